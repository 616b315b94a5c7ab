"""policy_loss against the float64 loop transcription of spec sections 2-8: value and gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fipo_lite
from spec_reference import policy_loss_ref


def _batch(B=6, L=17, seed=0, dtype=torch.float64, spikes=0.08):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    delta = torch.randn(B, L, generator=g, dtype=torch.float64) * 0.25
    spike = torch.rand(B, L, generator=g) < spikes
    delta[spike] = 2.4 + torch.rand(int(spike.sum()), generator=g, dtype=torch.float64) * 1.5  # ratio 11..50 > c
    logp = old + delta
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, L).contiguous()
    adv[0] = -abs(adv[0])  # one negative-advantage row with spikes: exercises dual clip + invalidation
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0], lengths[1] = L, 1
    mask = torch.arange(L)[None, :] < lengths[:, None]
    delta[0, :3] = torch.tensor([2.6, 2.8, 0.1], dtype=torch.float64)  # two dual-clipped tokens: row 0 is dropped
    logp = old + delta
    return old.to(dtype), logp.to(dtype), adv.to(dtype), mask


def _check(kwargs, ref_kwargs, seed=0, dtype=torch.float64, rtol=1e-9, grad_rtol=None, **batch_kw):
    old, logp, adv, mask = _batch(seed=seed, dtype=dtype, **batch_kw)
    logp = logp.clone().requires_grad_(True)
    loss, metrics = fipo_lite.policy_loss(old, logp, adv, mask, **kwargs)
    loss.backward()
    ref_loss, ref_grad = policy_loss_ref(old.double().tolist(), logp.detach().double().tolist(), adv.double().tolist(),
                                         mask.tolist(), **ref_kwargs)
    assert math.isclose(loss.item(), ref_loss, rel_tol=rtol, abs_tol=rtol)
    grad_rtol = grad_rtol or rtol * 10
    torch.testing.assert_close(logp.grad.double(), torch.tensor(ref_grad, dtype=torch.float64), rtol=grad_rtol, atol=grad_rtol / 10)
    return loss, metrics


KNOBS = list(itertools.product(["include_current", "exclude_current"], [-1, 4], [False, True],
                               [(1.0, 1.2), (0.8, 1.2), (0.0, 10.0)], [10.0, 3.0]))


@pytest.mark.parametrize("start,window,average,clip,safety", KNOBS)
def test_fipo_matches_spec_for_every_knob(start, window, average, clip, safety):
    kw = dict(start=start, window=window, average=average, fkl_clip_low=clip[0], fkl_clip_high=clip[1], safety_thresh=safety)
    ref = dict(kw, tau=32.0)
    _check(dict(kw, mode="fipo", tau=32.0), ref, seed=len(str(kw)))


@pytest.mark.parametrize("tau", [1.0, 8.0, 256.0])
def test_fipo_tau_and_ablation_switches(tau):
    _check(dict(mode="fipo", tau=tau), dict(tau=tau), seed=3)
    _check(dict(mode="fipo", tau=tau, mask_dual_clip=False, invalidate_dual_clipped=False),
           dict(tau=tau, mask_dual_clip=False, invalidate=False), seed=4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("mode", ["fipo", "dapo", "grpo"])
def test_modes_and_aggregations(mode, agg):
    kw = dict(mode=mode, loss_agg_mode=agg, max_response_length=40)
    ref = dict(mode=mode, loss_agg_mode=agg, max_response_length=40)
    _check(kw, ref, seed=5)


def test_grpo_reference_kl():
    old, logp, adv, mask = _batch(seed=6)
    ref_logp = old + 0.05 * torch.randn_like(old)
    x = logp.clone().requires_grad_(True)
    loss, m = fipo_lite.policy_loss(old, x, adv, mask, mode="grpo", ref_logp=ref_logp, kl_coef=0.1)
    loss.backward()
    rl, rg = policy_loss_ref(old.tolist(), logp.tolist(), adv.tolist(), mask.tolist(), mode="grpo", ref_logp=ref_logp.tolist(), kl_coef=0.1)
    assert loss.item() == pytest.approx(rl, rel=1e-9)
    torch.testing.assert_close(x.grad, torch.tensor(rg, dtype=torch.float64), rtol=1e-8, atol=1e-10)
    assert m["kl_ref"] > 0


def test_kl_is_verls_low_var_kl():
    """Per token, verl's kl_penalty(..., "low_var_kl"), including its clamp of the estimate at 10."""
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    old, logp, adv, mask = _batch(seed=21)
    ref_logp = old + torch.randn_like(old)
    ref_logp[0, :4] = logp[0, :4] + torch.tensor([12.0, 25.0, -15.0, -30.0], dtype=logp.dtype)  # past both clamps
    ours = fipo_lite.objective.low_var_kl(logp, ref_logp)
    theirs = core.kl_penalty(logp, ref_logp, "low_var_kl")
    assert ours.max() == 10.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["grpo", "fipo"])
def test_kl_term_is_not_importance_weighted(mode):
    """As in verl's actor and TRL: is_weights/TIS scale the policy loss only, and the KL term is
    aggregated on its own over the response mask (with the same aggregation and denominator)."""
    old, logp, adv, mask = _batch(seed=22)
    ref_logp = old + 0.3 * torch.randn_like(old)
    w = torch.rand_like(logp) + 0.5
    kw = dict(mode=mode, loss_agg_mode="token-mean", denominator=50.0)
    pg_w, _ = fipo_lite.policy_loss(old, logp, adv, mask, is_weights=w, **kw)
    both_w, m = fipo_lite.policy_loss(old, logp, adv, mask, is_weights=w, ref_logp=ref_logp, kl_coef=0.1, **kw)
    both, _ = fipo_lite.policy_loss(old, logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, **kw)
    pg, _ = fipo_lite.policy_loss(old, logp, adv, mask, **kw)
    kl = fipo_lite.objective.low_var_kl(logp, ref_logp)
    kl_term = 0.1 * (kl * mask).sum() / 50.0
    assert both_w.item() == pytest.approx(pg_w.item() + kl_term.item(), rel=1e-12)
    assert (both_w - pg_w).item() == pytest.approx((both - pg).item(), rel=1e-12)
    assert m["kl_ref"] > 0


def test_dapo_ignores_influence_and_keeps_invalid_rows():
    old, logp, adv, mask = _batch(seed=7)
    _, fm = fipo_lite.policy_loss(old, logp, adv, mask, mode="fipo")
    _, dm = fipo_lite.policy_loss(old, logp, adv, mask, mode="dapo")
    assert fm["invalid_seq_frac"] > 0 and dm["invalid_seq_frac"] == 0
    assert fm["kept_tokens"] < dm["kept_tokens"] == mask.sum().item()
    assert "influence_mean" in fm and "influence_mean" not in dm


@pytest.mark.parametrize("dtype,grad_rtol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 2e-5)])
def test_low_precision_inputs(dtype, grad_rtol):
    """Half inputs are computed in float32: the loss equals float64 math on the same (rounded) inputs
    to float32 rounding; the gradient is returned in the input dtype, so it carries that dtype's rounding."""
    _check(dict(mode="fipo"), dict(), seed=8, dtype=dtype, rtol=2e-5, grad_rtol=grad_rtol)


def test_influence_weights_carry_no_gradient():
    """d loss / d logp equals the spec's gradient with f held constant (checked against the loops),
    and differs from what autograd through f would give."""
    old, logp, adv, mask = _batch(seed=9, spikes=0.0)
    x = logp.clone().requires_grad_(True)
    loss, _ = fipo_lite.policy_loss(old, x, adv, mask, fkl_clip_low=0.0, fkl_clip_high=10.0)
    (g,) = torch.autograd.grad(loss, x)
    _, ref_grad = policy_loss_ref(old.tolist(), logp.tolist(), adv.tolist(), mask.tolist(), fkl_clip_low=0.0, fkl_clip_high=10.0)
    torch.testing.assert_close(g, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-8, atol=1e-12)

    # the same loss with f left attached to the graph has a different gradient
    delta = x - old
    F = fipo_lite.future_kl(delta, mask, tau=32.0)  # not detached here
    a = adv * torch.exp(F).clamp(0, 10)
    ratio = torch.exp(delta)
    lm = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    attached = (lm * mask).sum() / mask.sum()
    (g2,) = torch.autograd.grad(attached, x)
    assert not torch.allclose(g, g2)


def test_shared_denominator_gives_big_batch_gradient():
    old, logp, adv, mask = _batch(B=8, seed=10)
    x = logp.clone().requires_grad_(True)
    big, _ = fipo_lite.policy_loss(old, x, adv, mask)
    (g_big,) = torch.autograd.grad(big, x)
    _, m = fipo_lite.policy_loss(old, logp, adv, mask)
    y = logp.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 3), slice(3, 5), slice(5, 8)):
        part, _ = fipo_lite.policy_loss(old[sl], y[sl], adv[sl], mask[sl], denominator=m["kept_tokens"], compute_metrics=False)
        part.backward()
        total += part.item()
    assert total == pytest.approx(big.item(), rel=1e-12)
    torch.testing.assert_close(y.grad, g_big, rtol=1e-12, atol=1e-15)
    # without the shared denominator the micro-batch losses do not add up to the big batch
    local = sum(fipo_lite.policy_loss(old[sl], logp[sl], adv[sl], mask[sl])[0].item() for sl in (slice(0, 3), slice(3, 5), slice(5, 8)))
    assert local != pytest.approx(big.item(), rel=1e-6)


def test_all_zero_mask_gives_exact_zero_and_zero_gradient():
    old, logp, adv, mask = _batch(seed=11)
    x = logp.clone().requires_grad_(True)
    for mode in ("fipo", "dapo", "grpo"):
        loss, metrics = fipo_lite.policy_loss(old, x, adv, torch.zeros_like(mask), mode=mode)
        assert loss.item() == 0.0 and not math.isnan(loss.item())
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all() and (g == 0).all()


def test_metrics_match_their_definitions():
    old, logp, adv, mask = _batch(seed=12)
    _, m = fipo_lite.policy_loss(old, logp, adv, mask)
    n = mask.sum().item()
    assert m["policy_kl"] == pytest.approx(((old - logp) * mask).sum().item() / n)
    ratio = torch.exp(logp - old)
    assert m["ratio_pos_max"] == pytest.approx(ratio[mask & (adv > 0)].max().item())
    assert m["ratio_neg_p50"] == pytest.approx(torch.quantile(ratio[mask & (adv < 0)].float(), 0.5).item(), rel=1e-5)
    assert m["invalid_seq_frac"] == pytest.approx(1 / mask.shape[0])
    assert 1.0 <= m["influence_min"] <= m["influence_mean"] <= m["influence_max"] <= 1.2
    assert 0 <= m["influence_frac_upper"] <= 1 and 0 <= m["influence_frac_lower"] <= 1
    assert m["dual_clip_frac"] > 0


def test_from_recipe_maps_upstream_knobs():
    kw = fipo_lite.from_recipe(decay_rate=32, future_kl_clip_ratio=0.2, future_kl_clip_high_only=True, safety_thresh=10.0,
                               clip_ratio_c=10.0, future_kl_start="include_current", future_kl_window=-1,
                               future_kl_average=False, chunk_size=2048)
    assert kw == dict(mode="fipo", tau=32.0, fkl_clip_low=1.0, fkl_clip_high=1.2, safety_thresh=10.0, dual_clip_c=10.0,
                      start="include_current", window=-1, average=False)
    assert fipo_lite.from_recipe(future_kl_clip_ratio=0.2, future_kl_clip_high_only=False)["fkl_clip_low"] == 0.8
    assert fipo_lite.influence_bounds(0.0, True) == (0.0, 10.0)
    with pytest.raises(ValueError, match="unknown recipe keys"):
        fipo_lite.from_recipe(decay=3)
    old, logp, adv, mask = _batch(seed=13)
    a, _ = fipo_lite.policy_loss(old, logp, adv, mask, **fipo_lite.from_recipe(decay_rate=32, future_kl_clip_ratio=0.2,
                                                                                future_kl_clip_high_only=False, safety_thresh=3))
    b, _ = fipo_lite.policy_loss(old, logp, adv, mask, tau=32, fkl_clip_low=0.8, fkl_clip_high=1.2, safety_thresh=3)
    assert a.item() == b.item()


def test_is_weights_scale_token_losses():
    old, logp, adv, mask = _batch(seed=14)
    w = torch.full_like(logp, 0.5)
    a, _ = fipo_lite.policy_loss(old, logp, adv, mask, mode="dapo", is_weights=w)
    b, _ = fipo_lite.policy_loss(old, logp, adv, mask, mode="dapo")
    assert a.item() == pytest.approx(0.5 * b.item())


@pytest.mark.parametrize("kwargs,name", [
    (dict(mode="ppo"), "mode"), (dict(start="later"), "start"), (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(dual_clip_c=1.0), "dual_clip_c"), (dict(dual_clip_c=0.5), "dual_clip_c"),
])
def test_bad_options_name_the_argument(kwargs, name):
    old, logp, adv, mask = _batch(seed=15)
    with pytest.raises(ValueError, match=name):
        fipo_lite.policy_loss(old, logp, adv, mask, **kwargs)


def test_bad_tensors_name_the_argument():
    old, logp, adv, mask = _batch(seed=16)
    with pytest.raises(ValueError, match="old_logp has shape"):
        fipo_lite.policy_loss(old[:, :-1], logp, adv, mask)
    with pytest.raises(ValueError, match="mask has shape"):
        fipo_lite.policy_loss(old, logp, adv, mask[:2])
    with pytest.raises(ValueError, match="logp must be a floating-point"):
        fipo_lite.policy_loss(old, logp.long(), adv, mask)
    for name, pos in (("old_logp", 0), ("logp", 1), ("advantages", 2)):
        args = [old.clone(), logp.clone(), adv.clone(), mask]
        args[pos][1, 2] = float("nan")
        with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
            fipo_lite.policy_loss(*args)
