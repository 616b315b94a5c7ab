"""Mistakes in data files, checkpoints and model paths end `train` and `evaluate` with one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fipo_lite import evaluation, trainer

ROOT = Path(__file__).resolve().parents[1]


def _train(capsys, model_dir, tmp_path, *overrides) -> str:
    rc = trainer.main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}",
                       "trainer.progress=false", "trainer.eval_every=0", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_malformed_jsonl_row(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n{not json\n")
    assert "train.jsonl: row 1 (line 2) is not valid JSON" in _train(capsys, tiny_model_dir, tmp_path, f"data.train={data}")


def test_parquet_without_prompt_column(capsys, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["1+1="], "answer": ["2"]}), data)
    assert "train.parquet: no 'prompt' column (columns: question, answer)" in _train(capsys, tiny_model_dir, tmp_path, f"data.train={data}")


def test_missing_checkpoint(capsys, tiny_model_dir, tmp_path):
    not_a_ckpt = tmp_path / "step_000003"
    not_a_ckpt.mkdir()
    assert str(not_a_ckpt) in _train(capsys, tiny_model_dir, tmp_path, f"trainer.resume={not_a_ckpt}")


@pytest.mark.parametrize("path,match", [("no/such-model-here", "cannot load a causal LM"), ("./nowhere", "neither a local model directory")])
def test_bad_model_path(capsys, tmp_path, path, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert match in _train(capsys, path, tmp_path)


def test_evaluate_malformed_jsonl(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text("[1, 2]\n")
    rc = evaluation.main(["--model", str(tiny_model_dir), "--data", str(data), "-k", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {data}: row 0: expected an object, got list"


# ----------------------------------------------------------------------------- config values (issue 19)
def _train_config_error(capsys, *args) -> str:
    """`train` with a bad config: one `error:` line naming the key, exit 2, before any model loads."""
    rc = trainer.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("override,key", [
    ("trainer.ppo_mini_batch_size=0", "trainer.ppo_mini_batch_size"),
    ("trainer.lr=nan", "trainer.lr"), ("trainer.lr=-0.01", "trainer.lr"), ("trainer.lr=inf", "trainer.lr"),
    ("trainer.weight_decay=-1", "trainer.weight_decay"),
    ("lora.r=0", "lora.r"), ("lora.dropout=1.5", "lora.dropout"), ("lora.target_modules=[]", "lora.target_modules"),
    ("algorithm.tau=inf", "algorithm.tau"),
    ("trainer.eval_k=0", "trainer.eval_k"), ("trainer.eval_temperature=0", "trainer.eval_temperature"),
    ("reward.num_workers=0", "reward.num_workers"),
    ("trainer.ppo_epochs=0", "trainer.ppo_epochs"), ("algorithm.kl_coef=nan", "algorithm.kl_coef"),
])
def test_bad_config_value_is_one_error_line(capsys, override, key):
    line = _train_config_error(capsys, "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), override)
    assert f"config key '{key}' is " in line and "must be" in line, line


def test_output_dir_naming_a_file_is_one_error_line(capsys, tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    line = _train_config_error(capsys, "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"output_dir={f}")
    assert f"config key 'output_dir' is '{f}'; must be a directory" in line


@pytest.mark.parametrize("text,key", [("trainer: 5\n", "config key 'trainer' is a section"), ("- 1\n- 2\n", "a config must be a mapping")])
def test_yaml_of_the_wrong_shape_is_one_error_line(capsys, tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert key in _train_config_error(capsys, "--config", str(path))


def test_python_m_fipo_lite_train_bad_value(tmp_path):
    """The real command line: `python -m fipo_lite train --config configs/tiny_cpu.yaml KEY=VALUE`."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "fipo_lite", "train", "--config", "configs/tiny_cpu.yaml", "trainer.ppo_mini_batch_size=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == "error: config key 'trainer.ppo_mini_batch_size' is 0; must be >= 1"
