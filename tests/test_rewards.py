"""Rewards (spec section 9): extraction and normalisation, overlong shaping, and failure safety."""

from __future__ import annotations

import time

import pytest

from fipo_lite import rewards as R
from fipo_lite.config import OverlongConfig, RewardConfig
from fipo_lite.data import load_examples


def test_exact_reward_takes_last_integer():
    assert R.exact_reward("7+5=12\nanswer 132", "132") == (1.0, True, "132")
    assert R.exact_reward("answer -4", "-4")[:2] == (1.0, True)
    assert R.exact_reward("answer 131", "132")[:2] == (0.0, False)
    assert R.exact_reward("no digits", "1") == (0.0, False, None)


@pytest.mark.parametrize("text,norm", [
    ("34", "34"), ("x = 5", "5"), ("$\\frac{3}{4}$.", "\\frac{3}{4}"), ("\\frac34", "\\frac{3}{4}"),
    ("\\sqrt2", "\\sqrt{2}"), ("1,000 dollars", "1000"), ("12 \\text{ cm}", "12"), ("\\boxed{17}", "17"),
    ("90^\\circ", "90"), ("\\textbf{(B)}", "(B)"), ("1,2", "12"), ("(1, 2)", "(1,2)"), ("\\$5", "5"),
])
def test_normalize_answer(text, norm):
    assert R.normalize_answer(text) == norm


@pytest.mark.parametrize("response,truth,ok", [
    ("... so the result is\nAnswer: 34", "34", True),
    ("answer: $\\frac{3}{4}$", "\\frac34", True),
    ("ANSWER : 1,000 dollars", "1000", True),
    ("Answer: \\boxed{17}", "17", True),
    ("Answer: x = 5", "5", True),
    ("Answer: 25", "025", True),  # zero-padded AIME truth: integers compare by value
    ("Answer: 34\nAnswer: 35", "34", False),  # the last match counts
    ("Answer: 35", "34", False),
    ("The answer is 34", "34", False),  # no 'Answer:' line
    ("Answer: 34\n" + "x" * 280, "34", True),  # still inside the last 300 characters
    ("Answer: 34\n" + "x" * 400, "34", False),  # outside them
])
def test_dapo_math_reward(response, truth, ok):
    score, correct, _ = R.dapo_math_reward(response, truth)
    assert correct is ok and score == (1.0 if ok else -1.0)


def test_dapo_math_on_shared_ground_truths(shared_data_dir):
    """Every truth of the shared DAPO sample is matched by its own `Answer:` line and by no other."""
    truths = [e.ground_truth for e in load_examples(str(shared_data_dir / "dapo-math-sample16.parquet"))]
    for t in truths:
        assert R.dapo_math_reward(f"work...\nAnswer: {t}", t)[:2] == (1.0, True)
        assert R.dapo_math_reward(f"work...\nAnswer: {int(t) + 1}", t)[1] is False


def test_boxed_reward_uses_math_verify(shared_data_dir):
    assert R.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert R.last_boxed("\\boxed{a^{2}}") == "a^{2}"
    assert R.last_boxed("\\boxed{unclosed") is None
    assert R.boxed_reward("so \\boxed{0.5}", "\\frac{1}{2}")[:2] == (1.0, True)
    assert R.boxed_reward("so \\boxed{205}", "204")[:2] == (-1.0, False)
    assert R.boxed_reward("no box", "204") == (-1.0, False, None)
    aime = [e.ground_truth for e in load_examples(str(shared_data_dir / "aime-2024.parquet"))]
    for t in aime[:8] + ["025", "073"]:  # incl. zero-padded truths
        assert R.boxed_reward(f"... so the answer is \\boxed{{{int(t)}}}.", t)[1] is True
    assert R.boxed_reward("\\boxed{25}", "073")[1] is False


def test_overlong_penalty_matches_spec():
    assert R.overlong_penalty(10, 100, 20) == 0.0
    assert R.overlong_penalty(80, 100, 20) == 0.0
    assert R.overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert R.overlong_penalty(100, 100, 20, penalty_factor=2.0) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="buffer_len"):
        R.overlong_penalty(1, 10, 0)


def test_auto_picks_by_data_source_and_answer_format():
    assert R.pick_reward("auto", "synthetic/addition", "Answer: 3") == "exact"
    assert R.pick_reward("auto", "math_dapo", "...\nAnswer: 3") == "dapo_math"
    assert R.pick_reward("auto", "math_dapo", "... \\boxed{3}") == "boxed"
    assert R.pick_reward("auto", "aime24", "Answer: 3\n" + "x" * 400) == "boxed"
    assert R.pick_reward("boxed", "synthetic/addition", "") == "boxed"


def test_runner_scores_shapes_and_extracts():
    cfg = RewardConfig(name="auto", overlong=OverlongConfig(enable=True, buffer_len=4))
    out = R.RewardRunner(cfg, max_response_length=10)(
        ["answer 3", "answer 3", "Answer: 1,000", "so \\boxed{1/2}", "nothing"], ["3", "3", "1000", "0.5", "7"],
        ["synthetic/addition", "synthetic/addition", "math_dapo", "aime24", "aime24"], [5, 9, 1, 1, 10])
    assert out.accs == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert out.scores == [1.0, pytest.approx(0.25), 1.0, 1.0, -2.0]  # -1 wrong, -1 overlong at the limit
    assert out.preds == ["3", "3", "1000", "1/2", None] and out.failures == 0


def _flaky(response, truth):
    if response == "boom":
        raise RuntimeError("reward bug")
    if response == "hang":
        time.sleep(60)
    if response == "gil":  # a C-level computation that holds the GIL: a thread-based timeout would hang here
        return float(9 ** (9 ** 8) > 0), True, "gil"  # ~30 s of one C call
    return 1.0, True, response


R.register("_test_flaky")(_flaky)


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_survives_raising_and_runaway_rewards(workers):
    runner = R.RewardRunner(RewardConfig(name="_test_flaky", timeout_s=0.5, num_workers=workers), max_response_length=16)
    t0 = time.monotonic()
    out = runner(["ok", "boom", "hang", "ok", "gil", "ok"], ["x"] * 6, ["s"] * 6, [1] * 6)
    assert time.monotonic() - t0 < 10
    assert out.scores == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0] and out.accs == out.scores
    assert out.failures == 3 and out.failed == [1, 2, 4]
    assert "RuntimeError: reward bug" in out.reasons[0] and "past 0.5s" in out.reasons[1] and "past 0.5s" in out.reasons[2]
    again = runner(["ok", "ok"], ["x", "x"])  # replaced workers keep serving
    assert again.accs == [1.0, 1.0] and again.failures == 0
    runner.close()


def test_runner_inline_mode_and_bad_input():
    runner = R.RewardRunner(RewardConfig(name="_test_flaky", timeout_s=0), max_response_length=16)
    out = runner(["ok", "boom"], ["x", "x"])
    assert out.accs == [1.0, 0.0] and out.failed == [1]
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        runner(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="reward.name 'nope' is unknown; valid"):
        R.RewardRunner(RewardConfig(name="nope"), 10)
    with pytest.raises(ValueError, match="num_workers"):
        R.RewardRunner(RewardConfig(num_workers=0), 10)
    with pytest.raises(ValueError, match="buffer_len"):
        R.RewardRunner(RewardConfig(overlong=OverlongConfig(enable=True, buffer_len=32)), 16)
