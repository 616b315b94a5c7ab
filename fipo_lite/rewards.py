"""Rewards (spec section 9): exact match, the DAPO math reward, a boxed answer via math-verify, and
overlong shaping. `RewardRunner` scores a batch so that a reward that raises or hangs costs one
sample (score 0, counted in `failures`), never the run.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

# A reward function maps (response, ground_truth) -> (score, correct, extracted prediction).
RewardFn = Callable[[str, str], "tuple[float, bool, Optional[str]]"]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    """Add a reward function to the table (tests and users can plug in their own)."""
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return deco


# ----------------------------------------------------------------------------- exact
@register("exact")
def exact_reward(response: str, ground_truth: str):
    """The synthetic tasks: the last integer in the response equals the ground truth (1 / 0)."""
    found = re.findall(r"-?\d+", response)
    pred = found[-1] if found else None
    ok = pred is not None and pred == ground_truth.strip()
    return float(ok), ok, pred


# ----------------------------------------------------------------------------- DAPO math
_DROP_WORDS = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "points", "feet",
               "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
               "childrentickets", "multiples", "sue")
_DROP_TEX = ("\\ldots", "\\dots", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
             "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"')
_REWRITES = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
             (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))


def normalize_answer(text: str) -> str:
    """Canonical form of a final answer, following the DAPO/Minerva rules used by verl's math_dapo
    reward: keep the right-hand side, drop units and spacing, unwrap \\text/\\boxed/..., fix \\frac12."""
    s = text.split("=")[-1]
    for old, new in _REWRITES:
        s = s.replace(old, new)
    for junk in _DROP_WORDS + _DROP_TEX:
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


@register("dapo_math")
def dapo_math_reward(response: str, ground_truth: str):
    """Last `Answer: X` in the last 300 characters, normalised, vs the normalised truth: +1 / -1."""
    found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", response[-300:])
    pred = normalize_answer(found[-1]) if found else None
    ok = pred is not None and pred == normalize_answer(ground_truth)
    return (1.0 if ok else -1.0), ok, pred


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
    """Last \\boxed{} answer checked symbolically against the truth by math-verify: 1 / 0."""
    from math_verify import parse, verify

    pred = last_boxed(response)
    if pred is None:
        return 0.0, False, None
    # math-verify's own timeouts use SIGALRM (main thread only); RewardRunner enforces the limit instead.
    gold = parse("$" + ground_truth + "$", parsing_timeout=None)
    target = parse("$" + pred + "$", parsing_timeout=None)
    ok = bool(gold and target and verify(gold, target, timeout_seconds=None))
    return float(ok), ok, pred


def pick_reward(name: str, data_source: str) -> str:
    """`auto`: synthetic/* -> exact; DAPO-style sources -> dapo_math; anything else -> boxed."""
    if name != "auto":
        return name
    if data_source.startswith("synthetic/"):
        return "exact"
    if "dapo" in data_source.lower():
        return "dapo_math"
    return "boxed"


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 until max_len - buffer_len, then linearly down to -penalty_factor."""
    if buffer_len <= 0:
        return 0.0
    return min(-(length - (max_len - buffer_len)) / buffer_len * penalty_factor, 0.0)


# ----------------------------------------------------------------------------- batch runner
@dataclass
class RewardOutput:
    scores: list[float]  # shaped scores (the advantage input)
    accs: list[float]  # 0/1 correctness
    preds: list[Optional[str]]
    failures: int = 0
    failed: list[int] = field(default_factory=list)  # indices that raised or timed out


def _call_with_timeout(fn: RewardFn, response: str, truth: str, timeout_s: float):
    """Run fn in a daemon thread; a call that hangs is abandoned (it cannot block the loop or exit)."""
    box: dict = {}

    def work():
        try:
            box["out"] = fn(response, truth)
        except BaseException as e:  # noqa: BLE001 - any reward failure is a scored failure
            box["err"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout_s if timeout_s and timeout_s > 0 else None)
    if th.is_alive():
        raise TimeoutError(f"reward {getattr(fn, '__name__', fn)} ran past {timeout_s}s")
    if "err" in box:
        raise box["err"]
    return box["out"]


class RewardRunner:
    """Scores a batch of responses with the configured reward (config section `reward`)."""

    def __init__(self, reward_cfg, max_response_length: int):
        self.name = reward_cfg.name
        if self.name != "auto" and self.name not in REWARDS:
            raise ValueError(f"reward.name {self.name!r} is unknown; valid: {['auto', *sorted(REWARDS)]}")
        self.timeout_s = float(reward_cfg.timeout_s)
        self.overlong = reward_cfg.overlong
        self.max_response_length = max_response_length

    def __call__(self, responses, ground_truths, data_sources=None, lengths=None) -> RewardOutput:
        n = len(responses)
        data_sources = data_sources or ["unknown"] * n
        out = RewardOutput(scores=[0.0] * n, accs=[0.0] * n, preds=[None] * n)
        for i, (resp, truth, src) in enumerate(zip(responses, ground_truths, data_sources)):
            fn = REWARDS[pick_reward(self.name, src or "unknown")]
            try:
                score, ok, pred = _call_with_timeout(fn, resp, str(truth), self.timeout_s)
            except Exception:  # noqa: BLE001
                out.failures += 1
                out.failed.append(i)
                continue
            if self.overlong.enable and lengths is not None:
                score += overlong_penalty(lengths[i], self.max_response_length, self.overlong.buffer_len,
                                          self.overlong.penalty_factor)
            out.scores[i], out.accs[i], out.preds[i] = float(score), float(ok), pred
        return out
