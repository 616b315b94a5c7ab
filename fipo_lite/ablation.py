"""Ablation grids: variants x seeds of `fipo_lite train`, then a markdown table and overlay plots.

    python -m fipo_lite ablate configs/ablations/fipo_vs_dapo_vs_grpo.yaml [--seeds 0,1] [--dry-run] [--jobs 1]

An ablation file:

    name: tau                          # optional; defaults to the file name
    base: configs/tiny_cpu.yaml        # the run config every variant starts from
    common: [trainer.total_steps=30]   # overrides shared by all variants
    seeds: [0, 1]
    variants:                          # name -> its own overrides
      tau8: [algorithm.tau=8]
      tau32: [algorithm.tau=32]
    runs_dir: runs/ablations/tau       # optional (default runs/ablations/NAME)
    out_dir: results/ablations/tau     # optional (default results/ablations/NAME)

Each run is a subprocess (started in this working directory, so a relative `reward.function` file or
data path means the same file there; every variant's config and reward files are loaded here first,
before any run) writing RUNS_DIR/VARIANT/seed_S; a run whose metrics.jsonl already
reaches its last step is skipped, so an interrupted ablation resumes where it stopped. Runs go one
at a time by default (on a small CPU box parallel runs only slow each other down); a failed run is
reported at the end and the others still run.

In a notebook, `fipo_lite.ablate(FILE)` or `fipo_lite.ablate(base=..., variants=..., seeds=...)` runs the
same grid and returns the table (`fipo_lite.api.ablate`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import metrics as M
from .config import load_config
from .errors import UserError
from .rewards import build_components

KEYS = {"name", "description", "base", "common", "seeds", "variants", "runs_dir", "out_dir"}
TRAIN_CMD_ENV = "FIPO_LITE_ABLATE_TRAIN_CMD"  # tests substitute a fake trainer here


@dataclass
class Ablation:
    name: str
    base: str
    common: list[str]
    seeds: list[int]
    variants: dict[str, list[str]]
    runs_dir: Path
    out_dir: Path
    description: str = ""
    source: str = ""  # the ablation file, for the "reproduce" line


def load_ablation(path: str | Path) -> Ablation:
    """Read and validate an ablation file (unknown keys and bad shapes are errors that say what is valid)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"ablation file not found: {p}")
    spec = yaml.safe_load(p.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{p}: expected a mapping with keys {sorted(KEYS)}")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"{p}: unknown keys {unknown}; valid keys: {sorted(KEYS)}")
    for key in ("base", "variants"):
        if key not in spec:
            raise ValueError(f"{p}: missing required key '{key}'")
    variants = spec["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{p}: 'variants' must map variant names to lists of dotted overrides")
    for name, ov in variants.items():
        if not isinstance(ov, list) or not all(isinstance(o, str) and "=" in o for o in ov):
            raise ValueError(f"{p}: variant '{name}' must be a list of 'key=value' overrides, got {ov!r}")
    common = spec.get("common", []) or []
    if not isinstance(common, list) or not all(isinstance(o, str) and "=" in o for o in common):
        raise ValueError(f"{p}: 'common' must be a list of 'key=value' overrides")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{p}: 'seeds' must be a non-empty list of integers")
    name = str(spec.get("name") or p.stem)
    return Ablation(name=name, base=str(spec["base"]), common=list(common), seeds=list(seeds),
                    variants={str(k): list(v) for k, v in variants.items()},
                    runs_dir=Path(spec.get("runs_dir") or f"runs/ablations/{name}"),
                    out_dir=Path(spec.get("out_dir") or f"results/ablations/{name}"),
                    description=str(spec.get("description", "")), source=str(p))


def run_dir(ab: Ablation, variant: str, seed: int) -> Path:
    return ab.runs_dir / variant / f"seed_{seed}"


def overrides(ab: Ablation, variant: str, seed: int) -> list[str]:
    # the tracker run's name says which cell of the grid it is (the grid's own keys may rename it)
    return [f"trainer.run_name={ab.name}/{variant}/seed_{seed}", *ab.common, *ab.variants[variant], f"seed={seed}",
            f"output_dir={run_dir(ab, variant, seed)}", "trainer.progress=false"]


def train_command(ab: Ablation, variant: str, seed: int) -> list[str]:
    prefix = json.loads(os.environ[TRAIN_CMD_ENV]) if TRAIN_CMD_ENV in os.environ else [sys.executable, "-m", "fipo_lite", "train"]
    return [*prefix, "--config", ab.base, *overrides(ab, variant, seed)]


def is_complete(out: Path, total_steps: int) -> bool:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return False
    rows = M.read_jsonl(f)
    return bool(rows) and rows[-1].get(M.STEP) == total_steps


def _run_one(ab: Ablation, variant: str, seed: int, total_steps: int) -> dict:
    """Train one variant x seed unless its metrics already reach the last step. The wall time is that of
    the attempt that finished the run (the shipped grids save no checkpoints, so a retry starts over)."""
    out = run_dir(ab, variant, seed)
    info_file = out / "ablation_run.json"
    prev = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if is_complete(out, total_steps):
        if prev.get("returncode") == 0:
            return {**prev, "skipped": True}
        # finished outside this runner (or it died before writing its record): keep it, wall time unknown
        return {"variant": variant, "seed": seed, "wall_s": float("nan"), "returncode": 0, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    cmd = train_command(ab, variant, seed)
    print(f"[ablate] {ab.name}/{variant}/seed_{seed}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    info = {"variant": variant, "seed": seed, "wall_s": time.time() - t0, "returncode": proc.returncode,
            "command": shlex.join(cmd)}
    info_file.write_text(json.dumps(info, indent=1))
    if proc.returncode != 0:
        raise RuntimeError(f"{ab.name}/{variant}/seed_{seed} failed (exit {proc.returncode}); see {out / 'train.log'}")
    if not is_complete(out, total_steps):
        raise RuntimeError(f"{ab.name}/{variant}/seed_{seed} exited 0 but {out / 'metrics.jsonl'} stops before step {total_steps}")
    print(f"[ablate] {ab.name}/{variant}/seed_{seed}: done in {info['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return {**info, "skipped": False}


def _run_all(ab: Ablation, tasks: list[tuple[str, int]], totals: dict[str, int], jobs: int) -> tuple[dict, list[str]]:
    """Every task, in order (jobs=1) or `jobs` at a time. A failed run does not stop the others; Ctrl-C does."""
    infos, failures = {}, []

    def one(task):
        try:
            return task, _run_one(ab, task[0], task[1], totals[task[0]]), None
        except RuntimeError as e:
            return task, None, str(e)

    if jobs <= 1:
        outcomes = (one(t) for t in tasks)  # lazy: an interrupt leaves the later runs unstarted
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=jobs)
        outcomes = pool.map(one, tasks)
    try:
        for task, info, err in outcomes:
            if err:
                print(f"[ablate] {err}", file=sys.stderr, flush=True)
                failures.append(err)
            else:
                infos[task] = info
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: queued runs never start
    return infos, failures


def run_summary(out: Path, wall_s: float) -> dict:
    """Val accuracy (initial, peak, final, first eval at >= 0.9), sampled accuracy (mean, first step at
    >= 0.5 and >= 0.9), mean response length at 25%, 50% and 100% of the steps, wall time."""
    rows = M.read_jsonl(out / "metrics.jsonl")
    val = [(r[M.STEP], r[M.VAL_AVG]) for r in rows if isinstance(r.get(M.VAL_AVG), (int, float))]
    lengths = [r[M.LENGTH["mean"]] for r in rows if isinstance(r.get(M.LENGTH["mean"]), (int, float))]
    reach = [s for s, v in val if v >= 0.9]
    # The policy's accuracy on everything it sampled (the kept groups' accuracy, which the recipe logs,
    # is biased: dynamic sampling drops the all-correct groups); runs logged before sampled/* existed: the latter.
    acc_key = M.SAMPLED[M.ACCURACY] if any(M.SAMPLED[M.ACCURACY] in r for r in rows) else M.ACCURACY
    train = [(r[M.STEP], r[acc_key]) for r in rows if isinstance(r.get(acc_key), (int, float))]
    train_reach = [s for s, v in train if v >= 0.9]
    train_half = [s for s, v in train if v >= 0.5]
    by_step = {r[M.STEP]: r[M.LENGTH["mean"]] for r in rows if isinstance(r.get(M.LENGTH["mean"]), (int, float))}
    last = max(by_step) if by_step else 0

    def length_at(frac: float) -> float:  # mean response length at (the last logged step up to) frac of the run
        steps = [s for s in by_step if s <= max(1, round(frac * last))]
        return by_step[max(steps)] if steps else float("nan")

    return {
        "length_at_25": length_at(0.25),
        "length_at_50": length_at(0.5),
        "train_acc_mean": sum(v for _, v in train) / len(train) if train else float("nan"),
        "train_step_to_90": float(train_reach[0]) if train_reach else float("nan"),
        "train_step_to_50": float(train_half[0]) if train_half else float("nan"),
        "peak_val_acc": max(v for _, v in val) if val else float("nan"),
        "final_val_acc": val[-1][1] if val else float("nan"),
        "initial_val_acc": val[0][1] if val else float("nan"),
        "step_to_90": float(reach[0]) if reach else float("nan"),
        "final_mean_length": lengths[-1] if lengths else float("nan"),
        "wall_s": wall_s,
    }


COLUMNS = [("peak_val_acc", "peak val avg@k", "{:.3f}"), ("final_val_acc", "final val avg@k", "{:.3f}"),
           ("step_to_90", "first eval step with val >= 0.9", "{:.1f}"),
           ("train_acc_mean", "mean sampled accuracy over all steps", "{:.3f}"),
           ("train_step_to_50", "first step with sampled accuracy >= 0.5", "{:.1f}"),
           ("train_step_to_90", "first step with sampled accuracy >= 0.9", "{:.1f}"),
           ("length_at_25", "mean length at 25% of steps", "{:.1f}"), ("length_at_50", "mean length at 50% of steps", "{:.1f}"),
           ("final_mean_length", "final mean length (tokens)", "{:.1f}"),
           ("wall_s", "wall time (s)", "{:.0f}")]


def _mean_spread(values: list[float], fmt: str, missing: str = "n/a") -> str:
    """'mean ± stdev' over seeds; nan values (a threshold never reached, nothing logged) are counted apart."""
    finite = [v for v in values if v == v]
    if not finite:
        return missing if values else "-"
    text = fmt.format(statistics.mean(finite))
    if len(finite) > 1:
        text += " ± " + fmt.format(statistics.stdev(finite))
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} {missing})"
    return text


def table(ab: Ablation, summaries: dict[str, list[dict]]) -> str:
    lines = ["| variant | overrides | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for variant, rows in summaries.items():
        cells = [_mean_spread([r[key] for r in rows], fmt, "never" if "_to_" in key else "n/a") for key, _, fmt in COLUMNS]
        lines.append(f"| {variant} | `{' '.join(ab.variants[variant])}` | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(ab: Ablation, *, jobs: int = 1, dry_run: bool = False) -> dict:
    # validate every variant's config before spending any compute
    totals = {}
    for variant in ab.variants:
        try:
            cfg = load_config(ab.base, overrides(ab, variant, ab.seeds[0]))
            build_components(cfg.reward)  # reward.function(s) load here too (same working directory as the runs)
        except UserError as e:
            raise ValueError(f"variant '{variant}': {e}") from None
        totals[variant] = cfg.trainer.total_steps
    tasks = [(v, s) for v in ab.variants for s in ab.seeds]
    if dry_run:
        for v, s in tasks:
            print(shlex.join(train_command(ab, v, s)))
        return {}
    infos, failures = _run_all(ab, tasks, totals, jobs)
    summaries: dict[str, list[dict]] = {}
    for (v, s), info in infos.items():
        summaries.setdefault(v, []).append({"seed": s, **run_summary(run_dir(ab, v, s), info["wall_s"])})
    ab.out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# Ablation: {ab.name}", "", ab.description, "",
          f"Base config `{ab.base}`; common overrides `{' '.join(ab.common)}`; seeds {ab.seeds}. "
          "Mean ± standard deviation over seeds; val avg@k is the held-out accuracy; wall time is "
          "that of the attempt that finished each run.", "",
          table(ab, summaries), ""]
    if failures:
        md += ["**Failed runs** (left out of the table; rerun the same command to retry them):", ""]
        md += [f"- {f}" for f in failures] + [""]
    md += ["Reproduce (finished runs are skipped):", "",
          "    " + shlex.join(["python", "-m", "fipo_lite", "ablate", ab.source, "--seeds", ",".join(map(str, ab.seeds))]), ""]
    (ab.out_dir / "table.md").write_text("\n".join(md))
    (ab.out_dir / "summary.json").write_text(json.dumps({**summaries, **({"_failed": failures} if failures else {})}, indent=1))
    _plots(ab, done=set(infos))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(tasks)} runs failed (table of the others: {ab.out_dir / 'table.md'}):\n"
                           + "\n".join(failures))
    return summaries


def _plots(ab: Ablation, done: set[tuple[str, int]]) -> None:
    """Overlay of every variant for the first seed (seeds differ little; one figure stays readable)."""
    import matplotlib.pyplot as plt

    from .plots import load_run, make_figure

    for seed in ab.seeds[:1]:
        runs = [load_run(run_dir(ab, v, seed), name=v) for v in ab.variants if (v, seed) in done]
        if not runs:
            continue
        fig = make_figure(runs, title=f"{ab.name} (seed {seed})")
        fig.savefig(ab.out_dir / f"{ab.name}_seed{seed}.png", dpi=90)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fipo_lite ablate", description="Run an ablation grid and tabulate it.")
    ap.add_argument("file", help="ablation YAML, e.g. configs/ablations/tau.yaml")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (overrides the file)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: runs share the CPU otherwise)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = ap.parse_args(argv)
    try:
        ab = load_ablation(args.file)
        if args.seeds:
            try:
                ab.seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        summaries = run_ablation(ab, jobs=args.jobs, dry_run=args.dry_run)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # some runs failed; the others are tabulated
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summaries:
        print((ab.out_dir / "table.md").read_text())
    return 0

