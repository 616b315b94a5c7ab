"""A direct, unoptimised float64 transcription of FIPO_SPEC.md sections 2-8 (loops, no tricks).

Only the tests use it: the library's fast paths must agree with it to rounding error.
"""

from __future__ import annotations

import math


def future_kl_ref(delta, mask, *, tau, c=10.0, start="include_current", window=-1, average=False, mask_dual_clip=True):
    """Section 3 on Python lists of floats: FutureKL[b][t] = sum_{k in K(t)} M*gamma^(k-t)*delta."""
    gamma = 2.0 ** (-1.0 / tau)
    out = []
    for d_row, m_row in zip(delta, mask):
        L = len(d_row)
        d_row = [max(-20.0, min(20.0, d)) for d in d_row]
        M = [bool(m) and (not mask_dual_clip or d <= math.log(c)) for d, m in zip(d_row, m_row)]
        row = []
        for t in range(L):
            first = t if start == "include_current" else t + 1
            last = L if window <= 0 else min(L, t + window)
            num = sum(gamma ** (k - t) * d_row[k] for k in range(first, last) if M[k])
            if average:
                w = sum(gamma ** (k - t) for k in range(first, last) if M[k])
                row.append(num / w if w > 0 else 0.0)
            else:
                row.append(num)
        out.append(row)
    return out


def policy_loss_ref(old_logp, logp, adv, mask, *, mode="fipo", clip_low=0.2, clip_high=None, c=10.0, tau=32.0,
                    fkl_clip_low=1.0, fkl_clip_high=1.2, safety_thresh=10.0, start="include_current", window=-1,
                    average=False, loss_agg_mode=None, ref_logp=None, kl_coef=0.0, max_response_length=None,
                    mask_dual_clip=True, invalidate=True):
    """Sections 2 and 4-8 as loops; returns (loss, per-token weight of d loss / d logp)."""
    if clip_high is None:
        clip_high = clip_low if mode == "grpo" else 0.28
    agg = loss_agg_mode or ("seq-mean-token-mean" if mode == "grpo" else "token-mean")
    B, L = len(logp), len(logp[0])
    delta = [[max(-20.0, min(20.0, logp[b][t] - old_logp[b][t])) for t in range(L)] for b in range(B)]
    if mode == "fipo":
        fkl = future_kl_ref(delta, mask, tau=tau, c=c, start=start, window=window, average=average,
                            mask_dual_clip=mask_dual_clip)
    tok_loss = [[0.0] * L for _ in range(B)]
    tok_grad = [[0.0] * L for _ in range(B)]  # d loss_t / d logp_t
    keep = [[bool(mask[b][t]) for t in range(L)] for b in range(B)]
    for b in range(B):
        n_dual = 0
        for t in range(L):
            ratio = math.exp(delta[b][t])
            a = adv[b][t]
            if mode == "fipo":
                f = min(max(math.exp(min(fkl[b][t], 80.0)), fkl_clip_low), fkl_clip_high)
                if a < 0 and ratio > safety_thresh:
                    f = min(max(f, 0.8), 1.0)
                a = a * f
            l1 = -a * ratio
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            l2 = -a * clipped
            c1 = max(l1, l2)
            g = -a * ratio if l1 >= l2 else 0.0  # d/dlogp: l1 = -a*exp(delta); l2 const where clipped
            if l1 < l2 and 1 - clip_low < ratio < 1 + clip_high:
                g = -a * ratio
            l3 = -a * c
            if a < 0 and l3 < c1:
                loss, g = l3, 0.0
            else:
                loss = c1
            if adv[b][t] < 0 and c1 > l3 and mask[b][t]:
                n_dual += 1
            if ref_logp is not None and kl_coef:
                lr = max(-20.0, min(20.0, ref_logp[b][t] - logp[b][t]))
                loss += kl_coef * (math.exp(lr) - lr - 1.0)
                g += kl_coef * (-math.exp(lr) + 1.0)
            tok_loss[b][t], tok_grad[b][t] = loss, g
        if mode == "fipo" and invalidate and n_dual > 1:
            keep[b] = [False] * L
    # section 7
    if agg == "token-mean":
        n = sum(sum(k) for k in keep)
        if n == 0:
            return 0.0, [[0.0] * L for _ in range(B)]
        w = [[(1.0 / n if keep[b][t] else 0.0) for t in range(L)] for b in range(B)]
    else:
        seqs = [b for b in range(B) if any(keep[b])]
        if not seqs:
            return 0.0, [[0.0] * L for _ in range(B)]
        w = [[0.0] * L for _ in range(B)]
        for b in seqs:
            n_b = sum(keep[b])
            per = {"seq-mean-token-mean": 1.0 / n_b, "seq-mean-token-sum": 1.0,
                   "seq-mean-token-sum-norm": 1.0 / float(max_response_length or L)}[agg]
            for t in range(L):
                w[b][t] = per / len(seqs) if keep[b][t] else 0.0
    loss = sum(w[b][t] * tok_loss[b][t] for b in range(B) for t in range(L))
    grad = [[w[b][t] * tok_grad[b][t] for t in range(L)] for b in range(B)]
    return loss, grad
