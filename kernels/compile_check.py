"""Compile every Triton kernel of this package for an NVIDIA GPU target, without a GPU.

    python -m kernels.compile_check [--arch 90] [--json] [--only NAME] [--jobs N]

The kernel tests run in Triton's CPU interpreter, which accepts code a GPU build rejects (layouts,
dot shapes and dtypes, shared-memory budgets) and computes bf16 dots wrongly; this check builds
each kernel with every launch configuration it may run with on CUDA (each autotune configuration
of kernels.tuning, with the constexprs its host launcher passes), for fp32, fp16 and bf16, down
to a cubin when the CUDA backend's ptxas is present (Triton wheels bundle it), or to PTX when it is
not. It needs TRITON_INTERPRET unset: under the interpreter `triton.jit` returns interpreted
functions that cannot be compiled. Each kernel module lists its configurations in
`compile_specs()`, as CompileSpecs (kernels/compile_spec.py). The builds run in --jobs processes
(default: one per CPU core).

Output: one line per (kernel, dtype, configuration) with the stage reached and the static shared
memory, then, with --json, one JSON line. Exit status 1 when any build fails or needs more shared
memory than one block may use on the target (227 KiB on sm_90).
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

from kernels.compile_spec import CompileSpec

# largest shared memory one thread block may use, by compute capability (bytes)
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def all_specs() -> list[CompileSpec]:
    from kernels import attention, grpo_loss, logprobs, norm, paged_attention
    specs = []
    for module in (norm, logprobs, grpo_loss, attention, paged_attention):
        specs.extend(module.compile_specs())
    return specs


def _ptxas_available() -> bool:
    from triton import knobs
    try:
        tool = knobs.nvidia.ptxas
    except Exception:  # the knob raises when no ptxas can be found
        return False
    return tool is not None and os.path.exists(tool.path)


def _compile_to_ptx(src, target, options: dict):
    """Run Triton's pipeline up to the PTX stage only (when ptxas is missing)."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend
    backend = make_backend(target)
    opts = backend.parse_options(dict(options, **src.parse_options()))
    stages = {}
    backend.add_stages(stages, opts, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    metadata = {"target": target, **opts.__dict__}
    for ext, stage in stages.items():  # "ttir" first: make_ir's output still needs its passes
        module = stage(module, metadata)
        if ext == "ptx":
            return metadata
    raise AssertionError("the CUDA pipeline has no ptx stage")


def compile_one(spec: CompileSpec, arch: int, to_cubin: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", arch, 32)
    src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    row = {"kernel": spec.name, "dtype": spec.dtype, "config": spec.config, "ok": False, "stage": None, "shared": None,
           "error": None}
    t0 = time.perf_counter()
    try:
        if to_cubin:
            compiled = triton.compile(src, target=target, options=options)
            row["stage"], row["shared"] = "cubin", int(compiled.metadata.shared)
        else:
            metadata = _compile_to_ptx(src, target, options)
            row["stage"], row["shared"] = "ptx", int(metadata.get("shared", 0))
        limit = MAX_SHARED.get(arch, 99 * 1024)
        row["ok"] = row["shared"] <= limit
        if not row["ok"]:
            row["error"] = f"needs {row['shared']} bytes of shared memory, sm_{arch} allows {limit}"
    except Exception as e:  # a compiler error is the result being reported, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_nth(job) -> dict:
    """compile_one of the n-th spec, in a worker process (a spec holds a kernel object: send its index)."""
    n, arch, to_cubin = job
    return compile_one(all_specs()[n], arch, to_cubin)


def compile_all(arch: int, only=None, jobs: int = 1) -> tuple[bool, list[dict]]:
    """(to_cubin, one result row per spec whose name contains `only`), in spec order."""
    to_cubin = _ptxas_available()
    picked = [n for n, s in enumerate(all_specs()) if only is None or only in s.name]
    work = [(n, arch, to_cubin) for n in picked]
    if jobs <= 1 or len(work) <= 1:
        return to_cubin, [_compile_nth(w) for w in work]
    # fork: the workers inherit the imported kernel modules; nothing was compiled in this process yet
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return to_cubin, list(pool.map(_compile_nth, work))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    p.add_argument("--json", action="store_true", help="also print one JSON line of all results")
    p.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="builds in parallel (processes)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernels.compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    to_cubin, rows = compile_all(args.arch, args.only, args.jobs)
    for r in rows:
        status = "ok" if r["ok"] else "FAIL " + (r["error"] or "")
        print(f"{r['kernel']:<34} {r['dtype']:<5} {r['config']:<28} sm_{args.arch} {r['stage'] or '-':<5} "
              f"shared={r['shared'] if r['shared'] is not None else '-':>6} {r['seconds']:>6.2f}s  {status}")
    if args.json:
        print(json.dumps({"arch": args.arch, "to_cubin": to_cubin, "results": rows}))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
