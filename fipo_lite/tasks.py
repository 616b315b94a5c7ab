"""Synthetic tasks for the CPU runs: a short answer a tiny model usually gets wrong, or a long,
step-by-step one it usually gets right. Reachable as `synthetic:NAME` (see TASKS).

Every answer form ends with "answer N", so one reward (last integer == ground truth) scores both:

    addition, addition3 (the demo; ~12 vs ~35 tokens):
        prompt "47+85"
        direct: "answer 132"
        steps:  "7+5=12\\n4+8+1=13\\nanswer 132"          column by column with carries
    mul2x1 (a pretrained instruct model, e.g. SmolLM2-135M-Instruct; no forms):
        prompt "What is 47 * 6?"                         natural language; the model answers in its own words
                                                         and the last integer of the response is scored
    modsum20 (long responses; 8 vs 168 tokens):
        prompt "A3 B7 C2 ... T4"                         20 labelled digits
        direct: "answer 9"                               the sum mod 10 at a glance: ~1 in 10 right
        steps:  "A 0+3=3\\nB 3+7=0\\nC 0+2=2\\n...\\nanswer 9"   a running sum mod 10, one line per digit

The warm start (tiny.py) teaches both forms and then tilts the model towards the short one, so RL
has to discover that the longer response pays: a miniature of FIPO's length scaling. In modsum20
each line is easy (find the label's digit in the prompt, add mod 10) but a correct answer needs all
20 of them, so accuracy requires the responses to grow ~20x.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .errors import UserError
from .example import Example

FORMS = ("direct", "steps")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


@dataclass(frozen=True)
class Addition:
    """a + b with `digits`-digit operands; the whole problem space, split ~1 in 8 for val."""

    digits: int
    step_line = re.compile(r"^\d\+\d(\+1)?=\d+$")

    def problems(self, split: str) -> list[tuple[int, int]]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits
        return [(a, b) for a in range(lo, hi) for b in range(lo, hi) if _pair_split(a, b) == split]

    def prompt(self, p: tuple[int, int]) -> str:
        return f"{p[0]}+{p[1]}"

    def answer(self, p: tuple[int, int]) -> int:
        return p[0] + p[1]

    def extra(self, p: tuple[int, int]) -> dict:
        return {"a": p[0], "b": p[1]}

    def problem_of(self, extra: dict) -> tuple[int, int]:
        return extra["a"], extra["b"]

    def steps(self, p: tuple[int, int]) -> list[str]:
        xs, ys = str(p[0])[::-1], str(p[1])[::-1]
        lines, carry = [], 0
        for i in range(max(len(xs), len(ys))):
            x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
            s = x + y + carry
            lines.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
            carry = s // 10
        return lines


@dataclass(frozen=True)
class ModSum:
    """The sum mod 10 of `items` labelled digits (labels A, B, C, ...); problems are drawn at random,
    `pool` per split, and a hash of the digits keeps train and val disjoint."""

    items: int
    pool: int = 20000
    step_line = re.compile(r"^[A-Z] \d\+\d=\d$")

    def problems(self, split: str) -> list[tuple[int, ...]]:
        rng = random.Random(f"modsum{self.items}/{split}")  # one pool per split; make_examples shuffles it by seed
        out, seen = [], set()
        while len(out) < self.pool:
            p = tuple(rng.randrange(10) for _ in range(self.items))
            if p not in seen and _split_of(hash_digits(p) % 8) == split:
                seen.add(p)
                out.append(p)
        return out

    def prompt(self, p: tuple[int, ...]) -> str:
        return " ".join(f"{chr(65 + i)}{d}" for i, d in enumerate(p))

    def answer(self, p: tuple[int, ...]) -> int:
        return sum(p) % 10

    def extra(self, p: tuple[int, ...]) -> dict:
        return {"digits": list(p)}

    def problem_of(self, extra: dict) -> tuple[int, ...]:
        return tuple(extra["digits"])

    def steps(self, p: tuple[int, ...]) -> list[str]:
        lines, s = [], 0
        for i, d in enumerate(p):
            lines.append(f"{chr(65 + i)} {s}+{d}={(s + d) % 10}")
            s = (s + d) % 10
        return lines


@dataclass(frozen=True)
class WordMultiplication:
    """A two-digit by one-digit product asked in words, for pretrained instruct models (not the tiny
    model: it has no answer forms to warm-start). SmolLM2-135M-Instruct gets ~12% held-out avg@4 at first
    (results/ablations/smollm2_fipo_vs_dapo): hard enough to learn, easy enough that some groups pay.
    The whole space (90 x 8 problems), split ~1 in 8 for val."""

    step_line = None  # no digit-by-digit form to count

    def problems(self, split: str) -> list[tuple[int, int]]:
        return [(a, b) for a in range(10, 100) for b in range(2, 10) if _pair_split(a, b) == split]

    def prompt(self, p: tuple[int, int]) -> str:
        return f"What is {p[0]} * {p[1]}?"

    def answer(self, p: tuple[int, int]) -> int:
        return p[0] * p[1]

    def extra(self, p: tuple[int, int]) -> dict:
        return {"a": p[0], "b": p[1]}

    def problem_of(self, extra: dict) -> tuple[int, int]:
        return extra["a"], extra["b"]

    def steps(self, p: tuple[int, int]) -> list[str]:
        raise UserError("task mul2x1 has no step-by-step form: it is for pretrained models, not model.path=tiny")


def hash_digits(p: tuple[int, ...]) -> int:
    """A deterministic integer hash of a digit tuple (Python's hash() of str is salted per process)."""
    h = 0
    for d in p:
        h = (h * 1_000_003 + d + 1) % (1 << 61)
    return h


TASKS = {"addition": Addition(2), "addition3": Addition(3), "modsum20": ModSum(20), "mul2x1": WordMultiplication()}
# Tasks whose answers have a direct and a step-by-step form: the tiny model warm-starts on these.
FORM_TASKS = tuple(name for name, t in TASKS.items() if t.step_line is not None)


def _pair_split(a: int, b: int) -> str:
    """The split of the operand pair (a, b): a fixed hash, so train and val never share a problem."""
    return _split_of((a * 7919 + b * 104729) % 8)


def _split_of(bucket: int) -> str:
    """Deterministic, disjoint train/val split of the problem space (bucket 0 of 8 is val)."""
    return "val" if bucket == 0 else "train"


def get_task(name: str):
    if name not in TASKS:
        raise UserError(f"unknown synthetic task {name!r}; valid: {sorted(TASKS)}")
    return TASKS[name]


def task_of(example: Example):
    """The task an example of `make_examples` came from (its data_source is synthetic/NAME)."""
    return get_task(example.data_source.split("/", 1)[1])


def format_response(task, problem, form: str) -> str:
    """The reference answer of `problem` in one of the forms (what the warm start trains on)."""
    _check_form(form)
    final = f"answer {task.answer(problem)}"
    return final if form == "direct" else "\n".join(task.steps(problem) + [final])


def classify_form(response: str, task=None) -> str:
    """'direct', 'steps' (at least one work line before the answer) or 'other'. Work lines are
    checked against `task`'s line format; without a task, any task's format counts."""
    if task is not None and task.step_line is None:  # a task without answer forms
        return "other"
    lines = response.strip().split("\n")
    if not re.fullmatch(r"answer -?\d+", lines[-1].strip()):
        return "other"
    if len(lines) == 1:
        return "direct"
    patterns = ([task.step_line] if task is not None
                else list({t.step_line.pattern: t.step_line for t in TASKS.values() if t.step_line is not None}.values()))
    ok = any(all(pat.match(line.strip()) for line in lines[:-1]) for pat in patterns)
    return "steps" if ok else "other"


def make_examples(name: str, n: int | None, seed: int, split: str = "train") -> list[Example]:
    """`n` problems (all, or the task's pool, when None) of task `name`, shuffled by `seed`;
    train and val never overlap."""
    task = get_task(name)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    pool = task.problems(split)
    random.Random(f"{name}/{split}/{seed}").shuffle(pool)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        pool = pool[:n]
    return [
        Example(prompt=[{"role": "user", "content": task.prompt(p)}], ground_truth=str(task.answer(p)),
                data_source=f"synthetic/{name}", index=i, extra=task.extra(p))
        for i, p in enumerate(pool)
    ]
