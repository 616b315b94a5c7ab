"""Training and evaluation prompts: the Example record every loader returns.

Loaders (JSONL, verl-format parquet, synthetic tasks) all produce `Example`s; the loop applies
the tokenizer's chat template to `prompt` and hands `ground_truth` to the reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    prompt: list[dict[str, str]]  # chat messages, e.g. [{"role": "user", "content": "12+34="}]
    ground_truth: str
    data_source: str = "unknown"
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
