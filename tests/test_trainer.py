"""End-to-end tests of the RL loop on the tiny model (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fipo_lite import metrics as M
from fipo_lite.config import ConfigError, gen_batch_size, load_config
from fipo_lite import rewards
from fipo_lite.engines.base import Rollout, SamplingParams
from fipo_lite.example import Example
from fipo_lite.trainer import PromptStream, collect_groups, group_advantages, group_metrics, main, micro_batches, Sample, train

ROOT = Path(__file__).resolve().parents[1]


def _overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 3, "trainer.train_batch_size": 4,
        "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8, "rollout.n": 4, "rollout.max_new_tokens": 24,
        "trainer.eval_every": 2, "trainer.eval_k": 2, "data.val_size": 4, "trainer.save_every": 1, "trainer.progress": False,
        "algorithm.filter_groups.max_num_gen_batches": 3, "trainer.lr": 5e-3, "trainer.gen_batch_size": 4,
        "data.train": "synthetic:addition", "data.val": "synthetic:addition",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(model_dir, out, **extra):
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", _overrides(model_dir, out, **extra))


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in M.read_jsonl(out / "metrics.jsonl")]


def _adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fipo_run(tiny_warm_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fipo_run")
    train(_cfg(tiny_warm_model_dir, out, **{"trainer.keep_checkpoints": 3}))  # every step's adapter stays readable
    return out


def test_run_trains_logs_and_checkpoints(fipo_run):
    rows = _rows(fipo_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert M.VAL_AVG in rows[0] and M.VAL_AVG in rows[2] and M.VAL_AVG in rows[3]
    required = [M.REWARD_MEAN, M.ACCURACY, *M.LENGTH.values(), M.LENGTH_CLIP_RATIO, M.NUM_GEN_BATCHES, M.LENGTH_WEIGHTED_ADV,
                M.LOSS, M.POLICY_KL, M.CLIP_FRAC, M.DUAL_CLIP_FRAC, M.INVALID_SEQ_FRAC, M.INFLUENCE_MEAN, M.FKL_EXP_MEAN,
                M.INFLUENCE_FRAC_UPPER, M.INFLUENCE_FRAC_LOWER, M.ENTROPY, M.GRAD_NORM, "actor/ratio_pos_p50"]
    trained = [r for r in rows[1:] if r.get("actor/num_updates", 0) > 0]
    assert trained, "no step had a group with mixed rewards: the warm model should solve some problems"
    for r in trained:
        for key in required:
            assert key in r, key
            if r[key] is not None:
                assert math.isfinite(r[key]), key
    # the adapter moved away from its (zero) LoRA-B initialisation at the first step that trained, and
    # keeps moving (which steps find a group with mixed rewards depends on the sampling stream)
    steps = [r["step"] for r in trained]
    first = _adapter(fipo_run, steps[0])
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and any(first[k].abs().sum() > 0 for k in lora_b)
    if steps[0] > 1:
        assert all(_adapter(fipo_run, steps[0] - 1)[k].abs().sum() == 0 for k in lora_b)  # nothing moved before it
    if len(steps) > 1:
        assert any(not torch.equal(first[k], _adapter(fipo_run, steps[-1])[k]) for k in first)


def test_dynamic_sampling_refills(tiny_warm_model_dir, tmp_path):
    # Larger groups of a weak model: many groups are all-wrong, so the loop must generate more.
    out = tmp_path / "ds"
    train(_cfg(tiny_warm_model_dir, out, **{"trainer.total_steps": 2, "trainer.eval_every": 0, "trainer.save_every": 0}))
    rows = _rows(out)
    assert any(r[M.NUM_GEN_BATCHES] > 1 for r in rows), [r[M.NUM_GEN_BATCHES] for r in rows]
    for r in rows:
        assert r["train/kept_groups"] <= 4
        assert r[M.NUM_GEN_BATCHES] <= 3
        # the headline figures are the trained batch's: every kept group has mixed accuracy
        assert r[M.SAMPLED_GROUPS] == 4 * r[M.NUM_GEN_BATCHES]
        if r[M.KEPT_GROUPS]:
            assert 0 < r[M.ACCURACY] < 1 and r[M.SAMPLED[M.ACCURACY]] is not None
        assert r[M.PARTIAL_BATCH] == int(r[M.KEPT_GROUPS] < 4)


class ScriptedEngine:
    """Prompt p (its id is [p]) gets the responses script[p]; tokens are characters."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompt_ids, params):
        self.calls.append(len(prompt_ids))
        idx = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        resp = [[ord(c) for c in self.script[prompt_ids[i][0]][j]] for i, j in zip(idx, list(range(params.n)) * len(prompt_ids))]
        return Rollout(prompt_index=idx, prompt_ids=[prompt_ids[i] for i in idx], response_ids=resp, truncated=[False] * len(idx))


class CharTok:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(map(chr, r)) for r in ids]


def test_collect_groups_keeps_mixed_groups_and_reports_both_batches():
    """Generation batches of gen_batch_size prompts until train_batch_size mixed groups are kept; the
    surplus is dropped; the trained-batch metrics cover only the kept groups."""
    script = {p: ["1", "1"] if p % 2 == 0 else ["1", "22"] for p in range(8)}  # odd prompts: one right, one wrong
    examples = [Example(prompt=[], ground_truth="1", data_source="synthetic/x", index=p) for p in range(8)]
    cfg = load_config(None, ["trainer.train_batch_size=2", "trainer.ppo_mini_batch_size=1", "algorithm.filter_groups.max_num_gen_batches=0"])
    assert gen_batch_size(cfg) == 8  # 0: 4 x train_batch_size, the recipe's gen_prompt_bsz
    cfg = load_config(None, ["trainer.train_batch_size=2", "trainer.ppo_mini_batch_size=1", "trainer.gen_batch_size=3"])
    engine = ScriptedEngine(script)
    runner = rewards.RewardRunner(cfg.reward, max_response_length=8)
    runner.timeout_s = 0  # score in this process
    kept, sampled, n_gen, fails = collect_groups(engine, CharTok(), examples, [[p] for p in range(8)], PromptStream(8, 0, shuffle=False),
                                                 SamplingParams(n=2), runner, cfg)
    assert engine.calls == [3, 3] and n_gen == 2 and fails == 0  # prompts 0-2 keep one group, 3-5 two more
    assert [g.prompt_ids for g in kept] == [[1], [3]] and len(sampled) == 6  # prompt 5's group is surplus
    trained, everything = group_metrics(kept), group_metrics(sampled)
    assert trained[M.ACCURACY] == 0.5 and trained[M.LENGTH["mean"]] == 1.5
    assert everything[M.ACCURACY] == pytest.approx(9 / 12) and everything[M.LENGTH["max"]] == 2


@rewards.register("test_always_right")
def _always_right(response, ground_truth):
    return 1.0, True, response[-1:] or None


def test_cap_reached_error_or_partial(tiny_warm_model_dir, tmp_path, capsys):
    """A registered reward the config accepts; every group scores the same, so the cap is always hit:
    on_cap=error stops with a message naming the knobs, on_cap=partial records a partial (empty) step."""
    extra = {"reward.name": "test_always_right", "trainer.total_steps": 1, "trainer.eval_every": 0, "trainer.save_every": 0,
             "algorithm.filter_groups.max_num_gen_batches": 2}
    out = tmp_path / "partial"
    train(_cfg(tiny_warm_model_dir, out, **extra, **{"algorithm.filter_groups.on_cap": "partial"}))
    row = _rows(out)[-1]
    assert row[M.PARTIAL_BATCH] == 1 and row[M.KEPT_GROUPS] == 0 and row[M.NUM_GEN_BATCHES] == 2
    assert row[M.SAMPLED[M.ACCURACY]] == 1.0 and row[M.ACCURACY] is None and "actor/num_updates" not in row
    assert "at the cap: train on the groups kept" in capsys.readouterr().err
    rc = main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
               *_overrides(tiny_warm_model_dir, tmp_path / "error", **extra, **{"algorithm.filter_groups.on_cap": "error"})])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: dynamic sampling kept 0 of trainer.train_batch_size=4 groups after 2 generation batches" in err
    assert "algorithm.filter_groups.on_cap=partial" in err and "max_num_gen_batches" in err


def test_non_finite_gradient_skips_the_optimizer_step(tiny_warm_model_dir, tmp_path, monkeypatch):
    """As verl's actor: a NaN gradient norm zeroes the gradient and skips optimizer.step (counted)."""
    import fipo_lite.trainer as T

    real = T.policy_loss
    monkeypatch.setattr(T, "policy_loss", lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(real(*a, **k)))
    out = tmp_path / "nan"
    train(_cfg(tiny_warm_model_dir, out, **{"algorithm.filter_groups.enable": False, "trainer.total_steps": 1,
                                            "trainer.eval_every": 0, "trainer.save_every": 1}))
    row = _rows(out)[-1]
    assert row[M.SKIPPED_STEPS] == 2 and row[M.NUM_UPDATES] == 0  # 4 prompts / mini-batches of 2
    assert all(not v.abs().sum() for k, v in _adapter(out, 1).items() if "lora_B" in k)  # LoRA-B still zero: no step


def test_resume_equals_uninterrupted(tiny_warm_model_dir, fipo_run, tmp_path):
    out = tmp_path / "resumed"
    train(_cfg(tiny_warm_model_dir, out, **{"trainer.total_steps": 2}))  # "killed" after step 2
    train(_cfg(tiny_warm_model_dir, out))
    assert _rows(out) == _rows(fipo_run)
    # running a finished run again changes nothing and reports its last step
    last = train(_cfg(tiny_warm_model_dir, out))
    assert last[M.STEP] == 3 and _rows(out) == _rows(fipo_run)


def test_same_seed_same_metrics_other_seed_differs(tiny_warm_model_dir, fipo_run, tmp_path):
    again = tmp_path / "again"
    train(_cfg(tiny_warm_model_dir, again))
    assert _rows(again) == _rows(fipo_run)
    other = tmp_path / "other"
    train(_cfg(tiny_warm_model_dir, other, seed=1, **{"trainer.total_steps": 1}))
    assert _rows(other)[1] != _rows(fipo_run)[1]


@pytest.mark.parametrize("mode", ["dapo", "grpo"])
def test_baselines_run(tiny_warm_model_dir, tmp_path, mode):
    out = tmp_path / mode
    extra = {"algorithm.loss_mode": mode, "trainer.total_steps": 1, "trainer.eval_every": 0, "trainer.save_every": 0}
    if mode == "grpo":
        extra.update({"algorithm.kl_coef": 0.01, "algorithm.filter_groups.enable": False})
    train(_cfg(tiny_warm_model_dir, out, **extra))
    row = _rows(out)[-1]
    assert "actor/influence_mean" not in row  # no Future-KL outside fipo
    if mode == "grpo":
        assert row[M.NUM_GEN_BATCHES] == 1 and "actor/kl_ref" in row


@pytest.mark.parametrize("mode", ["fipo", "dapo"])
def test_kl_coef_applies_in_every_mode(tiny_warm_model_dir, tmp_path, mode):
    """algorithm.kl_coef > 0 adds the KL to the reference whatever the loss (verl's use_kl_loss, spec 8):
    the trainer computes the reference log-probs and the loss logs actor/kl_ref (it was grpo only)."""
    out = tmp_path / mode
    train(_cfg(tiny_warm_model_dir, out, **{"algorithm.loss_mode": mode, "algorithm.kl_coef": 0.01, "trainer.total_steps": 1,
                                              "trainer.eval_every": 0, "trainer.save_every": 0, "algorithm.filter_groups.enable": False}))
    row = _rows(out)[-1]
    assert "actor/kl_ref" in row and row["actor/kl_ref"] >= 0


def test_bad_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"trainer\.total_steps"):
        load_config(None, ["trainer.total_step=3"])
    with pytest.raises(ConfigError, match=r"trainer\.lr"):
        load_config(None, ["trainer.lr=fast"])
    with pytest.raises(ConfigError, match=r"algorithm\.loss_mode.*fipo"):
        load_config(None, ["algorithm.loss_mode=ppo"])
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["trainer.train_batch_size=6", "trainer.ppo_mini_batch_size=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  totl_steps: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.total_steps"):
        load_config(bad)
    assert main(["--config", str(bad)]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_bad_data_row_names_file_and_row(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    cfg = _cfg(tiny_model_dir, tmp_path / "o", **{"data.train": str(data), "trainer.eval_every": 0})
    with pytest.raises(ValueError, match=r"train\.jsonl: row 1: no ground truth"):
        train(cfg)


def test_helpers():
    assert group_advantages([1.0, 1.0, 1.0], True) == [0.0, 0.0, 0.0]
    adv = group_advantages([1.0, 0.0], True)
    assert adv[0] > 0 > adv[1] and abs(adv[0] + adv[1]) < 1e-9 and abs(adv[0] - 0.5 / (2 ** 0.5 / 2 + 1e-6)) < 1e-6
    assert group_advantages([1.0, 0.0], False) == [0.5, -0.5]
    s = PromptStream(5, seed=3)
    first = s.take(7)
    state = s.state_dict()
    nxt = s.take(4)
    s2 = PromptStream(5, seed=3)
    s2.load_state_dict(state)
    assert s2.take(4) == nxt and sorted(first[:5]) == list(range(5))
    samples = [Sample([1] * 3, [2] * n, 0.0) for n in (5, 5, 10, 1)]
    packed = micro_batches(samples, size=99, token_budget=26)
    assert [len(mb) for mb in packed] == [2, 2]  # 8+8 fit in 26, 3 x 13 would not; 13 and 4 pad to 2 x 13
    assert micro_batches(samples, size=3, token_budget=0) == [samples[:3], samples[3:]]


def test_gpu_backend_without_gpu_stack_is_a_clear_error(capsys):
    """configs/qwen2.5-32b.yaml (Unsloth + its vLLM) stops with one line: the missing package where Unsloth is
    not installed (main lane), the missing GPU where it is (stack lane: Unsloth's vLLM needs CUDA)."""
    import importlib.util

    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if has_unsloth and torch.cuda.is_available():
        pytest.skip("this machine can run unsloth")
    assert main(["--config", str(ROOT / "configs" / "qwen2.5-32b.yaml")]) == 2
    err = capsys.readouterr().err
    assert ("needs a CUDA GPU" if has_unsloth else "gpu extra") in err and err.count("\n") == 1, err


def test_evaluate_command_loads_a_run_directory(fipo_run, tmp_path):
    from fipo_lite import evaluation

    rc = evaluation.main(["--model", str(fipo_run), "--data", "synthetic:addition", "-k", "2", "--n-problems", "4",
                        "--max-new-tokens", "24", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val/num_problems"] == 4 and 0 <= summary[M.VAL_AVG] <= 1


def test_sampler_logprobs_tis_and_token_budget_packing(tiny_warm_model_dir, tmp_path):
    """Sampler log-probs are kept and agree with the trainer's recomputation (same weights, T=1), the
    TIS correction runs, and micro-batches packed by a token budget train like count-based ones."""
    out = tmp_path / "tis"
    train(_cfg(tiny_warm_model_dir, out, **{"algorithm.tis_cap": 2.0, "trainer.max_tokens_per_micro_batch": 120,
                                            "algorithm.filter_groups.enable": False, "trainer.total_steps": 1,
                                            "trainer.eval_every": 0, "trainer.save_every": 0}))
    row = _rows(out)[-1]
    assert row["actor/num_updates"] > 0
    assert 0 <= row["rollout/logprob_gap"] < 1e-3
    assert math.isfinite(row[M.LOSS])


def test_logged_gap_at_a_rollout_temperature_below_one(tiny_warm_model_dir, tmp_path):
    """rollout.temperature = 0.7: old log-probs, ratio, Future-KL and the logged gap are at T = 0.7, so
    the sampler/trainer gap is float noise (it was ~0.1 nats when the trainer used raw logits)."""
    out = tmp_path / "t07"
    train(_cfg(tiny_warm_model_dir, out, **{"rollout.temperature": 0.7, "algorithm.tis_cap": 2.0, "algorithm.filter_groups.enable": False,
                                            "trainer.total_steps": 1, "trainer.eval_every": 0, "trainer.save_every": 0}))
    assert 0 <= _rows(out)[-1]["rollout/logprob_gap"] < 1e-4


def test_micro_batches_respect_the_token_budget():
    samples = [Sample([1] * 5, [2] * n, 0.0) for n in (3, 10, 4, 20, 1)]
    packs = micro_batches(samples, size=99, token_budget=40)
    assert [len(p) for p in packs] and sum(len(p) for p in packs) == 5
    for p in packs:  # padded size of each pack stays within the budget unless one sample alone exceeds it
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in p)
        assert len(p) * width <= 40 or len(p) == 1
    assert [len(p) for p in micro_batches(samples, size=2, token_budget=0)] == [2, 2, 1]


def test_overlong_prompts_are_left_out_with_a_count(tiny_model_dir, tmp_path, capsys):
    from fipo_lite.backends.hf import load_tokenizer
    from fipo_lite.data import DataError, encode_prompt

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+1=" * 20, "answer": "2"}, {"prompt": "2+1=", "answer": "3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the limit fits the short prompts only with the system prompt counted: the trainer encodes with it
    limit = len(encode_prompt(load_tokenizer(str(tiny_model_dir)), [{"role": "user", "content": "1+1="}], system_prompt="Add."))
    opts = {"data.train": str(data), "data.system_prompt": "Add.", "data.max_prompt_length": limit, "trainer.total_steps": 1,
            "trainer.eval_every": 0, "data.val_size": 0, "trainer.save_every": 0, "trainer.train_batch_size": 2,
            "trainer.gen_batch_size": 2, "trainer.ppo_mini_batch_size": 2, "algorithm.filter_groups.enable": False}
    train(_cfg(tiny_model_dir, tmp_path / "a", **opts))
    assert f"data.train: left out 1 of 3 prompts longer than data.max_prompt_length={limit}" in capsys.readouterr().err
    assert len(M.read_jsonl(tmp_path / "a" / "metrics.jsonl")) == 1
    with pytest.raises(DataError, match=rf"data\.train: all 3 prompts are longer than data\.max_prompt_length={limit - 1}"):
        train(_cfg(tiny_model_dir, tmp_path / "b", **{**opts, "data.max_prompt_length": limit - 1}))
    with pytest.raises(DataError, match=r"tokens > data\.max_prompt_length=.*data\.filter_overlong_prompts=true"):
        train(_cfg(tiny_model_dir, tmp_path / "c", **{**opts, "data.filter_overlong_prompts": False}))


def test_several_validation_sets_are_reported_per_set(tiny_model_dir, tmp_path):
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(3)))
    opts = {"data.val": f"[synthetic:addition,{data}]", "data.val_size": 2, "trainer.total_steps": 1, "trainer.eval_every": 1,
            "trainer.save_every": 0, "trainer.train_batch_size": 2, "trainer.gen_batch_size": 2, "trainer.ppo_mini_batch_size": 2,
            "algorithm.filter_groups.enable": False}
    train(_cfg(tiny_model_dir, tmp_path / "o", **opts))
    rows = M.read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [0, 1]
    for row in rows:  # names: the set's one data_source (synthetic/addition), else the file's stem
        assert row["val/synthetic_addition/num_problems"] == 2 and row["val/mini/num_problems"] == 2
        assert row["val/num_problems"] == 4
        for key in ("avg_at_k", "pass_at_k", "cons_at_k"):
            assert math.isclose(row[f"val/{key}"], (row[f"val/synthetic_addition/{key}"] + row[f"val/mini/{key}"]) / 2)


def test_summarize_sets_splits_rows_in_order():
    from fipo_lite.rollout import summarize_sets

    def problem(acc):
        return {"k": 2, "avg_at_k": acc, "pass_at_k": float(acc > 0), "cons_at_k": acc, "lengths": [3, 5]}

    out = summarize_sets([problem(1.0), problem(0.5), problem(0.0)], [("a", 1), ("b", 2), ("empty", 0)], k=2)
    assert out["val/a/avg_at_k"] == 1.0 and out["val/b/avg_at_k"] == 0.25 and out["val/b/pass_at_k"] == 0.5
    assert out["val/b/num_problems"] == 2 and out["val/a/response_length_mean"] == 4.0 and "val/empty/avg_at_k" not in out


def test_a_datasets_dataset_trains_and_evaluates(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # the datasets extra (the main lane has it)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(3)))
    spec = f"{{path: json, data_files: {data}, split: train}}"  # load_dataset arguments
    opts = {"data.train": spec, "data.val": f"[{spec}]", "data.prompt_key": "q", "data.answer_key": "a", "data.val_size": 2,
            "trainer.total_steps": 1, "trainer.eval_every": 1, "trainer.save_every": 0, "trainer.train_batch_size": 2,
            "trainer.gen_batch_size": 2, "trainer.ppo_mini_batch_size": 2, "algorithm.filter_groups.enable": False}
    train(_cfg(tiny_model_dir, tmp_path / "o", **opts))
    rows = M.read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [0, 1] and all(r["val/qa/num_problems"] == 2 for r in rows)  # named by the file's stem
