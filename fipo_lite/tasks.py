"""Synthetic tasks for the CPU demo: addition answered at once or digit by digit.

Both answer forms end with "answer N", so one reward (last integer == ground truth) scores both:

    direct: "answer 132"                        short, and a tiny model usually gets it wrong
    steps:  "7+5=12\\n4+8+1=13\\nanswer 132"      longer, column by column with carries, usually right

The first character already decides the form ('a' vs a digit), so RL can move probability mass
from the short answer to the long one: a miniature of FIPO's length scaling.
"""

from __future__ import annotations

import random
import re

from .errors import UserError
from .example import Example

TASKS = {"addition": 2, "addition3": 3}  # task name -> number of digits per operand
FORMS = ("direct", "steps")


def _split_of(a: int, b: int) -> str:
    """Deterministic, disjoint train/val split of the problem space (about 1 in 8 problems is val)."""
    return "val" if (a * 7919 + b * 104729) % 8 == 0 else "train"


def problems(name: str, split: str) -> list[tuple[int, int]]:
    if name not in TASKS:
        raise UserError(f"unknown synthetic task {name!r}; valid: {sorted(TASKS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d = TASKS[name]
    lo, hi = 10 ** (d - 1), 10**d
    return [(a, b) for a in range(lo, hi) for b in range(lo, hi) if _split_of(a, b) == split]


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}"


def format_response(a: int, b: int, form: str) -> str:
    """The reference answer in one of the two forms (used by the warm start)."""
    if form == "direct":
        return f"answer {a + b}"
    if form != "steps":
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        terms = f"{x}+{y}" + ("+1" if carry else "")
        s = x + y + carry
        lines.append(f"{terms}={s}")
        carry = s // 10
    return "\n".join(lines + [f"answer {a + b}"])


_STEP = re.compile(r"^\d\+\d(\+1)?=\d+$")


def classify_form(response: str) -> str:
    """'direct', 'steps' (at least one column line before the answer) or 'other'."""
    lines = response.strip().split("\n")
    if not re.fullmatch(r"answer -?\d+", lines[-1].strip()):
        return "other"
    if len(lines) == 1:
        return "direct"
    return "steps" if all(_STEP.match(line.strip()) for line in lines[:-1]) else "other"


def make_examples(name: str, n: int | None, seed: int, split: str = "train") -> list[Example]:
    """`n` problems (all when None) of task `name`, shuffled by `seed`; train and val never overlap."""
    pool = problems(name, split)
    random.Random(f"{name}/{split}/{seed}").shuffle(pool)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        pool = pool[:n]
    return [
        Example(prompt=[{"role": "user", "content": prompt_text(a, b)}], ground_truth=str(a + b),
                data_source=f"synthetic/{name}", index=i, extra={"a": a, "b": b})
        for i, (a, b) in enumerate(pool)
    ]
