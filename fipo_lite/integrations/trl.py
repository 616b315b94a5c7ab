"""fipo_lite's objective inside TRL: a GRPOTrainer whose loss is `fipo_lite.policy_loss`.

Multi-GPU and multi-node runs then go through accelerate or DeepSpeed exactly as with TRL's own
GRPOTrainer:

    from fipo_lite.integrations.trl import FIPOGRPOTrainer
    trainer = FIPOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                              fipo=dict(tau=32.0, fkl_clip_low=1.0, fkl_clip_high=1.2, safety_thresh=10.0))
    trainer.train()          # accelerate launch --num_processes 8 train.py

Supported: trl >= 0.24, <= 1.15 (text-only models). TRL's tensors map onto the spec's inputs:
per_token_logps -> logp, old_per_token_logps (or logp.detach() when TRL skips it) -> old_logp,
advantages -> adv, completion_mask (x tool_mask) -> mask. TRL's clip range (epsilon, epsilon_high)
is the token clip; the token-mean denominator is one optimizer step's completion tokens (TRL's
`num_items_in_batch` rescaled to the accumulation window, per process, as TRL 1.x does for DAPO),
so gradient accumulation matches one big batch.
FIPO diagnostics are logged under `fipo/<name>` next to TRL's own metrics.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("fipo_lite.integrations.trl needs TRL: pip install 'trl>=0.24,<=1.15'") from e

from ..objective import policy_loss

LOGGED = ("policy_kl", "clip_frac", "dual_clip_frac", "invalid_seq_frac", "influence_mean", "influence_min",
          "influence_max", "influence_frac_upper", "influence_frac_lower", "fkl_exp_mean", "ratio_pos_p99_9", "ratio_neg_p99_9")


class FIPOGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the FIPO (or DAPO/GRPO, via fipo['mode']) loss of fipo_lite."""

    def __init__(self, *args, fipo: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fipo_kwargs = {"mode": "fipo", **(fipo or {})}
        for key in ("clip_low", "clip_high", "denominator", "ref_logp", "kl_coef", "is_weights"):
            if key in self.fipo_kwargs:
                raise ValueError(f"fipo[{key!r}] is set from TRL's own arguments (epsilon, epsilon_high, beta, "
                                 "importance sampling); remove it")

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
