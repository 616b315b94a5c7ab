"""fipo_lite's objective inside TRL: a GRPOTrainer whose loss is `fipo_lite.policy_loss`.

Multi-GPU and multi-node runs then go through accelerate or DeepSpeed exactly as with TRL's own
GRPOTrainer:

    from fipo_lite.integrations.trl import FIPOGRPOConfig, FIPOGRPOTrainer
    args = FIPOGRPOConfig(output_dir="out", num_generations=16, per_device_train_batch_size=16)
    trainer = FIPOGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=..., fipo=dict(tau=32.0))
    trainer.train()          # accelerate launch --num_processes 8 train.py

FIPO only differs from DAPO when optimizer steps reuse a generation batch (on the first step after
generation the policy is the sampler, the Future-KL is 0 and every influence weight is 1). TRL's
defaults make every step on-policy, so FIPOGRPOConfig defaults to the recipe's shape: one generation
batch feeds UPDATES_PER_GENERATION optimizer steps. The trainer warns when a configuration is on-policy.

Supported: trl >= 0.24, <= 1.15 (text-only models). TRL's tensors map onto the spec's inputs:
per_token_logps -> logp, old_per_token_logps (or logp.detach() when TRL skips it) -> old_logp,
advantages -> adv, completion_mask (x tool_mask) -> mask. TRL's clip range (epsilon, epsilon_high)
is the token clip; the token-mean denominator is one optimizer step's completion tokens (TRL's
`num_items_in_batch` rescaled to the accumulation window, per process, as TRL 1.x does for DAPO),
so gradient accumulation matches one big batch.
FIPO diagnostics are logged under `fipo/<name>` next to TRL's own metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("fipo_lite.integrations.trl needs TRL: pip install 'trl>=0.24,<=1.15'") from e

from ..config import AlgorithmConfig
from ..objective import CLIP_HIGH, policy_loss

LOGGED = ("policy_kl", "clip_frac", "dual_clip_frac", "invalid_seq_frac", "influence_mean", "influence_min",
          "influence_max", "influence_frac_upper", "influence_frac_lower", "fkl_exp_mean", "ratio_pos_p99_9", "ratio_neg_p99_9")
# The `fipo=` knobs, with fipo_lite's run-config defaults (AlgorithmConfig: tau 32, influence clip [1, 1.2], ...).
KNOBS = ("tau", "fkl_clip_low", "fkl_clip_high", "safety_thresh", "dual_clip_c", "start", "window", "average",
         "mask_dual_clip", "invalidate_dual_clipped", "loss_agg_mode")
TRL_OWNED = ("clip_low", "clip_high", "denominator", "ref_logp", "kl_coef", "is_weights")
UPDATES_PER_GENERATION = 8  # the recipe: 512 prompts per rollout, optimizer mini-batches of 64


def fipo_defaults() -> dict[str, Any]:
    """policy_loss keyword defaults of the plug-in, read from fipo_lite's AlgorithmConfig."""
    a = AlgorithmConfig()
    return {"mode": a.loss_mode, **{k: getattr(a, k) for k in KNOBS}}


@dataclass
class FIPOGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig with the recipe's defaults where TRL's would turn FIPO into DAPO.

    Unless `steps_per_generation` or `generation_batch_size` is given, steps_per_generation =
    UPDATES_PER_GENERATION x gradient_accumulation_steps: each generation batch feeds 8 optimizer
    steps, and TRL computes the old log-probs that the later (off-policy) steps need. Unless given,
    `epsilon_high` is DAPO's clip-higher 0.28 (TRL's default: epsilon).
    """

    def __post_init__(self):
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = UPDATES_PER_GENERATION * self.gradient_accumulation_steps
        if self.epsilon_high is None:
            self.epsilon_high = CLIP_HIGH
        super().__post_init__()


def on_policy(args, num_iterations: int) -> bool:
    """True when every optimizer step starts right after generation (TRL's own test for skipping old log-probs)."""
    return args.gradient_accumulation_steps % (args.steps_per_generation * num_iterations) == 0


class FIPOGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the FIPO (or DAPO/GRPO, via fipo['mode']) loss of fipo_lite.

    `fipo`: policy_loss knobs (KNOBS, and "mode"), defaults from fipo_lite's AlgorithmConfig. Without
    `args`, a FIPOGRPOConfig (off-policy by default) replaces TRL's default GRPOConfig.
    """

    def __init__(self, *args, fipo: dict[str, Any] | None = None, **kwargs):
        fipo = dict(fipo or {})
        for key in fipo:
            if key in TRL_OWNED:
                raise ValueError(f"fipo[{key!r}] is set from TRL's own arguments (epsilon, epsilon_high, beta, "
                                 "importance sampling); remove it")
            if key not in ("mode", *KNOBS):
                raise ValueError(f"fipo[{key!r}] is not a FIPO knob; valid: {['mode', *KNOBS]}")
        if len(args) < 3 and kwargs.get("args") is None:  # TRL would build an on-policy GRPOConfig
            model = kwargs.get("model", args[0] if args else None)
            name = model if isinstance(model, str) else model.config._name_or_path
            kwargs["args"] = FIPOGRPOConfig(f"{name.split('/')[-1]}-FIPO")
        super().__init__(*args, **kwargs)
        self.fipo_kwargs = {**fipo_defaults(), **fipo}
        if self.fipo_kwargs["mode"] == "fipo" and on_policy(self.args, self.num_iterations):
            a = self.args
            warnings.warn(
                f"FIPO runs as DAPO with this configuration: gradient_accumulation_steps={a.gradient_accumulation_steps} "
                f"is a multiple of steps_per_generation={a.steps_per_generation} x num_iterations={self.num_iterations}, so "
                "every optimizer step is on-policy, the Future-KL is 0 and every influence weight is 1. Set "
                f"steps_per_generation to a multiple of gradient_accumulation_steps (the recipe: "
                f"steps_per_generation={UPDATES_PER_GENERATION * a.gradient_accumulation_steps}, {UPDATES_PER_GENERATION} "
                "optimizer steps per generation batch), or num_iterations > 1, or use FIPOGRPOConfig, whose default does this.",
                UserWarning, stacklevel=2)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        out = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_ids.size(1),
                                                      compute_entropy=True)
        logp, entropies = out[0], out[1]  # trl >= 1.x also returns an auxiliary loss
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        adv = inputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(logp)
        is_weights = None
        if getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False):
            w = inputs.get("importance_sampling_ratio")
            is_weights = None if w is None else w.expand_as(logp)
        kl = {}
        if self.beta != 0.0:
            kl = {"ref_logp": inputs["ref_per_token_logps"], "kl_coef": self.beta}
        n_items = inputs.get("num_items_in_batch")  # completion tokens of the whole generation batch, all ranks
        denominator = None
        if n_items is not None:  # this rank's share of one optimizer step's tokens (TRL 1.x's DAPO normaliser)
            denominator = float(n_items) / self.accelerator.num_processes
            if self.model.training:
                denominator *= self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss, metrics = policy_loss(old, logp, adv, mask.bool(), clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                                    denominator=denominator, is_weights=is_weights, **kl, **self.fipo_kwargs)
        if denominator is None:  # no global count: TRL's per-micro-batch normalisation
            loss = loss / self.current_gradient_accumulation_steps

        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            ent = (entropies * mask).sum() / mask.sum().clamp(min=1)
        self._metrics[mode]["entropy"].append(self.accelerator.gather(ent).nanmean().item())
        for key in LOGGED:
            if key in metrics:
                value = torch.tensor(metrics[key], device=logp.device)
                self._metrics[mode][f"fipo/{key}"].append(self.accelerator.gather(value).nanmean().item())
        return loss
