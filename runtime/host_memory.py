"""Host (CPU) memory: keep freed memory in the process instead of handing it back to the kernel.

A training step on the CPU allocates the same few GiB of activations every step. glibc's malloc
serves each block larger than its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
mmap and unmaps it when freed, and trims the heap's free top back to the kernel, so every step
faults in and zeroes all of its activation pages again. Measured on a 2-core machine (a 100M
Qwen2, 5184 packed tokens): the forward with autograd took 10.8-15.3 s with glibc's defaults and
6.8-8.4 s with mmap off and trimming raised, against 6.7-7.0 s for the same forward without
autograd (whose tensors are freed as it goes), at the same peak (5.42 vs 5.39 GB). In a whole GRPO
run (train.py, 8 steps) the heap also holds what fragments it between phases: the resident
high-water mark settled at 7.6 GiB against 7.3 GiB with the defaults, reached in 3 steps instead of
6, while the forward settled at 7.2-7.5 s against 9.3-13.2 s. What changes is what the process
holds between steps: the heap stays at its high-water mark, which the next step reuses.

keep_freed_host_memory() sets that for the rest of the process (mallopt: M_MMAP_MAX 0, so blocks
come from the heap; M_TRIM_THRESHOLD 1 GiB). A block that a thread's own arena cannot hold still
falls back to mmap, so nothing is refused. It does nothing where the C library is not glibc, when
the user has tuned glibc's malloc through its MALLOC_*_ environment variables (bench/planner_check.py
does, to measure live memory), or when R1_HOST_MALLOC=system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_host_memory() -> bool:
    """Tune glibc's malloc as the module docstring says, once per process; True when it applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    choice = os.environ.get("R1_HOST_MALLOC", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"R1_HOST_MALLOC={choice!r}: expected 'keep' (the default) or 'system'")
    if choice == "system" or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
