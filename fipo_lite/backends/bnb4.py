"""QLoRA backend: the base model in 4-bit NF4 (bitsandbytes), LoRA adapters trained on top.

NF4 with double quantisation and compute in model.dtype (bf16 on a GPU), as in the QLoRA paper and the
transformers/peft docs: a 7B base model takes about 4 GiB instead of 14. `make_optimizer` gives the paged 8-bit AdamW
(`trainer.optimizer=paged_adamw_8bit`), whose states page to CPU under memory pressure.
"""

from __future__ import annotations

import importlib.util

import torch

from ..checks import GPU_EXTRA, check_model_path, require_gpu_package, resolve_model_path


def bnb_config_kwargs(cfg) -> dict:
    """Keyword arguments of `transformers.BitsAndBytesConfig`: NF4, double quant, compute in model.dtype
    (bf16 in the GPU configs; float32 on a CPU, so that the trainer computes what a float32 sampler does)."""
    compute = cfg.model.dtype
    return dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, compute))


def load_model(cfg):
    """4-bit base model on model.device (the GPU when there is one) + fresh LoRA adapter, ready to train."""
    require_gpu_package("bitsandbytes", "model.backend=bnb4")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .hf import apply_lora, load_tokenizer, resolve_device

    if not cfg.lora.enable:
        raise ValueError("model.backend=bnb4 trains LoRA adapters only (4-bit weights are frozen); set lora.enable=true")
    path = resolve_model_path(cfg.model)
    check_model_path(path)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    qkw = bnb_config_kwargs(cfg)
    device = resolve_device(cfg.model.device)  # bitsandbytes' NF4 also runs (slowly) on a CPU
    kwargs = dict(quantization_config=BitsAndBytesConfig(**qkw), device_map={"": str(device)},
                  dtype=qkw["bnb_4bit_compute_dtype"], trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # Freezes the base, upcasts norms/embeddings to fp32, enables input grads (needed by checkpointing).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
    if device.type == "cpu":
        keep_cpu_weights_trainable(model)
    return apply_lora(model, cfg.lora), tok


def keep_cpu_weights_trainable(model) -> int:
    """Switch off bitsandbytes' CPU inference repacking (AVX512-BF16 machines).

    On such a CPU, the first forward in eval mode without gradients (our old log-probs, HF sampling)
    repacks each NF4 weight for a fast gemv kernel and never packs it back; the next training
    forward then fails inside that kernel ("a view of a leaf Variable that requires grad is being
    used in an in-place operation"). The loop alternates both, so the generic 4-bit matmul is kept.
    Returns the number of 4-bit layers changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def make_optimizer(params, cfg):
    """Paged 8-bit AdamW from bitsandbytes: 2 bytes of optimizer state per trained parameter.
    (On a CPU bitsandbytes warns that paging needs CUDA and runs the non-paged 8-bit AdamW.)"""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"trainer.optimizer=paged_adamw_8bit needs the 'bitsandbytes' package: {GPU_EXTRA}")
    import bitsandbytes as bnb

    t = cfg.trainer
    return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)


DEQUANT_VERSION = 1  # bump when dequantized_base writes something else


def has_4bit_layers(model) -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def dequantized_base(model, tokenizer, source: str, cache_dir: str, dtype: str = "float32"):
    """A Hugging Face directory holding the base weights this QLoRA model actually computes with: each
    NF4 weight dequantized (bitsandbytes' own `dequantize_4bit`), every other weight as loaded, no LoRA.

    vLLM loading the original checkpoint would sample from the full-precision base + LoRA while the
    trainer's base is NF4: on SmolLM2-135M that is a gap of ~0.5 nats per token, and every update far
    off-policy. With this directory the float32 sampler/trainer gap is float noise (tests/stack).
    Written once per (source, quantization, dtype) to `cache_dir`, atomically."""
    import hashlib
    import json
    from pathlib import Path

    import bitsandbytes as bnb
    from safetensors.torch import save_file

    from ..checkpoint import atomic_dir

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = {name for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    src = Path(source)
    # every file of the source (weights in safetensors or .bin, config): a base replaced in place is written again
    stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.iterdir() if f.is_file()) if src.is_dir() else []
    qcfg = getattr(base.config, "quantization_config", None)
    qdict = qcfg.to_dict() if hasattr(qcfg, "to_dict") else qcfg
    key = json.dumps({"source": str(src.resolve()) if src.is_dir() else source, "files": stamp, "quant": qdict, "dtype": dtype,
                      "layers": len(quantized), "bnb": bnb.__version__, "v": DEQUANT_VERSION}, sort_keys=True, default=str)
    out = Path(cache_dir) / f"nf4-dequant-{src.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    tensors = {}
    for name, p in base.named_parameters():  # tied weights appear once: the config's tie flag restores them
        if "lora_" in name:
            continue
        owner = name.rsplit(".", 1)[0].replace(".base_layer", "")
        t = p.data
        if owner in quantized or owner + ".base_layer" in quantized:
            if name.endswith(".weight"):
                t = bnb.functional.dequantize_4bit(p.data, p.quant_state)
        tensors[name.replace(".base_layer", "")] = t.detach().to(getattr(torch, dtype)).contiguous().cpu()
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_pre_quantization_dtype", None)
    config["torch_dtype"] = config["dtype"] = dtype
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(tmp)
    return out
