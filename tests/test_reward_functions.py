"""Your own reward end to end: a PATH.py:NAME file in a tiny run (per-reward metrics, the row's extra
fields), a Python function through the notebook API, and an `ablate` subprocess loading the same file."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from fipo_lite import ablation, api, metrics as M
from fipo_lite.config import ConfigError, load_config
from fipo_lite.trainer import main, train

ROOT = Path(__file__).resolve().parents[1]

REWARDS = textwrap.dedent('''
    import json, os

    def _log(**record):
        with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\\n")

    def ends_right(response, ground_truth, *, prompt, extra):
        ok = response.strip().endswith(ground_truth)
        _log(fn="ends_right", response=response, score=float(ok), prompt=prompt, extra=extra)
        return {"score": float(ok), "acc": ok}

    def length(response, ground_truth, **kwargs):
        score = len(response) / 10
        _log(fn="length", response=response, score=score, keys=sorted(kwargs))
        return score

    def const(response, ground_truth):
        return 0.25
''')

SMALL = {"trainer.total_steps": 1, "trainer.train_batch_size": 2, "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 4,
         "rollout.n": 2, "rollout.max_new_tokens": 8, "trainer.eval_every": 0, "trainer.save_every": 0, "trainer.progress": False,
         "algorithm.filter_groups.enable": False}  # no filtering: the batch trained on is everything sampled


def _overrides(model_dir, out, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in {"model.path": model_dir, "output_dir": out, **SMALL, **extra}.items()]


def test_reward_file_in_a_tiny_run(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "mine.py").write_text(REWARDS)
    rows = [{"prompt": f"{a}+{a}", "answer": str(2 * a), "level": a, "extra_info": {"id": f"r{a}"}} for a in (11, 22, 33, 44)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # relative paths: taken from the working directory
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", _overrides(
        tiny_model_dir, tmp_path / "run", **{"data.train": "d.jsonl", "data.val": "d.jsonl", "data.val_size": 4, "trainer.save_every": 1,
                                            "reward.functions": "[{function: rw/mine.py:ends_right}, {function: rw/mine.py:length, weight: 0.5, name: len}]"}))
    assert cfg.reward.functions[1].function == f"{tmp_path}/rw/mine.py:length"  # stored absolute
    row = train(cfg)
    calls = [json.loads(line) for line in (tmp_path / "rw" / "calls.jsonl").read_text().splitlines()]
    right = [c for c in calls if c["fn"] == "ends_right"]
    length = [c for c in calls if c["fn"] == "length"]
    assert len(right) == len(length) == 4  # 2 prompts x 2 samples, each reward once per sample
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert row["reward/ends_right/mean"] == pytest.approx(mean([c["score"] for c in right]))
    assert row["reward/len/mean"] == pytest.approx(mean([c["score"] for c in length])) and row["reward/len/mean"] > 0
    assert row[M.REWARD_MEAN] == pytest.approx(row["reward/ends_right/mean"] + 0.5 * row["reward/len/mean"])
    assert row[M.ACCURACY] == row["reward/ends_right/mean"]  # the first reward's `acc` is the accuracy
    assert row[M.reward_component("len", sampled=True)] == pytest.approx(row["reward/len/mean"])
    by_prompt = {r["prompt"]: r for r in rows}
    for c in right:  # the chat prompt and the row's other fields (extra_info merged in) reach the function
        source = by_prompt[c["prompt"][-1]["content"]]
        assert c["prompt"] == [{"role": "user", "content": source["prompt"]}]
        assert c["extra"] == {"level": source["level"], "id": source["extra_info"]["id"]}
    assert all(c["keys"] == ["data_source", "extra", "prompt"] for c in length)  # **kwargs: every context keyword
    assert M.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["reward/len/mean"] == pytest.approx(row["reward/len/mean"])
    # evaluate scores the run with its first reward (the accuracy one), loaded from the file again
    ev = api.evaluate(tmp_path / "run", k=2)
    calls = [json.loads(line) for line in (tmp_path / "rw" / "calls.jsonl").read_text().splitlines()][len(calls):]
    assert {c["fn"] for c in calls} == {"ends_right"} and len(calls) == 4 * 2
    assert ev.summary[M.VAL_AVG] == pytest.approx(mean([c["score"] for c in calls]))
    assert ev.summary[M.VAL_REWARD] == pytest.approx(mean([c["score"] for c in calls]))
    assert ev.summary[M.reward_component("ends_right", val=True)] == pytest.approx(mean([c["score"] for c in calls]))


def quarter(response, ground_truth):
    return 0.25


def test_notebook_api_takes_python_functions(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "api"
    offset = 0.5
    run = api.train(ROOT / "configs" / "tiny_cpu.yaml", *_overrides(tiny_model_dir, out),
                    reward_funcs={"closure": lambda response, ground_truth: offset, "q": quarter, "ex": "exact"},
                    reward_weights=[1.0, 2.0, 3.0])
    row = run.rows[-1]
    assert row["reward/closure/mean"] == 0.5 and row["reward/q/mean"] == 0.25  # run in the forked reward workers
    assert row[M.REWARD_MEAN] == pytest.approx(0.5 + 2 * 0.25 + 3 * row["reward/ex/mean"])
    assert [e.function for e in run.config.reward.functions] == [
        "callable:test_reward_functions.test_notebook_api_takes_python_functions.<locals>.<lambda>",
        "callable:test_reward_functions.quarter", "exact"]
    # the run's config cannot bring a Python function back: the command says what to do
    assert main(["--config", str(out / "config.yaml"), "trainer.total_steps=2"]) == 2
    assert "a Python function handed to fipo_lite.train(reward_funcs=...)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"reward_funcs\[0\] has no name \(a lambda\?\): give it one"):
        api.train(ROOT / "configs" / "tiny_cpu.yaml", reward_funcs=[lambda r, t: 1.0])
    with pytest.raises(ConfigError, match="reward_weights has 1 numbers for 2 reward_funcs"):
        api.train(ROOT / "configs" / "tiny_cpu.yaml", reward_funcs=[quarter, "exact"], reward_weights=[1.0])


# A stand-in for `python -m fipo_lite train` (whose logging the tests above check): the same config loading
# from the same command line, then one scored response, in a fresh process without a model.
FAKE_TRAIN = textwrap.dedent('''
    import json, sys, pathlib
    from omegaconf import OmegaConf
    from fipo_lite.config import load_config
    from fipo_lite.rewards import RewardRunner
    cfg = load_config(sys.argv[2], sys.argv[3:])
    out = pathlib.Path(cfg.output_dir); out.mkdir(parents=True, exist_ok=True)
    scored = RewardRunner(cfg.reward, 8)(["answer 1"], ["1"])
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    rows = [{"step": s, **{f"reward/{k}/mean": v[0] for k, v in scored.components.items()}} for s in range(cfg.trainer.total_steps + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
''')


def test_ablate_subprocesses_load_the_same_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(REWARDS)
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({
        "name": "own", "base": str(ROOT / "configs" / "tiny_cpu.yaml"), "runs_dir": "runs", "out_dir": "out",
        "common": ["trainer.total_steps=2"], "variants": {"const": ["reward.function=mine.py:const"]}}))
    monkeypatch.chdir(tmp_path)  # the relative path resolves here, in this process and in the run's subprocess
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # this checkout's fipo_lite
    monkeypatch.setenv(ablation.TRAIN_CMD_ENV, json.dumps([sys.executable, str(tmp_path / "fake_train.py")]))
    assert ablation.main([str(grid)]) == 0, (tmp_path / "runs" / "const" / "seed_0" / "train.log").read_text()
    run = tmp_path / "runs" / "const" / "seed_0"
    assert "reward.function=mine.py:const" in json.loads((run / "ablation_run.json").read_text())["command"]
    assert M.read_jsonl(run / "metrics.jsonl")[-1]["reward/const/mean"] == 0.25
    assert load_config(run / "config.yaml").reward.function == f"{tmp_path}/mine.py:const"
    # a reward that does not load stops the grid before any run, naming the variant, key and value
    grid.write_text(grid.read_text().replace("const", "nope"))
    assert ablation.main([str(grid)]) == 2
    err = capsys.readouterr().err
    assert f"error: variant 'nope': config key 'reward.function' is '{tmp_path}/mine.py:nope': " in err and "has no 'nope'" in err
    assert not (tmp_path / "runs" / "nope").exists()
