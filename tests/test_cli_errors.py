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
