"""The `Example` record: one prompt with its ground truth, as every loader returns it.

Its own module so that the loaders (`data`) and the synthetic tasks (`tasks`) can both use it
without importing each other.
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
