"""Experiment trackers (trainer.logger): TensorBoard, W&B (offline) and MLflow (a local store) get
metrics.jsonl's rows; a resumed run continues the same tracker runs and never logs a step twice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fipo_lite import checkpoint, metrics as M, tracking
from fipo_lite.config import ConfigError, load_config
from fipo_lite.errors import UserError
from fipo_lite.trainer import main, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model_dir: Path, out: Path, **extra):
    base = {
        "model.path": str(model_dir), "output_dir": str(out), "trainer.total_steps": 2, "trainer.train_batch_size": 2,
        "trainer.ppo_mini_batch_size": 2, "trainer.micro_batch_size": 8, "rollout.n": 2, "rollout.max_new_tokens": 8,
        "trainer.eval_every": 1, "trainer.eval_k": 2, "data.val_size": 2, "trainer.save_every": 0, "trainer.progress": False,
        "algorithm.filter_groups.enable": False, "data.train": "synthetic:addition", "data.val": "synthetic:addition",
        "trainer.project": "fipo_lite_tests", "data.train_size": 16,
    }
    base.update(extra)
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"{k}={v}" for k, v in base.items()])


def _jsonl_scalars(out: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every number metrics.jsonl holds (null: NaN or inf, which no tracker gets)."""
    return {(k, r[M.STEP]): float(v) for r in M.read_jsonl(out / "metrics.jsonl") for k, v in r.items()
            if k != M.STEP and isinstance(v, (int, float))}


def _tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(out / tracking.TENSORBOARD_DIR), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------- config and extras
def test_logger_names_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"'trainer.logger' has 'neptune'; valid values: \['console', 'tensorboard', 'wandb', 'mlflow'\]"):
        load_config(None, ["trainer.logger=[console,neptune]"])
    with pytest.raises(ConfigError, match="'trainer.logger' is 5; must be a list"):
        load_config(None, ["trainer.logger=5"])
    assert list(load_config(None).trainer.logger) == ["console"]
    assert list(load_config(None, ["trainer.logger=tensorboard"]).trainer.logger) == ["tensorboard"]  # TRL's report_to="..."
    assert list(load_config(None, ["trainer.logger=[console,wandb,console]"]).trainer.logger) == ["console", "wandb"]
    assert list(load_config(None, ["trainer.logger=[]"]).trainer.logger) == []  # metrics.jsonl only


def test_a_missing_tracker_package_stops_before_the_run_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_installed", lambda package: package != "wandb")
    out = tmp_path / "run"
    rc = main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"output_dir={out}", "trainer.logger=[console,wandb]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: trainer.logger 'wandb' needs the 'wandb' package") and ".[wandb]" in err[0]
    assert not out.exists()  # nothing started: no run directory, no model built


def test_scalars_skip_the_step_and_non_finite_values():
    import torch

    assert tracking.scalars({"step": 3, "a": 1, "b": math.nan, "c": math.inf, "d": torch.tensor(0.5), "e": None, "f": "x"}) == {
        "a": 1.0, "d": 0.5}


def test_the_facade_skips_steps_logged_before_and_logs_tables(tmp_path, monkeypatch):
    """Without a model: rows and a table to TensorBoard and MLflow; reopened as a resume, the steps up to
    the last one logged are not sent again, tables included."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "trainer.logger=[tensorboard,mlflow]", "trainer.run_name=unit"])
    (tmp_path / "run").mkdir()
    with tracking.Tracker() as tr:
        tr.open(cfg, 0, resumed=False)
        for step in (1, 2):
            tr.log({M.STEP: step, "x": float(step)})
        tr.log_table("samples", [{"prompt": "1+1", "response": "2 | ok"}, {"prompt": "2+2", "reward": 1.0}])
    with tracking.Tracker() as tr:  # resumed from a checkpoint at step 1: step 2 is redone
        tr.open(cfg, 1, resumed=True)
        tr.log_table("samples", [{"prompt": "again"}], step=2)
        for step in (2, 3):
            tr.log({M.STEP: step, "x": 10.0 * step})
    assert _tb_scalars(tmp_path / "run")["x"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    client = MlflowClient()
    run_id = json.loads((tmp_path / "run" / tracking.STATE_FILE).read_text())["mlflow"]["run_id"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "x")) == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert client.get_run(run_id).info.run_name == "unit"
    tables = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert tables == ["samples/step_2.json"]
    rows = json.loads(Path(client.download_artifacts(run_id, "samples/step_2.json", str(tmp_path / "dl"))).read_text())
    assert rows[0]["prompt"] == "1+1"  # the first table, not the resumed run's


def test_an_unusable_mlflow_store_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # mlflow 3 refuses its file store unless allowed
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "trainer.logger=[mlflow]"])
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="trainer.logger 'mlflow' cannot use the tracking URI: .*set MLFLOW_TRACKING_URI") as e:
        with tracking.Tracker() as tr:
            tr.open(cfg, 0, resumed=False)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- tensorboard
def test_tensorboard_scalars_equal_metrics_jsonl(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    train(_cfg(tiny_model_dir, out, **{"trainer.logger": "[console,tensorboard]"}))
    jsonl = _jsonl_scalars(out)
    assert {s for _, s in jsonl} == {0, 1, 2} and ("val/avg_at_k", 0) in jsonl and ("actor/loss", 2) in jsonl
    tb = {(tag, step): value for tag, events in _tb_scalars(out).items() for step, value in events}
    assert tb.keys() == jsonl.keys()
    for key, value in jsonl.items():  # TensorBoard stores float32
        assert tb[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert not (out / tracking.STATE_FILE).exists() or "tensorboard" in json.loads((out / tracking.STATE_FILE).read_text())


# ----------------------------------------------------------------------------- resume: W&B, MLflow, TensorBoard
@pytest.fixture(scope="module")
def resumed_run(tiny_model_dir, tmp_path_factory):
    """Steps 0-3 logged, killed before step 3's checkpoint (the one at step 2 survives), then resumed to
    step 4: step 3 is trained again, and must not reach a tracker twice."""
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    logged: list[tuple[str, int]] = []  # (W&B run id, step) of every history row of metrics W&B was given
    tables: list[tuple[str, int]] = []  # and of the sample tables
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                     "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
            mp.setenv(k, v)
        mp.delenv("WANDB_API_KEY", raising=False)
        (tmp / "wandb").mkdir()
        real_log, real_save = wandb.sdk.wandb_run.Run.log, checkpoint.save

        def spy_log(run, data, step=None, **kw):
            is_table = all(isinstance(v, wandb.Table) for v in data.values())
            (tables if is_table else logged).append((run.id, step))
            return real_log(run, data, step=step, **kw)

        def killed_at_3(root, step, *args, **kw):
            if step == 3:
                raise RuntimeError("killed")
            return real_save(root, step, *args, **kw)

        mp.setattr(wandb.sdk.wandb_run.Run, "log", spy_log)
        mp.setattr(checkpoint, "save", killed_at_3)
        loggers = "[console,tensorboard,wandb,mlflow]"
        with pytest.raises(RuntimeError, match="killed"):
            train(_cfg(tiny_model_dir, out, **{"trainer.logger": loggers, "trainer.total_steps": 3, "trainer.save_every": 2}))
        first = json.loads((out / tracking.STATE_FILE).read_text())
        train(_cfg(tiny_model_dir, out, **{"trainer.logger": loggers, "trainer.total_steps": 4, "trainer.save_every": 2}))
    return {"out": out, "tmp": tmp, "logged": logged, "tables": tables, "first": first, "state": json.loads((out / tracking.STATE_FILE).read_text())}


def test_resume_redoes_a_step_the_trackers_do_not_see_twice(resumed_run):
    rows = M.read_jsonl(resumed_run["out"] / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [0, 1, 2, 3, 4]  # step 3 redone after the resume
    st = resumed_run["state"]
    assert resumed_run["first"]["wandb"]["last_step"] == 3 and st["wandb"]["last_step"] == 4
    assert st["tensorboard"]["last_step"] == 4 and st["mlflow"]["last_step"] == 4


def test_wandb_offline_resume_keeps_the_run_id(resumed_run):
    run_id = resumed_run["state"]["wandb"]["id"]
    assert resumed_run["first"]["wandb"]["id"] == run_id
    logged = resumed_run["logged"]
    assert logged == [(run_id, s) for s in (0, 1, 2, 3, 4)]  # one history row per step, step 3 once
    steps = [s for _, s in resumed_run["tables"]]
    assert steps and len(steps) == len(set(steps)) and set(steps) <= {0, 1, 2, 3, 4}  # sample tables: none twice
    dirs = sorted((resumed_run["tmp"] / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2 and all((d / f"run-{run_id}.wandb").is_file() for d in dirs)  # the first attempt and the resume


def test_mlflow_resume_continues_one_run(resumed_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(resumed_run["tmp"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("fipo_lite_tests")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [resumed_run["state"]["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.params["trainer.total_steps"] == "3"
    history = client.get_metric_history(run.info.run_id, M.REWARD_MEAN)
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    jsonl = _jsonl_scalars(resumed_run["out"])
    assert {m.step: m.value for m in history} == {s: jsonl[(M.REWARD_MEAN, s)] for s in (1, 2, 3, 4)}


def test_tensorboard_after_a_resume_has_each_step_once(resumed_run):
    tb = _tb_scalars(resumed_run["out"])
    assert [s for s, _ in tb[M.REWARD_MEAN]] == [1, 2, 3, 4]
    assert [s for s, _ in tb[M.VAL_AVG]] == [0, 1, 2, 3, 4]
