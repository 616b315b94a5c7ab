"""The notebook API (fipo_lite/api.py): config spellings, train + interrupt + resume, ablate, plot, evaluate."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fipo_lite
from fipo_lite import api, metrics as M
from fipo_lite.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def test_import_stays_light_and_api_names_resolve():
    code = ("import sys, fipo_lite; heavy = [m for m in ('pandas', 'matplotlib', 'transformers', 'fipo_lite.api') if m in sys.modules];"
            "print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert fipo_lite.train is api.train and fipo_lite.plot is api.plot and fipo_lite.Run is api.Run
    # ablate / evaluate are plain API functions; importing the command modules (ablation, evaluation) leaves them be
    importlib.import_module("fipo_lite.ablation")
    importlib.import_module("fipo_lite.evaluation")
    importlib.import_module("fipo_lite.exporting")
    assert fipo_lite.ablate is api.ablate and fipo_lite.evaluate is api.evaluate and fipo_lite.export is api.export
    assert inspect.isfunction(fipo_lite.ablate) and inspect.isfunction(fipo_lite.evaluate) and inspect.isfunction(fipo_lite.export)
    assert "variants" in inspect.signature(fipo_lite.ablate).parameters
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        fipo_lite.trian  # noqa: B018


def test_override_spellings_agree_and_bad_keys_name_themselves():
    a = api.resolve_config(TINY, "trainer.total_steps=7", "algorithm.tau=8", "seed=3")
    b = api.resolve_config(TINY, **{"trainer.total_steps": 7, "algorithm.tau": 8}, seed=3)
    c = api.resolve_config(TINY, trainer={"total_steps": 7}, algorithm={"tau": 8}, seed=3)
    d = api.resolve_config({"trainer": {"total_steps": 7}, "algorithm": {"tau": 8}, "seed": 3, "model": {"device": "cpu"}},
                           **{"model.path": "tiny", "output_dir": Path("runs/tiny_cpu")})
    for cfg in (a, b, c, d):
        assert (cfg.trainer.total_steps, cfg.algorithm.tau, cfg.seed) == (7, 8.0, 3)
    assert a == b == c
    assert api.resolve_config(TINY, "trainer.lr=1", trainer={"lr": 2}).trainer.lr == 2  # keywords win
    with pytest.raises(ConfigError, match="unknown config key 'trainer.total_stepz'.*trainer.total_steps"):
        api.resolve_config(TINY, trainer={"total_stepz": 5})
    with pytest.raises(ConfigError, match="trainer.total_steps"):
        api.resolve_config(TINY, **{"trainer.total_steps": "many"})
    with pytest.raises(ConfigError, match="YAML path, a dict or None"):
        api.resolve_config(42)
    assert api._dotlist({"algorithm": {"loss_mode": "dapo", "clip_high": None}, "trainer.lr": 1e-3, "lora.target_modules": ["q_proj"]}) == [
        "algorithm.loss_mode=dapo", "algorithm.clip_high=null", "trainer.lr=0.001", 'lora.target_modules=["q_proj"]']
    with pytest.raises(ConfigError, match="key=value"):
        api._dotlist(["trainer.lr"])


def _small(model_dir: Path, out: Path, **extra) -> dict:
    return {"model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 3, "trainer.train_batch_size": 4,
            "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 24,
            "trainer.eval_every": 2, "trainer.eval_k": 2, "data.val_size": 4, "trainer.save_every": 1, "trainer.progress": False,
            "algorithm.filter_groups.max_num_gen_batches": 3, "trainer.lr": 5e-3, "trainer.gen_batch_size": 4,
            "data.train": "synthetic:addition", "data.val": "synthetic:addition", **extra}


def _steps(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_interrupted_train_resumes_to_the_same_run(tiny_warm_model_dir, tmp_path, monkeypatch):
    whole = api.train(TINY, **_small(tiny_warm_model_dir, tmp_path / "whole"))
    assert [r[M.STEP] for r in whole.rows] == [0, 1, 2, 3]

    def interrupt_in_step_3(path, record):  # Ctrl-C in step 3, after its update, before its metrics row and checkpoint
        if record.get(M.STEP) == 3:
            raise KeyboardInterrupt
        return append(path, record)

    append = M.append_jsonl
    monkeypatch.setattr(M, "append_jsonl", interrupt_in_step_3)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt, match="resumes it from its checkpoint at step 2"):
        api.train(TINY, **_small(tiny_warm_model_dir, cut))
    assert [r[M.STEP] for r in M.read_jsonl(cut / "metrics.jsonl")] == [0, 1, 2]
    monkeypatch.setattr(M, "append_jsonl", append)

    run = api.train(TINY, **_small(tiny_warm_model_dir, cut))
    assert _steps(run.rows) == _steps(whole.rows)  # same metrics, step for step, as the uninterrupted run
    assert run.checkpoint.name == "step_000003" and run.last[M.STEP] == 3
    assert list(run.metrics.index) == [0, 1, 2, 3] and M.VAL_AVG in run.metrics.columns
    assert "step 3/3" in repr(run) and run.config.trainer.total_steps == 3
    from fipo_lite import trainer

    monkeypatch.setattr(trainer, "train", lambda cfg: pytest.fail("a finished run should not load its model again"))
    again = api.train(TINY, **_small(tiny_warm_model_dir, cut))  # finished: returned as it is
    assert _steps(again.rows) == _steps(run.rows)
    assert api.Run.load(cut).config == run.config

    ev = run.evaluate(k=2)  # the run's val data, size and response length
    assert ev.summary["val/num_problems"] == 4 and ev.summary["val/k"] == 2
    assert len(ev.problems) == 4 and (cut / "eval" / "summary.json").is_file() and "avg@2" in repr(ev)
    with pytest.raises(ValueError, match="needs data="):
        api.evaluate(tiny_warm_model_dir)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="without finished checkpoints"):
        api.evaluate(tmp_path / "empty_run", data="synthetic:addition")


def test_ablate_in_code_grid_table_and_plot(tmp_path, monkeypatch):
    from test_ablate import FAKE_TRAIN

    from fipo_lite import ablation

    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setenv(ablation.TRAIN_CMD_ENV, json.dumps([sys.executable, str(fake)]))
    runs = tmp_path / "grid"
    table = fipo_lite.ablate(base=TINY, variants={"t8": {"algorithm.tau": 8}, "t256": ["algorithm.tau=256"]}, seeds=[0, 1],
                             common={"trainer": {"total_steps": 10, "eval_every": 2}}, name="taus", runs_dir=runs)
    assert list(table.index) == ["t8", "t256"] and list(table["seeds"]) == [2, 2]
    # the fake trainer's val accuracy: min(1, 0.1 * step + 0.01 * seed + tau / 1000), final step 10
    assert table.loc["t8", "final_val_acc"] == pytest.approx(1.0) and table.loc["t8", "initial_val_acc"] == pytest.approx(0.013)
    assert table.loc["t8", "initial_val_acc_std"] == pytest.approx(0.01 / 2**0.5)
    assert table.loc["t256", "final_mean_length"] == pytest.approx(10 + 10 + 32 + 0.5)
    assert table.attrs["runs"]["t8"] == [str(runs / "t8" / "seed_0"), str(runs / "t8" / "seed_1")]
    assert (runs / "table.md").is_file() and (runs / "taus_seed0.png").is_file()
    assert ablation.load_ablation(runs / "ablation.yaml").variants == {"t8": ["algorithm.tau=8"], "t256": ["algorithm.tau=256"]}

    fig = fipo_lite.plot(table, tmp_path / "fig.png", title="taus")
    assert len(fig.axes) == 15 and (tmp_path / "fig.png").stat().st_size > 10_000
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["t8", "t256"]
    fig = fipo_lite.plot({"a": runs / "t8" / "seed_0"}, labels=["renamed"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["renamed"]
    with pytest.raises(ValueError, match="labels has 1 names for 2 runs"):
        fipo_lite.plot([runs / "t8" / "seed_0", runs / "t8" / "seed_1"], labels=["x"])

    # a dict base is written next to the runs; a grid file works too; and the two ways cannot mix
    dict_runs = tmp_path / "dict_base"
    fipo_lite.ablate(base={"trainer": {"total_steps": 4}}, variants={"only": {}}, common={"trainer.total_steps": 4}, runs_dir=dict_runs)
    assert "total_steps: 4" in (dict_runs / "base.yaml").read_text()
    with pytest.raises(ValueError, match="not both"):
        fipo_lite.ablate(runs / "ablation.yaml", base=TINY, variants={"x": {}})
    with pytest.raises(ValueError, match="base= .* and variants="):
        fipo_lite.ablate(base=TINY)
    again = fipo_lite.ablate(runs / "ablation.yaml")  # everything finished: skipped, same table
    assert again.equals(table)
