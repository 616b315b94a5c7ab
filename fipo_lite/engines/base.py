"""The rollout-engine interface: what the loop needs from a sampler, and nothing more.

Implementations: `engines/hf.py` (Hugging Face generate, CPU and GPU) and `engines/vllm.py`
(in-process vLLM with LoRA). The loop only ever calls `generate`, `sync` and `sleep`/`wake`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 64
    seed: int | None = None
    logprobs: bool = False  # ask the sampler for its own log-prob of each sampled token

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """n samples per prompt, flattened prompt-major: sample j of prompt i is row i * n + j."""

    prompt_index: list[int]  # which input prompt each row belongs to
    prompt_ids: list[list[int]]  # the prompt's token ids (no padding)
    response_ids: list[list[int]]  # generated ids, EOS included when the sample stopped, no padding
    truncated: list[bool]  # True when max_new_tokens ran out before EOS
    sampler_logprobs: list[list[float]] | None = None  # per response token, when SamplingParams.logprobs
    extra: dict = field(default_factory=dict)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def __len__(self) -> int:
        return len(self.response_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Sample params.n responses for every prompt."""

    def sync(self, policy) -> None:
        """Make the sampler use the policy's current weights (adapter hand-off after an update)."""

    def sleep(self) -> None:
        """Free accelerator memory for the trainer (no-op where sampler and trainer share weights)."""

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`."""
