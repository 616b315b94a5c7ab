"""Completions on disk and on the console, the warmup given as a share of the steps, throughput and memory
metrics: one short run on the warm tiny model, resumed once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fipo_lite import metrics as M, samples as S
from fipo_lite.config import ConfigError, load_config, warmup_steps
from fipo_lite.trainer import make_scheduler, train

ROOT = Path(__file__).resolve().parents[1]
CAP = 10  # rows per step: fewer than one generation batch samples (4 prompts x 4)
ROLLOUT_FIELDS = {"step", "group", "gen_batch", "sample", "kept", "index", "data_source", "prompt", "ground_truth", "response",
                  "reward", "correct", "pred", "response_length", "truncated", "advantage"}


def _cfg(model_dir: Path, out: Path, **extra):
    base = {
        "model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 3, "trainer.train_batch_size": 2,
        "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 24,
        "trainer.eval_every": 2, "trainer.eval_k": 2, "data.val_size": 3, "trainer.save_every": 1, "trainer.progress": False,
        "algorithm.filter_groups.max_num_gen_batches": 2, "trainer.gen_batch_size": 4, "trainer.lr": 5e-3,
        "trainer.warmup_ratio": 1.0, "trainer.log_rollouts_max": CAP,
        "trainer.print_samples_every": 2, "trainer.print_samples_num": 2,
        "data.train": "synthetic:addition", "data.val": "synthetic:addition",
    }
    base.update(extra)
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def run(tiny_warm_model_dir, tmp_path_factory):
    """3 steps, then a rollback to the checkpoint of step 2 that redoes step 3; the console output of both."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("samples") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(_cfg(tiny_warm_model_dir, out))
        first = {f"{d}/{f.name}": f.read_text() for d in (S.ROLLOUTS_DIR, S.EVAL_DIR) for f in sorted((out / d).iterdir())}
        with open(out / S.ROLLOUTS_DIR / "step_000003.jsonl", "a") as f:  # were it appended to, a redone step would show twice
            f.write('{"step": 3, "stale": true}\n')
        train(_cfg(tiny_warm_model_dir, out, **{"trainer.resume": out / "checkpoints" / "step_000002"}))
    return out, first, err.getvalue()


def test_every_step_writes_its_completions_capped_trained_groups_first(run):
    out, _, _ = run
    metrics = {r[M.STEP]: r for r in M.read_jsonl(out / "metrics.jsonl")}
    assert sorted(p.name for p in (out / S.ROLLOUTS_DIR).iterdir()) == [f"step_{s:06d}.jsonl" for s in (1, 2, 3)]
    for step in (1, 2, 3):
        rows = S.read_rows(S.step_file(out, S.ROLLOUTS_DIR, step))
        m = metrics[step]
        sampled = 4 * m[M.SAMPLED_GROUPS]
        assert len(rows) == min(CAP, sampled)  # the cap holds, and it bites: a generation batch samples 16
        for r in rows:
            assert set(r) == ROLLOUT_FIELDS and r["step"] == step
            assert isinstance(r["response"], str) and r["prompt"] and r["response_length"] >= 0
            assert r["correct"] == (r["reward"] > 0) and (r["advantage"] is not None) == r["kept"]
        kept = [r for r in rows if r["kept"]]
        assert rows[: len(kept)] == kept  # trained groups first
        assert len({r["group"] for r in kept}) == min(m[M.KEPT_GROUPS], math.ceil(CAP / 4))
        for g in {r["group"] for r in kept}:  # a kept group's advantages are its rewards, centred and scaled
            grp = [r for r in kept if r["group"] == g]
            assert sum(r["advantage"] for r in grp) == pytest.approx(0, abs=1e-6)
            assert len({r["reward"] for r in grp}) > 1  # dynamic sampling kept it for its mixed rewards
        assert all(r["gen_batch"] < m[M.NUM_GEN_BATCHES] for r in rows)


def test_every_evaluation_writes_all_its_samples(run):
    out, _, _ = run
    metrics = {r[M.STEP]: r for r in M.read_jsonl(out / "metrics.jsonl")}
    assert sorted(p.name for p in (out / S.EVAL_DIR).iterdir()) == [f"step_{s:06d}.jsonl" for s in (0, 2, 3)]
    for step in (0, 2, 3):
        rows = S.read_rows(S.step_file(out, S.EVAL_DIR, step))
        assert len(rows) == 3 * 2  # val_size x eval_k: evaluations are not capped
        assert {"step", "sample", "index", "prompt", "ground_truth", "response", "reward", "correct", "pred"} <= set(rows[0])
        accs = [float(r["correct"]) for r in rows]
        assert sum(accs) / len(accs) == pytest.approx(metrics[step][M.VAL_AVG])


def test_a_resume_replaces_the_steps_it_redoes(run):
    """The resume from step 2 redid step 3 (and its evaluation): each file holds that step once, as the
    uninterrupted run wrote it (a resume reproduces the step), and the earlier steps' files are untouched."""
    out, first, _ = run
    assert len(first) == 6  # rollouts of steps 1-3, evaluations at 0, 2, 3
    for name, text in first.items():
        assert (out / name).read_text() == text, name
    assert not list(out.rglob("*.tmp"))


def test_console_shows_a_few_completions(run):
    _, _, err = run
    assert err.count("of its completions") == 1  # print_samples_every=2: step 2 only
    block = err.split("[fipo_lite] step 2: 2 of its completions", 1)[1]
    assert block.count("  prompt: ") == 2 and block.count("  response: ") == 2 and block.count("  reward ") == 2


def test_warmup_ratio_sets_the_lr_sequence(run):
    """warmup_ratio=1.0 of 3 steps under the constant schedule: the lr ramps over all 3 (1/3, 2/3, 1 of lr)."""
    out, _, _ = run
    logged = [r["actor/lr"] for r in M.read_jsonl(out / "metrics.jsonl") if r[M.STEP] > 0]
    assert logged == pytest.approx([5e-3 * 2 / 3, 5e-3, 5e-3])  # actor/lr: the lr set for the next step


def test_perf_metrics_are_logged_every_step(run):
    out, _, _ = run
    for r in M.read_jsonl(out / "metrics.jsonl"):
        if r[M.STEP] == 0:
            continue
        assert r[M.SAMPLE_TOKENS_PER_S] > 0 and r[M.PEAK_RSS_GB] > 0.05  # a Python process with torch loaded
        if r.get(M.NUM_UPDATES):
            assert r[M.UPDATE_TOKENS_PER_S] > 0
        assert (M.MAX_MEMORY_ALLOCATED_GB in r) == torch.cuda.is_available()


def test_switches_off(tiny_warm_model_dir, tmp_path, capsys):
    out = tmp_path / "off"
    train(_cfg(tiny_warm_model_dir, out, **{"trainer.log_rollouts": False, "trainer.print_samples_every": 0, "trainer.total_steps": 1,
                                            "trainer.eval_every": 0, "trainer.save_every": 0}))
    assert not (out / S.ROLLOUTS_DIR).exists() and not (out / S.EVAL_DIR).exists()
    assert "of its completions" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # schedules stepped without an optimizer step
def test_warmup_ratio_rules():
    t = load_config(None, ["trainer.warmup_ratio=0.1", "trainer.total_steps=30"]).trainer
    assert warmup_steps(t) == 3  # 0.1 x 30 is 3.0000000000000004 in floats: not 4
    assert warmup_steps(load_config(None, ["trainer.warmup_ratio=0.25", "trainer.total_steps=10"]).trainer) == 3  # rounded up
    assert warmup_steps(load_config(None, ["trainer.warmup_steps=5"]).trainer) == 5
    with pytest.raises(ConfigError, match=r"trainer.warmup_ratio=0.1 and trainer.warmup_steps=5 both set the warmup"):
        load_config(None, ["trainer.warmup_ratio=0.1", "trainer.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"'trainer.warmup_ratio' is 1.5; must be null .* or a number in \[0, 1\]"):
        load_config(None, ["trainer.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"'trainer.log_rollouts_max' is -1"):
        load_config(None, ["trainer.log_rollouts_max=-1"])
    # transformers' schedules get the warmup in steps: 0.5 x 6 = 3
    from transformers import get_scheduler

    cfg = load_config(None, ["trainer.lr_scheduler=cosine", "trainer.warmup_ratio=0.5", "trainer.total_steps=6"])
    ours = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg.trainer)
    ref = get_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=3, num_training_steps=6)
    for _ in range(6):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr())
        ours.step(), ref.step()
    cfg = load_config(None, ["trainer.warmup_ratio=0.5", "trainer.total_steps=4"])  # constant: ramp over 2 steps, then flat
    sched = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg.trainer)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs == [0.5, 1.0, 1.0, 1.0]


def test_a_longer_run_under_a_warmup_ratio_needs_the_opt_in(run, tiny_warm_model_dir):
    """The warmup is a share of total_steps: raising it on resume changes the lr to come (as under a decaying
    schedule), though the schedule is the constant one, whose total_steps may change otherwise."""
    from fipo_lite.rundir import RunDirError

    out, _, _ = run
    with pytest.raises(RunDirError, match=r"trainer.total_steps 3 -> 4.*allow_config_change"):
        train(_cfg(tiny_warm_model_dir, out, **{"trainer.total_steps": 4}))
