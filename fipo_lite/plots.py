"""Length-dynamics plots from one or more runs' metrics.jsonl (paper Figs. 3, 4, 5, 9-11).

    python -m fipo_lite plot runs/fipo runs/dapo -o length_dynamics.png [--smooth 5] [--n-stages 3]

One figure, shared step axis, one colour per run. A run that did not log a metric gets a note on
that panel instead of a line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # never open a window; a notebook keeps its inline backend, so figures show
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import metrics as M  # noqa: E402


@dataclass
class Run:
    name: str
    rows: list[dict]
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows that logged `key` with a finite number."""
        pts = [(r[M.STEP], r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        if not pts:
            return np.array([]), np.array([])
        s, v = zip(*pts)
        return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def load_run(path: str | Path, name: str | None = None) -> Run:
    """A run directory (or a metrics.jsonl file); a clear error when it is missing or empty."""
    p = Path(path)
    f = p / "metrics.jsonl" if p.is_dir() else p
    if not p.exists():
        raise ValueError(f"run directory not found: {p}")
    if not f.is_file():
        raise ValueError(f"{p} has no metrics.jsonl (is it a fipo_lite run directory?)")
    rows = [r for r in M.read_jsonl(f) if M.STEP in r]
    if not rows:
        raise ValueError(f"{f} is empty: the run has not logged a step yet")
    config = {}
    cfg_file = f.parent / "config.yaml"
    if cfg_file.is_file():
        import yaml

        config = yaml.safe_load(cfg_file.read_text()) or {}
    if name is None:  # ablation runs live in VARIANT/seed_S: name them by both
        d = f.parent.resolve()
        name = f"{d.parent.name}/{d.name}" if re.fullmatch(r"seed_\d+", d.name) else d.name
        mode = (config.get("algorithm") or {}).get("loss_mode")
        name = f"{name} ({mode})" if mode and mode not in name else name
    return Run(name, rows, config)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window 1: unchanged); the first points average what exists."""
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# (title, unit label, [(metric key, line label or None)])
LENGTH_PANELS = [(f"Response length: {k}", "tokens", [(M.LENGTH[k], None)]) for k in ("min", "q25", "mean", "median", "q75")]
TRAIN_PANELS = [
    ("Mean reward", "reward", [(M.REWARD_MEAN, None)]),
    ("Dynamic-sampling batches", "generation batches / step", [(M.NUM_GEN_BATCHES, None)]),
    ("Length-weighted mean advantage", "Σ L·A / Σ L", [(M.LENGTH_WEIGHTED_ADV, None)]),
    ("Policy KL (old ‖ new)", "nats / token", [(M.POLICY_KL, None)]),
    ("Gradient norm", "‖g‖ before clipping", [(M.GRAD_NORM, None)]),
    ("Entropy", "nats / token", [(M.ENTROPY, None)]),
    ("Influence weight mean", "f (clipped)", [(M.INFLUENCE_MEAN, None)]),
    ("Influence clip fractions", "fraction of tokens", [(M.INFLUENCE_FRAC_UPPER, "at upper bound"), (M.INFLUENCE_FRAC_LOWER, "at lower bound")]),
    ("Dual-clip fraction", "fraction of tokens", [(M.DUAL_CLIP_FRAC, None)]),
]
ACC_PANEL = "Accuracy vs mean response length"
LINESTYLES = ["-", "--", ":", "-."]


ACC_SOURCES = {"val": (M.VAL_AVG, M.VAL_LENGTH, "val avg@k"), "train": (M.ACCURACY, M.LENGTH["mean"], "train accuracy")}
MIN_FIT_POINTS = 3  # two points always fit a line exactly (R² = 1), which says nothing


def _accuracy_points(run: Run, source: str = "auto", min_points: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(steps, mean length, accuracy, label) from evaluation rows ("val"), per-step training rows ("train"),
    or ("auto") evaluation rows when there are at least `min_points` of them, else training rows."""
    if source not in ("auto", *ACC_SOURCES):
        raise ValueError(f"accuracy source must be auto, val or train, got {source!r}")
    found = []
    for name in (["val", "train"] if source == "auto" else [source]):
        acc_key, len_key, label = ACC_SOURCES[name]
        rows = [r for r in run.rows if isinstance(r.get(acc_key), (int, float)) and isinstance(r.get(len_key), (int, float))]
        pts = (np.array([r[M.STEP] for r in rows], float), np.array([r[len_key] for r in rows], float),
               np.array([r[acc_key] for r in rows], float), label)
        if len(rows) >= min_points:
            return pts
        if len(rows) >= 2:
            found.append(pts)
    return found[0] if found else (np.array([]), np.array([]), np.array([]), "")


def accuracy_fits(run: Run, stages: list[float] | None = None, n_stages: int = 3, source: str = "auto") -> list[dict]:
    """Per-stage accuracy-vs-length fits of one run: user boundaries, or the run split evenly into n_stages.
    "auto" uses evaluation rows if there are enough for MIN_FIT_POINTS per stage, else the per-step training accuracy."""
    n = len(stages) - 1 if stages else n_stages
    steps, x, y, _ = _accuracy_points(run, source, min_points=MIN_FIT_POINTS * max(n, 1))
    if not len(steps):
        return []
    bounds = list(stages) if stages else list(np.linspace(steps.min(), steps.max(), n_stages + 1))
    return stage_fits(steps, x, y, bounds)


def stage_fits(steps, x, y, boundaries, min_points: int = MIN_FIT_POINTS) -> list[dict]:
    """Least-squares line of y on x inside each stage [b_i, b_{i+1}) (last stage closed); slope, intercept, R².
    Stages with fewer than min_points points or no spread in length are skipped; R² is nan when y is constant."""
    fits = []
    for i, (lo, hi) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        last = i == len(boundaries) - 2
        sel = (steps >= lo) & ((steps <= hi) if last else (steps < hi))
        if sel.sum() < min_points or np.ptp(x[sel]) == 0:
            continue
        slope, intercept = np.polyfit(x[sel], y[sel], 1)
        pred = slope * x[sel] + intercept
        ss_res, ss_tot = float(((y[sel] - pred) ** 2).sum()), float(((y[sel] - y[sel].mean()) ** 2).sum())
        fits.append({"stage": i + 1, "lo": float(lo), "hi": float(hi), "n": int(sel.sum()), "slope": float(slope),
                     "intercept": float(intercept), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "x": x[sel]})
    return fits


def _width(i: int, n: int) -> float:
    """Later runs are drawn thinner on top, so a run hidden under an identical one still shows at its edges."""
    return 1.6 if n == 1 else 2.6 - 1.6 * i / (n - 1)


def _note(ax, text: str) -> None:
    """A grey note inside the panel, wrapped by hand and kept out of the layout engine."""
    import textwrap

    t = ax.text(0.5, 0.5, textwrap.fill(text, 48), ha="center", va="center", transform=ax.transAxes, fontsize=7.5, color="0.4")
    t.set_in_layout(False)


def make_figure(runs: list[Run], *, smooth_window: int = 1, stages: list[float] | None = None, n_stages: int = 3,
                accuracy: str = "auto", title: str | None = None):
    """The whole dashboard as a matplotlib Figure (5 x 3 panels)."""
    if not runs:
        raise ValueError("no runs to plot")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(5, 3, figsize=(16, 20), constrained_layout=True)
    flat = axes.ravel()
    panels = LENGTH_PANELS[:3] + LENGTH_PANELS[3:] + [None] + TRAIN_PANELS  # slot 5 is the accuracy panel
    last_step = max(r[M.STEP] for run in runs for r in run.rows)
    for ax, panel in zip(flat, panels):
        if panel is None:
            _accuracy_panel(ax, runs, colors, stages, n_stages, accuracy)
            continue
        name, unit, keys = panel
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("training step")
        ax.set_ylabel(unit)
        ax.set_xlim(0, max(last_step, 1))
        missing = []
        for i, run in enumerate(runs):
            for j, (key, sub) in enumerate(keys):
                s, v = run.series(key)
                if not len(s):
                    missing.append(f"{run.name}: {key}")
                    continue
                label = run.name if sub is None else f"{run.name}, {sub}"
                ax.plot(s, smooth(v, smooth_window), color=colors[i % len(colors)], ls=LINESTYLES[j % 4], lw=_width(i, len(runs)), label=label)
        if missing:
            hint = " (dapo/grpo runs have no influence weights)" if "influence" in keys[0][0] else ""
            lacking = sorted({m.split(": ")[0] for m in missing})
            what = ", ".join(sorted({m.split(": ")[1] for m in missing}))
            if ax.lines:  # some runs have it: say which do not, under the title
                ax.set_title(f"{name}\n(not logged by {', '.join(lacking)})", fontsize=10)
            else:
                _note(ax, f"no data: {what} not logged by {', '.join(lacking)}{hint}")
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], lw=_width(i, len(runs)) + 0.5, label=run.name) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 6), fontsize=11, frameon=False)
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def _accuracy_panel(ax, runs, colors, stages, n_stages, accuracy) -> None:
    ax.set_title(ACC_PANEL, fontsize=11)
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("accuracy")
    any_points, table, sources = False, [], set()
    for i, run in enumerate(runs):
        n = len(stages) - 1 if stages else n_stages
        steps, x, y, label = _accuracy_points(run, accuracy, min_points=MIN_FIT_POINTS * max(n, 1))
        if not len(steps):
            continue
        any_points = True
        sources.add(label)
        c = colors[i % len(colors)]
        ax.scatter(x, y, s=14, color=c, label=f"{run.name} ({label})" if len(runs) <= 2 else None)
        fits = accuracy_fits(run, stages, n_stages, accuracy)
        for fit in fits:
            xs = np.linspace(fit["x"].min(), fit["x"].max(), 2)
            label = (f"stage {fit['stage']} (steps {fit['lo']:.0f}-{fit['hi']:.0f}): slope {fit['slope']:.3g}/token, R² {fit['r2']:.2f} (n={fit['n']})"
                     if len(runs) <= 2 else None)
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], color=c, lw=1.2, ls=LINESTYLES[(fit["stage"] - 1) % 4], label=label)
        if fits and len(runs) > 2:  # a legend per stage would cover the data: one compact line per run instead
            table.append((c, f"{run.name}: " + "  ".join(f"{f['slope']:.3f} ({f['r2']:.2f})" for f in fits)))
    if sources:
        ax.set_ylabel(f"accuracy ({', '.join(sorted(sources))})")
    if not any_points:
        _note(ax, f"no data: need >= 2 rows with {M.VAL_AVG} or {M.ACCURACY}")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6.5, loc="lower right")
    if table:
        table.insert(0, ("0.3", "accuracy / token (R²) per stage"))
    for k, (c, text) in enumerate(table):  # upper left: accuracy grows with length, so that corner is usually empty
        t = ax.text(0.02, 0.97 - 0.055 * k, text, transform=ax.transAxes, fontsize=6.5, color=c, va="top",
                    bbox=dict(facecolor="white", alpha=0.7, lw=0, pad=0.5))
        t.set_in_layout(False)
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fipo_lite plot", description="Plot length dynamics of one or more runs.")
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("-o", "--out", default="length_dynamics.png", help="output file (.png or .pdf)")
    ap.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1: none)")
    ap.add_argument("--stages", default=None, help="stage boundaries in steps for the accuracy-length fits, e.g. 0,20,40")
    ap.add_argument("--n-stages", type=int, default=3, help="split the run evenly into N stages (without --stages)")
    ap.add_argument("--accuracy", choices=["auto", "val", "train"], default="auto",
                    help="accuracy-length panel: eval rows, per-step train accuracy, or auto (eval rows if >= 3 per stage)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    try:
        if len(labels) != len(args.runs):
            raise ValueError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
        runs = [load_run(r, name) for r, name in zip(args.runs, labels)]
        try:
            stages = [float(s) for s in args.stages.split(",")] if args.stages else None
        except ValueError:
            raise ValueError(f"--stages must be comma-separated step numbers, e.g. 0,20,40; got {args.stages!r}") from None
        if stages is not None and (len(stages) < 2 or stages != sorted(stages)):
            raise ValueError("--stages needs at least two increasing step boundaries, e.g. 0,20,40")
        if args.n_stages < 1:
            raise ValueError(f"--n-stages must be >= 1, got {args.n_stages}")
        if args.smooth < 1:
            raise ValueError(f"--smooth must be >= 1 (1: no smoothing), got {args.smooth}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig = make_figure(runs, smooth_window=args.smooth, stages=stages, n_stages=args.n_stages, accuracy=args.accuracy, title=args.title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    fits = {r.name: [{k: f[k] for k in ("stage", "lo", "hi", "n", "slope", "r2")} for f in accuracy_fits(r, stages, args.n_stages, args.accuracy)]
            for r in runs}
    print(json.dumps({"wrote": str(out), "runs": [r.name for r in runs], "accuracy_length_fits": fits}))
    return 0
