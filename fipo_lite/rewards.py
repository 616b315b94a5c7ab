"""Rewards (spec section 9): exact match, the DAPO math reward, a boxed answer via math-verify, your
own functions (`reward.function` / `reward.functions`, weighted), and overlong shaping. `RewardRunner`
scores a batch in worker processes, so a reward that raises or runs away costs one sample (score 0,
counted in `failures`), never the run.

A reward function is called as `fn(response, ground_truth, *, prompt=..., data_source=..., extra=...)`:
the keywords are passed only when its signature names them (or has **kwargs); `prompt` is the chat
messages, `extra` the row's other fields (verl's extra_info, the JSONL's other keys). It returns a
number (correct: > 0), a tuple (score, correct, prediction) as the built-ins, or a dict with `score`
and optionally `acc`/`correct` and `pred` (verl's compute_score dict).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import math
import multiprocessing as mp
import numbers
import os
import pickle
import re
import signal
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

from .errors import UserError

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


# ----------------------------------------------------------------------------- your own reward functions
CALLABLE = "callable:"  # the spec recorded for a Python callable given to fipo_lite.train(reward_funcs=...)
CONTEXT = ("prompt", "data_source", "extra")  # the keywords a reward function may take besides (response, ground_truth)
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it becomes part of the metric key reward/<name>/mean
_LOADED: dict[str, Any] = {}  # absolute path -> module: a file runs once per process (forked workers inherit it)


class RewardError(UserError):
    """A reward spec that cannot be used; the message names the config key and its value."""


def spec_kind(spec: str) -> Optional[str]:
    """"file" (PATH.py:NAME), "callable" (a function handed to the notebook API), "builtin" (a
    registered name, or auto), or None (none of these)."""
    if spec.startswith(CALLABLE):
        return "callable"
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py") and attr.isidentifier():
        return "file"
    return "builtin" if spec in reward_names() else None


def spec_error(key: str, spec: Any) -> str:
    """What `key` accepts, for a value that is none of it."""
    return (f"config key '{key}' is {spec!r}; must be PATH.py:NAME (a function NAME in a Python file) or a built-in "
            f"reward: {list(reward_names())}")


def absolute_spec(spec: str) -> str:
    """PATH.py:NAME with PATH made absolute against the working directory (as data paths are), so the
    trainer, its reward workers and every `ablate` subprocess load the same file; other specs as they are."""
    if spec_kind(spec) != "file":
        return spec
    path, _, attr = spec.rpartition(":")
    return f"{os.path.abspath(os.path.expanduser(path))}:{attr}"


def default_component_name(spec: str) -> str:
    """The metric name of a reward given without one: the function's or the built-in's name."""
    return spec.rpartition(":")[2].rpartition(".")[2] if spec_kind(spec) in ("file", "callable") else spec


def component_entries(reward_cfg) -> list[tuple[str, str, float, str]]:
    """(config key, spec, weight, metric name) of each configured reward: reward.functions, else
    reward.function (weight 1), else reward.name (the default: weight 1, no per-reward metrics)."""
    functions = list(getattr(reward_cfg, "functions", None) or [])
    if functions:
        out = []
        for i, e in enumerate(functions):
            get = e.get if isinstance(e, dict) else lambda k, d=None, e=e: getattr(e, k, d)
            spec = get("function")
            name = get("name") or (default_component_name(spec) if isinstance(spec, str) else "")
            out.append((f"reward.functions[{i}].function", spec, get("weight", 1.0), name))
        return out
    single = getattr(reward_cfg, "function", None)
    if single:
        return [("reward.function", single, 1.0, default_component_name(single))]
    return [("reward.name", reward_cfg.name, 1.0, reward_cfg.name)]


def check_entries(reward_cfg) -> None:
    """The shape of reward.function / reward.functions, without loading anything (config validation):
    one of the two, each spec of a known kind, finite weights, unique metric-safe names."""
    if getattr(reward_cfg, "function", None) and getattr(reward_cfg, "functions", None):
        raise RewardError("config keys 'reward.function' and 'reward.functions' are both set; use one (a list entry "
                          "{function: PATH.py:NAME, weight: 1.0} is the same as reward.function)")
    seen: dict[str, str] = {}
    for key, spec, weight, name in component_entries(reward_cfg):
        if key == "reward.name":
            return
        if not isinstance(spec, str) or spec_kind(spec) is None:
            raise RewardError(spec_error(key, spec))
        where = key.rsplit(".", 1)[0]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardError(f"config key '{where}.weight' is {weight!r}; must be a finite number")
        if not _COMPONENT_NAME.fullmatch(str(name)):
            raise RewardError(f"config key '{where}.name' is {name!r}; must be letters, digits, '_', '-' or '.' (it names the "
                              f"metric reward/<name>/mean)")
        if name in seen:
            raise RewardError(f"config key '{where}.name': two rewards are named {name!r} ({seen[name]} and {key}); "
                              "give each its own name")
        seen[name] = key


def load_file_function(key: str, spec: str) -> Callable:
    """The function NAME of PATH.py:NAME. Running the file is running the user's own code, at their
    request; the module is kept under a name of its own so its functions and classes pickle."""
    path_text, _, attr = spec.rpartition(":")
    path = os.path.abspath(path_text)
    if not os.path.isfile(path):
        raise RewardError(f"config key '{key}' is {spec!r}: file {path} not found")
    module = _LOADED.get(path)
    if module is None:
        name = "fipo_lite_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001  (the user's file: any error is theirs to see, in one line)
            del sys.modules[name]
            raise RewardError(f"config key '{key}' is {spec!r}: running {path} raised {type(e).__name__}: {e}") from None
        _LOADED[path] = module
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise RewardError(f"config key '{key}' is {spec!r}: {path} has no '{attr}' (functions there: {found})")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(f"config key '{key}' is {spec!r}: '{attr}' is not a function but {fn!r:.40} ({type(fn).__name__})")
    return fn


@lru_cache(maxsize=None)
def context_keywords(fn: Callable) -> frozenset:
    """The CONTEXT keywords `fn` takes: those its signature names, or all of them with **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (some C functions): (response, ground_truth) only
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(CONTEXT)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(k for k in CONTEXT if k in params and params[k].kind in kinds)


def check_signature(key: str, spec: str, fn: Callable) -> None:
    """`fn(response, ground_truth, <the CONTEXT keywords it names>)` must bind."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind("response", "ground_truth", **{k: None for k in context_keywords(fn)})
    except TypeError as e:
        raise RewardError(f"config key '{key}' is {spec!r}: {getattr(fn, '__name__', 'it')}{sig} cannot be called as "
                          f"fn(response, ground_truth, *, prompt=..., data_source=..., extra=...) ({e})") from None


def as_result(value: Any) -> tuple[float, bool, Optional[str]]:
    """A reward function's return value as (score, correct, prediction); a non-finite score is an error."""
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"a reward dict needs a 'score' key, got keys {sorted(value)}")
        score = value["score"]
        ok = value.get("correct", value.get("acc"))
        pred = value.get("pred")
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        score, ok, pred = value
    elif isinstance(value, numbers.Real) or hasattr(value, "item"):
        score, ok, pred = value, None, None
    else:
        raise TypeError(f"a reward returns a number, (score, correct, pred) or {{'score': ...}}, got {type(value).__name__}")
    score = float(score.item() if hasattr(score, "item") else score)
    if not math.isfinite(score):
        raise ValueError(f"the reward's score is {score}")
    ok = score > 0 if ok is None else bool(ok)
    return score, ok, None if pred is None else str(pred)


@dataclass
class Component:
    """One reward of the weighted sum. `fn` is None for a built-in named by `spec` (looked up at call
    time; `auto` picks one per response)."""

    key: str  # the config key it came from, for messages
    spec: str
    weight: float
    name: str
    fn: Optional[Callable] = None

    def __call__(self, response: str, truth: str, context: tuple) -> tuple[float, bool, Optional[str]]:
        source, prompt, extra = context
        fn = self.fn or REWARDS[pick_reward(self.spec, source or "unknown", response)]
        given = {"prompt": prompt, "data_source": source, "extra": extra}
        return as_result(fn(response, truth, **{k: given[k] for k in context_keywords(fn)}))

    def __reduce__(self):
        """A worker started by `spawn` receives a pickled copy: a file's function is loaded again there
        (by its spec, never pickled), a built-in looked up; a notebook callable must pickle itself."""
        if spec_kind(self.spec) == "callable":
            return (Component, (self.key, self.spec, self.weight, self.name, self.fn))
        return (_component_from_spec, (self.key, self.spec, self.weight, self.name))


def _component_from_spec(key: str, spec: str, weight: float, name: str) -> Component:
    fn = load_file_function(key, spec) if spec_kind(spec) == "file" else None
    return Component(key, spec, weight, name, fn)


def build_components(reward_cfg, callables: Optional[dict[str, Callable]] = None) -> list[Component]:
    """The configured rewards, each loaded and checked (file, attribute, callable, signature); errors
    name the config key and its value. `callables`: {name: function} for `callable:` specs."""
    callables = callables or {}
    check_entries(reward_cfg)
    out = []
    for key, spec, weight, name in component_entries(reward_cfg):
        kind = spec_kind(spec) if isinstance(spec, str) else None
        if kind is None:
            if key == "reward.name":  # the long-standing message for an unknown reward.name
                raise RewardError(f"reward.name {spec!r} is unknown; valid: {list(reward_names())}")
            raise RewardError(spec_error(key, spec))
        fn = None
        if kind == "file":
            fn = load_file_function(key, spec)
        elif kind == "callable":
            fn = callables.get(name)
            if fn is None:
                raise RewardError(f"config key '{key}' is {spec!r}: a Python function handed to fipo_lite.train(reward_funcs=...) "
                                  "in its own process, which a config cannot load again; pass it to train() again, or put it in "
                                  "a file and name it as PATH.py:NAME")
        elif spec != "auto":
            fn = REWARDS[spec]
        if fn is not None:
            check_signature(key, spec, fn)
        out.append(Component(key, spec, float(weight), name, fn if kind != "builtin" else None))
    return out


def describe(components: list[Component]) -> str:
    """'0.5 x fmt (/abs/rewards.py:fmt) + 1 x exact', for the run's log."""
    return " + ".join(f"{c.weight:g} x {c.name}" + (f" ({c.spec})" if c.spec != c.name else "") for c in components)


# ----------------------------------------------------------------------------- worker processes
def _score_one(components: list[Component], response: str, truth: str, context: tuple, named: bool) -> tuple[bool, object]:
    """(True, (total, correct, pred, [score of each reward])) or (False, why): any reward failure is a
    scored failure. The total is the weighted sum; correct and pred are the first reward's."""
    parts = []
    for c in components:
        try:
            parts.append(c(response, truth, context))
        except Exception as e:  # noqa: BLE001
            return False, f"{f'{c.name}: ' if named else ''}{type(e).__name__}: {e}"[:200]
    total = sum(c.weight * p[0] for c, p in zip(components, parts))
    return True, (total, parts[0][1], parts[0][2], [p[0] for p in parts])


def _worker_main(conn, components: list[Component], named: bool) -> None:
    """Child loop: receive a list of (index, response, truth, context), send one result per job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the parent times us
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        for i, response, truth, context in jobs:
            conn.send((i, *_score_one(components, response, truth, context, named)))


class _Worker:
    """One scoring process. Threads cannot stop a call stuck in C code holding the GIL (math-verify
    on `9^{9^{9^9}}` freezes the whole interpreter), and SIGALRM only works in the main thread; a
    separate process can simply be killed."""

    def __init__(self, ctx, components: list[Component], named: bool):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, components, named), daemon=True, name="fipo_lite-reward")
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


def _check_picklable(components: list[Component]) -> None:
    """Where workers are spawned (no fork: Windows), each gets a pickled copy of the rewards: a lambda or
    a function defined inside another cannot travel; say so before the run rather than in a worker."""
    for c in components:
        try:
            pickle.dumps(c)
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"reward {c.name!r} ({c.spec}) cannot be sent to the reward worker processes ({type(e).__name__}: {e}); "
                              "define it at the top level of a module or a PATH.py file, or set reward.timeout_s=0 to score "
                              "in this process") from None


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
    # with reward.function(s): {reward name: its unweighted score per sample, NaN where the sample failed}
    components: dict[str, list[float]] = field(default_factory=dict)


class RewardRunner:
    """Scores a batch of responses with the configured reward (config section `reward`): reward.name,
    or the weighted sum of reward.function / reward.functions (`callables` supplies the functions a
    notebook handed to `fipo_lite.train`).

    Calls run in `reward.num_workers` forked processes (a forked worker inherits the loaded functions,
    closures and lambdas included); one that raises scores 0 and one past `reward.timeout_s` is killed
    (its process is replaced) and scores 0, both counted in `failures`. `timeout_s <= 0` scores in this
    process with no limit (debugging)."""

    def __init__(self, reward_cfg, max_response_length: int, callables: Optional[dict[str, Callable]] = None):
        self.name = reward_cfg.name
        self.components = build_components(reward_cfg, callables)
        self.named = bool(getattr(reward_cfg, "function", None) or getattr(reward_cfg, "functions", None))
        self._wants = set().union(*(context_keywords(c.fn) for c in self.components if c.fn is not None))
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
        if self._ctx.get_start_method() != "fork" and self.timeout_s > 0:
            _check_picklable(self.components)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    def close(self) -> None:
        """Stop the worker processes (they also end with this process)."""
        _close_all(self._workers)

    def __call__(self, responses, ground_truths, data_sources=None, lengths=None, prompts=None, extras=None) -> RewardOutput:
        n = len(responses)
        given = {"ground truths": ground_truths, "data sources": data_sources, "lengths": lengths, "prompts": prompts, "extras": extras}
        if any(v is not None and len(v) != n for v in given.values()):
            raise ValueError(f"RewardRunner got {n} responses but " + ", ".join(f"{len(v)} {k}" for k, v in given.items() if v is not None))
        sources = data_sources or ["unknown"] * n
        # the prompt and the extra fields travel to the workers only when a reward takes them
        prompts = prompts if prompts is not None and "prompt" in self._wants else [None] * n
        extras = extras if extras is not None and "extra" in self._wants else [None] * n
        jobs = [(i, resp, str(truth), (src or "unknown", prompt, extra))
                for i, (resp, truth, src, prompt, extra) in enumerate(zip(responses, ground_truths, sources, prompts, extras))]
        results = self._score_inline(jobs) if self.timeout_s <= 0 else self._score_in_workers(jobs)
        out = RewardOutput(scores=[0.0] * n, accs=[0.0] * n, preds=[None] * n)
        if self.named:
            out.components = {c.name: [math.nan] * n for c in self.components}
        for i, (good, payload) in enumerate(results):
            if not good:
                out.failures += 1
                out.failed.append(i)
                out.reasons.append(payload)
                continue
            score, ok, pred, parts = payload
            if self.overlong.enable and lengths is not None:
                score += overlong_penalty(lengths[i], self.max_response_length, self.overlong.buffer_len,
                                          self.overlong.penalty_factor)
            out.scores[i], out.accs[i], out.preds[i] = float(score), float(ok), pred
            for c, part in zip(self.components, parts) if self.named else ():
                out.components[c.name][i] = part
        return out

    def _score_inline(self, jobs):
        return [_score_one(self.components, resp, truth, context, self.named) for _, resp, truth, context in jobs]

    def _score_in_workers(self, jobs):
        """Spread jobs over the workers (strided), collect answers, replace any worker past its deadline."""
        results: list = [None] * len(jobs)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.components, self.named))
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
        new = self._workers[k] = _Worker(self._ctx, self.components, self.named)
        if old.pending:
            new.submit([jobs[i] for i in old.pending], self.timeout_s)
