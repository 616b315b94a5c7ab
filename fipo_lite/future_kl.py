"""Future-KL (FIPO paper Eq. 6) in exact O(B*L).

    FutureKL[b, t] = sum_{k in K(t)} M[b, k] * gamma**(k - t) * delta[b, k],   gamma = 2**(-1/tau)

The released code builds this with an O(B*L^2) chunked matmul (paper Appendix G). The sum is a
linear recurrence, F_t = x_t + gamma * F_{t+1}, so we compute it as a reverse scan:

1. inside blocks of K = 64 tokens, one small matmul with the decay matrix gamma**(k-t), k >= t;
2. across blocks, the carries obey the same recurrence with decay gamma**K over L/K values:
   the same two steps again, recursively (three levels cover L = 262144).
Only powers gamma**n with n >= 0 ever appear, so nothing overflows for any L and tau.

A window W and the "exclude_current" start are differences of shifted scans:
sum_{k=t+a}^{t+b-1} = gamma**a F_{t+a} - gamma**b F_{t+b} (computed in float64, as that difference
can cancel). Otherwise float64 inputs are computed in float64 and everything else (bf16, fp16,
fp32) accumulates in float32, the spec's floor.
"""

from __future__ import annotations

import functools
import math

import torch

STARTS = ("include_current", "exclude_current")
TAU = 32.0  # the paper's decay half-life in tokens (gamma = 2**(-1/tau)); the default everywhere


def check_tensor(name: str, x: torch.Tensor, shape: torch.Size | None = None, floating: bool = True) -> None:
    """Raise ValueError naming `name` for a wrong type, shape, dtype, or non-finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, L], got {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if floating:
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x.detach().sum(dtype=torch.float64))):  # NaN/inf survive a float64 sum
            raise ValueError(f"{name} contains NaN or inf")


_BLOCK = 32  # tokens per block: one small matmul per block, then a scan over the block carries


@functools.lru_cache(maxsize=64)
def _decay_tables(K: int, gamma: float, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T with W[t, k] = gamma**(k - t) for k >= t (else 0), and tail[j] = gamma**(K - j).
    Only non-negative powers: nothing overflows. Cached: a training run reuses a handful."""
    i = torch.arange(K, device=device, dtype=torch.float64)
    dist = i[None, :] - i[:, None]
    W = torch.where(dist >= 0, torch.exp2(dist.clamp(min=0) * math.log2(gamma)), 0.0)
    tail = torch.exp2((K - i) * math.log2(gamma))
    return W.T.contiguous().to(dtype), tail.to(dtype)


def _reverse_scan(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = x_t + gamma * F_{t+1} along the last dim, exactly, in x's dtype.

    Inside blocks of K tokens: one [B*nb, K] x [K, K] matmul with the decay matrix. Across blocks:
    carry_i (F at the first token of block i+1) obeys carry_i = F_first(i+1) + gamma**K carry_{i+1},
    the same recurrence on nb = L/K values, solved by recursion (depth log_K L). Only powers
    gamma**n with n >= 0 appear.
    """
    B, L = x.shape
    if L == 0 or gamma == 0.0:
        return x.clone()
    K = min(_BLOCK, L)
    nb = -(-L // K)
    xb = (x if nb * K == L else torch.nn.functional.pad(x, (0, nb * K - L))).reshape(B, nb, K)
    w_t, tail = _decay_tables(K, gamma, x.dtype, x.device)
    if torch.is_autocast_enabled(x.device.type):  # never let autocast drop this matmul to 16 bits
        with torch.autocast(device_type=x.device.type, enabled=False):
            local = xb @ w_t
    else:
        local = xb @ w_t  # within-block F
    if nb > 1:
        # the carries are the same recurrence one level up, with decay gamma**K: recurse
        carry = _reverse_scan(torch.nn.functional.pad(local[:, 1:, 0], (0, 1)), gamma**K)
        local = torch.addcmul(local, carry.unsqueeze(-1), tail)  # tail: gamma**(K - j), distance to the next block
    return local.reshape(B, nb * K)[:, :L]


def _shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """y_t = x_{t+n}, zero past the end."""
    if n <= 0:
        return x
    if n >= x.shape[-1]:
        return torch.zeros_like(x)
    return torch.nn.functional.pad(x[:, n:], (0, n))


def _window_sum(F: torch.Tensor, gamma: float, first: int, window: int) -> torch.Tensor:
    """sum over k in [t+first, t+window) of gamma**(k-t) x_k, from the full scan F."""
    out = gamma**first * _shift_left(F, first) if first else F
    if window > 0:
        out = out - gamma**window * _shift_left(F, window)
    return out


def future_kl(
    delta: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float = TAU,
    dual_clip_c: float = 10.0,
    start: str = "include_current",
    window: int = -1,
    average: bool = False,
    mask_dual_clip: bool = True,
) -> torch.Tensor:
    """Discounted signed probability shift of each token's future (spec sections 2-3).

    delta = logp - old_logp, shape [B, L]; mask is 1 on response tokens. Detached: no gradient.
    Tokens with delta > log(dual_clip_c) take no part in the sums (paper Eq. 5), unless
    `mask_dual_clip=False` (an ablation). Returns float32 for half/float32 inputs, else float64.
    """
    check_tensor("delta", delta)
    check_tensor("mask", mask, shape=delta.shape, floating=False)
    check_options(tau=tau, dual_clip_c=dual_clip_c, start=start, window=window)
    return _future_kl(delta, mask, tau=tau, dual_clip_c=dual_clip_c, start=start, window=window, average=average,
                      mask_dual_clip=mask_dual_clip)


def check_options(*, tau, dual_clip_c, start, window) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if not (isinstance(window, int) and (window == -1 or window > 0)):
        raise ValueError(f"window must be -1 (no window) or a positive int, got {window!r}")


def _future_kl(delta, mask, *, tau, dual_clip_c, start, window, average, mask_dual_clip, clamped=False) -> torch.Tensor:
    """future_kl without input validation (for callers that validated already; `clamped`: delta is
    already within [-20, 20])."""

    out_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32  # half inputs accumulate in float32
    # a window subtracts two long sums (gamma**a F_{t+a} - gamma**b F_{t+b}): do that in float64
    dtype = torch.float64 if window > 0 else out_dtype
    d = delta.detach().to(dtype)
    if not clamped:
        d = d.clamp(-20.0, 20.0)
    M = mask.detach().to(torch.bool)
    if mask_dual_clip:
        M = M & (d <= math.log(dual_clip_c))
    gamma = 2.0 ** (-1.0 / tau)
    first = 0 if start == "include_current" else 1

    F = _window_sum(_reverse_scan(torch.where(M, d, 0.0), gamma), gamma, first, window)
    if average:
        Mf = M.to(dtype)
        Z = _window_sum(_reverse_scan(Mf, gamma), gamma, first, window)
        # Count participants exactly (integers) so an empty K(t) gives 0, not rounding noise / noise.
        n = _window_sum(_reverse_scan(Mf, 1.0), 1.0, first, window)  # integer counts: exact in float32 up to 2**24
        F = torch.where(n > 0.5, F / torch.where(n > 0.5, Z, torch.ones_like(Z)), torch.zeros_like(F))
    return F.to(out_dtype)


def future_kl_chunked(delta: torch.Tensor, mask: torch.Tensor, *, tau: float = TAU, chunk_size: int = 1024) -> torch.Tensor:
    """The paper's O(B*L^2) chunked algorithm (Appendix G, Listing 1): the speed baseline.

    `mask` must already include the dual-clip filter. Default start/window/average only.
    """
    gamma = 2 ** (-1 / tau)
    D = delta * mask
    F = torch.zeros_like(D)
    L = D.shape[1]
    i = torch.arange(L, device=D.device).unsqueeze(1)
    for j_start in range(0, L, chunk_size):
        j_end = min(j_start + chunk_size, L)
        j = torch.arange(j_start, j_end, device=D.device).unsqueeze(0)
        dist = j - i
        W = (gamma ** torch.clamp(dist, min=0)) * (dist >= 0).to(D.dtype)
        F += torch.matmul(D[:, j_start:j_end], W.T)
    return F
