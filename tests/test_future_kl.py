"""future_kl against the float64 loop transcription of the spec, the paper's chunked algorithm, and
its numerical limits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fipo_lite
from fipo_lite.future_kl import future_kl_chunked
from spec_reference import future_kl_ref


def _batch(B, L, seed, big=0.05):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3
    spikes = torch.rand(B, L, generator=g) < big
    delta[spikes] = 2.5 + torch.rand(int(spikes.sum()), generator=g, dtype=torch.float64)  # ratio > c=10
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[-1] = L, 1  # full row and a length-1 response
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return delta, mask


@pytest.mark.parametrize("start,window,average,mask_dual_clip",
                         list(itertools.product(["include_current", "exclude_current"], [-1, 1, 5], [False, True], [True, False])))
def test_matches_spec_loops_for_every_knob(start, window, average, mask_dual_clip):
    delta, mask = _batch(5, 23, seed=hash((start, window, average)) % 1000)
    for tau in (1.0, 4.0, 32.0):
        got = fipo_lite.future_kl(delta, mask, tau=tau, start=start, window=window, average=average, mask_dual_clip=mask_dual_clip)
        ref = torch.tensor(future_kl_ref(delta.tolist(), mask.tolist(), tau=tau, start=start, window=window, average=average,
                                         mask_dual_clip=mask_dual_clip), dtype=torch.float64)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_all_masked_rows_give_zero_and_no_nan():
    delta, mask = _batch(3, 10, seed=1)
    mask[1] = False
    for average in (False, True):
        out = fipo_lite.future_kl(delta, mask, tau=8.0, average=average)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_chunked_baseline_agrees_in_fp32():
    delta, mask = _batch(4, 300, seed=2)
    delta32 = delta.float()
    fast = fipo_lite.future_kl(delta32, mask, tau=32.0)
    participants = mask & (delta32 <= math.log(10.0))  # Listing 1 takes the dual-clip filter inside M
    slow = future_kl_chunked(delta32, participants, tau=32.0, chunk_size=64)
    assert fast.dtype == torch.float32
    rel = ((fast.double() - slow.double()).norm() / slow.double().norm()).item()
    assert rel <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    delta, mask = _batch(3, 2000, seed=3, big=0.0)
    low = delta.to(dtype)
    out = fipo_lite.future_kl(low, mask, tau=256.0)
    assert out.dtype == torch.float32  # never accumulated in 16 bits
    ref = fipo_lite.future_kl(low.double(), mask, tau=256.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_long_sequences_small_tau_do_not_overflow():
    L = 131072
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(1, L, generator=g) * 0.1
    mask = torch.ones(1, L, dtype=torch.bool)
    for tau in (1.0, 32.0, 4096.0):
        out = fipo_lite.future_kl(delta, mask, tau=tau)
        assert torch.isfinite(out).all()
        # check against the exact float64 recurrence F_t = x_t + gamma * F_{t+1} at a strided subset
        gamma = 2.0 ** (-1.0 / tau)
        x = delta[0].double().tolist()
        F, ref = 0.0, [0.0] * L
        for t in range(L - 1, -1, -1):
            F = x[t] + gamma * F
            ref[t] = F
        idx = torch.arange(0, L, 997)
        torch.testing.assert_close(out[0, idx].double(), torch.tensor(ref, dtype=torch.float64)[idx], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(tau=0.0), "tau"), (dict(tau=float("nan")), "tau"), (dict(dual_clip_c=1.0), "dual_clip_c"),
    (dict(start="middle"), "start"), (dict(window=0), "window"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    delta, mask = _batch(2, 4, seed=5)
    with pytest.raises(ValueError, match=name):
        fipo_lite.future_kl(delta, mask, **kwargs)


def test_bad_tensors_name_themselves():
    delta, mask = _batch(2, 4, seed=6)
    with pytest.raises(ValueError, match="mask"):
        fipo_lite.future_kl(delta, mask[:, :3])
    with pytest.raises(ValueError, match="delta"):
        fipo_lite.future_kl(delta.long(), mask)
    bad = delta.clone()
    bad[0, 1] = math.inf
    with pytest.raises(ValueError, match="delta.*NaN or inf"):
        fipo_lite.future_kl(bad, mask)


def test_autocast_does_not_lower_precision():
    delta, mask = _batch(2, 500, seed=7, big=0.0)
    d32 = delta.float()
    plain = fipo_lite.future_kl(d32, mask, tau=32.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = fipo_lite.future_kl(d32, mask, tau=32.0)
    assert auto.dtype == torch.float32 and torch.equal(plain, auto)
