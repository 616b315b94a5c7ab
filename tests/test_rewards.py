"""Rewards (spec section 9): extraction and normalisation, overlong shaping, and failure safety."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fipo_lite import rewards as R
from fipo_lite.config import OverlongConfig, RewardConfig, RewardFunctionConfig as R_FN
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


# ----------------------------------------------------------------------------- your own reward functions
USER_REWARDS = '''
import math

def quarter(response, ground_truth):
    return 0.25

def tagged(response, ground_truth, *, prompt, extra):
    return {"score": float(extra["level"]), "acc": response == ground_truth, "pred": prompt[-1]["content"]}

def everything(response, ground_truth, **kw):
    return float(len(kw)), False, ",".join(sorted(kw))

def source_only(response, ground_truth, data_source=None):
    return (1.0 if data_source == "s" else 0.0), True, data_source

def bad_value(response, ground_truth):
    return math.nan if response == "nan" else "text"

def one_arg(response):
    return 1.0

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_rewards(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(USER_REWARDS)
    return f


def _fns(*entries, **kw):
    return RewardConfig(functions=[R_FN(function=f, weight=w, name=n) for f, w, n in entries], **kw)


@pytest.mark.parametrize("timeout_s", [0, 5])  # in this process, and in a forked worker
def test_user_functions_get_context_weights_combine_and_each_is_reported(user_rewards, timeout_s):
    f = str(user_rewards)
    cfg = _fns((f"{f}:tagged", 1.0, None), (f"{f}:quarter", 2.0, "q"), (f"{f}:everything", 0.5, None), (f"{f}:source_only", 1.0, None),
               timeout_s=timeout_s, overlong=OverlongConfig(enable=True, buffer_len=4))
    runner = R.RewardRunner(cfg, max_response_length=10)
    prompts = [[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]]
    out = runner(["7", "x"], ["7", "8"], ["s", "t"], [1, 10], prompts=prompts, extras=[{"level": 2}, {"level": 5}])
    assert out.failures == 0
    assert out.components == {"tagged": [2.0, 5.0], "q": [0.25, 0.25], "everything": [3.0, 3.0], "source_only": [1.0, 0.0]}
    # weighted sum (the overlong penalty on the total: -1 at the limit); correct and pred from the first reward
    assert out.scores == [2.0 + 0.5 + 1.5 + 1.0, 5.0 + 0.5 + 1.5 + 0.0 - 1.0]
    assert out.accs == [1.0, 0.0] and out.preds == ["p0", "p1"]
    runner.close()


def test_built_ins_in_the_list_and_the_default_unchanged(user_rewards):
    f = str(user_rewards)
    runner = R.RewardRunner(_fns(("auto", 1.0, None), (f"{f}:quarter", -1.0, None), timeout_s=0), max_response_length=10)
    out = runner(["answer 3", "Answer: 5"], ["3", "4"], ["synthetic/addition", "math_dapo"])
    assert out.components == {"auto": [1.0, -1.0], "quarter": [0.25, 0.25]} and out.scores == [0.75, -1.25]
    assert out.accs == [1.0, 0.0] and out.preds == ["3", "5"]
    one = R.RewardRunner(RewardConfig(function=f"{f}:quarter", timeout_s=0), 10)(["a"], ["b"])
    assert one.components == {"quarter": [0.25]} and one.scores == [0.25] and one.accs == [1.0]  # a number: correct when > 0
    default = R.RewardRunner(RewardConfig(name="exact", timeout_s=0), 10)(["answer 3"], ["3"])
    assert default.components == {} and default.scores == [1.0]  # reward.name alone: as before, no per-reward metrics


def test_a_bad_return_value_is_a_scored_failure_named_by_its_reward(user_rewards):
    runner = R.RewardRunner(_fns((f"{user_rewards}:quarter", 1.0, None), (f"{user_rewards}:bad_value", 1.0, None), timeout_s=0), 10)
    out = runner(["nan", "ok"], ["x", "x"])
    assert out.failures == 2 and out.scores == [0.0, 0.0] and out.components["quarter"][0] != out.components["quarter"][0]  # NaN
    assert out.reasons[0] == "bad_value: ValueError: the reward's score is nan"
    assert out.reasons[1].startswith("bad_value: TypeError: a reward returns a number, (score, correct, pred) or")


@pytest.mark.parametrize("spec,message", [
    ("missing.py:f", "file {dir}/missing.py not found"),
    ("my_rewards.py:nope", "has no 'nope' (functions there: ['bad_value', 'everything', 'one_arg', 'quarter', 'source_only', 'tagged'])"),
    ("my_rewards.py:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not a function but 3 (int)"),
    ("my_rewards.py:one_arg", "one_arg(response) cannot be called as fn(response, ground_truth, *, prompt=..., data_source=..., extra=...)"),
    ("broken.py:f", "running {dir}/broken.py raised NameError: name 'undefined_name' is not defined"),
])
def test_bad_reward_function_specs_name_the_key_and_value(user_rewards, spec, message, monkeypatch, capsys):
    from fipo_lite.trainer import main

    (user_rewards.parent / "broken.py").write_text("x = undefined_name\n")
    monkeypatch.chdir(user_rewards.parent)  # a relative path is taken from the working directory
    full = f"{user_rewards.parent}/{spec}"
    with pytest.raises(R.RewardError) as err:
        R.RewardRunner(RewardConfig(function=full), 10)
    assert str(err.value).startswith(f"config key 'reward.function' is {full!r}: ") and message.format(dir=user_rewards.parent) in str(err.value)
    # the command: one line, before any model loads or the run directory is made
    assert main([f"reward.function={spec}", f"output_dir={user_rewards.parent / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {err.value}"] and not (user_rewards.parent / "run").exists()


def test_config_shapes_of_reward_functions(tmp_path, monkeypatch):
    from fipo_lite.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["reward.functions=[{function: sub/r.py:f, weight: 0.5}, {function: exact, name: ok}]"])
    assert [(e.function, e.weight, e.name) for e in cfg.reward.functions] == [(f"{tmp_path}/sub/r.py:f", 0.5, None), ("exact", 1.0, "ok")]
    assert load_config(None, ["reward.function=~/r.py:f"]).reward.function == str(Path.home() / "r.py") + ":f"
    for overrides, message in [
        (["reward.function=r.py"], "config key 'reward.function' is 'r.py'; must be PATH.py:NAME"),
        (["reward.functions=[{function: nope}]"], "config key 'reward.functions[0].function' is 'nope'; must be PATH.py:NAME"),
        (["reward.functions=[{weight: 2}]"], "config key 'reward.functions[0].function' is ''"),
        (["reward.function=r.py:f", "reward.functions=[{function: exact}]"], "'reward.function' and 'reward.functions' are both set"),
        (["reward.functions=[{function: exact}, {function: a.py:exact}]"], "two rewards are named 'exact'"),
        (["reward.functions=[{function: exact, weight: .inf}]"], "config key 'reward.functions[0].weight' is inf; must be a finite number"),
        (["reward.functions=[{function: exact, name: a/b}]"], "config key 'reward.functions[0].name' is 'a/b'"),
        (["reward.functions=[{function: exact, wieght: 2}]"], "unknown key 'wieght' in an entry of reward.functions"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)


def test_spawned_workers_reload_files_and_refuse_what_cannot_travel(user_rewards, monkeypatch):
    import pickle

    c = R.build_components(RewardConfig(function=f"{user_rewards}:quarter"))[0]
    R._LOADED.clear()  # as in a fresh (spawned) process: the copy loads the file again, from its spec
    copy = pickle.loads(pickle.dumps(c))
    assert copy.fn is not c.fn and copy("r", "t", ("s", None, None)) == (0.25, True, None)
    monkeypatch.setattr(R.mp, "get_all_start_methods", lambda: ["spawn"])
    cfg = RewardConfig(functions=[R_FN(function="callable:__main__.<lambda>", name="lam")])
    with pytest.raises(R.RewardError, match="reward 'lam' .* cannot be sent to the reward worker processes"):
        R.RewardRunner(cfg, 10, callables={"lam": lambda r, t: 1.0})
    assert R.RewardRunner(RewardConfig(functions=cfg.functions, timeout_s=0), 10, callables={"lam": lambda r, t: 1.0})(["a"], ["b"]).scores == [1.0]
