"""Peak memory of loading a checkpoint, per rank, against the checkpoint's size, on CPU.

    python bench/load_memory.py --ranks 2            # ~1B-parameter fp32 checkpoint, two gloo ranks
    python bench/load_memory.py --ranks 1 --size small

Writes a sharded fp32 checkpoint of a Qwen2-style model (size "1b": 1.03B parameters, 4.1 GB;
"small": about 70 MB), then loads it once per target dtype (fp32: the stored dtype, read straight
into the parameters; bf16: converted through the staging buffer), each time in fresh processes:
with --ranks 1 one process and load_pretrained; with --ranks R > 1, R ranks under torchrun and the
training loops' sharded path (model.build.build_model with FSDP2: meta device, fully_shard,
to_empty, each rank reading its own rows). Each rank reports

    ratio = (peak RSS during the load - RSS before it) / bytes of the checkpoint

RSS before is taken after the imports and one meta-device construction and sharding of a tiny
model (lazy imports of torch._dynamo and FSDP: a fixed cost of the process, printed apart); the
peak is VmHWM, reset just before loading by writing 5 to /proc/self/clear_refs (Linux). Files are
read with plain reads (no mmap), so the page cache is not charged to the process. A rank holding
its share of the weights in fp32 shows 1/R; in bf16, 1/(2R). The goals, 1.2/R for fp32 and 0.7/R
for bf16 (0.6 and 0.35 on 2 ranks), leave room for one staging chunk and allocator slack, and none
for a whole-tensor or whole-model copy. With --ranks R > 1 the table also shows the path the loops
took before (every rank loads the whole model, then shards it), for comparison.

Prints a table, then one JSON line: {"ranks", "params", "checkpoint_bytes", "ratio_per_rank":
{"fp32": [...], "bf16": [...]}, "goal": {"fp32", "bf16"}} (the sharded path's figures).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen2-style configs: parameters ~ 2·V·D + L·(2·D² + 2·D·Dkv + 3·D·I)
SIZES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
               num_attention_heads=16, num_key_value_heads=4, max_shard_bytes=1 << 30),
    "large": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_shard_bytes=100 << 20),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, max_shard_bytes=32 << 20),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(args) -> None:
    """Load the checkpoint once (this rank's share under torchrun) and report; rank 0 writes the
    ranks' reports to --report as JSON."""
    import torch
    sys.path.insert(0, str(ROOT))
    from argparse import Namespace

    from model import ModelConfig, Transformer, load_pretrained
    from model.build import build_model
    from model.parallel import apply_fsdp
    from runtime.distributed import all_gather_object, init_distributed, teardown

    torch.set_num_threads(1)  # keep thread pools (and their stacks) out of the measurement
    info = init_distributed(backend="gloo") if args.ranks > 1 else None
    dtype = getattr(torch, DTYPES[args.dtype])
    imported = _status_kib("VmRSS") * 1024
    # Lazy imports (torch._dynamo through meta normal_, FSDP's modules) are a fixed per-process
    # cost, reported apart, not a copy of the weights.
    with torch.device("meta"):
        tiny = Transformer(ModelConfig.from_preset("tiny"))
    if info is not None:
        apply_fsdp(tiny)
    del tiny
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if info is None:
        model = load_pretrained(args.dir, dtype=dtype)
    elif args.path == "sharded":
        model = build_model(Namespace(model=args.dir, preset=None, seed=0), None, dtype=dtype,
                            fsdp={"param_dtype": None, "reduce_dtype": None})
    else:   # what the loops did before: the whole model on every rank, then sharded
        model = apply_fsdp(load_pretrained(args.dir, dtype=dtype))
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in model.parameters())
    report = {"rank": 0 if info is None else info.rank, "rss_before": before, "lazy_import_bytes": before - imported,
              "peak_above_before": peak - before, "local_weight_bytes": local, "seconds": seconds}
    reports = all_gather_object(report) if info is not None else [report]
    if report["rank"] == 0:
        Path(args.report).write_text(json.dumps(reports))
    if info is not None:
        del model
        teardown()


def write_checkpoint(size: str, out: Path) -> dict:
    """A random fp32 model of SIZES[size] saved (sharded) at `out`; returns its description."""
    import torch
    sys.path.insert(0, str(ROOT))
    from model import ModelConfig, Transformer, save_pretrained

    spec = dict(SIZES[size])
    max_shard_bytes = spec.pop("max_shard_bytes")
    config = ModelConfig(model_type="qwen2", attention_bias=True, **spec)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    with torch.no_grad():   # cheap values: the bytes matter here, not the init
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)
    save_pretrained(model, out, max_shard_bytes=max_shard_bytes, overwrite=True)
    return describe(out)


def describe(directory: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from model.safetensors_io import SafetensorsFile

    files = sorted(directory.glob("*.safetensors"))
    entries = [e for f in files for e in SafetensorsFile(f).entries.values()]
    params = sum(end - begin for _, _, begin, end in entries) // 4
    return {"params": params, "checkpoint_bytes": sum(end - begin for _, _, begin, end in entries),
            "files": [f.name for f in files]}


def measure(directory: Path, dtype: str, ranks: int, path: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        cmd = [__file__, "--child", "--dir", str(directory), "--dtype", dtype, "--ranks", str(ranks),
               "--path", path, "--report", report.name]
        if ranks > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *cmd]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"loading child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(report.name).read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="processes loading the checkpoint together")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--dir", help="checkpoint folder (written there if it holds none; default: a temporary one)")
    p.add_argument("--skip-before", action="store_true", help="do not measure the previous load-then-shard path")
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--path", default="sharded", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.ranks < 1:
        raise SystemExit(f"--ranks {args.ranks}: expected >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        info = describe(directory) if list(directory.glob("*.safetensors")) else write_checkpoint(args.size, directory)
        write_s = time.perf_counter() - t0
        paths = ["sharded"] if args.ranks == 1 or args.skip_before else ["sharded", "before"]
        rows = {(path, dt): measure(directory, dt, args.ranks, path) for path in paths for dt in DTYPES}
    B = info["checkpoint_bytes"]
    goal = {"fp32": round(1.2 / args.ranks, 4), "bf16": round(0.7 / args.ranks, 4)}
    print(f"checkpoint: {info['params'] / 1e9:.3f}B parameters, fp32, {B / 1e9:.2f} GB in {len(info['files'])} "
          f"file(s) (ready in {write_s:.0f} s); {args.ranks} rank(s)")
    print(f"{'path':<34}{'target':<7}{'rank':>5}{'peak above MB':>15}{'ratio':>8}{'goal':>7}{'local MB':>10}"
          f"{'imports MB':>12}{'load s':>8}")
    for (path, dt), reports in rows.items():
        label = ("load_pretrained" if args.ranks == 1 else "sharded load (each rank its rows)") if path == "sharded" \
            else "before: whole model, then shard"
        for r in reports:
            print(f"{label:<34}{dt:<7}{r['rank']:>5}{r['peak_above_before'] / 1e6:>15.1f}"
                  f"{r['peak_above_before'] / B:>8.3f}{goal[dt] if path == 'sharded' else '':>7}"
                  f"{r['local_weight_bytes'] / 1e6:>10.1f}{r['lazy_import_bytes'] / 1e6:>12.1f}{r['seconds']:>8.2f}")
    ratios = {dt: [round(r["peak_above_before"] / B, 4) for r in rows[("sharded", dt)]] for dt in DTYPES}
    result = {"ranks": args.ranks, "params": info["params"], "checkpoint_bytes": B, "ratio_per_rank": ratios,
              "goal": goal}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
