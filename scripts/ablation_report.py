"""Seed-averaged curves and FIPO's influence-weight distribution for a finished ablation grid.

    python scripts/ablation_report.py configs/ablations/modsum_fipo_vs_dapo_vs_grpo.yaml [--variant fipo]

Reads every run of the grid (RUNS_DIR/VARIANT/seed_S/metrics.jsonl) and writes, next to the grid's
table.md in its out_dir:

    curves.png       mean over seeds (line) and min..max (band) of the mean response length, the
                     train accuracy, held-out avg@k and the share of step-by-step answers, per variant
    influence_VARIANT.png   the FIPO variant's influence weights over training: quantiles of f and of the
                     unclipped exp(FutureKL), the share of tokens moved off 1 and at the upper clip,
                     f on the first tokens of a response against the rest and by advantage sign, and
                     how often the safety rule and the dual clip engaged
    influence_VARIANT.md    the same figures summarised over training and seeds
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from fipo_lite import metrics as M
from fipo_lite.ablation import load_ablation, run_dir
from fipo_lite.objective import INFLUENCE_HEAD

CURVES = [(M.LENGTH["mean"], "mean response length (tokens)"), (M.SAMPLED[M.ACCURACY], "accuracy of all sampled responses"),
          (M.VAL_AVG, "held-out avg@k"), (M.SAMPLED[M.STEPS_FORM_FRAC], "share of step-by-step answers (sampled)")]
INFLUENCE = [
    ("quantiles of f", ["actor/influence_p50", "actor/influence_p90", "actor/influence_p99", "actor/influence_max"]),
    ("unclipped exp(FutureKL)", ["actor/fkl_exp_p01", "actor/fkl_exp_p50", "actor/fkl_exp_p99"]),
    ("share of tokens", ["actor/influence_frac_moved", "actor/influence_frac_upper", "actor/safety_frac", "actor/dual_clip_frac"]),
    ("mean f by token", ["actor/influence_mean_head", "actor/influence_mean_tail", "actor/influence_mean_pos", "actor/influence_mean_neg"]),
]
LABELS = {"actor/influence_frac_moved": "|f - 1| > 0.01", "actor/influence_frac_upper": "f at the upper clip",
          "actor/safety_frac": "safety rule engaged", "actor/dual_clip_frac": "dual-clipped",
          "actor/influence_mean_head": f"first {INFLUENCE_HEAD} tokens", "actor/influence_mean_tail": "later tokens",
          "actor/influence_mean_pos": "A > 0", "actor/influence_mean_neg": "A < 0"}


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[M.STEP], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def across_seeds(runs: list[list[dict]], key: str):
    """Steps present in every seed, with the mean, min and max over seeds."""
    per = [dict(zip(*series(rows, key))) for rows in runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    if not steps:
        return None
    vals = np.array([[p[s] for s in steps] for p in per])
    return np.array(steps), vals.mean(0), vals.min(0), vals.max(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", help="the ablation YAML whose runs are done")
    ap.add_argument("--variant", default="fipo", help="the variant whose influence weights to report")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab = load_ablation(a.file)
    runs = {v: [M.read_jsonl(run_dir(ab, v, s) / "metrics.jsonl") for s in ab.seeds if (run_dir(ab, v, s) / "metrics.jsonl").is_file()]
            for v in ab.variants}
    runs = {v: r for v, r in runs.items() if r}
    if not runs:
        print(f"error: no finished runs under {ab.runs_dir}", file=sys.stderr)
        return 2
    ab.out_dir.mkdir(parents=True, exist_ok=True)

    curves = [(k, t) for k, t in CURVES if any(across_seeds(rs, k) is not None for rs in runs.values())]  # a task without forms has no 4th
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4))
    for ax, (key, title) in zip(axes, curves):
        for v, rs in runs.items():
            agg = across_seeds(rs, key)
            if agg is None:
                continue
            steps, mean, lo, hi = agg
            line, = ax.plot(steps, mean, marker="o" if len(steps) < 15 else None, ms=3, label=f"{v} ({len(rs)} seeds)")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{ab.name}: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    fig.savefig(ab.out_dir / "curves.png", dpi=90)
    plt.close(fig)

    rs = runs.get(a.variant)
    if not rs:
        print(f"[report] no runs of variant {a.variant!r}: influence report skipped", file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, len(INFLUENCE), figsize=(5 * len(INFLUENCE), 4))
    lines = [f"# Influence weights of `{a.variant}` in {ab.name}", "",
             f"Per optimizer step the trainer logs statistics of f = clip(exp(FutureKL), lo, hi) over the response tokens "
             f"of each micro-batch, averaged over the step's micro- and mini-batches; below, their mean and maximum over "
             f"steps, and the mean over seeds ({len(rs)}). Reproduce: `python scripts/ablation_report.py {ab.source} --variant {a.variant}`.", "",
             "| statistic | mean over training | max over training | mean, first quarter of steps | mean, last quarter |",
             "|---|---|---|---|---|"]
    for ax, (title, keys) in zip(axes, INFLUENCE):
        for key in keys:
            agg = across_seeds(rs, key)
            if agg is None:
                continue
            steps, mean, lo, hi = agg
            line, = ax.plot(steps, mean, label=LABELS.get(key, key.removeprefix("actor/")))
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
            q = max(1, len(mean) // 4)
            lines.append(f"| {key.removeprefix('actor/')} | {mean.mean():.4f} | {hi.max():.4f} | {mean[:q].mean():.4f} | {mean[-q:].mean():.4f} |")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{ab.name}/{a.variant}: influence weights over training (mean over seeds, band = min..max)", fontsize=11)
    fig.tight_layout()
    fig.savefig(ab.out_dir / f"influence_{a.variant}.png", dpi=90)
    plt.close(fig)
    (ab.out_dir / f"influence_{a.variant}.md").write_text("\n".join(lines) + "\n")
    print(f"[report] wrote {ab.out_dir / 'curves.png'} and {ab.out_dir}/influence_{a.variant}.png, .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
