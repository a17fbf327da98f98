"""Peak memory of load_pretrained against the size of the weights it loads, on CPU.

    python bench/load_memory.py [--size large|small] [--dir DIR]

Writes a sharded fp32 checkpoint of a Qwen2-style model (large: about 495 MB, 5 shards; small:
about 70 MB, 3 shards), then loads it, once per target dtype (fp32: stored dtype, read straight into
the parameters; bf16: converted through the staging buffer), each in a fresh process:

    ratio = (peak RSS during load - RSS before load) / bytes of the loaded weights in the target dtype

RSS before load is taken after `import torch`, the model package and one meta-device construction
of a tiny model (which imports torch._dynamo lazily: a fixed cost of the process, about 80 MB,
printed apart as "lazy imports"); the peak is VmHWM, whose
high-water mark is reset just before loading by writing 5 to /proc/self/clear_refs (Linux), so the
import's own peak does not count. Files are read with plain reads (no mmap), so the page cache is not
charged to the process. A loader holding a second copy of the weights would show a ratio near 2 (or
3 for fp32 -> bf16); the goal is <= 1.3. Prints a table, then one JSON line.
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
    "large": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_shard_bytes=100 << 20),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, max_shard_bytes=32 << 20),
}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(args) -> None:
    """Load the checkpoint once and print {ratio, ...} as JSON (runs in a fresh process)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from model import ModelConfig, Transformer, load_pretrained

    torch.set_num_threads(1)  # keep thread pools (and their stacks) out of the measurement
    imported = _status_kib("VmRSS") * 1024
    # The first meta-device construction imports torch._dynamo lazily (torch's meta normal_ goes
    # through it): a fixed per-process cost, reported apart, not a copy of the weights.
    with torch.device("meta"):
        Transformer(ModelConfig.from_preset("tiny"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    model = load_pretrained(args.dir, dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    tensors = {id(t): t for t in model.state_dict().values()}.values()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"dtype": args.dtype, "weights_bytes": weights, "rss_before": before,
                      "lazy_import_bytes": before - imported, "seconds": seconds,
                      "peak_above_before": peak - before, "ratio": (peak - before) / weights}))


def write_checkpoint(size: str, out: Path) -> dict:
    """A random fp32 model of SIZES[size] saved (sharded) at `out`; returns its description."""
    import torch
    sys.path.insert(0, str(ROOT))
    from model import ModelConfig, Transformer, save_pretrained

    spec = dict(SIZES[size])
    max_shard_bytes = spec.pop("max_shard_bytes")
    config = ModelConfig(model_type="qwen2", attention_bias=True, **spec)
    torch.manual_seed(0)
    model = Transformer(config)
    save_pretrained(model, out, max_shard_bytes=max_shard_bytes, overwrite=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, "files": sorted(p.name for p in out.glob("*.safetensors"))}


def measure(directory: Path, dtype: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory), "--dtype", dtype],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loading child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    p.add_argument("--dir", help="checkpoint folder (default: a temporary one, deleted afterwards)")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "ckpt"
        info = write_checkpoint(args.size, directory)
        rows = [measure(directory, dt) for dt in ("float32", "bfloat16")]
    print(f"checkpoint: {info['params'] / 1e6:.1f}M parameters, fp32, {len(info['files'])} shard(s)")
    print(f"{'target dtype':<14}{'weights MB':>12}{'peak above MB':>15}{'ratio':>8}{'lazy imports MB':>17}{'load s':>8}")
    for r in rows:
        print(f"{r['dtype']:<14}{r['weights_bytes'] / 1e6:>12.1f}{r['peak_above_before'] / 1e6:>15.1f}"
              f"{r['ratio']:>8.3f}{r['lazy_import_bytes'] / 1e6:>17.1f}{r['seconds']:>8.2f}")
    result = {"bench": "load_memory", "size": args.size, "params": info["params"], "shards": len(info["files"]),
              "ratios": {r["dtype"]: round(r["ratio"], 4) for r in rows}, "goal": 1.3}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
