"""Every Triton kernel compiles for an NVIDIA Hopper target (sm_90) in fp32, fp16 and bf16, in every
autotune configuration it may run with on CUDA, no GPU needed.

The interpreter runs code a GPU build rejects; this catches it. The build runs in a subprocess
because TRITON_INTERPRET=1 (set for the other kernel tests) makes `triton.jit` return interpreted
functions, which cannot be compiled. About 130 builds: a few minutes of CPU on a fresh machine
(Triton's cache makes a second run quick), spread over the cores.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from kernels.compile_check import all_specs

ROOT = Path(__file__).resolve().parents[2]

ALL = ("fp32", "fp16", "bf16")
# the kernels the package must build, and in which dtypes (the log-sum-exp tile pass reads fp32
# logits whatever the model's dtype, so it has one build per configuration)
EXPECTED = {"rms_norm_fwd": ALL, "rms_norm_bwd": ALL, "token_logprobs_lse_tile": ("fp32",),
            "token_logprobs_dz_tile": ALL, "grpo_token_loss_fwd": ALL, "grpo_token_loss_bwd": ALL} | {
    f"flash_attention_{k}_{d}": ALL for k in ("fwd", "bwd_dkdv", "bwd_dq") for d in ("128x128", "192x128", "64x64")}


def test_all_kernels_compile_for_sm90_in_every_configuration():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    failures = [r for r in report["results"] if not r["ok"]]
    assert not failures, "kernels that do not build for sm_90:\n" + "\n".join(
        f"{r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in failures)
    built = Counter((r["kernel"], r["dtype"], r["config"]) for r in report["results"])
    # every configuration the kernel modules list, once each (the specs, built here without compiling)
    assert built == Counter((s.name, s.dtype, s.config) for s in all_specs())
    missing = {(k, d) for k, dts in EXPECTED.items() for d in dts} - {(k, d) for k, d, _ in built}
    assert not missing, f"kernels not compiled: {sorted(missing)}"
    per_kernel = Counter((k, d) for k, d, _ in built)
    assert all(n >= 2 for n in per_kernel.values()), f"kernels with a single configuration: {per_kernel}"
    assert all(r["stage"] in ("cubin", "ptx") for r in report["results"])
    assert proc.returncode == 0, proc.stderr[-3000:]
