"""Atomic, verified, data-only checkpoints: nothing a user has trained is lost to a kill, a full
disk or a shared file.

Layout: OUTPUT_DIR/checkpoints/step_000010/ holds
  adapter/              the LoRA adapter (safetensors, PEFT format)
  trainer_state.pt      optimizer, scheduler, data position, RNG states: tensors and plain values only,
                        read back with `torch.load(weights_only=True)`, so a checkpoint can never run code
  config.json           the resolved config that trained the run up to this step
  manifest.json         size and sha256 of every file above, written last
A checkpoint is written into a temporary folder, flushed to disk and renamed into place, then `latest`
(a one-line file for people and tools, replaced atomically) points to it: a run killed at any instant
leaves the previous checkpoint intact. Loading checks the manifest first, so a truncated or altered
checkpoint is reported (and `pick` falls back to the previous good one) instead of half-loaded.
Checkpoints from before manifests (no manifest.json) still load, through the same data-only reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it and why."""


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()  # a tuple of ints: plain data already
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj: Any, where: str = "state") -> Any:
    """`obj` as nested dicts/lists/tuples of plain tensors, ints, floats, bools, str and None (what
    `weights_only=True` reads back); anything else is an error at save time, not at resume time."""
    if obj is None:
        return obj
    for kind in (bool, int, float, str):  # subclasses (enums, numpy floats) become the plain type
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, torch.Tensor):  # subclasses and attributes (bitsandbytes' paged state) dropped
        return obj.detach().as_subclass(torch.Tensor)
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds only tensors and plain values")


@contextmanager
def atomic_dir(out: str | Path, marker: str = "config.json"):
    """Build a directory under a temporary name beside `out` and rename it into place when the block
    ends without error, so a reader never sees half of it (the tiny model, a converted GGUF, a
    dequantized base). If another process published `out` first (its `marker` exists), theirs stays."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name[:40]}-", dir=out.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race: keep theirs
            if not (out / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks (checkpoint manifests, GGUF cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a kill at any instant leaves the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _write_manifest(folder: Path, step: int) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "step": step, "files": entries}, indent=1))
    for p in [*files, folder / MANIFEST_FILE]:
        _fsync(p)


def save(ckpt_root: str | Path, step: int, model, state: dict[str, Any], keep: int = 2,
         config: dict | None = None) -> Path:
    """Write step `step` (adapter, trainer state, config) atomically and prune to the newest `keep`."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(str(tmp / "adapter"))
    torch.save(plain(state), tmp / STATE_FILE)
    if config is not None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    _write_manifest(tmp, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        for old in candidates(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def candidates(ckpt_root: str | Path) -> list[Path]:
    """Finished checkpoint folders, newest step first (unverified)."""
    root = Path(ckpt_root)
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def verify(ckpt_dir: str | Path) -> None:
    """Raise CheckpointError unless every file matches the manifest written at save time."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist")
    mf = d / MANIFEST_FILE
    if not mf.is_file():
        if not (d / STATE_FILE).is_file():
            raise CheckpointError(f"checkpoint {d} has no {STATE_FILE}")
        return  # written before manifests: the loaders below still catch what they can
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {d}: unreadable {MANIFEST_FILE} ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict) or not all(isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("sha256"), str)
                                              for w in files.values()):
        raise CheckpointError(f"checkpoint {d}: malformed {MANIFEST_FILE}: 'files' must map each file name to its size and sha256")
    root = d.resolve()
    for name in files:  # entries name files of this checkpoint, nothing outside it
        if Path(name).is_absolute() or ".." in Path(name).parts or root not in (root / name).resolve().parents:
            raise CheckpointError(f"checkpoint {d}: {MANIFEST_FILE} names {name!r}, outside the checkpoint")
    # every file the loaders read must be vouched for: an unlisted file is not trusted
    unlisted = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                      and p.relative_to(d).as_posix() not in files)
    if unlisted:
        raise CheckpointError(f"checkpoint {d}: {', '.join(unlisted[:3])} not in its {MANIFEST_FILE} (added or manifest rewritten)")
    for name, want in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {d}: {name} has {size} bytes, {want['size']} were saved (truncated or replaced)")
        if file_sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {d}: {name} does not match its checksum (corrupted or replaced)")
    if STATE_FILE not in files:
        raise CheckpointError(f"checkpoint {d}: {MANIFEST_FILE} lists no {STATE_FILE}")


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The verified trainer state, read as data only: a pickled object or function is refused, never run."""
    d = Path(ckpt_dir)
    verify(d)
    try:
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln.upper()), "")  # names the object
        raise CheckpointError(f"checkpoint {d}: refused {STATE_FILE}: it holds more than tensors and plain values, "
                              f"so loading it could run code ({what[:200] or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad header, ...
        raise CheckpointError(f"checkpoint {d}: cannot read {STATE_FILE}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} is not a fipo_lite trainer state")
    return state


def read_config(ckpt_dir: str | Path) -> dict | None:
    """The config saved with the checkpoint (None for checkpoints written before configs were saved)."""
    f = Path(ckpt_dir) / CONFIG_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def pick(ckpt_root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies and reads, with its state; damaged ones are skipped with a
    warning that says which and why. None when there is no checkpoint; an error when none is good."""
    found = candidates(ckpt_root)
    problems = []
    for c in found:
        try:
            state = read_state(c)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"[fipo_lite] warning: skipping damaged {e}", file=sys.stderr)
            continue
        if problems:
            print(f"[fipo_lite] warning: resuming from {c.name}, the newest good checkpoint "
                  f"({len(problems)} newer one(s) skipped, see above)", file=sys.stderr)
        return c, state
    if found:
        raise CheckpointError(f"no usable checkpoint in {ckpt_root}: all {len(found)} are damaged (newest: {problems[0]}); "
                              "trainer.resume=never starts the run over (deleting them)")
    return None


ABANDONED_DIR = "abandoned"  # checkpoints of a branch a rollback left: kept, never resumed from or pruned


def set_aside_after(ckpt_root: str | Path, resumed: str | Path) -> list[Path]:
    """A run resumed from `resumed` (an earlier checkpoint of this run: a rollback) continues a new
    branch: the checkpoints of later steps belong to the branch it left. Move them to
    `checkpoints/abandoned/<time>/`, where neither the resume, the pruning nor `evaluate RUN` picks
    them, and point `latest` at the resumed checkpoint. Nothing is deleted."""
    root, resumed = Path(ckpt_root), Path(resumed)
    if resumed.parent.resolve() != root.resolve():
        return []  # a checkpoint of another run: this run's own history is not a branch of it
    later = [c for c in candidates(root) if c.name > resumed.name]
    if not later:
        return []
    dest = root / ABANDONED_DIR / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for c in later:
        os.replace(c, dest / c.name)
        moved.append(dest / c.name)
    write_atomic(root / "latest", resumed.name + "\n")
    return moved


def find_latest(ckpt_root: str | Path) -> Path | None:
    """The newest checkpoint whose files match their manifest (for tools that read a run directory)."""
    for c in candidates(ckpt_root):
        try:
            verify(c)
            return c
        except CheckpointError:
            continue
    return None


def of_run(run_dir: str | Path) -> Path:
    """The checkpoint that `evaluate RUN` and `export RUN` read: the run's newest checkpoint whose files
    match their manifest. Newer damaged ones are named in a warning; none at all is a CheckpointError."""
    root = Path(run_dir) / "checkpoints"
    latest = find_latest(root)
    found = candidates(root)
    if latest is None:
        damaged = f" that verify ({len(found)} damaged, newest {found[0].name})" if found else ""
        raise CheckpointError(f"{run_dir} is a run directory without finished checkpoints{damaged}")
    skipped = [c.name for c in found if c.name > latest.name]
    if skipped:
        print(f"[fipo_lite] warning: {', '.join(skipped)} of {run_dir} do not match their manifest; using {latest.name}",
              file=sys.stderr)
    return latest


def adapter_dir(path: str | Path, what: str = "lora.adapter_path") -> Path:
    """The LoRA adapter folder (peft's save_pretrained: adapter_config.json + weights) that `path` names: the
    folder itself, a checkpoint of this kit (its adapter/) or a run directory (its newest checkpoint's)."""
    p = Path(path)
    if (p / "checkpoints").is_dir() and not (p / "adapter_config.json").is_file():
        p = of_run(p)
    for folder in (p, p / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise CheckpointError(f"{what}={str(path)!r} is not a LoRA adapter: expected a folder with adapter_config.json "
                          "(peft's save_pretrained), a checkpoint or a run directory")


def load_adapter(ckpt_dir: str | Path, model) -> None:
    """Load the checkpoint's adapter weights into `model` (in place); a mismatch is one CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    adapter_dir = ckpt_dir / "adapter"
    from safetensors.torch import load_file

    try:
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict

            weights = adapter_dir / "adapter_model.safetensors"
            if not weights.is_file():
                raise CheckpointError(f"checkpoint {ckpt_dir} has no adapter weights at {weights}")
            result = set_peft_model_state_dict(model, load_file(str(weights), device=str(next(model.parameters()).device)))
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"checkpoint {ckpt_dir} does not match the model: unexpected keys {result.unexpected_keys[:5]}")
        else:
            files = sorted(adapter_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"checkpoint {ckpt_dir} has no model weights in {adapter_dir}")
            sd = {}
            for f in files:
                sd.update(load_file(str(f)))
            model.load_state_dict(sd, strict=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError (truncated file), a size mismatch (RuntimeError), ...
        if type(e).__name__ == "SafetensorError" or not isinstance(e, RuntimeError):
            raise CheckpointError(f"checkpoint {ckpt_dir}: cannot read its adapter weights ({type(e).__name__}: {str(e)[:200]})") from None
        # size mismatch: the model was built with another shape than the checkpoint
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the model of this config: {detail[:300]}") from None


def load(ckpt_dir: str | Path, model) -> dict[str, Any]:
    """Load adapter weights into `model` (in place) and return the trainer state (verified, data only)."""
    state = read_state(ckpt_dir)
    load_adapter(ckpt_dir, model)
    return state
