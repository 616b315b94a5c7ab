"""trainer.packed_matmul (fipo_lite/packed.py): x @ W^T against a oneDNN-packed weight gives F.linear's
sums up to float rounding, "false" is F.linear exactly, and the setting is checked by key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fipo_lite import packed
from fipo_lite.config import load_config
from fipo_lite.errors import UserError
from fipo_lite.packed import Packed, set_packed_matmul


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.setattr(packed, "MIN_PACKED_ELEMENTS", 0)  # the small cases below are packed (see the size test)
    before = dict(packed._state)
    yield
    packed._state.update(before)


def test_small_weights_stay_on_f_linear(monkeypatch):
    """Below MIN_PACKED_ELEMENTS (the tiny model's weights) oneDNN's per-call cost outweighs packing."""
    if not set_packed_matmul("auto"):
        pytest.skip("this torch has no oneDNN packed linear")
    monkeypatch.setattr(packed, "MIN_PACKED_ELEMENTS", 1 << 18)
    assert not Packed(torch.ones(768, 128)).active  # the tiny model's gate|up
    assert Packed(torch.ones(576, 576)).active


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(37, 96, generator=g), torch.randn(96, 53, generator=g), torch.randn(53, generator=g),
            torch.randn(37, 53, generator=g))


def test_packed_matmul_is_f_linear_up_to_rounding():
    if not set_packed_matmul("auto"):
        pytest.skip("this torch has no oneDNN packed linear")
    x, w_t, b, h = _case()
    w = w_t.t()  # a transposed view, as the update's dx matmul packs it
    for weight in (w, w.contiguous()):
        p = Packed(weight, rows=37)
        assert p.active and p.weight is None  # packed, the source not kept
        torch.testing.assert_close(p(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p(x, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p(x, b, residual=h), h + F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p(x[:3]), F.linear(x[:3], weight), rtol=1e-5, atol=1e-5)  # fewer rows than the hint
    assert not torch.equal(Packed(w, 37)(x), w.new_zeros(37, 53))


def test_false_keeps_f_linear_exactly_and_other_dtypes_are_not_packed():
    set_packed_matmul("false")
    x, w_t, b, h = _case(1)
    p = Packed(w_t.t())
    assert not p.active
    assert torch.equal(p(x, b), F.linear(x, w_t.t(), b))
    assert torch.equal(p(x, b, residual=h), torch.addmm(h, x, w_t) + b)
    set_packed_matmul("auto")
    assert not Packed(w_t.t().to(torch.float64)).active  # float32 only: other dtypes take F.linear
    assert torch.equal(Packed(w_t.t().double())(x.double()), F.linear(x.double(), w_t.t().double()))


def test_settings(monkeypatch):
    with pytest.raises(ValueError, match="trainer.packed_matmul must be one of"):
        set_packed_matmul("fast")
    with pytest.raises(UserError, match="trainer.packed_matmul"):
        load_config(None, ["trainer.packed_matmul=fast"])
    assert load_config(None, []).trainer.packed_matmul == "auto"
    monkeypatch.setattr(packed, "_check", lambda: False)  # a torch without the ops
    packed._state["works"] = None
    assert set_packed_matmul("auto") is False and not Packed(torch.ones(3, 2)).active
    with pytest.raises(ValueError, match="packed_matmul=true"):
        set_packed_matmul("true")


def test_first_use_check_leaves_the_random_stream_alone():
    packed._state.update(setting="auto", works=None)
    torch.manual_seed(3)
    packed.enabled()  # runs the check
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))


def test_bench_script_times_both_settings(tiny_model_dir, tmp_path):
    """scripts/bench_packed.py runs end to end (tiny model, one counted round) and reports both settings."""
    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "bench_packed.py"), "--model", str(tiny_model_dir), "--task", "addition3",
                    "--rounds", "2", "--out", str(out)], check=True, cwd=root, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    for key in ("sampling_tokens_per_s", "update_s"):
        assert set(result[key]) == {"auto", "false"} and all(v > 0 for v in result[key].values())
