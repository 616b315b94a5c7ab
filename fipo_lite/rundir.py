"""One run directory: one writer, one experiment, its history kept.

A run directory holds hours of GPU work, so `train` guards it:
- `hold` takes an exclusive lock (flock) on OUTPUT_DIR/run.lock for the whole run. A second `train`
  on the same directory stops at once naming the holder's pid; the kernel drops the lock of a killed
  run, so a stale lock is simply taken over (and its last holder named).
- `open_run` decides where the run starts: fresh, or from the newest good checkpoint. On a resume it
  compares the new config with the one the checkpoint was trained with (config.RESUME_SAFE_KEYS may
  change; anything else needs trainer.allow_config_change=true) and records every change. The files
  the config names are compared too (`input_digests`: reward files, local data files): an edited reward
  under an unchanged config would otherwise finish a run that trained on two rewards and says one.

Layout of OUTPUT_DIR (checkpoints/ is described in checkpoint.py):
  run.lock              pid, host and start time of the live run (empty after a clean exit)
  config.yaml           the config the run was started with; a resume never rewrites it
  config_history.jsonl  one row per resume that changed the config: step it took effect, time, pid,
                        checkpoint, {key: [old, new]}, and whether trainer.allow_config_change allowed it
  metrics.jsonl         one row per step
  rollouts/, eval/      step_NNNNNN.jsonl: each step's and each evaluation's completions (samples.py)
  tracking.json         the experiment trackers' run ids and last steps logged (tracking.py), when trainer.logger has one
  tensorboard/ wandb/   trainer.logger's TensorBoard events and W&B files (W&B's go to WANDB_DIR when it is set)
  checkpoints/          step_NNNNNN/ folders
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .metrics import flat_dict
from .config import RESUME_SAFE_KEYS, RunConfig, resolve_loss_defaults
from .data import data_specs
from .errors import UserError
from .rewards import component_entries, spec_kind

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"


class RunDirError(UserError):
    """A run directory that cannot be used as asked; the message says why and the ways out."""


# ----------------------------------------------------------------------------- one writer
_held: dict[str, int] = {}  # lock path -> fd, for the locks this process holds


def _close_held_in_child() -> None:
    # A forked child (reward workers) must not keep the lock alive after its parent dies. Closing the
    # inherited fd drops the child's reference only; the parent still holds the lock.
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _describe(h: dict) -> str:
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"


@contextmanager
def hold(output_dir: str | Path) -> Iterator[Path]:
    """Hold OUTPUT_DIR for this process until the block ends; RunDirError if a live run holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = {}
        for _ in range(20):  # the holder writes its pid right after locking
            holder = _read_holder(fd)
            if holder:
                break
            time.sleep(0.05)
        os.close(fd)
        raise RunDirError(f"{out} is in use by another train run ({_describe(holder)}); "
                          "wait for it, stop it, or use another output_dir") from None
    stale = _read_holder(fd)
    if stale:
        print(f"[fipo_lite] {out}: taking over the lock left by a run that is no longer running ({_describe(stale)})",
              file=sys.stderr)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[str(path)] = fd
    try:
        yield out
    finally:
        _held.pop(str(path), None)
        os.ftruncate(fd, 0)  # a clean exit leaves an empty lock file: only a killed run leaves a record
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- one experiment
def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{key: [old, new]} for every leaf that differs; a key missing on one side counts as its default, and
    a null loss default (algorithm.clip_high, loss_agg_mode) as the value the loss resolves it to."""
    defaults = flat_dict(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
    a, b = flat_dict(old), flat_dict(new)
    keys = sorted(set(a) | set(b))
    a = resolve_loss_defaults({k: a.get(k, defaults.get(k)) for k in keys})
    b = resolve_loss_defaults({k: b.get(k, defaults.get(k)) for k in keys})
    return {k: [a[k], b[k]] for k in keys if a[k] != b[k]}


def input_digests(cfg: DictConfig) -> dict[str, str]:
    """{"file PATH": sha256} of the files a run reads besides its config and model: each reward file
    (reward.function / reward.functions, PATH.py:NAME) and each local data file (data.train, data.val).
    Saved in every checkpoint's trainer state; a resume compares them as it compares the config."""
    paths = [spec.rpartition(":")[0] for _, spec, _, _ in component_entries(cfg.reward)
             if isinstance(spec, str) and spec_kind(spec) == "file"]
    paths += [s for key in ("train", "val") for s in data_specs(cfg.data[key]) if isinstance(s, str)]  # synthetic:, hf: are no files
    return {f"file {os.path.abspath(p)}": checkpoint.file_sha256(Path(p)) for p in sorted(set(paths)) if os.path.isfile(p)}


def input_changes(old: dict | None, new: dict) -> dict[str, list]:
    """{"file PATH": [old sha256[:12], new sha256[:12]]} for each file read by both runs whose content changed
    (a file the config no longer names shows as a config change)."""
    return {k: [old[k][:12], new[k][:12]] for k in sorted(new) if old and k in old and old[k] != new[k]}


def _fmt(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in changes.items())


def _start_fresh(out: Path, cfg: DictConfig) -> None:
    """A new run in OUTPUT_DIR: what an earlier run left there would mix with it, so it goes."""
    old = checkpoint.candidates(out / "checkpoints")
    if old or (out / CONFIG_FILE).exists():
        print(f"[fipo_lite] {out}: starting a new run here; the previous run's config"
              f"{f' and {len(old)} checkpoint(s)' if old else ''} are replaced", file=sys.stderr)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / HISTORY_FILE).unlink(missing_ok=True)
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))


def _record(out: Path, row: dict) -> None:
    f = out / HISTORY_FILE
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    last = rows[-1] if rows else {}
    if last.get("step") == row["step"] and last.get("changes") == row["changes"]:
        return  # the same resume again (killed before its next checkpoint): already recorded
    with open(f, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def open_run(cfg: DictConfig, inputs: dict[str, str] | None = None) -> tuple[Path, dict] | None:
    """(checkpoint, trainer state) to resume from, or None for a fresh start; checks that a resume
    continues the same experiment (the config, and the files `inputs` digests: input_digests) and
    records what changed. Call while holding the directory."""
    out, t = Path(cfg.output_dir), cfg.trainer
    if t.resume == "never":
        found = None
    elif t.resume == "auto":
        found = checkpoint.pick(out / "checkpoints")
    else:
        found = Path(t.resume), checkpoint.read_state(t.resume)
    if found is None:
        _start_fresh(out, cfg)
        return None
    path, state = found
    old = checkpoint.read_config(path)
    legacy = out / CONFIG_FILE
    if old is None and legacy.is_file():  # checkpoints from before configs were saved with them
        old = OmegaConf.to_container(OmegaConf.load(legacy))
    new = OmegaConf.to_container(cfg)
    changes = config_changes(old, new) if old is not None else {}
    # a decaying lr schedule, or a warmup given as a share of them, is laid out over total_steps: changing
    # it changes the lr of the steps to come
    schedule_over_steps = cfg.trainer.lr_scheduler != "constant" or cfg.trainer.warmup_ratio is not None
    changes.update(input_changes(state.get("inputs"), inputs or {}))
    relevant = {k: v for k, v in changes.items()
                if k not in RESUME_SAFE_KEYS or (k == "trainer.total_steps" and schedule_over_steps)}
    if relevant and not t.allow_config_change:
        raise RunDirError(
            f"{out} was trained with a different config ({path.name}): {_fmt(relevant)}; use another output_dir, "
            "trainer.resume=never to start over in it (its checkpoints are deleted), or trainer.allow_config_change=true "
            "to continue with the change")
    if relevant:
        print(f"[fipo_lite] warning: {out} continues from step {state['step']} with a changed config: {_fmt(relevant)} "
              f"(recorded in {HISTORY_FILE})", file=sys.stderr)
    if not (out / CONFIG_FILE).exists():  # resumed from another run's checkpoint: this run starts here
        (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(old) if old is not None else cfg))
    if changes:
        _record(out, {"step": state["step"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                      "checkpoint": str(path), "changes": changes, "allowed_by": "trainer.allow_config_change" if relevant else None})
    return path, state
