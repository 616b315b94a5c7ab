"""The FIPO / DAPO / GRPO token loss with dual clip, invalidation and aggregation (spec sections 4-8).

One function, `policy_loss`, is what the trainer, notebooks and the verl/TRL plug-ins call. The
Future-KL math itself lives in `future_kl.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .future_kl import TAU, _future_kl, check_options, check_tensor

MODES = ("fipo", "dapo", "grpo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DEFAULT_AGG = {"fipo": "token-mean", "dapo": "token-mean", "grpo": "seq-mean-token-mean"}
RATIO_QUANTILES = (("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p99_5", 0.995), ("p99_9", 0.999))
_FKL_EXP_CAP = 80.0  # exp(FutureKL) is reported saturated at e**80 (only the metric; f is clipped far lower)
CLIP_HIGH = 0.28  # DAPO's clip-higher: the token clip's upper range for fipo/dapo (grpo: symmetric)


def resolve_clip_high(mode: str, clip_low: float, clip_high: float | None) -> float:
    """clip_high as the loss uses it: None is CLIP_HIGH for fipo/dapo and clip_low (symmetric) for grpo."""
    if clip_high is not None:
        return clip_high
    return clip_low if mode == "grpo" else CLIP_HIGH


def aggregate(loss_mat: torch.Tensor, keep: torch.Tensor, mode: str, *, denominator: float | None = None, max_response_length: int | None = None) -> torch.Tensor:
    """Reduce a [B, L] token loss over the kept tokens (spec section 7).

    `denominator` replaces the local count (kept tokens for token-mean, kept sequences for the
    seq-mean modes): pass the whole mini-batch's count to every micro-batch and gradient
    accumulation gives exactly the big-batch gradient. Nothing kept gives exactly 0.
    """
    keep = keep.to(loss_mat.dtype)
    masked = loss_mat * keep
    if mode == "token-mean":
        num, count = masked.sum(), keep.sum()
    else:
        tokens = keep.sum(-1)
        seq_sum = masked.sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = seq_sum / tokens.clamp(min=1.0)
        elif mode == "seq-mean-token-sum":
            per_seq = seq_sum
        else:
            per_seq = seq_sum / float(max_response_length or loss_mat.shape[-1])
        num, count = per_seq.sum(), (tokens > 0).to(loss_mat.dtype).sum()
    den = float(denominator) if denominator is not None else float(count)
    if den <= 0:
        return masked.sum() * 0.0
    return num / den


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref), as verl's `kl_penalty(..., "low_var_kl")`.

    exp(ref - logp) - (ref - logp) - 1, with the log-ratio clamped to +-20 and the estimate to
    [-10, 10] (verl's guards: one token far from the reference cannot dominate the loss).
    """
    log_r = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


def influence_bounds(future_kl_clip_ratio: float, high_only: bool) -> tuple[float, float]:
    """Upstream's `future_kl_clip_ratio` knob as [low, high] (r = 0 means no clip: [0, 10])."""
    r = float(future_kl_clip_ratio)
    if r == 0:
        return 0.0, 10.0
    return (1.0, 1.0 + r) if high_only else (1.0 - r, 1.0 + r)


def from_recipe(**recipe: Any) -> dict[str, Any]:
    """Map the upstream FIPO recipe's knob names onto `policy_loss` keyword arguments.

    Accepts: decay_rate (tau), future_kl_clip_ratio, future_kl_clip_high_only, future_kl_start,
    future_kl_window, future_kl_average, safety_thresh, clip_ratio_c, clip_ratio_low,
    clip_ratio_high, loss_agg_mode; chunk_size is accepted and unused (we need no chunks).
    """
    known = {
        "decay_rate", "chunk_size", "future_kl_clip_ratio", "future_kl_clip_high_only", "future_kl_start",
        "future_kl_window", "future_kl_average", "safety_thresh", "clip_ratio_c", "clip_ratio_low",
        "clip_ratio_high", "loss_agg_mode",
    }
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; valid keys: {sorted(known)}")
    out: dict[str, Any] = {"mode": "fipo"}
    if "decay_rate" in recipe:
        out["tau"] = float(recipe["decay_rate"])
    if "future_kl_clip_ratio" in recipe:
        lo, hi = influence_bounds(recipe["future_kl_clip_ratio"], bool(recipe.get("future_kl_clip_high_only", True)))
        out["fkl_clip_low"], out["fkl_clip_high"] = lo, hi
    renames = {
        "future_kl_start": "start", "future_kl_window": "window", "future_kl_average": "average",
        "safety_thresh": "safety_thresh", "clip_ratio_c": "dual_clip_c", "clip_ratio_low": "clip_low",
        "clip_ratio_high": "clip_high", "loss_agg_mode": "loss_agg_mode",
    }
    for src, dst in renames.items():
        if src in recipe and recipe[src] is not None:
            out[dst] = recipe[src]
    if "window" in out:
        out["window"] = int(out["window"])
    if out.get("start") in ("current", "include"):
        out["start"] = "include_current"
    elif out.get("start") in ("next", "exclude"):
        out["start"] = "exclude_current"
    return out


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {f"{prefix}_mean": math.nan, f"{prefix}_min": math.nan, f"{prefix}_max": math.nan}
    return {f"{prefix}_mean": x.mean().item(), f"{prefix}_min": x.min().item(), f"{prefix}_max": x.max().item()}


def _ratio_quantiles(prefix: str, r: torch.Tensor) -> dict[str, float]:
    if r.numel() == 0:
        out = {f"{prefix}_{name}": math.nan for name, _ in RATIO_QUANTILES}
        out[f"{prefix}_max"] = math.nan
        return out
    r = r.to(torch.float32)
    if r.numel() > 1_000_000:  # torch.quantile has a size limit; a sorted subsample is plenty here
        r = r[torch.randperm(r.numel(), device=r.device)[:1_000_000]]
    q = torch.quantile(r, torch.tensor([p for _, p in RATIO_QUANTILES], device=r.device))
    out = {f"{prefix}_{name}": v for (name, _), v in zip(RATIO_QUANTILES, q.tolist())}
    out[f"{prefix}_max"] = r.max().item()
    return out


INFLUENCE_HEAD = 8  # influence_mean_head: the first tokens of each response, where the answer's form is chosen


def _influence_profile(f, raw, m, adv, ratio, safety_thresh) -> dict[str, float]:
    """Where the influence weights go: quantiles of f and of the unclipped exp(FutureKL), the share of
    tokens moved off 1, by advantage sign, the first INFLUENCE_HEAD tokens of each response against the
    rest, and how often the safety rule engaged (A < 0 and ratio > safety_thresh)."""
    if not bool(m.any()):
        return {}
    out = {}
    fm, rm = f[m].float(), raw[m].float()
    if fm.numel() > 1_000_000:
        keep = torch.randperm(fm.numel(), device=fm.device)[:1_000_000]
        fm, rm = fm[keep], rm[keep]
    qs = torch.tensor([0.5, 0.9, 0.99], device=fm.device)
    for name, v in zip(("p50", "p90", "p99"), torch.quantile(fm, qs).tolist()):
        out[f"influence_{name}"] = v
    for name, v in zip(("p01", "p50", "p99"), torch.quantile(rm, torch.tensor([0.01, 0.5, 0.99], device=rm.device)).tolist()):
        out[f"fkl_exp_{name}"] = v
    out["influence_frac_moved"] = ((fm - 1.0).abs() > 0.01).float().mean().item()
    for name, sel in (("pos", m & (adv > 0)), ("neg", m & (adv < 0))):
        out[f"influence_mean_{name}"] = f[sel].mean().item() if bool(sel.any()) else math.nan
    head = torch.zeros_like(m)
    head[:, :INFLUENCE_HEAD] = True
    for name, sel in (("head", m & head), ("tail", m & ~head)):
        out[f"influence_mean_{name}"] = f[sel].mean().item() if bool(sel.any()) else math.nan
    out["safety_frac"] = (m & (adv < 0) & (ratio > safety_thresh)).float().sum().item() / m.sum().item()
    return out


def policy_loss(
    old_logp: torch.Tensor,
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "fipo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip_c: float = 10.0,
    tau: float = TAU,
    fkl_clip_low: float = 1.0,
    fkl_clip_high: float = 1.2,
    safety_thresh: float = 10.0,
    start: str = "include_current",
    window: int = -1,
    average: bool = False,
    loss_agg_mode: str | None = None,
    mask_dual_clip: bool = True,
    invalidate_dual_clipped: bool = True,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
    denominator: float | None = None,
    max_response_length: int | None = None,
    compute_metrics: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with FIPO's Future-KL influence weights.

    mode: "fipo" (spec 4-7), "dapo" (f = 1, no invalidation) or "grpo" (symmetric clip). In every
    mode, `ref_logp` with `kl_coef` > 0 adds a k3 KL to the reference (verl's use_kl_loss, spec 8). clip_high defaults to CLIP_HIGH for fipo/dapo and to
    clip_low (symmetric) for grpo; loss_agg_mode defaults to token-mean (fipo/dapo) or
    seq-mean-token-mean (grpo). `mask_dual_clip=False` lets ratios above c into the Future-KL
    sums and `invalidate_dual_clipped=False` keeps sequences with several dual-clipped tokens
    (ablations; the released recipe has both on). `is_weights` multiplies each token's policy loss
    (truncated importance sampling against the sampler). The KL term is verl's `low_var_kl` added as
    verl's actor adds its KL loss: aggregated on its own over the response mask (invalidated rows
    included) and not importance-weighted. `denominator`: see `aggregate`.

    Returns (scalar loss, metrics). The influence weights carry no gradient.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    agg = loss_agg_mode if loss_agg_mode is not None else DEFAULT_AGG[mode]
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {agg!r}")
    check_options(tau=tau, dual_clip_c=dual_clip_c, start=start, window=window)
    if not (0 <= fkl_clip_low <= fkl_clip_high):
        raise ValueError(f"need 0 <= fkl_clip_low <= fkl_clip_high, got fkl_clip_low={fkl_clip_low}, fkl_clip_high={fkl_clip_high}")
    check_tensor("logp", logp)
    shape = logp.shape
    check_tensor("old_logp", old_logp, shape)
    check_tensor("advantages", advantages, shape)
    check_tensor("mask", mask, shape, floating=False)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, shape)
    if is_weights is not None:
        check_tensor("is_weights", is_weights, shape)
    clip_high = resolve_clip_high(mode, clip_low, clip_high)

    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16/fp16 in, float32 math
    logp_c, old = logp.to(dtype), old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    m = mask.to(torch.bool)
    delta = (logp_c - old).clamp(-20.0, 20.0)
    ratio = torch.exp(delta)
    ratio_d = ratio.detach()

    neg = adv < 0
    if mode == "fipo":
        with torch.no_grad():
            # One reduction tells whether any ratio exceeds c or the safety threshold; usually none
            # does, and the filter and safety passes below (which would change nothing) are skipped.
            r_max = ratio_d.max().item() if ratio_d.numel() else 0.0
            fkl = _future_kl(delta, m, tau=tau, dual_clip_c=dual_clip_c, start=start, window=window, average=average,
                             mask_dual_clip=mask_dual_clip and r_max >= dual_clip_c * (1 - 1e-6), clamped=True).to(dtype)
            raw = torch.exp(fkl.clamp(max=_FKL_EXP_CAP)) if compute_metrics else None
            # clip(exp(F), lo, hi) == exp(clip(F, log lo, log hi)): one clamp and one exp, in place
            f = fkl.clamp_(math.log(fkl_clip_low) if fkl_clip_low > 0 else -math.inf, math.log(fkl_clip_high)).exp_()
            if r_max > safety_thresh:
                f = torch.where(neg & (ratio_d > safety_thresh), f.clamp(0.8, 1.0), f)
        a_tilde = adv * f
    else:
        a_tilde = adv

    l1 = -a_tilde * ratio
    l2 = -a_tilde * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    c1 = torch.maximum(l1, l2)
    l3 = -a_tilde * dual_clip_c
    loss_mat = torch.where(neg, torch.minimum(l3, c1), c1)  # f > 0, so sign(A~) == sign(A)

    dual_clipped = neg & (c1 > l3) & m
    keep = m
    if mode == "fipo" and invalidate_dual_clipped:
        invalid_seq = dual_clipped.sum(-1) > 1
        if bool(invalid_seq.any()):
            keep = m & ~invalid_seq.unsqueeze(-1)
    else:
        invalid_seq = torch.zeros(shape[0], dtype=torch.bool, device=m.device)
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach().to(dtype)
    loss = aggregate(loss_mat, keep, agg, denominator=denominator, max_response_length=max_response_length)
    if ref_logp is not None and kl_coef:
        kl_ref = low_var_kl(logp_c, ref_logp.detach().to(dtype))
        loss = loss + kl_coef * aggregate(kl_ref, m, agg, denominator=denominator, max_response_length=max_response_length)

    metrics: dict[str, float] = {}
    if compute_metrics:
        with torch.no_grad():
            n_tok = m.sum().clamp(min=1).item()
            mf = m.to(dtype)
            has_tokens = m.any(-1)
            metrics = {
                "loss": loss.item(),
                "policy_kl": ((old - logp_c.detach()) * mf).sum().item() / n_tok,
                "clip_frac": ((l2.detach() > l1.detach()) & m).sum().item() / n_tok,
                "dual_clip_frac": dual_clipped.sum().item() / n_tok,
                "invalid_seq_frac": (invalid_seq & has_tokens).sum().item() / max(int(has_tokens.sum()), 1),
                "kept_tokens": float(keep.sum().item()),
                "kept_seqs": float(keep.any(-1).sum().item()),
            }
            if mode == "fipo":
                metrics.update(_stats("fkl_exp", raw[m]))
                metrics.update(_stats("influence", f[m]))
                fm = f[m]
                metrics["influence_frac_upper"] = (fm >= fkl_clip_high).float().mean().item() if fm.numel() else math.nan
                metrics["influence_frac_lower"] = (fm <= fkl_clip_low).float().mean().item() if fm.numel() else math.nan
                metrics.update(_influence_profile(f, raw, m, adv, ratio_d, safety_thresh))
            if ref_logp is not None and kl_coef:
                metrics["kl_ref"] = (kl_ref.detach() * mf).sum().item() / n_tok
            metrics.update(_ratio_quantiles("ratio_pos", ratio_d[m & (adv > 0)]))
            metrics.update(_ratio_quantiles("ratio_neg", ratio_d[m & (adv < 0)]))
    return loss, metrics
