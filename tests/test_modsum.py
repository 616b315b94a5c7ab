"""The long-response task (synthetic:modsum20) and its off-policy config (configs/modsum_cpu.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fipo_lite import tasks
from fipo_lite.rewards import exact_reward

ROOT = Path(__file__).resolve().parents[1]


def _problem(ex):
    return tasks.task_of(ex).problem_of(ex.extra)


def test_modsum_prompt_answer_and_steps_agree():
    task = tasks.get_task("modsum20")
    for ex in tasks.make_examples("modsum20", 50, seed=0):
        digits = _problem(ex)
        assert len(digits) == 20
        assert ex.prompt[0]["content"] == " ".join(f"{chr(65 + i)}{d}" for i, d in enumerate(digits))
        assert ex.ground_truth == str(sum(digits) % 10)
        lines = task.steps(digits)
        running = 0
        for i, (line, d) in enumerate(zip(lines, digits)):
            label, prev, digit, new = re.fullmatch(r"([A-Z]) (\d)\+(\d)=(\d)", line).groups()
            assert (label, int(prev), int(digit)) == (chr(65 + i), running, d)
            running = (running + d) % 10
            assert int(new) == running
        for form in tasks.FORMS:
            text = tasks.format_response(task, digits, form)
            assert exact_reward(text, ex.ground_truth)[0] == 1.0
            assert tasks.classify_form(text, task) == form


def test_modsum_steps_take_at_least_150_tokens_and_direct_few():
    """The point of the task: the reliable answer is >= 150 tokens of work, the guess under 10."""
    from fipo_lite.tiny import build_tokenizer

    tok = build_tokenizer()
    task = tasks.get_task("modsum20")
    for ex in tasks.make_examples("modsum20", 20, seed=1):
        steps = tok(tasks.format_response(task, _problem(ex), "steps"), add_special_tokens=False)["input_ids"]
        direct = tok(tasks.format_response(task, _problem(ex), "direct"), add_special_tokens=False)["input_ids"]
        assert len(steps) >= 150 and len(direct) < 10


def test_modsum_splits_are_disjoint_deterministic_and_shuffled_by_seed():
    train = {tuple(e.extra["digits"]) for e in tasks.make_examples("modsum20", None, seed=0, split="train")}
    val = {tuple(e.extra["digits"]) for e in tasks.make_examples("modsum20", None, seed=0, split="val")}
    assert len(train) == len(val) == tasks.get_task("modsum20").pool
    assert not train & val
    a = tasks.make_examples("modsum20", 10, seed=3)
    assert [e.extra for e in a] == [e.extra for e in tasks.make_examples("modsum20", 10, seed=3)]
    assert [e.extra for e in a] != [e.extra for e in tasks.make_examples("modsum20", 10, seed=4)]
    answers = [e.ground_truth for e in tasks.make_examples("modsum20", 2000, seed=0)]
    assert len(set(answers)) == 10 and max(answers.count(str(d)) for d in range(10)) < 0.15 * len(answers)  # guessing ~ 1 in 10


def test_classify_form_checks_the_tasks_line_format():
    modsum, addition = tasks.get_task("modsum20"), tasks.get_task("addition")
    steps = "A 0+3=3\nB 3+9=2\nanswer 2"
    assert tasks.classify_form(steps, modsum) == "steps"
    assert tasks.classify_form(steps, addition) == "other"
    assert tasks.classify_form("3+9=12\nanswer 12", addition) == "steps"
    assert tasks.classify_form("A 0+3=3\nB 3+9=2", modsum) == "other"  # no final answer
    assert tasks.classify_form("answer 4", modsum) == "direct"


def test_unknown_task_names_the_valid_ones():
    from fipo_lite.errors import UserError

    with pytest.raises(UserError, match="modsum20"):
        tasks.make_examples("modsum", 4, seed=0)


def test_modsum_config_runs_the_recipes_off_policy_updates(tmp_path):
    """A few steps of configs/modsum_cpu.yaml on a small, briefly warm-started model: 8 optimizer steps
    per rollout batch, and FIPO's influence weights leave 1 on the later, off-policy mini-batches."""
    from fipo_lite import metrics as M
    from fipo_lite.config import load_config
    from fipo_lite.trainer import train

    cfg = load_config(str(ROOT / "configs/modsum_cpu.yaml"), [
        f"output_dir={tmp_path / 'run'}", f"model.cache_dir={tmp_path / 'cache'}", "model.tiny.hidden_size=64",
        "model.tiny.num_layers=2", "model.tiny.intermediate_size=128", "model.tiny.warm_start_steps=30",
        "model.tiny.prior_steps=10", "trainer.total_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.progress=false", "rollout.n=4", "algorithm.filter_groups.metric=score",
        "algorithm.filter_groups.max_num_gen_batches=2"])
    assert cfg.trainer.train_batch_size // cfg.trainer.ppo_mini_batch_size == 8 and cfg.reward.overlong.enable
    train(cfg)
    rows = M.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    full = [r for r in rows if r[M.KEPT_GROUPS] == cfg.trainer.train_batch_size]
    assert full, rows
    assert all(r[M.NUM_UPDATES] == 8 for r in full)
    assert all(r["actor/influence_max"] > 1.0 and r["actor/influence_frac_moved"] > 0 for r in full)
