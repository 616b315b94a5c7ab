"""The ablation runner with a fake trainer: commands, resume-skipping, the table's numbers, errors."""

from __future__ import annotations

import json
import math
import statistics
import sys
import textwrap

import pytest

from fipo_lite import ablation

FAKE_TRAIN = textwrap.dedent('''
    import json, os, sys, pathlib
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = pathlib.Path(args["output_dir"]); out.mkdir(parents=True, exist_ok=True)
    seed, tau, steps = int(args["seed"]), float(args.get("algorithm.tau", 32)), int(args["trainer.total_steps"])
    with open(out / "calls.txt", "a") as f: f.write("x")
    if os.environ.get("FAKE_FAIL") and args["output_dir"].endswith(os.environ["FAKE_FAIL"]):
        (out / "metrics.jsonl").write_text('{"step": 0}\\n')
        sys.exit(3)
    rows = []
    for s in range(steps + 1):
        r = {"step": s}
        if s: r["response_length/mean"] = 10 + s + tau / 8 + seed
        if s % 2 == 0: r["val/avg_at_k"] = min(1.0, 0.1 * s + 0.01 * seed + tau / 1000)
        rows.append(r)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    (out / "config.yaml").write_text("algorithm:\\n  loss_mode: fipo\\n")
''')


@pytest.fixture
def grid(tmp_path, monkeypatch):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setenv(ablation.TRAIN_CMD_ENV, json.dumps([sys.executable, str(fake)]))
    f = tmp_path / "grid.yaml"
    f.write_text(textwrap.dedent(f'''
        name: taus
        base: configs/tiny_cpu.yaml
        common: [trainer.total_steps=10, trainer.eval_every=2]
        seeds: [0, 1]
        variants:
          t8: [algorithm.tau=8]
          t256: [algorithm.tau=256]
        runs_dir: {tmp_path / "runs"}
        out_dir: {tmp_path / "out"}
    '''))
    return f, tmp_path


def _expected(tau, seed, steps=10):
    val = [min(1.0, 0.1 * s + 0.01 * seed + tau / 1000) for s in range(0, steps + 1, 2)]
    reach = [s for s in range(0, steps + 1, 2) if min(1.0, 0.1 * s + 0.01 * seed + tau / 1000) >= 0.9]
    return {"peak": max(val), "final": val[-1], "length": 10 + steps + tau / 8 + seed, "reach": reach[0]}


def test_grid_runs_tabulates_and_resumes(grid, monkeypatch):
    f, tmp = grid
    monkeypatch.chdir(ablation.Path(__file__).resolve().parents[1])
    assert ablation.main([str(f)]) == 0
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    for variant, tau in (("t8", 8), ("t256", 256)):
        rows = summary[variant]
        assert [r["seed"] for r in rows] == [0, 1]
        for r in rows:
            e = _expected(tau, r["seed"])
            assert r["peak_val_acc"] == pytest.approx(e["peak"]) and r["final_val_acc"] == pytest.approx(e["final"])
            assert r["final_mean_length"] == pytest.approx(e["length"]) and r["step_to_90"] == e["reach"]
    md = (tmp / "out" / "table.md").read_text()
    lengths = [_expected(256, s)["length"] for s in (0, 1)]
    assert f"{statistics.mean(lengths):.1f} ± {statistics.stdev(lengths):.1f}" in md
    assert "| t8 | `algorithm.tau=8` | 2 |" in md
    assert (tmp / "out" / "taus_seed0.png").stat().st_size > 10_000
    # a second invocation skips the finished runs
    assert ablation.main([str(f)]) == 0
    assert (tmp / "runs" / "t8" / "seed_0" / "calls.txt").read_text() == "x"
    # an interrupted run (metrics short of the last step) is redone
    m = tmp / "runs" / "t8" / "seed_1" / "metrics.jsonl"
    m.write_text("\n".join(m.read_text().splitlines()[:3]) + "\n")
    assert ablation.main([str(f)]) == 0
    assert (tmp / "runs" / "t8" / "seed_1" / "calls.txt").read_text() == "xx"


def test_dry_run_prints_commands(grid, capsys, monkeypatch):
    f, tmp = grid
    monkeypatch.chdir(ablation.Path(__file__).resolve().parents[1])
    assert ablation.main([str(f), "--dry-run", "--seeds", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and all("seed=3" in line and "trainer.total_steps=10" in line for line in out)
    assert not (tmp / "runs").exists()


def test_bad_ablation_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/tiny_cpu.yaml\nvariant: {a: [x=1]}\n")
    assert ablation.main([str(bad)]) == 2
    assert "unknown keys ['variant']; valid keys" in capsys.readouterr().err
    bad.write_text("base: configs/tiny_cpu.yaml\nvariants: {a: [algorithm.tauu=1]}\n")
    assert ablation.main([str(bad), "--dry-run"]) == 2
    assert "variant 'a'" in capsys.readouterr().err
    assert ablation.main([str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fipo_vs_dapo_vs_grpo", "tau", "influence_clip", "dual_clip_mask"])
def test_shipped_grids_validate(name, monkeypatch):
    root = ablation.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    ab = ablation.load_ablation(root / "configs" / "ablations" / f"{name}.yaml")
    assert len(ab.variants) >= 2 and ab.seeds
    for v in ab.variants:
        ablation.load_config(ab.base, ablation.overrides(ab, v, ab.seeds[0]))


def test_a_failed_run_does_not_stop_the_others(grid, monkeypatch, capsys):
    f, tmp = grid
    monkeypatch.chdir(ablation.Path(__file__).resolve().parents[1])
    monkeypatch.setenv("FAKE_FAIL", "t8/seed_0")
    assert ablation.main([str(f)]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 runs failed" in err and "taus/t8/seed_0 failed (exit 3)" in err
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert [r["seed"] for r in summary["t8"]] == [1] and [r["seed"] for r in summary["t256"]] == [0, 1]
    md = (tmp / "out" / "table.md").read_text()
    assert "| t8 | `algorithm.tau=8` | 1 |" in md and "**Failed runs**" in md
    # fixed: only the failed run is redone
    monkeypatch.delenv("FAKE_FAIL")
    assert ablation.main([str(f), "--jobs", "2"]) == 0
    calls = {d: (tmp / "runs" / d / "calls.txt").read_text() for d in ("t8/seed_0", "t8/seed_1", "t256/seed_0", "t256/seed_1")}
    assert calls == {"t8/seed_0": "xx", "t8/seed_1": "x", "t256/seed_0": "x", "t256/seed_1": "x"}
    assert "**Failed runs**" not in (tmp / "out" / "table.md").read_text()


def test_interrupt_stops_the_grid(grid, monkeypatch):
    f, tmp = grid
    calls = []

    def interrupted(ab, variant, seed, total):
        calls.append((variant, seed))
        raise KeyboardInterrupt

    monkeypatch.chdir(ablation.Path(__file__).resolve().parents[1])
    monkeypatch.setattr(ablation, "_run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablation.main([str(f)])
    assert calls == [("t8", 0)]  # the later runs never started


def test_finished_run_without_runner_record_is_kept(grid, monkeypatch):
    f, tmp = grid
    monkeypatch.chdir(ablation.Path(__file__).resolve().parents[1])
    assert ablation.main([str(f)]) == 0
    (tmp / "runs" / "t8" / "seed_0" / "ablation_run.json").unlink()  # e.g. trained by hand into the same dir
    assert ablation.main([str(f)]) == 0
    assert (tmp / "runs" / "t8" / "seed_0" / "calls.txt").read_text() == "x"
    rows = json.loads((tmp / "out" / "summary.json").read_text())["t8"]
    assert math.isnan(rows[0]["wall_s"]) and rows[1]["wall_s"] > 0
    assert " (1 n/a) |" in (tmp / "out" / "table.md").read_text()


def test_bad_command_line_values(grid, capsys):
    f, _ = grid
    assert ablation.main([str(f), "--seeds", "0,a"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert ablation.main([str(f), "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
