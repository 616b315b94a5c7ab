"""Sample and score: what the trainer's rollout and the evaluation share.

Any `RolloutEngine` samples `params.n` responses per prompt, the tokenizer decodes them, and the
reward runner scores each against its example's ground truth. The trainer groups the result into
GRPO groups; `evaluate` turns it into avg@k / pass@k / cons@k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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
    rewards = reward_fn(texts, [e.ground_truth for e in ex], [e.data_source for e in ex], ro.response_lengths)
    return Scored(ro, texts, rewards, sample_s=t1 - t0, reward_s=time.perf_counter() - t1)
