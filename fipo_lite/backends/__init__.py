"""Model backends: each returns (LoRA model ready to train, tokenizer) from the run config.

`hf` (plain transformers + peft; CPU and GPU) is the default and needs no GPU package. `bnb4`
(QLoRA through bitsandbytes) and `unsloth` live in their own modules and import their heavy
packages only when chosen.
"""

from __future__ import annotations

import importlib

BACKENDS = ("hf", "bnb4", "unsloth")


def load_model(cfg):
    """Dispatch on cfg.model.backend; returns (model, tokenizer) with the tokenizer's pad token set."""
    name = cfg.model.backend
    if name not in BACKENDS:
        raise ValueError(f"model.backend must be one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"fipo_lite.backends.{name}").load_model(cfg)
