"""Every Triton kernel compiles for an NVIDIA Hopper target (sm_90) in fp32, fp16 and bf16, no GPU needed.

The interpreter runs code a GPU build rejects; this catches it. The build runs in a subprocess
because TRITON_INTERPRET=1 (set for the other kernel tests) makes `triton.jit` return interpreted
functions, which cannot be compiled.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# the kernels the package must build, each in all three dtypes
EXPECTED = {"rms_norm_fwd", "rms_norm_bwd", "token_logprobs_lse_tile", "token_logprobs_dz_tile",
            "grpo_token_loss_fwd", "grpo_token_loss_bwd"} | {
    f"flash_attention_{k}_{d}" for k in ("fwd", "bwd_dkdv", "bwd_dq") for d in ("128x128", "192x128", "64x64")}


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    failures = [r for r in report["results"] if not r["ok"]]
    assert not failures, "kernels that do not build for sm_90:\n" + "\n".join(
        f"{r['kernel']} {r['dtype']}: {r['error']}" for r in failures)
    built = {(r["kernel"], r["dtype"]) for r in report["results"]}
    missing = {(k, d) for k in EXPECTED for d in ("fp32", "fp16", "bf16")} - built
    assert not missing, f"kernels not compiled: {sorted(missing)}"
    assert all(r["stage"] in ("cubin", "ptx") for r in report["results"])
    assert proc.returncode == 0, proc.stderr[-3000:]
