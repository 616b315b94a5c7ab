"""The notebook API: `fipo_lite.train`, `fipo_lite.ablate`, `fipo_lite.plot`, `fipo_lite.evaluate`, `fipo_lite.export`,
`fipo_lite.plan`.

Each is a thin layer over its command, so a notebook and the CLI run the same code: `train` calls
`trainer.train` in this process (live tqdm progress), `ablate` calls `ablation.run_ablation` (every run a
`python -m fipo_lite train` subprocess, so GPU memory is returned after each), `plot` calls
`plots.make_figure`, `evaluate` calls `evaluation.main`, `export` calls `exporting.export_model`, `plan` calls
`planner.plan`.

`train(..., reward_funcs=fn)` takes your reward as a Python function (or a list, with `reward_weights`).
Overrides are the CLI's dotted keys, in any of three spellings (later ones win):

    fipo_lite.train("configs/tiny_cpu.yaml", "trainer.total_steps=5")             # CLI strings
    fipo_lite.train("configs/tiny_cpu.yaml", **{"trainer.total_steps": 5})        # dotted keys
    fipo_lite.train("configs/tiny_cpu.yaml", trainer={"total_steps": 5}, seed=1)  # nested sections
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import metrics as M
from .config import ConfigError, RunConfig, _merge, load_config, parse_overrides, validate


# ----------------------------------------------------------------------------- config
def _nested(key: str, value: Any) -> dict:
    """"a.b.c", v -> {"a": {"b": {"c": v}}}; Paths become strings (the config holds str)."""
    value = str(value) if isinstance(value, Path) else value
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def resolve_config(config: str | Path | dict | DictConfig | None = None, *dotlist: str, **overrides: Any) -> DictConfig:
    """Defaults <- `config` (a YAML path or a dict) <- "key=value" strings <- keyword overrides, validated."""
    if config is None or isinstance(config, (str, Path)):
        cfg = load_config(config, list(dotlist))
    elif isinstance(config, (dict, DictConfig)):
        cfg = _merge(OmegaConf.structured(RunConfig), config, "config dict")
        if dotlist:
            cfg = _merge(cfg, parse_overrides(list(dotlist)), "overrides")
    else:
        raise ConfigError(f"config must be a YAML path, a dict or None, got {type(config).__name__}")
    for key, value in overrides.items():
        cfg = _merge(cfg, _nested(key, value), "keyword overrides")
    validate(cfg)
    return cfg


def _dotlist(overrides: Any, prefix: str = "") -> list[str]:
    """Overrides as "key=value" strings (what `ablate` hands to its subprocesses): a list of such
    strings passes through; a dict (dotted keys and/or nested sections) is flattened."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, (list, tuple)):
        bad = [o for o in overrides if not isinstance(o, str) or "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be 'key=value' strings, got {bad!r}")
        return list(overrides)
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict or a list of 'key=value' strings, got {type(overrides).__name__}")
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            out += _dotlist(value, f"{prefix}{key}.")
        else:
            value = str(value) if isinstance(value, Path) else value
            out.append(f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """A run directory and its resolved config. `metrics` is re-read on every access, so it is live."""

    config: DictConfig
    dir: Path
    last: dict = field(default_factory=dict)  # the last step's metrics when `train` returned

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """A finished or interrupted run from its directory (config.yaml + metrics.jsonl)."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise ValueError(f"{path} has no config.yaml (is it a fipo_lite run directory?)")
        rows = M.read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
        return cls(load_config(path / "config.yaml"), path, rows[-1] if rows else {})

    @property
    def rows(self) -> list[dict]:
        f = self.dir / "metrics.jsonl"
        return M.read_jsonl(f) if f.is_file() else []

    @property
    def metrics(self):
        """One row per step (step 0: the evaluation before training), indexed by step: a pandas
        DataFrame where pandas is installed, else the list of dicts."""
        return _frame(self.rows, index="step")

    @property
    def checkpoint(self) -> Path | None:
        from .checkpoint import find_latest

        return find_latest(self.dir / "checkpoints")

    def plot(self, out: str | Path | None = None, **kwargs):
        return plot(self, out, **kwargs)

    def evaluate(self, **kwargs) -> Evaluation:
        return evaluate(self, **kwargs)

    def export(self, out: str | Path, **kwargs) -> Path:
        return export(self, out, **kwargs)

    def __repr__(self) -> str:
        rows = self.rows
        step = rows[-1].get(M.STEP, 0) if rows else 0
        val = [r[M.VAL_AVG] for r in rows if isinstance(r.get(M.VAL_AVG), (int, float))]
        tail = f", val avg@k {val[0]:.3f} -> {val[-1]:.3f}" if val else ""
        return f"Run('{self.dir}', step {step}/{self.config.trainer.total_steps}, {self.config.algorithm.loss_mode}{tail})"


def _frame(rows: list[dict], index: str | None = None):
    try:
        import pandas as pd
    except ImportError:
        return rows
    df = pd.DataFrame(rows)
    return df.set_index(index) if index and index in df.columns else df


def _free_memory() -> None:
    """Drop what the last run left behind (model, sampler), so the next call in this kernel has the GPU."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finished_step(cfg: DictConfig) -> int | None:
    """The step of the latest checkpoint when it is at or past trainer.total_steps (and resume=auto)."""
    if cfg.trainer.resume != "auto":
        return None
    from .checkpoint import find_latest

    ckpt = find_latest(Path(cfg.output_dir) / "checkpoints")
    step = int(ckpt.name.split("_")[-1]) if ckpt is not None else -1
    return step if step >= cfg.trainer.total_steps and (Path(cfg.output_dir) / "config.yaml").is_file() else None


def reward_entries(reward_funcs: Any, reward_weights: Any = None) -> tuple[list[dict], dict[str, Any]]:
    """`reward_funcs` (a function, a spec string, a list of them, or {name: either}) and `reward_weights`
    (numbers in the same order; default all 1) as reward.functions entries, plus {name: function} for
    the functions. A function is recorded as `callable:<module>.<qualname>`: it runs in this process's
    forked reward workers, and a later train() of the same run must hand it over again."""
    if isinstance(reward_funcs, dict):
        items = [(str(k), v) for k, v in reward_funcs.items()]
    else:
        items = [(None, f) for f in (reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])]
    weights = [1.0] * len(items) if reward_weights is None else list(reward_weights)
    if len(weights) != len(items):
        raise ConfigError(f"reward_weights has {len(weights)} numbers for {len(items)} reward_funcs")
    from .rewards import CALLABLE

    entries, callables = [], {}
    for i, ((name, fn), weight) in enumerate(zip(items, weights)):
        where = f"reward_funcs[{name if name is not None else i}]"
        if isinstance(fn, (str, Path)):
            entries.append({"function": str(fn), "weight": weight, "name": name})
            continue
        if not callable(fn):
            raise ConfigError(f"{where} is a {type(fn).__name__}; must be a function, a PATH.py:NAME string or a built-in reward name")
        qualname = getattr(fn, "__qualname__", type(fn).__name__)
        name = name or getattr(fn, "__name__", None)
        if not name or name == "<lambda>":
            raise ConfigError(f"{where} has no name (a lambda?): give it one, e.g. reward_funcs={{'my_reward': fn}} (it names the metric "
                              "reward/<name>/mean)")
        entries.append({"function": f"{CALLABLE}{getattr(fn, '__module__', None) or '?'}.{qualname}", "weight": weight, "name": name})
        callables[name] = fn
    return entries, callables


def train(config: str | Path | dict | DictConfig | None = None, *dotlist: str, reward_funcs: Any = None,
          reward_weights: list[float] | None = None, **overrides: Any) -> Run:
    """Train in this process, with live progress; returns the `Run`.

    Like `python -m fipo_lite train`: a run directory with checkpoints resumes from its latest one, and
    a finished run is returned as it is. Interrupting the cell (KeyboardInterrupt) keeps every finished
    step's metrics and checkpoints; calling `train` again with the same config resumes from the latest
    checkpoint (saved every `trainer.save_every` steps; later steps are redone).

    `reward_funcs` (as TRL's): a reward function, or a list (or {name: function} dict) of functions,
    `PATH.py:NAME` strings and built-in names, summed with `reward_weights`; it replaces the config's
    reward.function(s) / reward.name. Functions are called as in `fipo_lite.rewards` and run in forked
    reward worker processes (a lambda or closure works, given a name through the dict)."""
    cfg = resolve_config(config, *dotlist, **overrides)
    callables: dict[str, Any] = {}
    if reward_funcs is not None:
        entries, callables = reward_entries(reward_funcs, reward_weights)
        cfg.reward.function = None
        cfg = _merge(cfg, {"reward": {"functions": entries}}, "reward_funcs")
        validate(cfg)
    elif reward_weights is not None:
        raise ConfigError("reward_weights needs reward_funcs (for the config's rewards set reward.functions[i].weight)")
    out = Path(cfg.output_dir)
    done = _finished_step(cfg)
    if done is not None:  # what the loop would find after loading the model and the sampler, without loading them
        print(f"[fipo_lite] {out} already finished {done} steps; raise trainer.total_steps to train further", file=sys.stderr)
        return Run.load(out)
    if cfg.model.backend == "unsloth":  # Unsloth patches transformers and peft: import it before they load
        from .backends.unsloth import import_unsloth

        import_unsloth(cfg)
    from .trainer import train as run_loop

    interrupted = False
    try:
        last = run_loop(cfg, reward_callables=callables)
    except KeyboardInterrupt:
        interrupted = True  # re-raised below, outside this block, so its traceback (and the model) can be freed
    _free_memory()
    if interrupted:
        run = Run(cfg, out)
        ckpt = run.checkpoint
        where = f"its checkpoint at step {int(ckpt.name.split('_')[-1])}" if ckpt else "the start (no checkpoint was saved yet)"
        raise KeyboardInterrupt(f"{out} stopped; train() with the same config resumes it from {where}")
    return Run(cfg, out, last)


# ----------------------------------------------------------------------------- ablations
def ablate(grid: str | Path | None = None, *, base: str | Path | dict | None = None, variants: dict | None = None,
           seeds: list[int] | None = None, common: dict | list[str] | None = None, name: str | None = None,
           runs_dir: str | Path | None = None, out_dir: str | Path | None = None, jobs: int = 1):
    """Run an ablation grid and return its summary table (one row per variant, mean over seeds,
    `<metric>_std` columns with more than one seed).

    Either a grid file (`configs/ablations/*.yaml`) or `base` (a config path or dict) + `variants`
    ({name: overrides}) [+ `common` overrides, `seeds`]. An in-code grid is written to
    RUNS_DIR/ablation.yaml first, so `python -m fipo_lite ablate` can rerun it. Finished runs are
    skipped, so calling this again resumes an interrupted grid. The table's `attrs` hold the run
    directories (`attrs["runs"]`: {variant: [dir per seed]}) and the output folder (`attrs["out_dir"]`)."""
    from . import ablation as A

    if grid is not None:
        if base is not None or variants is not None:
            raise ValueError("ablate takes a grid file, or base + variants, not both")
        ab = A.load_ablation(grid)
        if seeds is not None:
            ab.seeds = list(seeds)
        if runs_dir is not None:
            ab.runs_dir = Path(runs_dir)
        if out_dir is not None:
            ab.out_dir = Path(out_dir)
    else:
        if base is None or not variants:
            raise ValueError("ablate needs a grid file, or base= (a config path or dict) and variants= {name: overrides}")
        name = name or "notebook"
        runs = Path(runs_dir or f"runs/ablations/{name}")
        runs.mkdir(parents=True, exist_ok=True)
        if not isinstance(base, (str, Path)):
            (runs / "base.yaml").write_text(OmegaConf.to_yaml(resolve_config(base)))
            base = runs / "base.yaml"
        spec = {"name": name, "base": str(base), "common": _dotlist(common), "seeds": list(seeds or [0]),
                "variants": {str(k): _dotlist(v) for k, v in variants.items()},
                "runs_dir": str(runs), "out_dir": str(out_dir or runs)}
        (runs / "ablation.yaml").write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
        ab = A.load_ablation(runs / "ablation.yaml")
    summaries = A.run_ablation(ab, jobs=jobs)
    table = _frame([_summary_row(ab, v, rows) for v, rows in summaries.items()], index="variant")
    if not isinstance(table, list):
        table.attrs.update(runs={v: [str(A.run_dir(ab, v, r["seed"])) for r in rows] for v, rows in summaries.items()},
                           out_dir=str(ab.out_dir), per_seed=summaries)
    return table


def _summary_row(ab, variant: str, rows: list[dict]) -> dict:
    """Mean (and stdev) over seeds of each summary number; nan values (never reached) left out."""
    from .ablation import COLUMNS

    out = {"variant": variant, "overrides": " ".join(ab.variants[variant]), "seeds": len(rows)}
    order = ["initial_val_acc", *(key for key, _, _ in COLUMNS)]
    for key in sorted((k for k in rows[0] if k != "seed"), key=lambda k: order.index(k) if k in order else len(order)):
        finite = [r[key] for r in rows if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        out[key] = statistics.mean(finite) if finite else float("nan")
        if len(rows) > 1:
            out[f"{key}_std"] = statistics.stdev(finite) if len(finite) > 1 else float("nan")
    return out


# ----------------------------------------------------------------------------- plots
def _run_paths(runs: Any, labels: list[str] | None) -> list[tuple[Path, str | None]]:
    """(directory, legend name) pairs from a Run, a path, a list of those, {name: run}, or an ablation table."""
    attrs = getattr(runs, "attrs", None)
    if isinstance(attrs, dict) and "runs" in attrs:  # an ablate() table: first seed of each variant
        pairs = [(Path(dirs[0]), v) for v, dirs in attrs["runs"].items() if dirs]
    elif isinstance(runs, dict):
        pairs = [(r.dir if isinstance(r, Run) else Path(r), str(name)) for name, r in runs.items()]
    else:
        seq = runs if isinstance(runs, (list, tuple)) else [runs]
        pairs = [(r.dir if isinstance(r, Run) else Path(r), None) for r in seq]
    if labels is not None:
        if len(labels) != len(pairs):
            raise ValueError(f"labels has {len(labels)} names for {len(pairs)} runs")
        pairs = [(p, name) for (p, _), name in zip(pairs, labels)]
    return pairs


def plot(runs: Any, out: str | Path | None = None, *, labels: list[str] | None = None, smooth: int = 1,
         stages: list[float] | None = None, n_stages: int = 3, accuracy: str = "auto", title: str | None = None, dpi: int = 110):
    """The length-dynamics dashboard of `python -m fipo_lite plot` as a matplotlib Figure, saved to `out`
    if given. A notebook shows it when it is the cell's value (`fig = plot(...)` then `fig`)."""
    from .plots import load_run, make_figure, plt

    loaded = [load_run(path, name) for path, name in _run_paths(runs, labels)]
    fig = make_figure(loaded, smooth_window=smooth, stages=stages, n_stages=n_stages, accuracy=accuracy, title=title)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    plt.close(fig)  # closed for pyplot only: the returned figure is shown once, not again at the cell's end
    return fig


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    summary: dict  # val/avg_at_k, val/pass_at_k, val/cons_at_k, lengths
    problems: Any  # one row per problem (responses, predictions, accuracies): DataFrame or list of dicts
    dir: Path  # summary.json and per_problem.jsonl

    def __repr__(self) -> str:
        s = self.summary
        return (f"Evaluation(avg@{int(s['val/k'])} {s[M.VAL_AVG]:.3f}, pass@{int(s['val/k'])} {s[M.VAL_PASS]:.3f}, "
                f"cons@{int(s['val/k'])} {s[M.VAL_CONS]:.3f}, mean length {s[M.VAL_LENGTH]:.1f}, "
                f"{int(s['val/num_problems'])} problems, '{self.dir}')")


def _accuracy_reward(cfg: DictConfig) -> str:
    """The reward whose `correct` is a run's accuracy: reward.name, or the first of reward.function(s)."""
    from .rewards import component_entries, spec_kind

    spec = component_entries(cfg.reward)[0][1]
    if spec_kind(spec) == "callable":
        raise ValueError(f"the run's reward {spec} is a Python function, which evaluate cannot load: pass reward= "
                         "(a built-in name or PATH.py:NAME)")
    return spec


def evaluate(model: Run | str | Path, data: str | None = None, *, k: int = 8, n_problems: int | None = None,
             max_new_tokens: int | None = None, engine: str | None = None, dtype: str | None = None,
             reward: str | None = None, device: str | None = None, out: str | Path | None = None, seed: int = 0) -> Evaluation:
    """avg@k / pass@k / cons@k of a run (its latest checkpoint), a checkpoint or a model, as
    `python -m fipo_lite evaluate`. For a run, unset arguments come from its config: the validation
    data and size, response length, sampler, dtype and reward (the first of reward.function(s): its `correct`
    is the accuracy). `reward`: a built-in name or PATH.py:NAME. Writes to `out` (default RUN/eval)."""
    from . import evaluation as E
    from .data import data_specs

    run = model if isinstance(model, Run) else (Run.load(model) if (Path(model) / "config.yaml").is_file() else None)
    if run is not None:
        c = run.config
        data = data or data_specs(c.data.val)[0]  # several validation sets: the first
        if not isinstance(data, str):
            raise ValueError("the run's data.val is load_dataset arguments, which evaluate cannot take: pass data= (hf:NAME[:SPLIT] or a file)")
        n_problems = n_problems or c.data.val_size
        max_new_tokens = max_new_tokens or c.rollout.max_new_tokens
        engine = engine or c.rollout.engine
        dtype = dtype or (c.rollout.vllm.dtype if engine == "vllm" else c.model.dtype)
        reward = reward or _accuracy_reward(c)
        device = device or c.model.device
        template = c.data.get("system_prompt"), dict(c.data.get("chat_template_kwargs") or {})  # the prompts as trained
        model = run.dir
    if data is None:
        raise ValueError("evaluate needs data= (synthetic:NAME, .jsonl or .parquet) for a model that is not a run")
    out = Path(out or (run.dir / "eval" if run is not None else tempfile.mkdtemp(prefix="fipo_eval_")))
    argv = ["--model", str(model), "--data", data, "-k", str(k), "--seed", str(seed), "--out", str(out)]
    if run is not None and template[0]:
        argv += ["--system-prompt", template[0]]
    if run is not None and template[1]:
        argv += ["--chat-template-kwargs", json.dumps(template[1])]
    for flag, value in (("--n-problems", n_problems), ("--max-new-tokens", max_new_tokens), ("--engine", engine),
                        ("--dtype", dtype), ("--reward", reward), ("--device", device)):
        if value is not None:
            argv += [flag, str(value)]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):  # the summary is returned instead
        rc = E.main(argv)
    if rc != 0:
        raise ValueError(err.getvalue().strip() or f"evaluate failed (exit {rc})")
    summary = json.loads((out / "summary.json").read_text())
    return Evaluation(summary, _frame(M.read_jsonl(out / "per_problem.jsonl")), out)


# ----------------------------------------------------------------------------- export
def export(model: Run | str | Path, out: str | Path, *, dtype: str | None = None, base: str | None = None,
           push_to_hub: str | None = None, private: bool = False) -> Path:
    """A run (its newest good checkpoint) or a checkpoint as a plain Hugging Face model directory, the
    LoRA adapter merged into the base, as `python -m fipo_lite export`; returns the directory."""
    from .exporting import export_model

    source = model.dir if isinstance(model, Run) else model
    return export_model(source, out, dtype=dtype, base=base, push_to_hub=push_to_hub, private=private)


# ----------------------------------------------------------------------------- memory plan
def plan(config: str | Path | dict | DictConfig | None = None, *dotlist: str, gpu_gb: float, **overrides: Any):
    """The planner's verdict for a config on a `gpu_gb` GiB card (`print(plan(...))` shows the table)."""
    from .planner import plan as predict

    return predict(resolve_config(config, *dotlist, **overrides), gpu_gb)
