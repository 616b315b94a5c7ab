"""Completions you can read: the samples of every step and every evaluation, one JSON row each.

A number says a run is off; the completions say how. The loop turns each step's sampled groups into
rows (`rollout_rows`) and each evaluation's samples into rows (`eval_rows`), writes them to

  OUTPUT_DIR/rollouts/step_NNNNNN.jsonl   the step's completions, the groups trained on first
  OUTPUT_DIR/eval/step_NNNNNN.jsonl       the evaluation's completions (step 0: the warm start)

and prints a few (`format_rows`). A file is written whole and atomically, so a step redone after a
resume replaces its file instead of adding to it; `prune` drops the files of steps a resume redoes (or
all of them, for a fresh run). The rows are plain dicts of JSON values, ready for a tracker's table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from . import metrics as M
from .checkpoint import write_atomic

ROLLOUTS_DIR = "rollouts"
EVAL_DIR = "eval"
PRINT_CHARS = 400  # a printed response longer than this shows its head and tail


def step_file(run_dir: str | Path, kind: str, step: int) -> Path:
    """OUTPUT_DIR/KIND/step_NNNNNN.jsonl (kind: rollouts | eval), numbered as the checkpoints."""
    return Path(run_dir) / kind / f"step_{step:06d}.jsonl"


def prompt_text(example) -> str:
    """What was asked: the one message's text, or each message as 'role: text' on its own line."""
    messages = example.prompt
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def _sample(example, response: str, score: float, acc: float, pred, length: int, truncated: bool) -> dict[str, Any]:
    return {"index": example.index, "data_source": example.data_source, "prompt": prompt_text(example),
            "ground_truth": example.ground_truth, "response": response, "reward": float(score), "correct": bool(acc > 0),
            "pred": pred, "response_length": int(length), "truncated": bool(truncated)}


def rollout_rows(step: int, sampled: list, kept: list) -> list[dict[str, Any]]:
    """One row per sample of the step's groups (trainer.Group), the groups trained on first, each group's
    samples in order. `group` numbers the step's groups in sampling order (with `gen_batch`, the
    dynamic-sampling batch it came from); `kept` says whether it was trained on; `advantage` is null
    for a group that was not."""
    trained = {id(g) for g in kept}
    order = sorted(range(len(sampled)), key=lambda i: id(sampled[i]) not in trained)  # stable: sampling order within each
    rows = []
    for gi in order:
        g = sampled[gi]
        for j, (resp, text) in enumerate(zip(g.responses, g.texts)):
            rows.append({"step": step, "group": gi, "gen_batch": g.gen_batch, "sample": j, "kept": id(g) in trained,
                         **_sample(g.example, text, g.scores[j], g.accs[j], g.preds[j], len(resp), g.truncated[j]),
                         "advantage": g.advantages[j] if g.advantages is not None else None})
    return rows


def eval_rows(step: int, examples: list, problems: list[dict]) -> list[dict[str, Any]]:
    """One row per sample of an evaluation: `problems` are rollout.evaluate_rollouts' per-problem rows,
    in the order of `examples`."""
    rows = []
    for example, p in zip(examples, problems):
        for j, text in enumerate(p["responses"]):
            rows.append({"step": step, "sample": j, **_sample(example, text, p["scores"][j], p["accs"][j], p["preds"][j],
                                                               p["lengths"][j], p["truncated"][j])})
    return rows


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with these rows, one JSON line each (a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(M.json_line(r) for r in rows))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def prune(run_dir: str | Path, after: int) -> None:
    """Delete the step files of steps > `after` (a resume redoes them; after=-1: every file, a fresh run)."""
    for kind in (ROLLOUTS_DIR, EVAL_DIR):
        for f in (Path(run_dir) / kind).glob("step_*.jsonl*"):  # .jsonl.tmp: a write cut short
            step = f.name[len("step_"):].split(".", 1)[0]
            if not step.isdigit() or int(step) > after:
                f.unlink()


def _shorten(text: str, chars: int = PRINT_CHARS) -> str:
    if len(text) <= chars:
        return text
    half = chars // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def format_rows(rows: list[dict[str, Any]], num: int) -> str:
    """A few rows for the console: the first sample of each of the first `num` groups."""
    seen, picked = set(), []
    for r in rows:
        key = r.get("group", r["index"])
        if key not in seen and len(picked) < num:
            seen.add(key)
            picked.append(r)
    lines = []
    for r in picked:
        adv = f"  advantage {r['advantage']:+.3f}" if r.get("advantage") is not None else ""
        kept = "" if "kept" not in r else ("  trained" if r["kept"] else "  not trained")
        lines += [f"  prompt: {_shorten(r['prompt'])!r}", f"  response: {_shorten(r['response'])!r}",
                  f"  reward {r['reward']:.3f}  correct {r['correct']}  pred {r['pred']!r}  truth {r['ground_truth']!r}  "
                  f"length {r['response_length']}{' (truncated)' if r['truncated'] else ''}{adv}{kept}", ""]
    return "\n".join(lines).rstrip()
