"""Experiment trackers (trainer.logger): the console, TensorBoard, Weights & Biases, MLflow.

metrics.jsonl stays the record that `plot` and `ablate` read; a tracker gets a copy of each of its rows.
The trackers are the libraries themselves (torch's SummaryWriter, `wandb`, `mlflow`), optional extras
imported only when a run names them: `require` checks that they are installed before anything loads.

A run directory keeps, in tracking.json, each tracker's run id (W&B, MLflow) and the last step it
logged, so a resumed run continues the same tracker run and never logs a step twice: the steps a
resume redoes (those after its checkpoint, already logged before the kill) are not sent again.
A fresh start in the directory forgets them and starts new tracker runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import metrics as M
from .checkpoint import write_atomic
from .errors import UserError

# trainer.logger's names -> (the package each imports, the pyproject extra that installs it)
LOGGERS = {"console": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
           "mlflow": ("mlflow", "mlflow")}
STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def require(names: list[str]) -> None:
    """A one-line error naming the extra when a tracker's package is not installed (before the run starts)."""
    for name in names:
        package, extra = LOGGERS[name]
        if package is not None and not _installed(package):
            raise UserError(f"trainer.logger '{name}' needs the '{package}' package, which is not installed: "
                            f"pip install -e '.[{extra}]' (or '.[tracking]' for every tracker)")


def run_name(cfg: DictConfig) -> str:
    """trainer.run_name, or the name of the run directory."""
    return cfg.trainer.run_name or Path(cfg.output_dir).resolve().name


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (metrics.jsonl writes NaN and inf as null: no tracker gets them)."""
    out = {}
    for k, v in row.items():
        if k == M.STEP:  # the x axis, not a metric
            continue
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


# ----------------------------------------------------------------------------- the trackers
class Console:
    """The progress bar's reward / accuracy / length / val of the last step, or one line per step on
    stderr when trainer.progress=false."""

    def __init__(self, cfg: DictConfig, state: dict, start: int):
        from tqdm.auto import tqdm

        t = cfg.trainer
        self.total = t.total_steps
        self.bar = tqdm(total=t.total_steps, initial=start, desc="fipo_lite", dynamic_ncols=True) if t.progress else None

    def log(self, step: int, row: dict) -> None:
        if step == 0:  # the warm start's evaluation
            return
        fields = {"reward": row.get(M.REWARD_MEAN), "acc": row.get(M.ACCURACY), "len": row.get(M.LENGTH["mean"]),
                  "val": row.get(M.VAL_AVG)}
        shown = {k: "-" if v is None or not math.isfinite(v) else f"{v:.{1 if k == 'len' else 2}f}" for k, v in fields.items()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown)
        else:
            print(f"[fipo_lite] step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        pass

    def close(self, failed: bool) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoard:
    """Scalars under OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""

    def __init__(self, cfg: DictConfig, state: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(cfg.output_dir) / TENSORBOARD_DIR))
        if "last_step" not in state:  # a new run: its config, once
            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg) + "```", 0)

    def log(self, step: int, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps every logged step

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|").replace("\n", "<br>") for c in cols) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run whose id is kept in the run directory (a resume continues it: resume="allow").
    WANDB_MODE=offline logs without network (`wandb sync` uploads later); its files go to WANDB_DIR,
    or to the run directory."""

    def __init__(self, cfg: DictConfig, state: dict, start: int):
        import wandb

        try:
            self.run = wandb.init(project=cfg.trainer.project, name=run_name(cfg), id=state.get("id"), resume="allow",
                                  dir=None if os.environ.get("WANDB_DIR") else str(cfg.output_dir))
        except wandb.Error as e:
            raise UserError(f"trainer.logger 'wandb' could not start a W&B run: {str(e).splitlines()[0]} "
                            "(run `wandb login`, or set WANDB_MODE=offline to log without network)") from None
        if state.get("id") != self.run.id:  # a new W&B run: nothing of this directory logged to it yet
            state.clear()
        state["id"] = self.run.id
        self.run.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)

    def log(self, step: int, row: dict) -> None:
        self.run.log(scalars(row), step=step)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        import wandb

        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """An MLflow run in experiment trainer.project, on MLflow's tracking URI (MLFLOW_TRACKING_URI, or
    mlflow's default); its id is kept in the run directory, and a resume continues it."""

    def __init__(self, cfg: DictConfig, state: dict, start: int):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = client = MlflowClient()
            client.search_experiments(max_results=1)  # the tracking URI answers
        except MlflowException as e:
            raise UserError(f"trainer.logger 'mlflow' cannot use the tracking URI: {str(e).splitlines()[0][:300]} "
                            "(set MLFLOW_TRACKING_URI: a tracking server, or sqlite:///mlflow.db with the full 'mlflow' package)") from None
        run = None
        if "run_id" in state:
            try:
                run = client.get_run(state["run_id"])
            except MlflowException:
                print(f"[fipo_lite] mlflow run {state['run_id']} not found on {client.tracking_uri}: starting a new one", file=sys.stderr)
        if run is None:
            exp = client.get_experiment_by_name(cfg.trainer.project)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.trainer.project)
            run = client.create_run(exp_id, run_name=run_name(cfg))
            from mlflow.entities import Param

            params = [Param(k, str(v)[:500]) for k, v in M.flat_dict(OmegaConf.to_container(cfg, resolve=True)).items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params per call
                client.log_batch(run.info.run_id, params=params[i : i + 100])
            state.clear()
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = state["run_id"] = run.info.run_id

    def log(self, step: int, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(row).items()])

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name}/step_{step}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_CLASSES = {"console": Console, "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


# ----------------------------------------------------------------------------- the facade
class Tracker:
    """Every tracker of trainer.logger behind one `log(row)` and `log_table(name, rows)`. A context
    manager: the loop opens the trackers once it knows its first step, and the exit closes them
    (marking the tracker runs failed when the run raised)."""

    def __init__(self) -> None:
        self.trackers: dict[str, Any] = {}
        self.floor: dict[str, int] = {}  # each tracker's last step logged before this process: not logged again
        self.state: dict[str, dict] = {}
        self.step = 0

    def open(self, cfg: DictConfig, start: int, resumed: bool) -> None:
        """Start (or, `resumed`, continue) the tracker runs of cfg.trainer.logger. A run that starts over
        in its directory starts new tracker runs (and removes the old TensorBoard events)."""
        self.out, self.step = Path(cfg.output_dir), start
        if not resumed:
            (self.out / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.out / TENSORBOARD_DIR, ignore_errors=True)
        f = self.out / STATE_FILE
        self.state = json.loads(f.read_text()) if f.is_file() else {}
        try:
            for name in cfg.trainer.logger:
                st = self.state.setdefault(name, {}) if name != "console" else {}  # the console shows every step
                self.trackers[name] = _CLASSES[name](cfg, st, start)
                self.floor[name] = st.get("last_step", -1)
        finally:
            self._save()  # the run ids of the trackers that started

    def _save(self) -> None:
        if self.state:  # console alone keeps no state
            write_atomic(self.out / STATE_FILE, json.dumps(self.state, indent=1))

    def log(self, row: dict) -> None:
        """One metrics.jsonl row (its "step" is the x axis) to every tracker that has not logged that step."""
        step = int(row["step"])
        self.step = step
        todo = [n for n in self.trackers if step > self.floor[n]]
        for n in todo:  # recorded first: a kill between the two loses a step in the tracker, never repeats one
            if n in self.state:
                self.state[n]["last_step"] = max(step, self.state[n].get("last_step", -1))
        if any(n in self.state for n in todo):
            self._save()
        for n in todo:
            self.trackers[n].log(step, row)

    def log_table(self, name: str, rows: list[dict], step: int | None = None) -> None:
        """Rows of a table (e.g. sampled completions) at `step` (default: the last step logged)."""
        step = self.step if step is None else step
        for n, tr in self.trackers.items():
            if step > self.floor[n]:
                tr.log_table(step, name, rows)

    def close(self, failed: bool = False) -> None:
        for tr in self.trackers.values():
            tr.close(failed)
        self.trackers, self.floor = {}, {}

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
