"""GPU-only checks (skipped without CUDA): the real bnb4 / vLLM / Unsloth code paths on small random models.

Run on a GPU machine with the gpu extra installed:  pytest -m gpu tests/gpu
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fipo_lite.config import load_config
from fipo_lite.engines.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def needs(pkg):
    return pytest.mark.skipif(importlib.util.find_spec(pkg) is None, reason=f"needs {pkg} (pip install 'fipo_lite[gpu]')")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A random Qwen2 wide enough for 4-bit kernels and vLLM LoRA (hidden 256), with the kit's tokenizer."""
    from fipo_lite.tiny import save_random_tiny

    return save_random_tiny(tmp_path_factory.mktemp("small"), hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)


def _cfg(path, tmp_path, *extra):
    return load_config(None, [f"model.path={path}", f"output_dir={tmp_path}", "model.device=cuda", "model.dtype=bfloat16",
                              "data.max_prompt_length=64", "rollout.max_new_tokens=64", "rollout.vllm.max_model_len=512",
                              "rollout.vllm.gpu_memory_utilization=0.3", "lora.r=8", "rollout.vllm.max_lora_rank=8", *extra])


@needs("bitsandbytes")
def test_bnb4_loads_4bit_and_trains(small_dir, tmp_path):
    import bitsandbytes as bnb

    from fipo_lite.backends import load_model
    from fipo_lite.policy import Policy, SeqBatch
    from fipo_lite.trainer import make_optimizer

    cfg = _cfg(small_dir, tmp_path, "model.backend=bnb4", "model.gradient_checkpointing=true", "trainer.optimizer=paged_adamw_8bit")
    model, tok = load_model(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    policy = Policy(model, tok, 16)
    opt = make_optimizer(policy.trainable_parameters(), cfg)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    batch = SeqBatch.from_lists([[5, 6, 7]] * 2, [[8, 9, 10, 11]] * 2, tok.pad_token_id)
    logp, _ = policy.logprobs(batch)
    (-logp.sum()).backward()
    opt.step()
    assert torch.isfinite(logp).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.trainable_parameters()))


@needs("vllm")
def test_vllm_engine_samples_and_takes_adapter(small_dir, tmp_path):
    from fipo_lite.backends import load_model
    from fipo_lite.engines.vllm import VLLMEngine
    from fipo_lite.policy import Policy

    cfg = _cfg(small_dir, tmp_path, "rollout.engine=vllm", "rollout.vllm.enforce_eager=true")
    model, tok = load_model(cfg)
    eng = VLLMEngine(cfg, tok, model=model)
    ro = eng.generate([[5, 6, 7], [8]], SamplingParams(n=3, max_new_tokens=16, logprobs=True, seed=0))
    assert len(ro) == 6 and ro.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(len(lp) == len(r) for lp, r in zip(ro.sampler_logprobs, ro.response_ids))
    assert eng.asleep  # slept after sampling, so the trainer has the memory
    eng.sync(Policy(model, tok))
    ro2 = eng.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=8))
    assert len(ro2) == 2 and eng.lora_request.lora_int_id == 1


def test_gpu_measure_small_case(tmp_path):
    """The measurement script on the real GPU path with a short 0.5B run."""
    import importlib.util as iu
    import json
    from pathlib import Path

    spec = iu.spec_from_file_location("gpu_measure", Path(__file__).resolve().parents[2] / "scripts" / "gpu_measure.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m.json"
    mod.main(["--out", str(out), "--cases", "0.5b-bf16", "--response-len", "512", "--sample-tokens", "32", "--iters", "1"])
    case = json.loads(out.read_text())["cases"][0]
    assert "error" not in case, case
    assert case["train"]["peak_allocated_gb"] > 0 and case["train"]["tokens_per_s"] > 0
