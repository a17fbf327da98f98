"""runtime.host_memory: a large tensor comes from malloc's heap (not a fresh mmap) once
keep_freed_host_memory() has run, and stays an mmap when the user opted out or tuned glibc himself.
Each case runs in its own interpreter (mallopt is process-wide)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import ctypes, json, sys
import torch
from runtime.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_host_memory()
x = torch.ones(2 ** 26)            # 256 MiB, touched
mmapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks while x lives
del x
print(json.dumps({"applied": applied, "mmapped": mmapped}))
"""


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "R1_HOST_MALLOC")}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")


def test_after_keep_a_large_tensor_comes_from_the_heap():
    out = _probe()
    assert out["applied"] is True
    assert out["mmapped"] < 2 ** 28, out


def test_opting_out_or_tuning_glibc_leaves_the_defaults():
    for env in ({"R1_HOST_MALLOC": "system"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        out = _probe(**env)
        assert out["applied"] is False, env
        assert out["mmapped"] >= 2 ** 28, (env, out)   # glibc's default: the 256 MiB block is an mmap


def test_a_bad_choice_is_refused_by_name():
    clean = {k: v for k, v in os.environ.items() if k != "R1_HOST_MALLOC"}
    proc = subprocess.run([sys.executable, "-c", "from runtime.host_memory import keep_freed_host_memory as k; k()"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT), "R1_HOST_MALLOC": "jemalloc"}, timeout=60)
    assert proc.returncode != 0 and "R1_HOST_MALLOC='jemalloc'" in proc.stderr
