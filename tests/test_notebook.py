"""scripts/fipo_lite_notebook.ipynb, executed top to bottom on a real Jupyter kernel (CPU path, short settings)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "scripts" / "fipo_lite_notebook.ipynb"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")

# The tiny demo's task on the small tiny model, with small batches: three steps per run, ~10 s each.
SHORT = {"data.train": "synthetic:addition", "data.val": "synthetic:addition", "data.val_size": 4,
         "trainer.train_batch_size": 4, "trainer.gen_batch_size": 4, "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8,
         "rollout.n": 4, "rollout.max_new_tokens": 24, "trainer.eval_every": 1, "trainer.eval_k": 2,
         "trainer.lr": 5e-3, "algorithm.filter_groups.max_num_gen_batches": 2, "trainer.num_threads": 1}


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_committed_notebook_has_no_outputs_and_parameters_first():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must hold the parameters"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"commit the notebook with outputs cleared (cells {dirty})"


def test_notebook_runs_end_to_end_on_cpu(tiny_warm_model_dir, tiny_small_settings, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _tagged(nb, "parameters")
    overrides = {"model.path": "tiny", "model.cache_dir": str(tiny_warm_model_dir.parent), **tiny_small_settings, **SHORT}
    injected = nbformat.v4.new_code_cell("\n".join([
        "# injected by tests/test_notebook.py",
        "STEPS = 3", "SEEDS = [0]", "SAVE_EVERY = 3", "EVAL_K = 2", "CONFIG = 'configs/tiny_cpu.yaml'",
        f"RUNS_DIR = {str(tmp_path / 'runs')!r}", f"OVERRIDES = {json.dumps(overrides)}",
    ]))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(nb.cells.index(params) + 1, injected)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.time()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"notebook executed in {time.time() - t0:.0f}s")
    nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look: jupyter nbconvert --to html

    figure = _tagged(nb, "figure").outputs
    assert any("image/png" in o.get("data", {}) for o in figure), f"no inline figure: {figure}"
    table = _tagged(nb, "table").outputs
    html = "".join(o.get("data", {}).get("text/html", "") for o in table)
    assert "<table" in html and all(v in html for v in ("fipo", "dapo", "grpo")), f"no ablation table: {table}"
    assert (tmp_path / "runs" / "ablation" / "length_dynamics.png").is_file()
    assert (tmp_path / "runs" / "ablation" / "table.md").is_file()
    evaluation = "".join(o.get("text", "") for o in _tagged(nb, "evaluation").outputs)
    assert "Evaluation(avg@2" in evaluation, evaluation
