"""Rewards (spec section 9): exact match, the DAPO math reward, a boxed answer via math-verify, and
overlong shaping. `RewardRunner` scores a batch in worker processes, so a reward that raises or
runs away costs one sample (score 0, counted in `failures`), never the run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Callable, Optional

# A reward function maps (response, ground_truth) -> (score, correct, extracted prediction or None).
RewardFn = Callable[[str, str], "tuple[float, bool, Optional[str]]"]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    """Add a reward function to the table (tests and users plug in their own). Register before the
    first `RewardRunner` call: workers are forked then and see the table as it was."""
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return deco


def reward_names() -> tuple[str, ...]:
    """The values `reward.name` accepts now: "auto" (chosen per data_source) and every registered reward."""
    return ("auto", *sorted(REWARDS))


# ----------------------------------------------------------------------------- exact
@register("exact")
def exact_reward(response: str, ground_truth: str):
    """The synthetic tasks: the last integer in the response equals the ground truth (1 / 0)."""
    found = re.findall(r"-?\d+", response)
    pred = found[-1] if found else None
    ok = pred is not None and pred == ground_truth.strip()
    return float(ok), ok, pred


# ----------------------------------------------------------------------------- DAPO math
# The Minerva/DAPO answer normalisation that verl's `math_dapo` reward applies, in the same order.
_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots")


def normalize_answer(text: str) -> str:
    """Canonical form of a final answer: keep the right-hand side of `=`, drop units, spacing and
    \\text/\\textbf/\\overline/\\boxed wrappers, expand \\frac12 and \\sqrt2, drop commas in numbers."""
    s = text.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        s = s.replace(old, new)
    for junk in _REMOVED:
        s = s.replace(junk, "")
    s = re.sub(r"(.*?)\$(.*?)\$(.*)", r"$\2$", s)  # keep the first $...$ span
    for macro in ("text", "textbf", "overline"):
        s = re.sub(r"\\" + macro + r"\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", s)
    s = re.sub(r"sqrt([^{])", r"sqrt{\1}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def same_answer(pred: str, truth: str) -> bool:
    """Normalised strings equal, or both plain integers of equal value (AIME truths here are
    zero-padded, e.g. "025"; verl's string match would fail those, the only place we differ)."""
    a, b = normalize_answer(pred), normalize_answer(truth)
    if a == b:
        return True
    return bool(re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b)) and int(a) == int(b)


_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


@register("dapo_math")
def dapo_math_reward(response: str, ground_truth: str):
    """Last `Answer: X` in the last 300 characters vs the truth, both normalised: +1 / -1."""
    found = _ANSWER.findall(response[-300:])
    if not found:
        return -1.0, False, None
    ok = same_answer(found[-1], ground_truth)
    return (1.0 if ok else -1.0), ok, normalize_answer(found[-1])


# ----------------------------------------------------------------------------- boxed (math-verify)
def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


@register("boxed")
def boxed_reward(response: str, ground_truth: str):
    """Last \\boxed{} answer checked symbolically against the truth by math-verify: +1 / -1, the
    DAPO reward's scale, so `auto` can mix the two within one data set. Pred is DAPO-normalised
    so that cons@k votes agree across both extractors."""
    from math_verify import parse, verify

    pred = last_boxed(response)
    if pred is None:
        return -1.0, False, None
    # math-verify's own timeouts use SIGALRM; RewardRunner enforces the time limit instead.
    gold = parse("$" + ground_truth + "$", parsing_timeout=None)
    target = parse("$" + pred + "$", parsing_timeout=None)
    ok = bool(gold and target and verify(gold, target, timeout_seconds=None))
    return (1.0 if ok else -1.0), ok, normalize_answer(pred)


def pick_reward(name: str, data_source: str, response: str = "") -> str:
    """`auto`: synthetic/* -> exact; otherwise dapo_math when the response's last 300 characters have
    an `Answer:` line, else boxed (math-verify on the last \\boxed{}). Both score +1 / -1."""
    if name != "auto":
        return name
    if data_source.startswith("synthetic/"):
        return "exact"
    return "dapo_math" if _ANSWER.search(response[-300:]) else "boxed"


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 until max_len - buffer_len, then linearly down to -penalty_factor."""
    if buffer_len <= 0:
        raise ValueError(f"overlong buffer_len must be > 0, got {buffer_len}")
    return min(-(length - (max_len - buffer_len)) / buffer_len * penalty_factor, 0.0)


# ----------------------------------------------------------------------------- worker processes
def _score_one(name: str, response: str, truth: str) -> tuple[bool, object]:
    """(True, (score, correct, pred)) or (False, why): any reward failure is a scored failure."""
    try:
        score, ok, pred = REWARDS[name](response, truth)
        return True, (float(score), bool(ok), None if pred is None else str(pred))
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"[:200]


def _worker_main(conn) -> None:
    """Child loop: receive a list of (index, reward name, response, truth), send one result per job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the parent times us
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        for i, name, response, truth in jobs:
            conn.send((i, *_score_one(name, response, truth)))


class _Worker:
    """One scoring process. Threads cannot stop a call stuck in C code holding the GIL (math-verify
    on `9^{9^{9^9}}` freezes the whole interpreter), and SIGALRM only works in the main thread; a
    separate process can simply be killed."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="fipo_lite-reward")
        self.proc.start()
        child.close()
        self.pending: deque[int] = deque()  # job indices sent, in order, not yet answered
        self.deadline = 0.0

    def submit(self, jobs: list[tuple], timeout_s: float) -> None:
        self.pending.extend(j[0] for j in jobs)
        self.deadline = time.monotonic() + timeout_s
        self.conn.send(jobs)

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


def _close_all(workers: list) -> None:
    for w in workers:
        w.close()
    workers.clear()


# ----------------------------------------------------------------------------- batch runner
@dataclass
class RewardOutput:
    scores: list[float]  # shaped scores (the advantage input)
    accs: list[float]  # 0/1 correctness
    preds: list[Optional[str]]  # extracted (normalised) answers, None when none was found
    failures: int = 0
    failed: list[int] = field(default_factory=list)  # indices that raised or timed out ...
    reasons: list[str] = field(default_factory=list)  # ... and why


class RewardRunner:
    """Scores a batch of responses with the configured reward (config section `reward`).

    Calls run in `reward.num_workers` forked processes; one that raises scores 0 and one past
    `reward.timeout_s` is killed (its process is replaced) and scores 0, both counted in `failures`.
    `timeout_s <= 0` scores in this process with no limit (debugging)."""

    def __init__(self, reward_cfg, max_response_length: int):
        self.name = reward_cfg.name
        if self.name != "auto" and self.name not in REWARDS:
            raise ValueError(f"reward.name {self.name!r} is unknown; valid: {list(reward_names())}")
        self.timeout_s = float(reward_cfg.timeout_s)
        self.num_workers = int(getattr(reward_cfg, "num_workers", 1))
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")
        self.overlong = reward_cfg.overlong
        if self.overlong.enable and not 0 < self.overlong.buffer_len <= max_response_length:
            raise ValueError(f"reward.overlong.buffer_len must be in (0, max_response_length={max_response_length}], "
                             f"got {self.overlong.buffer_len}")
        self.max_response_length = max_response_length
        self._ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    def close(self) -> None:
        """Stop the worker processes (they also end with this process)."""
        _close_all(self._workers)

    def __call__(self, responses, ground_truths, data_sources=None, lengths=None) -> RewardOutput:
        n = len(responses)
        if len(ground_truths) != n or (data_sources is not None and len(data_sources) != n) or (lengths is not None and len(lengths) != n):
            raise ValueError(f"RewardRunner got {n} responses but {len(ground_truths)} ground truths"
                             f"{'' if data_sources is None else f', {len(data_sources)} data sources'}"
                             f"{'' if lengths is None else f', {len(lengths)} lengths'}")
        sources = data_sources or ["unknown"] * n
        jobs = [(i, pick_reward(self.name, src or "unknown", resp), resp, str(truth))
                for i, (resp, truth, src) in enumerate(zip(responses, ground_truths, sources))]
        results = self._score_inline(jobs) if self.timeout_s <= 0 else self._score_in_workers(jobs)
        out = RewardOutput(scores=[0.0] * n, accs=[0.0] * n, preds=[None] * n)
        for i, (good, payload) in enumerate(results):
            if not good:
                out.failures += 1
                out.failed.append(i)
                out.reasons.append(payload)
                continue
            score, ok, pred = payload
            if self.overlong.enable and lengths is not None:
                score += overlong_penalty(lengths[i], self.max_response_length, self.overlong.buffer_len,
                                          self.overlong.penalty_factor)
            out.scores[i], out.accs[i], out.preds[i] = float(score), float(ok), pred
        return out

    def _score_inline(self, jobs):
        return [_score_one(name, resp, truth) for _, name, resp, truth in jobs]

    def _score_in_workers(self, jobs):
        """Spread jobs over the workers (strided), collect answers, replace any worker past its deadline."""
        results: list = [None] * len(jobs)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))
        for k, w in enumerate(self._workers):
            share = jobs[k :: self.num_workers]
            if share:
                w.submit(share, self.timeout_s)
        while any(w.pending for w in self._workers):
            busy = [w for w in self._workers if w.pending]
            left = min(w.deadline for w in busy) - time.monotonic()
            ready = set(wait([w.conn for w in busy], timeout=max(left, 0.0)))
            for k, w in enumerate(self._workers):
                if not w.pending:
                    continue
                if w.conn in ready:
                    try:
                        i, good, payload = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory) on its current job
                        self._replace(k, jobs, results, "reward worker died")
                        continue
                    results[i] = (good, payload)
                    w.pending.popleft()
                    w.deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > w.deadline and not w.conn.poll(0):
                    self._replace(k, jobs, results, f"reward ran past {self.timeout_s:g}s")
        return results

    def _replace(self, k: int, jobs, results, reason: str) -> None:
        """Kill worker k, fail its current job, and hand the rest of its jobs to a fresh worker."""
        old = self._workers[k]
        old.close()
        results[old.pending.popleft()] = (False, reason)
        new = self._workers[k] = _Worker(self._ctx)
        if old.pending:
            new.submit([jobs[i] for i in old.pending], self.timeout_s)
