"""Microbenchmarks of the kernels: torch twin vs Triton vs (on GPU, when installed) flash-attn / Liger.

    python -m kernels.bench [rms_norm|token_logprobs|grpo_token_loss|flash_attention] [--reps N]

Each row times forward + backward (median of --reps runs after one warm-up), converts it with the
FLOP or byte count written below to TFLOP/s or GB/s, and reports the peak memory above what was
allocated before the call: torch.cuda.max_memory_allocated on GPU; on CPU the process's resident
set sampled every millisecond by a thread (a short spike between samples can be missed). On CPU
only the torch paths run (Triton needs a GPU outside its interpreter). A table, then one JSON line.

Work counted per forward + backward:
    rms_norm         bytes = 5 * N * D * elt                 (fwd: read x, write y; bwd: read dy and x, write dx)
    token_logprobs   flop  = 6 * N * V * D                   (fwd logits 2NVD; bwd dhidden 2NVD, dweight 2NVD;
                                                              the recomputed logits are not counted)
    grpo_token_loss  bytes = 20 * n * 4                      (fwd: 6 reads, 5 writes; bwd: 7 reads, 2 writes)
    flash_attention  flop  = pairs * (2 (Dqk + Dv)           (fwd: q k^T, p v)
                                      + 2 (3 Dqk + 2 Dv))    (bwd: q k^T again, dv, dp, dk, dq)
                     pairs = sum over sequences and heads of the visible (query, key) pairs
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

from kernels import attention, grpo_loss, logprobs, norm


# ---------------------------------------------------------------- measurement

class _RssPeak:
    """Peak resident set size above the start, sampled every millisecond by a thread (CPU runs)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.above = self.peak - self.base


def measure(step, device, reps):
    """Median seconds of step() and its peak memory above the start (bytes)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up: compilation, allocator
    sync()
    times, peak = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        if device.type == "cuda":
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        else:
            with _RssPeak() as mem:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.above)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def fwd_bwd(fn, inputs, grad_of):
    """A step that zeroes the inputs' grads, runs fn and back-propagates a fixed random cotangent."""
    def step():
        for t in inputs:
            t.grad = None
        out = grad_of(fn())
        out[0].backward(out[1])
    return step


# ---------------------------------------------------------------- the four kernels

def _optional(name):
    """Import an optional comparator (flash-attn, Liger) on GPU, or None."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def bench_rms_norm(device, dtype, sizes):
    for N, D in sizes:
        x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(N, D, device=device, dtype=dtype)
        impls = {"torch": lambda: norm.rms_norm_torch(x, w, 1e-6)}
        if device.type == "cuda":
            impls["triton"] = lambda: norm.rms_norm_triton(x, w, 1e-6)
            liger = _optional("liger_kernel.ops.rms_norm")
            if liger is not None:
                impls["liger"] = lambda: liger.LigerRMSNormFunction.apply(x, w, 1e-6)
        work = 5 * N * D * x.element_size()
        for name, fn in impls.items():
            yield dict(kernel="rms_norm", impl=name, size=f"N={N} D={D}", unit="GB/s", work=work,
                       step=fwd_bwd(fn, (x, w), lambda y: (y, dy)))


def bench_token_logprobs(device, dtype, sizes):
    for N, D, V in sizes:
        h = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, D, device=device, dtype=dtype) * D ** -0.5).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=device)
        g = torch.randn(N, device=device)

        def naive():
            return torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
        impls = {"naive": naive, "torch": lambda: logprobs.token_logprobs_torch(h, w, t)}
        if device.type == "cuda":
            impls["triton"] = lambda: logprobs.token_logprobs_triton(h, w, t)
            liger = _optional("liger_kernel.transformers.functional")
            if liger is not None:  # per-token cross entropy = -logp
                impls["liger"] = lambda: -liger.liger_fused_linear_cross_entropy(h, w, t, reduction="none")
        for name, fn in impls.items():
            yield dict(kernel="token_logprobs", impl=name, size=f"N={N} D={D} V={V}", unit="TFLOP/s",
                       work=6 * N * V * D, step=fwd_bwd(fn, (h, w), lambda y: (y, g)))


def bench_grpo_token_loss(device, dtype, sizes):
    for n in sizes:
        lr = (torch.randn(n, device=device) * 0.3).to(dtype).requires_grad_(True)
        lp = (-torch.rand(n, device=device) * 3).to(dtype).requires_grad_(True)
        ref = (lp.detach() + 0.1 * torch.randn(n, device=device).to(dtype))
        adv, mask, w = torch.randn(n, device=device), torch.rand(n, device=device) > 0.1, torch.rand(n, device=device)
        kw = dict(dual_clip=3.0, beta=0.04, logp=lp, ref_logp=ref, is_weight=w)
        g = torch.randn(n, device=device)
        impls = {"torch": lambda: grpo_loss.grpo_token_loss_torch(lr, adv, mask, **kw).loss}
        if device.type == "cuda":
            impls["triton"] = lambda: grpo_loss.grpo_token_loss_triton(lr, adv, mask, **kw).loss
        for name, fn in impls.items():
            yield dict(kernel="grpo_token_loss", impl=name, size=f"n={n}", unit="GB/s", work=20 * n * 4,
                       step=fwd_bwd(fn, (lr, lp), lambda y: (y, g)))


def _visible_pairs(T, S, causal):
    if not causal:
        return T * S
    return sum(max(0, min(S, i + S - T + 1)) for i in range(T))


def bench_flash_attention(device, dtype, sizes):
    for B, T, H, Hkv, dqk, dv in sizes:
        q = torch.randn(B, T, H, dqk, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, Hkv, dqk, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, Hkv, dv, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, T, H, dv, device=device, dtype=dtype)
        impls = {"torch": lambda: attention.flash_attention_torch(q, k, v)}
        if device.type == "cuda":
            impls["triton"] = lambda: attention.flash_attention_triton(q, k, v)
            fa = _optional("flash_attn")
            if fa is not None and dtype != torch.float32:
                impls["flash-attn"] = lambda: fa.flash_attn_func(q, k, v, causal=True)
        pairs = B * H * _visible_pairs(T, T, True)
        work = pairs * (2 * (dqk + dv) + 2 * (3 * dqk + 2 * dv))
        for name, fn in impls.items():
            yield dict(kernel="flash_attention", impl=name, size=f"B={B} T={T} H={H}/{Hkv} D={dqk}/{dv}",
                       unit="TFLOP/s", work=work, step=fwd_bwd(fn, (q, k, v), lambda y: (y, do)))


SWEEPS = {
    # name: (bench, CPU sizes, GPU sizes)
    "rms_norm": (bench_rms_norm, [(4096, 1024), (8192, 4096)], [(4096, 4096), (16384, 4096), (65536, 8192)]),
    "token_logprobs": (bench_token_logprobs, [(1024, 512, 32768), (2048, 768, 151936)],
                       [(4096, 4096, 151936), (16384, 4096, 151936)]),
    "grpo_token_loss": (bench_grpo_token_loss, [1 << 16, 1 << 20], [1 << 20, 1 << 24]),
    "flash_attention": (bench_flash_attention, [(1, 512, 8, 2, 64, 64), (1, 1024, 4, 4, 192, 128)],
                        [(4, 2048, 32, 8, 128, 128), (2, 4096, 16, 16, 192, 128), (1, 16384, 32, 8, 128, 128)]),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="name", help=f"kernels to run, of {', '.join(SWEEPS)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per row (default 3 on CPU, 20 on GPU)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in SWEEPS]
    if unknown:
        p.error(f"unknown kernel(s) {', '.join(unknown)}; expected some of {', '.join(SWEEPS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels.bench times real kernels: unset TRITON_INTERPRET")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (20 if device.type == "cuda" else 3)
    rows = []
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), dtype={dtype}, "
          f"forward+backward, median of {reps}")
    print(f"{'kernel':<16} {'size':<34} {'impl':<10} {'ms':>10} {'rate':>14} {'peak MiB':>10}")
    for name in args.names or list(SWEEPS):
        bench, cpu_sizes, gpu_sizes = SWEEPS[name]
        for row in bench(device, dtype, gpu_sizes if device.type == "cuda" else cpu_sizes):
            try:
                seconds, peak = measure(row.pop("step"), device, reps)
            except Exception as e:  # an optional comparator failing is reported, not fatal
                print(f"{row['kernel']:<16} {row['size']:<34} {row['impl']:<10} error: {type(e).__name__}: {e}")
                continue
            scale = 1e12 if row["unit"] == "TFLOP/s" else 1e9
            row.update(ms=seconds * 1e3, rate=row["work"] / seconds / scale, peak_mib=peak / 2 ** 20)
            rows.append(row)
            print(f"{row['kernel']:<16} {row['size']:<34} {row['impl']:<10} {row['ms']:>10.2f} "
                  f"{row['rate']:>8.3f} {row['unit']:<5} {row['peak_mib']:>10.1f}")
    print(json.dumps({"bench": "kernels", "device": str(device), "dtype": str(dtype), "reps": reps, "rows": rows}))


if __name__ == "__main__":
    main()
