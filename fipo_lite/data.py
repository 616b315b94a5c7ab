"""Training and evaluation prompts: the Example record every loader returns.

Loaders (JSONL, verl-format parquet, synthetic tasks) all produce `Example`s; the loop applies
the tokenizer's chat template to `prompt` and hands `ground_truth` to the reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Example:
    prompt: list[dict[str, str]]  # chat messages, e.g. [{"role": "user", "content": "12+34="}]
    ground_truth: str
    data_source: str = "unknown"
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def load_examples(spec: str, *, n: int | None = None, seed: int = 0, split: str = "train") -> list[Example]:
    """`synthetic:NAME` (n problems of that task, `split` and `seed` pick a disjoint, shuffled set), or
    a `.jsonl` / verl-format `.parquet` file (its first `n` rows in file order; None = all)."""
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 (or None for all rows), got {n}")
    if spec.startswith("synthetic:"):
        from .tasks import make_examples

        return make_examples(spec.split(":", 1)[1], n, seed, split)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"data file not found: {spec!r} (expected synthetic:NAME, a .jsonl or a .parquet file)")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)[:n]
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: cannot read as parquet: {e}") from None
        rows = (table if n is None else table.slice(0, n)).to_pylist()
    else:
        raise ValueError(f"unsupported data file {spec!r}: use .jsonl or verl-format .parquet")
    return [_example(row, i, path) for i, row in enumerate(rows)]


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {len(rows)} (line {i + 1}) is not valid JSON: {e.msg}") from None
            rows.append(row)
    return rows


def _example(row: Any, i: int, path: Path) -> Example:
    """verl schema (prompt = chat list, reward_model.ground_truth, data_source) or flat {prompt, answer}."""
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty list of chat messages or a string, got {prompt!r:.80}")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each prompt message needs string 'role' and 'content', got {m!r:.80}")
    rm = row.get("reward_model")
    truth = rm.get("ground_truth") if isinstance(rm, dict) else None
    if truth is None:
        truth = row.get("ground_truth", row.get("answer"))
    if truth is None or isinstance(truth, (dict, list)):
        raise ValueError(f"{where}: no ground truth (need reward_model.ground_truth, ground_truth or answer)")
    source = row.get("data_source") or "unknown"
    if not isinstance(source, str):
        raise ValueError(f"{where}: 'data_source' must be a string, got {source!r:.80}")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return Example(prompt=[{"role": m["role"], "content": m["content"]} for m in prompt], ground_truth=str(truth),
                   data_source=source, index=i, extra=dict(extra))
