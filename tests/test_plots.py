"""The length-dynamics figure: panels, series, fits, missing-metric notes and CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fipo_lite import metrics as M
from fipo_lite import plots


def _write_run(path, mode="fipo", steps=12, eval_every=3, slope=0.01):
    path.mkdir(parents=True)
    rows = []
    for s in range(steps + 1):
        length = 10 + 2 * s
        row = {M.STEP: s}
        if s:
            row.update({M.LENGTH[k]: length + off for k, off in zip(M.LENGTH_KEYS, (-5, -2, 0, 0.5, 2, 6))})
            row.update({M.REWARD_MEAN: 0.1 * s, M.NUM_GEN_BATCHES: 1 + s % 2, M.LENGTH_WEIGHTED_ADV: 0.01 * s,
                        M.POLICY_KL: 1e-3, M.GRAD_NORM: 0.5, M.ENTROPY: 1.0 / s, M.DUAL_CLIP_FRAC: 0.0, M.ACCURACY: 0.05 * s})
            if mode == "fipo":
                row.update({M.INFLUENCE_MEAN: 1.01, M.INFLUENCE_FRAC_UPPER: 0.1, M.INFLUENCE_FRAC_LOWER: 0.6})
        if s % eval_every == 0:
            row.update({M.VAL_AVG: 0.2 + slope * length, M.VAL_LENGTH: float(length)})
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"algorithm:\n  loss_mode: {mode}\n")
    return path


def _ax(fig, title):
    matches = [ax for ax in fig.axes if ax.get_title().split("\n")[0] == title]
    assert len(matches) == 1, [a.get_title() for a in fig.axes]
    return matches[0]


def test_figure_has_all_panels_and_one_series_per_run(tmp_path):
    runs = [plots.load_run(_write_run(tmp_path / "a", "fipo")), plots.load_run(_write_run(tmp_path / "b", "dapo"))]
    fig = plots.make_figure(runs)
    titles = {ax.get_title().split("\n")[0] for ax in fig.axes}
    for stat in ("min", "q25", "mean", "median", "q75"):
        assert f"Response length: {stat}" in titles
    for name, _, _ in plots.TRAIN_PANELS:
        assert name in titles
    assert plots.ACC_PANEL in titles
    mean_ax = _ax(fig, "Response length: mean")
    assert [line.get_label() for line in mean_ax.lines] == ["a (fipo)", "b (dapo)"]
    np.testing.assert_allclose(mean_ax.lines[0].get_xdata(), np.arange(1, 13))
    np.testing.assert_allclose(mean_ax.lines[0].get_ydata(), 10 + 2 * np.arange(1, 13))
    assert mean_ax.get_xlabel() == "training step" and mean_ax.get_ylabel() == "tokens"
    clip_ax = _ax(fig, "Influence clip fractions")
    assert {line.get_label() for line in clip_ax.lines} == {"a (fipo), at upper bound", "a (fipo), at lower bound"}
    assert clip_ax.get_title().endswith("(not logged by b (dapo))")  # the run without influence weights is named


def test_missing_metrics_get_a_note_not_a_crash(tmp_path):
    run = plots.load_run(_write_run(tmp_path / "d", "dapo"))
    fig = plots.make_figure([run])
    ax = _ax(fig, "Influence weight mean")
    assert not ax.lines
    notes = [t.get_text() for t in ax.texts]
    assert any("no data" in n and M.INFLUENCE_MEAN in n for n in notes)


def test_accuracy_length_stage_fits(tmp_path):
    run = plots.load_run(_write_run(tmp_path / "f", steps=30, eval_every=1, slope=0.02))
    steps, x, y, label = plots._accuracy_points(run)
    assert label == "val avg@k" and len(steps) == 31
    fits = plots.stage_fits(steps, x, y, [0, 10, 20, 30])
    assert [f["stage"] for f in fits] == [1, 2, 3]
    for f in fits:
        assert f["slope"] == pytest.approx(0.02) and f["r2"] == pytest.approx(1.0)
    fig = plots.make_figure([run], stages=[0, 15, 30])
    ax = _ax(fig, plots.ACC_PANEL)
    fit_labels = [line.get_label() for line in ax.lines if line.get_label().startswith("stage")]
    assert len(fit_labels) == 2 and "R² 1.00" in fit_labels[0]


def test_smoothing_is_a_trailing_mean():
    np.testing.assert_allclose(plots.smooth(np.array([0.0, 2.0, 4.0, 6.0]), 2), [0.0, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(plots.smooth(np.array([1.0, 5.0]), 1), [1.0, 5.0])


def test_cli_writes_png_and_pdf(tmp_path, capsys):
    a = _write_run(tmp_path / "a")
    for name in ("out.png", "out.pdf"):
        assert plots.main([str(a), "-o", str(tmp_path / name), "--smooth", "3", "--labels", "mine"]) == 0
        assert (tmp_path / name).stat().st_size > 10_000


def test_cli_errors(tmp_path, capsys):
    assert plots.main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plots.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    assert plots.main([str(tmp_path / "blank"), "-o", str(tmp_path / "x.png")]) == 2
    assert "is empty" in capsys.readouterr().err
    a = _write_run(tmp_path / "a")
    assert plots.main([str(a), "--labels", "x,y"]) == 2
    assert "--labels has 2 names for 1 runs" in capsys.readouterr().err


def test_ablation_runs_are_named_by_variant_and_seed(tmp_path):
    run = plots.load_run(_write_run(tmp_path / "tau8" / "seed_1", "fipo"))
    assert run.name == "tau8/seed_1 (fipo)"
    assert plots.load_run(_write_run(tmp_path / "dapo" / "seed_0", "dapo")).name == "dapo/seed_0"


def test_accuracy_source_auto_falls_back_to_train_rows(tmp_path):
    # 13 steps evaluated every 6: 3 eval points, too few for 3 points in each of 3 stages -> per-step train accuracy
    sparse = plots.load_run(_write_run(tmp_path / "sparse", steps=12, eval_every=6))
    fits = plots.accuracy_fits(sparse, n_stages=3)
    assert [f["n"] for f in fits] == [4, 4, 4]  # train rows at steps 1..12, split at 1, 4.67, 8.33, 12
    for f in fits:  # train accuracy 0.05 s against mean length 10 + 2 s: slope 0.025 per token
        assert f["slope"] == pytest.approx(0.025) and f["r2"] == pytest.approx(1.0)
    ax = _ax(plots.make_figure([sparse]), plots.ACC_PANEL)
    assert ax.get_ylabel() == "accuracy (train accuracy)"
    # forcing the 3 eval rows: one stage of 3 points gets a fit, two stages of 2 or fewer do not
    assert len(plots.accuracy_fits(sparse, stages=[0, 12], source="val")) == 1
    assert plots.accuracy_fits(sparse, n_stages=2, source="val") == []
    with pytest.raises(ValueError, match="accuracy source"):
        plots.accuracy_fits(sparse, source="test")


def test_flat_accuracy_has_undefined_r2():
    steps = np.arange(6.0)
    fits = plots.stage_fits(steps, 10 + steps, np.full(6, 0.5), [0, 5])
    assert fits[0]["slope"] == pytest.approx(0.0) and np.isnan(fits[0]["r2"])


def test_many_runs_list_their_fits_in_the_panel(tmp_path):
    runs = [plots.load_run(_write_run(tmp_path / n, "dapo")) for n in ("r1", "r2", "r3")]
    ax = _ax(plots.make_figure(runs), plots.ACC_PANEL)
    assert ax.get_legend() is None  # 3 runs x 3 stages would bury the data
    texts = [t.get_text() for t in ax.texts]
    assert texts[0].startswith("accuracy / token")
    assert texts[1:] == [f"{n} (dapo): " + "  ".join(["0.025 (1.00)"] * 3) for n in ("r1", "r2", "r3")]


def test_cli_prints_fits_and_rejects_bad_options(tmp_path, capsys):
    a = _write_run(tmp_path / "a", steps=30, eval_every=1, slope=0.02)
    assert plots.main([str(a), "-o", str(tmp_path / "o.png"), "--stages", "0,15,30", "--accuracy", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    fits = out["accuracy_length_fits"]["a (fipo)"]
    assert [(f["lo"], f["hi"], f["n"]) for f in fits] == [(0, 15, 15), (15, 30, 16)]
    assert all(f["slope"] == pytest.approx(0.02) for f in fits)
    for bad, msg in ((["--stages", "0,x"], "--stages must be"), (["--stages", "20,10"], "increasing"),
                     (["--n-stages", "0"], "--n-stages must be >= 1"), (["--smooth", "0"], "--smooth must be >= 1")):
        assert plots.main([str(a), "-o", str(tmp_path / "o.png"), *bad]) == 2
        assert msg in capsys.readouterr().err
