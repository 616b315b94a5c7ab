"""Plain Hugging Face backend: transformers model + peft LoRA, float32 on CPU or bf16 on GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype
DEVICES = ("auto", "cpu", "cuda")  # model.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA device is available; use model.device=cpu or auto")
    return torch.device(name)


def resolve_model_path(model_cfg) -> str:
    """"tiny" builds (or reuses) the kit's tiny CPU model; a GGUF file (or a directory holding one, or
    a packaged model such as "smollm2-135m-instruct") is converted once to a cached Hugging Face
    directory; anything else is a local dir or hub name. Local results are absolute: adapters record
    their base path."""
    if model_cfg.path == "tiny":
        from fipo_lite.tiny import build_tiny

        return str(Path(build_tiny(model_cfg)).resolve())
    from fipo_lite.gguf_models import convert, gguf_file_of

    gguf = gguf_file_of(model_cfg.path)
    if gguf is not None:
        return str(convert(gguf, model_cfg.cache_dir).resolve())
    return model_cfg.path


def check_model_path(path: str, what: str = "model.path") -> None:
    """A local directory must exist; otherwise the name must look like a hub id (org/name)."""
    import re

    if Path(path).is_dir():
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith((".", "/")):
        raise UserError(f"{what} {path!r} is neither a local model directory nor a hub name (org/name)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded for generation
    return tok


def apply_lora(model, lora_cfg):
    """Wrap `model` with a fresh LoRA adapter (peft). Seed torch before calling for reproducible init."""
    from peft import LoraConfig, get_peft_model

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
