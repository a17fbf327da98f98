"""Peak memory and time of token_logprobs forward+backward against the naive LM-head path, on CPU.

    python bench/token_logprobs_memory.py [--n 8192] [--d 768] [--v 151936] [--threads 0]

naive:   logits = hidden @ weight.T -> log_softmax -> gather      (holds several [N, V] fp32 tensors)
chunked: kernels.token_logprobs (the torch twin on CPU tensors)   (holds [C, Vb] tiles)

Each path runs in its own process, one after the other (never both at once), so that each peak
is its own: peak RSS (ru_maxrss) after forward + backward minus the RSS once the inputs exist
(hidden, weight, targets and the upstream gradient, fp32). Both processes draw the same inputs
from one seed and save logp and the gradients; the parent compares them (relative error
‖a − b‖ / ‖b‖) after both have exited. Prints a table, then one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    from kernels import token_logprobs

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.d, generator=g).requires_grad_(True)
    weight = (torch.randn(args.v, args.d, generator=g) * args.d ** -0.5).requires_grad_(True)
    targets = torch.randint(0, args.v, (args.n,), generator=g)
    upstream = torch.randn(args.n, generator=g)
    base = rss_bytes()

    t0 = time.perf_counter()
    if args.impl == "naive":
        logits = hidden @ weight.T                                     # [N, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        logp = token_logprobs(hidden, weight, targets)
    (logp * upstream).sum().backward()
    seconds = time.perf_counter() - t0

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    torch.save({"logp": logp.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad}, args.save)
    print(json.dumps({"impl": args.impl, "seconds": seconds, "peak_above_inputs": peak - base,
                      "rss_inputs": base}))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8 * 1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)

    import torch
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS_BACKEND")}
        for impl in ("naive", "chunked"):
            save = os.path.join(tmp, impl + ".pt")
            cmd = [sys.executable, __file__, "--impl", impl, "--save", save, "--n", str(args.n),
                   "--d", str(args.d), "--v", str(args.v), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
        naive, chunked = (torch.load(os.path.join(tmp, f"{i}.pt")) for i in ("naive", "chunked"))
        errs = {k: rel_err(chunked[k], naive[k]) for k in ("logp", "d_hidden", "d_weight")}
        del naive, chunked

    gib = 2 ** 30
    nv, ch = results["naive"], results["chunked"]
    print(f"token_logprobs fwd+bwd, fp32, N={args.n} D={args.d} V={args.v}, CPU")
    print(f"{'path':<10}{'peak above inputs (GiB)':>26}{'time (s)':>12}")
    for name, r in (("naive", nv), ("chunked", ch)):
        print(f"{name:<10}{r['peak_above_inputs'] / gib:>26.3f}{r['seconds']:>12.2f}")
    mem_ratio = ch["peak_above_inputs"] / nv["peak_above_inputs"]
    time_ratio = ch["seconds"] / nv["seconds"]
    print(f"memory chunked/naive = {mem_ratio:.4f}   time chunked/naive = {time_ratio:.3f}   "
          + "   ".join(f"rel err {k} = {v:.1e}" for k, v in errs.items()))
    print(json.dumps({"bench": "token_logprobs_memory", "n": args.n, "d": args.d, "v": args.v,
                      "naive": nv, "chunked": ch, "memory_ratio": mem_ratio, "time_ratio": time_ratio,
                      "rel_err": errs}))


if __name__ == "__main__":
    main()
