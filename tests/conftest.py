"""Shared fixtures: tiny Qwen2 models built locally (no hub), in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2 + char tokenizer with a chat template (save_pretrained format)."""
    from fipo_lite.tiny import save_random_tiny

    return save_random_tiny(tmp_path_factory.mktemp("tiny_random"), seed=0, hidden_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, intermediate_size=128)


# The small tiny model of `tiny_warm_model_dir`, as config overrides (the notebook test builds it through
# model.path=tiny and finds it in the fixture's cache).
TINY_SMALL = {"model.tiny.hidden_size": 64, "model.tiny.num_layers": 2, "model.tiny.intermediate_size": 128,
              "model.tiny.task": "addition", "model.tiny.warm_start_steps": 150, "model.tiny.warm_start_batch_size": 32,
              "model.tiny.direct_fraction": 0.5, "model.tiny.prior_steps": 0}


@pytest.fixture(scope="session")
def tiny_small_settings() -> dict:
    """TINY_SMALL for test modules (a plain `from conftest import` is ambiguous: tests/stack has one too)."""
    return dict(TINY_SMALL)


@pytest.fixture(scope="session")
def tiny_warm_model_dir(tmp_path_factory) -> Path:
    """A briefly warm-started tiny model that already writes the task's answer format (~20 s)."""
    from fipo_lite.config import load_config
    from fipo_lite.tiny import build_tiny

    cache = tmp_path_factory.mktemp("tiny_cache")
    cfg = load_config(None, [f"model.cache_dir={cache}", *(f"{k}={v}" for k, v in TINY_SMALL.items())])
    return build_tiny(cfg.model, log=lambda msg: None)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(params=["auto", "false"], ids=["packed", "unpacked"])
def packed_matmul(request, monkeypatch):
    """A test run twice: trainer.packed_matmul=auto (oneDNN-packed weights where torch has them, small
    test weights included) and false (F.linear), the process-wide setting restored after."""
    from fipo_lite import packed

    monkeypatch.setattr(packed, "MIN_PACKED_ELEMENTS", 0)
    before = packed._state["setting"]
    packed.set_packed_matmul(request.param)
    yield request.param
    packed.set_packed_matmul(before)
