"""Evaluation metrics (spec section 11, in fipo_lite/rollout.py) and the `evaluate` command (fipo_lite/evaluation.py)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from fipo_lite import evaluation as E
from fipo_lite import metrics as M, rollout as R
from fipo_lite.data import Example
from fipo_lite.engines.base import Rollout, SamplingParams


def _brute_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 1, 8), (7, 5, 4), (4, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert R.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_args():
    v = R.pass_at_k(1000, 3, 32)
    assert 0 < v < 1 and math.isfinite(v)
    assert v == pytest.approx(1 - math.comb(997, 32) / math.comb(1000, 32), rel=1e-9)
    with pytest.raises(ValueError, match="pass_at_k"):
        R.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass_at_k"):
        R.pass_at_k(4, 1, 5)


def test_cons_at_k_majority_and_ties():
    assert R.cons_at_k(["3", "3", "4"], [1, 1, 0]) == 1.0
    assert R.cons_at_k(["4", "3", "4", None, None, None], [0, 1, 0, 0, 0, 0]) == 0.0  # None never votes
    assert R.cons_at_k(["4", "3"], [0, 1]) == 0.0  # tie: the answer seen first wins
    assert R.cons_at_k(["3", "4"], [1, 0]) == 1.0
    assert R.cons_at_k([None, None], [0, 0]) == 0.0


class FakeEngine:
    """Returns scripted responses: problem p gets responses[p] (token ids are characters)."""

    def __init__(self, responses):
        self.responses = responses

    def generate(self, prompt_ids, params):
        idx, resp = [], []
        for p in range(len(prompt_ids)):
            for j in range(params.n):
                idx.append(p)
                resp.append([ord(ch) for ch in self.responses[p][j]])
        return Rollout(prompt_index=idx, prompt_ids=[prompt_ids[i] for i in idx], response_ids=resp, truncated=[False] * len(idx))


class FakeTok:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(map(chr, r)) for r in ids]


def test_evaluate_rollouts_summary_by_hand():
    from fipo_lite.config import RewardConfig
    from fipo_lite.rewards import RewardRunner

    ex = [Example([{"role": "user", "content": "1+1"}], "2", "synthetic/addition", 0),
          Example([{"role": "user", "content": "2+2"}], "4", "synthetic/addition", 1)]
    engine = FakeEngine([["answer 2", "answer 3", "answer 3"], ["answer 4", "answer 4", "x"]])
    summary, rows = R.evaluate_rollouts(engine, FakeTok(), ex, 3, SamplingParams(n=3), RewardRunner(RewardConfig(name="exact"), 8),
                                        prompt_ids=[[1], [2]])
    assert rows[0]["accs"] == [1.0, 0.0, 0.0] and rows[1]["preds"] == ["4", "4", None]
    assert summary[M.VAL_AVG] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert summary[M.VAL_PASS] == 1.0
    assert summary[M.VAL_CONS] == pytest.approx(0.5)  # "3" wins problem 0, "4" wins problem 1
    assert summary[M.VAL_LENGTH] == pytest.approx(sum(len(r) for rs in engine.responses for r in rs) / 6)
    assert summary["val/response_length_min"] == 1 and summary["val/response_length_max"] == 8
    assert summary[M.VAL_REWARD] == pytest.approx(3 / 6)  # the scores: 1 for each right answer
    assert R.summarize(rows) == summary  # k is read from the rows
    # n = 3 samples, k = 1: pass@1 and avg use all 3, cons@1 votes over the first sample only
    s1, rows1 = R.evaluate_rollouts(engine, FakeTok(), ex, 1, SamplingParams(n=3), RewardRunner(RewardConfig(name="exact"), 8),
                                    prompt_ids=[[1], [2]])
    assert s1[M.VAL_PASS] == pytest.approx(s1[M.VAL_AVG]) and s1[M.VAL_CONS] == 1.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        R.evaluate_rollouts(engine, FakeTok(), ex, 0, SamplingParams(n=3), None, prompt_ids=[[1], [2]])
    with pytest.raises(ValueError, match="at least k=4"):
        R.evaluate_rollouts(engine, FakeTok(), ex, 4, SamplingParams(n=3), None, prompt_ids=[[1], [2]])


def test_evaluate_command_on_aime_parquet(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    rc = E.main(["--model", str(tiny_model_dir), "--data", str(shared_data_dir / "aime-2024.parquet"), "-k", "2",
                 "--n-problems", "3", "--max-new-tokens", "8", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "per_problem.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["lengths"]) == 2 for r in rows)
    assert rows[0]["ground_truth"] == "204" and rows[0]["data_source"] == "aime24"
    assert summary["val/num_problems"] == 3 and 0 <= summary[M.VAL_AVG] <= 1
    assert 1 <= summary[M.VAL_LENGTH] <= 8


def test_evaluate_command_loads_a_checkpoint_adapter(tiny_model_dir, tmp_path):
    """A checkpoint dir whose adapter/ names the base model: the adapter is applied (logits change)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ckpt" / "adapter")
    model, tok = E.load_for_eval(str(tmp_path / "ckpt"), device="cpu")
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=True, return_dict=False)])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-4)
        assert torch.allclose(model(ids).logits, peft_model.eval()(ids).logits, atol=1e-4)
    rc = E.main(["--model", str(tmp_path / "ckpt"), "--data", "synthetic:addition", "-k", "2", "--n-problems", "2",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 0 and len((tmp_path / "out" / "per_problem.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args,msg", [
    (["--model", "{tmp}/nope", "--data", "synthetic:addition"], "neither a local model directory nor a hub name"),
    (["--model", "x/y", "--data", "{tmp}/missing.jsonl"], "not found"),
    (["--model", "x/y", "--data", "synthetic:addition", "-k", "0"], "-k must be >= 1"),
    (["--model", "x/y", "--data", "synthetic:addition", "-k", "4", "--n-samples", "2"], "--n-samples (2) must be >= k (4)"),
    (["--model", "x/y", "--data", "synthetic:addition", "--n-problems", "0"], "--n-problems must be >= 1"),
    (["--model", "x/y", "--data", "synthetic:addition", "--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_evaluate_command_errors(tmp_path, capsys, args, msg):
    assert E.main([a.format(tmp=tmp_path) for a in args]) == 2
    assert msg in capsys.readouterr().err


def test_evaluate_vllm_without_vllm_names_the_gpu_extra(tiny_model_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert E.main(["--model", str(tiny_model_dir), "--data", "synthetic:addition", "-k", "1", "--engine", "vllm"]) == 2
    assert "gpu extra" in capsys.readouterr().err


def test_evaluate_command_encodes_with_the_system_prompt_and_template_kwargs(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    real = E.encode_prompts
    monkeypatch.setattr(E, "encode_prompts", lambda tok, ex, **kw: seen.append(kw) or real(tok, ex, **kw))
    rc = E.main(["--model", str(tiny_model_dir), "--data", "synthetic:addition", "-k", "1", "--n-problems", "1",
                 "--max-new-tokens", "2", "--system-prompt", "Add.", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert rc == 0 and seen == [{"system_prompt": "Add.", "chat_template_kwargs": {"enable_thinking": False}}]
    assert E.main(["--model", str(tiny_model_dir), "--data", "synthetic:addition", "--chat-template-kwargs", "[1]"]) == 2
