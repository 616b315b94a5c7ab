"""Metric names shared by the loop (writer) and the plots (reader), and the metrics.jsonl file.

Every training step appends one JSON object to `output_dir/metrics.jsonl`. NaN and inf are
written as null so the file stays standard JSON.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

# Keys written by the loop every step (spec section 10). Objective diagnostics come from
# `policy_loss` prefixed with "actor/". Reward, accuracy and response-length figures are those of
# the batch trained on (the groups dynamic sampling kept), as the recipe logs them; the same
# figures over everything sampled in the step are under SAMPLED's names.
STEP = "step"
REWARD_MEAN = "reward/mean"
ACCURACY = "train/accuracy"
LENGTH_KEYS = ("min", "q25", "mean", "median", "q75", "max")
LENGTH = {k: f"response_length/{k}" for k in LENGTH_KEYS}
LENGTH_CLIP_RATIO = "response_length/clip_ratio"
NUM_GEN_BATCHES = "train/num_gen_batches"
KEPT_GROUPS = "train/kept_groups"  # groups trained on (train_batch_size unless the step was partial)
PARTIAL_BATCH = "train/partial_batch"  # 1: dynamic sampling hit its cap and the step trained on fewer groups
STEPS_FORM_FRAC = "train/steps_form_frac"  # synthetic tasks: share of digit-by-digit answers
LENGTH_WEIGHTED_ADV = "train/length_weighted_adv"
REWARD_FAILURES = "reward/failures"
VAL_AVG = "val/avg_at_k"
VAL_PASS = "val/pass_at_k"
VAL_CONS = "val/cons_at_k"
VAL_LENGTH = "val/response_length_mean"
VAL_REWARD = "val/reward_mean"  # the shaped score (what the advantage sees) over every evaluation sample
ACTOR = "actor/"  # + a policy_loss metric name, e.g. actor/policy_kl, actor/influence_mean
ENTROPY = "actor/entropy"
GRAD_NORM = "actor/grad_norm"
NUM_UPDATES = "actor/num_updates"
SKIPPED_STEPS = "actor/skipped_steps"  # optimizer steps skipped for a non-finite gradient norm
POLICY_KL = "actor/policy_kl"
LOSS = "actor/loss"
CLIP_FRAC = "actor/clip_frac"
DUAL_CLIP_FRAC = "actor/dual_clip_frac"
INVALID_SEQ_FRAC = "actor/invalid_seq_frac"
INFLUENCE_MEAN = "actor/influence_mean"
INFLUENCE_FRAC_UPPER = "actor/influence_frac_upper"
INFLUENCE_FRAC_LOWER = "actor/influence_frac_lower"
FKL_EXP_MEAN = "actor/fkl_exp_mean"

# The trained-batch figures above, over every group sampled in the step (kept or filtered out).
SAMPLED = {REWARD_MEAN: "sampled/reward_mean", ACCURACY: "sampled/accuracy", LENGTH_CLIP_RATIO: "sampled/response_length_clip_ratio",
           STEPS_FORM_FRAC: "sampled/steps_form_frac", **{LENGTH[k]: f"sampled/response_length_{k}" for k in LENGTH_KEYS}}
SAMPLED_GROUPS = "sampled/groups"

# Throughput and memory of a step (beside the time/*_s figures): response tokens sampled per second of
# sampling; prompt + response tokens trained on (once per ppo epoch) per second of the update; the peak
# of torch's CUDA allocator during the step (CUDA only) and the process's peak resident memory so far.
SAMPLE_TOKENS_PER_S = "perf/sample_tokens_per_s"
UPDATE_TOKENS_PER_S = "perf/update_tokens_per_s"
MAX_MEMORY_ALLOCATED_GB = "perf/max_memory_allocated_gb"
PEAK_RSS_GB = "perf/peak_rss_gb"


def reward_component(name: str, sampled: bool = False, val: bool = False) -> str:
    """The mean unweighted score of one of reward.function(s): reward/<name>/mean over the batch trained on
    (TRL's rewards/<name>/mean), sampled/reward_<name>_mean over everything sampled, val/reward_<name>_mean
    over an evaluation's samples."""
    if val:
        return f"val/reward_{name}_mean"
    return f"sampled/reward_{name}_mean" if sampled else f"reward/{name}/mean"


def nan_mean(values: Iterable[float]) -> float:
    """The mean of the values that are not NaN (a failed reward scores NaN); NaN when none is left."""
    kept = [float(v) for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def rollout_stats(lengths: list[int], truncated: list[bool], scores: list[float], accs: list[float]) -> dict[str, float]:
    """Reward mean, accuracy, response-length statistics and clip ratio of a set of samples (NaN when empty)."""
    n = len(lengths)
    out = {REWARD_MEAN: sum(scores) / n if n else math.nan, ACCURACY: sum(accs) / n if n else math.nan,
           LENGTH_CLIP_RATIO: sum(truncated) / n if n else math.nan}
    out.update(length_stats(lengths))
    return out


def length_stats(lengths: Iterable[int]) -> dict[str, float]:
    """min/q25/mean/median/q75/max of response lengths, under the response_length/ names."""
    xs = sorted(float(x) for x in lengths)
    if not xs:
        return {v: math.nan for v in LENGTH.values()}

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        LENGTH["min"]: xs[0], LENGTH["q25"]: q(0.25), LENGTH["mean"]: sum(xs) / len(xs),
        LENGTH["median"]: q(0.5), LENGTH["q75"]: q(0.75), LENGTH["max"]: xs[-1],
    }


def flat_dict(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted.key: leaf} (a config's keys: the run directory's change check, tracker params)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flat_dict(v, f"{prefix}{k}."))
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def json_line(record: dict[str, Any]) -> str:
    """One record as a line of standard JSON (NaN and inf as null, tensors and numpy scalars as numbers)."""
    return json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk (a killed run keeps every finished step)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file. A last line cut short (the process was killed while appending it:
    no newline after it) is dropped with a warning; a bad line anywhere else is an error."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # the unterminated last line
                warnings.warn(f"{path}: dropped its last line, cut short ({len(line)} characters without a newline)", stacklevel=2)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from None
    return rows
