"""Sample and score: what the trainer's rollout and the evaluation share.

Any `RolloutEngine` samples `params.n` responses per prompt, the tokenizer decodes them, and the
reward runner scores each against its example's ground truth. The trainer groups the result into
GRPO groups; `evaluate_rollouts` turns it into avg@k / pass@k / cons@k, for the loop's periodic
evaluation and for the `evaluate` command (`evaluation.py`).

avg@k = mean accuracy; cons@k = accuracy of the majority extracted answer; pass@k = the unbiased
estimator 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import metrics as M
from .data import encode_prompts
from .engines.base import Rollout, SamplingParams


@dataclass
class Scored:
    """A rollout with its decoded texts and rewards; row i belongs to prompt rollout.prompt_index[i]."""

    rollout: Rollout
    texts: list[str]
    rewards: Any  # rewards.RewardOutput: scores, accs, preds, failures
    sample_s: float = 0.0  # wall time of sampling (decoding included) ...
    reward_s: float = 0.0  # ... and of scoring

    def rows_by_prompt(self, num_prompts: int) -> list[list[int]]:
        """The rows of each prompt, in sampling order."""
        rows: list[list[int]] = [[] for _ in range(num_prompts)]
        for i, q in enumerate(self.rollout.prompt_index):
            rows[q].append(i)
        return rows


def sample_and_score(engine, tokenizer, examples, prompt_ids: list[list[int]], params: SamplingParams, reward_fn) -> Scored:
    """Sample params.n responses for each of `examples` (prompt_ids[i] encodes examples[i]) and score them."""
    t0 = time.perf_counter()
    ro = engine.generate(prompt_ids, params)
    texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    t1 = time.perf_counter()
    ex = [examples[i] for i in ro.prompt_index]
    rewards = reward_fn(texts, [e.ground_truth for e in ex], [e.data_source for e in ex], ro.response_lengths,
                        prompts=[e.prompt for e in ex], extras=[e.extra for e in ex])
    return Scored(ro, texts, rewards, sample_s=t1 - t0, reward_s=time.perf_counter() - t1)


# ----------------------------------------------------------------------------- evaluation metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        miss *= 1.0 - k / i
    return 1.0 - miss


def cons_at_k(preds: list, accs: list[float]) -> float:
    """Accuracy of the most frequent extracted answer (None never votes); a tie goes to the answer
    seen first. 0 when no sample produced an answer."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(p for p in preds if p is not None and votes[p] == best)
    return float(next(a for p, a in zip(preds, accs) if p == winner))


def summarize(rows: list[dict], k: int | None = None) -> dict[str, float]:
    """Mean of the per-problem metrics (rows of `evaluate_rollouts`) plus response-length statistics,
    under fipo_lite.metrics names."""
    if not rows:
        raise ValueError("no problems to summarize")
    k = k if k is not None else rows[0]["k"]
    lengths = [L for r in rows for L in r["lengths"]]
    out = {
        M.VAL_AVG: sum(r["avg_at_k"] for r in rows) / len(rows),
        M.VAL_PASS: sum(r["pass_at_k"] for r in rows) / len(rows),
        M.VAL_CONS: sum(r["cons_at_k"] for r in rows) / len(rows),
        M.VAL_LENGTH: sum(lengths) / len(lengths),
        M.VAL_REWARD: M.nan_mean(x for r in rows for x in r.get("scores", ())),  # (rows written before scores were kept: NaN)
        "val/k": float(k),
        "val/num_problems": float(len(rows)),
    }
    # val/response_length_min, _q25, _median, _q75, _max beside metrics' val/response_length_mean
    out.update({f"val/response_length_{key.split('/', 1)[1]}": v for key, v in M.length_stats(lengths).items() if key != M.LENGTH["mean"]})
    return out


def summarize_sets(rows: list[dict], sets: list[tuple[str, int]], k: int) -> dict[str, float]:
    """avg@k, pass@k, cons@k and problem count of each validation set (`sets`: (name, problems) in row order)
    as val/<name>/..., beside the pooled val/... of `summarize` (verl's per-data_source metrics)."""
    out, start = {}, 0
    keys = (M.VAL_AVG, M.VAL_PASS, M.VAL_CONS, M.VAL_LENGTH, "val/num_problems")
    for name, count in sets:
        if count:
            part = summarize(rows[start:start + count], k)
            out.update({f"val/{name}/{key.split('/', 1)[1]}": part[key] for key in keys})
        start += count
    return out


def evaluate_rollouts(engine, tokenizer, examples, k: int, params: SamplingParams, reward_fn, prompt_ids=None,
                      ) -> tuple[dict[str, float], list[dict]]:
    """Sample `params.n` (>= k) responses per example with any RolloutEngine, score, and summarize.

    With n > k samples, pass@k and avg@k use all n (unbiased, lower variance); cons@k votes over the first k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if params.n < k:
        raise ValueError(f"need at least k={k} samples per problem, got params.n={params.n}")
    if prompt_ids is None:
        prompt_ids = encode_prompts(tokenizer, examples)
    scored = sample_and_score(engine, tokenizer, examples, prompt_ids, params, reward_fn)
    ro, texts, rew = scored.rollout, scored.texts, scored.rewards
    by_prompt = scored.rows_by_prompt(len(examples))
    rows = []
    for example, idx in zip(examples, by_prompt):
        accs = [rew.accs[i] for i in idx]
        preds = [rew.preds[i] for i in idx]
        rows.append({
            "index": example.index, "k": k, "data_source": example.data_source, "ground_truth": example.ground_truth,
            "preds": preds, "accs": accs, "scores": [float(rew.scores[i]) for i in idx], "lengths": [ro.response_lengths[i] for i in idx],
            "truncated": [ro.truncated[i] for i in idx],
            "avg_at_k": sum(accs) / len(accs), "pass_at_k": pass_at_k(len(accs), int(sum(a > 0 for a in accs)), k),
            "cons_at_k": cons_at_k(preds[:k], accs[:k]), "responses": [texts[i] for i in idx],
        })
    summary = summarize(rows, k)
    for name, values in rew.components.items():  # reward.function(s): each reward's own mean, as in training
        summary[M.reward_component(name, val=True)] = M.nan_mean(values)
    if rew.failures:
        summary["val/reward_failures"] = float(rew.failures)
    return summary, rows
