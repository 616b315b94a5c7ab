"""Float32 CPU matmuls x @ W^T against a weight packed once, through oneDNN.

torch sends a float32 x @ W^T on the CPU to MKL's sgemm, which repacks W on every call and, on AMD
processors, does not take its fastest code paths. oneDNN with W reordered once into its blocked
layout (the op pair torch's inductor uses when it freezes a CPU model) is faster on this kit's
shapes: on SmolLM2 on 2 AMD EPYC cores the HF engine samples 1.5x faster with it and the update takes
0.95 of the time (scripts/bench_packed.py, results/bench_loop.md). The lean paths (lean.py) and
the frozen LM head (policy.py) use it: the decode step packs its weights once per rollout, the update
packs each merged weight once per forward and backward (a reorder costs about one copy of W). The
sums are the same, in another order: results move by float32 rounding (~1e-6 relative), not more.

`trainer.packed_matmul`: "auto" uses it on CPU float32 weights of at least MIN_PACKED_ELEMENTS when
torch has the ops and they pass a check at first use, "true" insists (a torch without them stops the
run), "false" keeps F.linear.
Process-wide, set once by the trainer (the default, "auto", serves `evaluate` too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_MATMUL = ("auto", "true", "false")  # trainer.packed_matmul
# Smaller weights stay on F.linear: on the shipped tiny model (hidden 128, gate|up 768 x 128) oneDNN's
# per-call cost made sampling 0.76-0.82x and the update 1.2x slower (scripts/bench_packed.py --model
# fipo_lite/assets/tiny); SmolLM2's smallest weight is 576 x 576 (331,776 elements).
MIN_PACKED_ELEMENTS = 1 << 18
_state: dict = {"setting": "auto", "works": None}  # works: the first-use check's answer (None: not run yet)


def set_packed_matmul(setting: str) -> bool:
    """Apply trainer.packed_matmul for this process; True when packed matmuls will be used."""
    if setting not in PACKED_MATMUL:
        raise ValueError(f"trainer.packed_matmul must be one of {PACKED_MATMUL}, got {setting!r}")
    _state["setting"] = setting
    if setting == "true" and not enabled():
        raise ValueError("trainer.packed_matmul=true: this torch has no working oneDNN packed linear "
                         "(torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise); use auto or false")
    return enabled()


def enabled() -> bool:
    if _state["setting"] == "false":
        return False
    if _state["works"] is None:
        _state["works"] = _check()
    return _state["works"]


def _check() -> bool:
    """The ops exist and agree with F.linear on a small random case (own generator: the run's random
    stream is left alone)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    g = torch.Generator().manual_seed(0)
    w, x, h, b = (torch.randn(shape, generator=g) for shape in ((24, 40), (5, 40), (5, 24), (24,)))
    try:
        blocked = torch.ops.mkldnn._reorder_linear_weight(w, 5)
        plain = torch.ops.mkldnn._linear_pointwise(x, blocked, b, "none", [], "")
        added = torch.ops.mkldnn._linear_pointwise.binary(x, h, blocked, b, "add")
    except (RuntimeError, NotImplementedError):
        return False
    want = F.linear(x, w, b)
    return torch.allclose(plain, want, rtol=1e-4, atol=1e-5) and torch.allclose(added, want + h, rtol=1e-4, atol=1e-5)


class Packed:
    """W [out, in] (a plain tensor or a transposed view) ready for x @ W^T + bias (+ residual).

    Packed for oneDNN when enabled and W is a float32 CPU tensor (`rows`: the expected rows of x, a hint
    for the layout); otherwise the call is F.linear / addmm on W itself, the exact sums of before."""

    __slots__ = ("weight", "blocked")

    def __init__(self, weight: torch.Tensor, rows: int = 64):
        usable = (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
                  and weight.numel() >= MIN_PACKED_ELEMENTS and enabled())
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(int(rows), 1)) if usable else None
        self.weight = None if usable else weight  # a packed weight does not keep the source alive

    @property
    def active(self) -> bool:
        return self.blocked is not None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.blocked is not None and x.dtype == torch.float32:
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.blocked, bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.blocked, bias, "add")
        if self.weight is None:
            raise TypeError(f"a packed float32 weight got a {x.dtype} input")
        if residual is None:
            return F.linear(x, self.weight, bias)
        out = torch.addmm(residual, x, self.weight.t())
        return out if bias is None else out + bias
