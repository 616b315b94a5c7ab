"""Keep freed memory in the process on a CPU run, so that big tensors are not page-faulted in anew.

glibc serves a block above its mmap threshold (which it raises to at most 32 MiB) with a fresh mmap,
hands it back to the kernel on free, and trims the heap's free top above its trim threshold. The
update allocates and frees the same activations of tens of MiB in every layer ([tokens, 2 x
intermediate] is 39 MiB on SmolLM2 at 3,200 tokens), so each one costs a page fault per 4 KiB page
and the kernel's zeroing of it, more than the elementwise op that fills it. Raising both thresholds
to 1 GiB keeps those pages for reuse: PyTorch's CPU tuning guide gets the same from jemalloc or
tcmalloc. The price is that the process keeps its peak resident memory between steps.

`trainer.keep_freed_memory`: "auto" on CPU with glibc, "true" insists, "false" leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import platform

KEEP_FREED_MEMORY = ("auto", "true", "false")  # trainer.keep_freed_memory
THRESHOLD = 1 << 30  # bytes: blocks below this come from the heap, and a free top below it stays
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(setting: str, device: str) -> bool:
    """Apply trainer.keep_freed_memory for a run on `device`; True when glibc's thresholds were raised."""
    if setting not in KEEP_FREED_MEMORY:
        raise ValueError(f"trainer.keep_freed_memory must be one of {KEEP_FREED_MEMORY}, got {setting!r}")
    if setting == "false" or (setting == "auto" and not str(device).startswith("cpu")):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        if setting == "true":
            raise ValueError("trainer.keep_freed_memory=true needs Linux with glibc (it sets glibc's malloc thresholds); "
                             f"this is {platform.system()} {platform.libc_ver()[0] or 'without glibc'}: use auto or false")
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    applied = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
    if setting == "true" and not applied:  # "true" is a promise: a glibc that refuses the thresholds stops the run
        raise ValueError(f"trainer.keep_freed_memory=true: glibc refused mallopt thresholds of {THRESHOLD} bytes; use auto or false")
    return applied
