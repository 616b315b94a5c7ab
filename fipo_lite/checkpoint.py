"""Atomic, resumable checkpoints: nothing a user has trained is lost to a kill.

Layout: OUTPUT_DIR/checkpoints/step_000010/{adapter/, trainer_state.pt}. A checkpoint is written
into a temporary folder and renamed into place, then `latest` (a one-line file, replaced
atomically) points to it, so a run killed at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(ckpt_root: str | Path, step: int, model, state: dict[str, Any], keep: int = 2) -> Path:
    """Write step `step` (adapter + trainer state) atomically and prune to the newest `keep`."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(str(tmp / "adapter"))
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load(ckpt_dir: str | Path, model) -> dict[str, Any]:
    """Load adapter weights into `model` (in place) and return the trainer state."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / STATE_FILE).is_file():
        raise UserError(f"{ckpt_dir} is not a fipo_lite checkpoint (no {STATE_FILE}); point trainer.resume at a "
                        "checkpoints/step_NNNNNN directory, or use auto / never")
    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
    adapter_dir = ckpt_dir / "adapter"
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"checkpoint {ckpt_dir} has no adapter weights at {weights}")
        result = set_peft_model_state_dict(model, load_file(str(weights), device=str(next(model.parameters()).device)))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint {ckpt_dir} does not match the model: unexpected keys {result.unexpected_keys[:5]}")
    else:
        from safetensors.torch import load_file

        files = sorted(adapter_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"checkpoint {ckpt_dir} has no model weights in {adapter_dir}")
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        model.load_state_dict(sd, strict=False)
    return state
