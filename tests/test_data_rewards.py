"""Data loaders on the real verl schema, and rewards (spec section 9) including failure safety."""

from __future__ import annotations

import json
import time

import pytest

from fipo_lite import rewards as R
from fipo_lite.config import RewardConfig
from fipo_lite.data import load_examples


# ----------------------------------------------------------------------------- data
def test_verl_parquet_files_load(shared_data_dir):
    aime = load_examples(str(shared_data_dir / "aime-2024.parquet"))
    assert len(aime) == 30 and aime[0].data_source == "aime24"
    assert aime[0].prompt[0]["role"] == "user" and "boxed" in aime[0].prompt[0]["content"]
    assert all(e.ground_truth.isdigit() for e in aime)
    dapo = load_examples(str(shared_data_dir / "dapo-math-sample16.parquet"), n=5)
    assert len(dapo) == 5 and dapo[0].ground_truth == "34" and "dapo" in dapo[0].data_source


def test_jsonl_flat_and_verl_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1", "answer": 2},
            {"prompt": [{"role": "user", "content": "2+2"}], "reward_model": {"ground_truth": "4"}, "data_source": "x"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_examples(str(f))
    assert [e.ground_truth for e in ex] == ["2", "4"]
    assert ex[0].prompt == [{"role": "user", "content": "1+1"}] and ex[1].data_source == "x"


@pytest.mark.parametrize("row,msg", [
    ({"prompt": 5, "answer": 1}, "'prompt' must be"),
    ({"prompt": [{"role": "user"}], "answer": 1}, "'role' and 'content'"),
    ({"prompt": "hi"}, "no ground truth"),
])
def test_malformed_rows_name_file_and_row(tmp_path, row, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 1: .*{msg}"):
        load_examples(str(f))


def test_bad_json_and_missing_files(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "a", "answer": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 1 \(line 2\) is not valid JSON"):
        load_examples(str(f))
    with pytest.raises(ValueError, match="not found"):
        load_examples(str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_examples("synthetic:nope", n=2)


# ----------------------------------------------------------------------------- rewards
def test_exact_reward_takes_last_integer():
    assert R.exact_reward("7+5=12\nanswer 132", "132")[:2] == (1.0, True)
    assert R.exact_reward("answer 131", "132")[:2] == (0.0, False)
    assert R.exact_reward("no digits", "1") == (0.0, False, None)


@pytest.mark.parametrize("response,truth,ok", [
    ("... so the result is\nAnswer: 34", "34", True),
    ("answer: $\\frac{3}{4}$", "\\frac34", True),
    ("Answer: 1,000 dollars", "1000", True),
    ("Answer: \\boxed{17}", "17", True),
    ("Answer: x = 5", "5", True),
    ("Answer: 35", "34", False),
    ("The answer is 34", "34", False),  # no 'Answer:' line
    ("Answer: 34\n" + "x" * 280, "34", True),  # still inside the last 300 characters
    ("Answer: 34\n" + "x" * 400, "34", False),  # outside them
])
def test_dapo_math_reward(response, truth, ok):
    score, correct, _ = R.dapo_math_reward(response, truth)
    assert correct is ok and score == (1.0 if ok else -1.0)


def test_boxed_reward_uses_math_verify():
    assert R.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert R.last_boxed("\\boxed{unclosed") is None
    assert R.boxed_reward("so \\boxed{0.5}", "\\frac{1}{2}")[:2] == (1.0, True)
    assert R.boxed_reward("so \\boxed{204}", "204")[1] is True
    assert R.boxed_reward("so \\boxed{205}", "204")[1] is False
    assert R.boxed_reward("no box", "204") == (0.0, False, None)


def test_overlong_penalty_matches_spec():
    assert R.overlong_penalty(10, 100, 20) == 0.0
    assert R.overlong_penalty(80, 100, 20) == 0.0
    assert R.overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert R.overlong_penalty(100, 100, 20, penalty_factor=2.0) == pytest.approx(-2.0)


def test_auto_picks_by_data_source():
    assert R.pick_reward("auto", "synthetic/addition") == "exact"
    assert R.pick_reward("auto", "math_dapo") == "dapo_math"
    assert R.pick_reward("auto", "aime24") == "boxed"
    assert R.pick_reward("boxed", "synthetic/addition") == "boxed"


def test_runner_survives_raising_and_hanging_rewards():
    @R.register("_test_flaky")
    def flaky(response, truth):
        if response == "boom":
            raise RuntimeError("reward bug")
        if response == "hang":
            time.sleep(30)
        return 1.0, True, response

    runner = R.RewardRunner(RewardConfig(name="_test_flaky", timeout_s=0.2), max_response_length=16)
    t0 = time.time()
    out = runner(["ok", "boom", "hang", "ok"], ["x"] * 4, ["s"] * 4, [1, 1, 1, 1])
    assert time.time() - t0 < 5
    assert out.scores == [1.0, 0.0, 0.0, 1.0] and out.accs == [1.0, 0.0, 0.0, 1.0]
    assert out.failures == 2 and out.failed == [1, 2]


def test_runner_overlong_shaping_and_bad_name():
    cfg = RewardConfig(name="exact")
    cfg.overlong.enable, cfg.overlong.buffer_len = True, 4
    out = R.RewardRunner(cfg, max_response_length=10)(["answer 3", "answer 3"], ["3", "3"], None, [5, 9])
    assert out.scores == [1.0, pytest.approx(0.25)] and out.accs == [1.0, 1.0]
    with pytest.raises(ValueError, match="reward.name 'nope' is unknown; valid"):
        R.RewardRunner(RewardConfig(name="nope"), 10)
