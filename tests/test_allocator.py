"""trainer.keep_freed_memory (fipo_lite/allocator.py): glibc keeps a freed big block for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fipo_lite.allocator import keep_freed_memory
from fipo_lite.config import load_config
from fipo_lite.errors import UserError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# RSS (bytes) given back to the kernel when a touched 256 MiB tensor is freed, in a fresh process
_FREED = """
import sys, torch
from fipo_lite.allocator import keep_freed_memory
applied = keep_freed_memory(sys.argv[1], "cpu")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(64 << 20)
before = rss()
del x
print(applied, before - rss())
"""


def _given_back(setting: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FREED, setting], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="sets glibc's malloc thresholds (Linux with glibc only)")
def test_a_freed_big_tensor_stays_in_the_process_for_reuse():
    applied, given_back = _given_back("auto")
    assert applied == "True" and given_back < 32 << 20  # kept: the next big tensor reuses the pages
    applied, given_back = _given_back("false")
    assert applied == "False" and given_back > 200 << 20  # glibc's default: unmapped, page-faulted in anew next time


def test_keep_freed_memory_leaves_gpu_runs_alone_and_refuses_unknown_values():
    assert keep_freed_memory("auto", "cuda") is False
    assert keep_freed_memory("false", "cpu") is False
    with pytest.raises(ValueError, match="keep_freed_memory must be one of"):
        keep_freed_memory("yes", "cpu")
    with pytest.raises(UserError, match="trainer.keep_freed_memory"):
        load_config(None, ["trainer.keep_freed_memory=always"])


@pytest.mark.skipif(not GLIBC, reason="sets glibc's malloc thresholds (Linux with glibc only)")
def test_true_stops_the_run_when_glibc_refuses_the_thresholds(monkeypatch):
    import ctypes

    class Refusing:
        mallopt = staticmethod(lambda param, value: 0)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Refusing())
    with pytest.raises(ValueError, match="glibc refused"):
        keep_freed_memory("true", "cpu")
    assert keep_freed_memory("auto", "cpu") is False  # auto: left as glibc's default, the run goes on
