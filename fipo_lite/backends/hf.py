"""Plain Hugging Face backend: transformers model + peft LoRA, float32 on CPU or bf16 on GPU."""

from __future__ import annotations

import torch

from ..checks import check_model_path, resolve_model_path
from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype
DEVICES = ("auto", "cpu", "cuda")  # model.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA device is available; use model.device=cpu or auto")
    return torch.device(name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded for generation
    return tok


def apply_lora(model, lora_cfg):
    """Wrap `model` with a fresh LoRA adapter (peft), or with the trainable adapter at lora.adapter_path (an SFT
    adapter to start RL from; config.py took its shape). Seed torch before calling for reproducible init."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora_cfg.get("adapter_path"):
        from ..checkpoint import adapter_dir

        return PeftModel.from_pretrained(model, str(adapter_dir(lora_cfg.adapter_path)), is_trainable=True)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_model(cfg):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model)
    check_model_path(path)
    device = resolve_device(cfg.model.device)
    kwargs = dict(dtype=DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        tok = load_tokenizer(path, cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    except (OSError, ValueError) as e:  # no such hub model, a folder without config.json/weights, an unknown model type
        raise UserError(f"model.path {path!r}: cannot load a causal LM: {str(e).strip().splitlines()[0]}") from None
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enable:
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg.lora)
    return model, tok
