"""Future-KL (FIPO paper Eq. 6) in exact O(B*L).

    FutureKL[b, t] = sum_{k in K(t)} M[b, k] * gamma**(k - t) * delta[b, k],   gamma = 2**(-1/tau)

The released code builds this with an O(B*L^2) chunked matmul (paper Appendix G). The sum is a
linear recurrence, F_t = x_t + gamma * F_{t+1}, so we compute it as a reverse scan:

1. inside blocks of K tokens, a rescaled reverse cumsum: sum_k gamma**(k-b) x_k, then times
   gamma**-(t-b). K is chosen so that gamma**-(K-1) <= 2**64: nothing overflows, for any tau;
2. across blocks, the carries obey the same recurrence with decay gamma**K; a log-step doubling
   scan over the (few) blocks adds them. Only powers gamma**n with n >= 0 appear there.

A window W and the "exclude_current" start are differences of shifted scans:
sum_{k=t+a}^{t+b-1} = gamma**a F_{t+a} - gamma**b F_{t+b}. Everything runs in float64, so bf16 and
fp16 inputs accumulate far wider than the spec's float32 floor.
"""

from __future__ import annotations

import math

import torch

STARTS = ("include_current", "exclude_current")
_MAX_EXPONENT = 64  # largest power of 2 a block rescale may reach (float64 has room for 1023)


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


def _reverse_scan(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = x_t + gamma * F_{t+1} along the last dim (float64 in, float64 out)."""
    B, L = x.shape
    if L == 0 or gamma == 0.0:
        return x.clone()
    log2_inv_gamma = -math.log2(gamma)
    K = max(1, min(L, int(_MAX_EXPONENT / log2_inv_gamma) + 1))
    nb = -(-L // K)
    pad = nb * K - L
    xb = torch.nn.functional.pad(x, (0, pad)).view(B, nb, K)
    j = torch.arange(K, dtype=x.dtype, device=x.device)
    down = torch.exp2(-j * log2_inv_gamma)  # gamma**j, in (2**-64, 1]
    up = torch.exp2(j * log2_inv_gamma)  # gamma**-j, in [1, 2**64)
    local = (xb * down).flip(-1).cumsum(-1).flip(-1) * up  # within-block F
    if nb > 1:
        # carry[i] = F at the first token of block i+1; carries obey c_i = s_{i+1} + g c_{i+1}.
        g = gamma**K
        carry = torch.zeros(B, nb, dtype=x.dtype, device=x.device)
        carry[:, :-1] = local[:, 1:, 0]
        step = 1
        while step < nb - 1:  # doubling scan: carry_i += g**step * carry_{i+step}
            gs = g**step
            if gs == 0.0:
                break
            carry[:, :-step] = carry[:, :-step] + gs * carry[:, step:]
            step *= 2
        tail = torch.exp2(-(K - j) * log2_inv_gamma)  # gamma**(K - j): distance to the next block
        local = local + carry.unsqueeze(-1) * tail
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
    tau: float = 32.0,
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
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if not (isinstance(window, int) and (window == -1 or window > 0)):
        raise ValueError(f"window must be -1 (no window) or a positive int, got {window!r}")

    out_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    d = delta.detach().to(torch.float64).clamp(-20.0, 20.0)
    M = mask.detach().to(torch.bool)
    if mask_dual_clip:
        M = M & (d <= math.log(dual_clip_c))
    Mf = M.to(torch.float64)
    gamma = 2.0 ** (-1.0 / tau)
    first = 0 if start == "include_current" else 1

    F = _window_sum(_reverse_scan(d * Mf, gamma), gamma, first, window)
    if average:
        Z = _window_sum(_reverse_scan(Mf, gamma), gamma, first, window)
        # Count participants exactly (integers) so an empty K(t) gives 0, not rounding noise / noise.
        n = _window_sum(Mf.flip(-1).cumsum(-1).flip(-1), 1.0, first, window)
        F = torch.where(n > 0.5, F / torch.where(n > 0.5, Z, torch.ones_like(Z)), torch.zeros_like(F))
    return F.to(out_dtype)


def future_kl_chunked(delta: torch.Tensor, mask: torch.Tensor, *, tau: float = 32.0, chunk_size: int = 1024) -> torch.Tensor:
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
