"""scripts/ablation_report.py on a made-up finished grid: seed-averaged curves and the influence summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_report_averages_seeds_and_summarises_the_influence_weights(tmp_path):
    grid = {"name": "g", "base": str(ROOT / "configs/tiny_cpu.yaml"), "seeds": [0, 1],
            "variants": {"fipo": ["algorithm.loss_mode=fipo"], "dapo": ["algorithm.loss_mode=dapo"]},
            "runs_dir": str(tmp_path / "runs"), "out_dir": str(tmp_path / "out")}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    for variant in grid["variants"]:
        for seed in grid["seeds"]:
            d = tmp_path / "runs" / variant / f"seed_{seed}"
            d.mkdir(parents=True)
            rows = [{"step": s, "response_length/mean": 10.0 * s + seed, "train/accuracy": 0.1 * s,
                     "sampled/accuracy": 0.1 * s, "sampled/steps_form_frac": 0.1 * s,
                     **({"val/avg_at_k": 0.2 * s} if s % 2 == 0 else {}),
                     **({"actor/influence_p99": 1.0 + 0.01 * s + 0.02 * seed, "actor/influence_frac_upper": 0.0}
                        if variant == "fipo" else {})}
                    for s in range(1, 9)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/ablation_report.py"), str(tmp_path / "g.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "influence_fipo.png").stat().st_size > 10_000
    table = (out / "influence_fipo.md").read_text()
    # p99 averaged over seeds is 1.01 + 0.01 * s at step s: mean over steps 1.055, largest seed value 1.10, quarters 1.025 and 1.085
    row = next(line for line in table.splitlines() if line.startswith("| influence_p99 "))
    mean, peak, first, last = (float(c) for c in row.strip("|").split("|")[1:])
    assert (round(mean, 4), round(peak, 4), round(first, 4), round(last, 4)) == (1.055, 1.1, 1.025, 1.085)
    assert "influence_frac_upper" in table and "safety_frac" not in table  # only what was logged


def test_report_says_when_nothing_ran(tmp_path):
    grid = {"base": str(ROOT / "configs/tiny_cpu.yaml"), "variants": {"fipo": ["algorithm.loss_mode=fipo"]},
            "runs_dir": str(tmp_path / "runs"), "out_dir": str(tmp_path / "out")}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/ablation_report.py"), str(tmp_path / "g.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no finished runs" in proc.stderr
