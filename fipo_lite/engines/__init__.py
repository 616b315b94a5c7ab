"""Rollout engines behind one interface (`base.RolloutEngine`): `hf` and `vllm`."""

from __future__ import annotations

from .base import Rollout, RolloutEngine, SamplingParams

__all__ = ["ENGINES", "Rollout", "RolloutEngine", "SamplingParams", "build_engine"]

ENGINES = ("hf", "vllm")  # rollout.engine


def build_engine(cfg, model, tokenizer) -> RolloutEngine:
    """The sampler named by cfg.rollout.engine."""
    if cfg.rollout.engine == "hf":
        from .hf import HFEngine

        return HFEngine(model, tokenizer, cfg.rollout.generation_batch_size, cfg.rollout.merge_lora, cfg.rollout.lean_decode)
    if cfg.rollout.engine == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(cfg, tokenizer, model=model)
    raise ValueError(f"rollout.engine must be one of {ENGINES}, got {cfg.rollout.engine!r}")
