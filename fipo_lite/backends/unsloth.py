"""Unsloth backend: 4-bit base + LoRA with Unsloth's kernels and offloaded gradient checkpointing.

With `rollout.engine=vllm` it loads with `fast_inference=True`: Unsloth starts an in-process vLLM
that holds the one copy of the 4-bit weights, and training reads the same weights, so the sampler
costs only its KV cache. `engines/vllm.py` then samples through `model.fast_generate`.
Import order matters to Unsloth (it patches transformers): it is imported before anything else here.
"""

from __future__ import annotations

from .bnb4 import require_gpu_package


def unsloth_from_pretrained_kwargs(cfg, model_path: str) -> dict:
    """Keyword arguments of `unsloth.FastLanguageModel.from_pretrained`."""
    m, v = cfg.model, cfg.rollout.vllm
    if cfg.lora.enable and cfg.lora.r > v.max_lora_rank:
        raise ValueError(f"lora.r={cfg.lora.r} exceeds rollout.vllm.max_lora_rank={v.max_lora_rank}")
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    if m.max_seq_length < seq:
        raise ValueError(f"model.max_seq_length={m.max_seq_length} < data.max_prompt_length + rollout.max_new_tokens = {seq}")
    kw = dict(model_name=model_path, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "float32" else _dtype(m.dtype),
              load_in_4bit=True, trust_remote_code=m.trust_remote_code, random_state=cfg.seed)
    if cfg.rollout.engine == "vllm":
        kw.update(fast_inference=True, gpu_memory_utilization=v.gpu_memory_utilization, max_lora_rank=v.max_lora_rank)
    return kw


def unsloth_peft_kwargs(cfg) -> dict:
    """Keyword arguments of `unsloth.FastLanguageModel.get_peft_model` from the lora section."""
    lo = cfg.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules), bias="none",
                use_gradient_checkpointing="unsloth" if cfg.model.offload_gradients else True, random_state=cfg.seed)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def load_model(cfg):
    require_gpu_package("unsloth", "model.backend=unsloth")
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    from .hf import check_model_path, resolve_model_path

    if not cfg.lora.enable:
        raise ValueError("model.backend=unsloth here trains LoRA adapters on a 4-bit base; set lora.enable=true")
    path = resolve_model_path(cfg.model)
    check_model_path(path)
    model, tok = FastLanguageModel.from_pretrained(**unsloth_from_pretrained_kwargs(cfg, path))
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok
