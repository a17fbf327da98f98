"""Peak memory of GRPO steps with and without --activation-checkpointing, in one process and on 2 ranks.

    python bench/activation_checkpointing.py [--steps 2] [--max-new-tokens 256]

A Qwen2-style model of 8 layers (hidden 128, tied embeddings; tests/rl/_grpo_worker.make_model_dir)
runs train.py's GRPO stage: 8 prompts x 8 samples per step, completions of up to --max-new-tokens
tokens (a random model rarely stops early), every step's sequences in one micro-batch (so the
training pass holds the activations of the whole batch), no reference model. Each configuration
runs in fresh processes; each rank reports

    peak = VmHWM during train.main - RSS just before it    (VmHWM reset via /proc/self/clear_refs)

so imports do not count, and what remains is the model, the optimizer, the sampler's KV cache and,
dominating without checkpointing, the stored activations. Activation checkpointing keeps only each
block's input and recomputes the block in the backward. The goal: peak with <= 0.8 x peak without,
in one process and on each rank of two, with the same losses (within 1e-5 relative; the recompute
is the same computation). Prints a table, then one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(argv: list[str], report: str) -> int:
    """train.main(argv) with this rank's peak memory above the level before it written to report.rank{r}."""
    sys.path.insert(0, str(ROOT))
    import torch

    import train
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS") * 1024
    code = train.main(argv)
    peak = _status_kib("VmHWM") * 1024
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{report}.rank{rank}").write_text(json.dumps({"rank": rank, "peak_above_before": peak - before}))
    return code


def run(tmp: Path, name: str, ranks: int, args, extra: tuple = ()) -> dict:
    out = tmp / name
    argv = ["--stage", "grpo", "--model", str(tmp / "model"), "--chat-template", "r1-zero",
            "--data", str(tmp / "prompts.jsonl"), "--out", str(out), "--max-steps", str(args.steps),
            "--warmup-steps", "0", "--prompts-per-step", "8", "--group-size", "8",
            "--max-new-tokens", str(args.max_new_tokens), "--reward", "tests.rl._grpo_worker:token_parity",
            "--reward-workers", "0", "--beta", "0", "--lr", "1e-4", "--micro-batch-tokens", "1000000",
            "--sampler-batch-size", "64", "--log-every-s", "1000", *extra]
    report = tmp / f"{name}.mem"
    cmd = [__file__, "--child", str(report), "--", *argv]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peaks = [json.loads(Path(f"{report}.rank{r}").read_text())["peak_above_before"] for r in range(ranks)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"peaks": peaks, "loss": {m["step"]: m["loss"] for m in metrics if "loss" in m},
            "train_s": sum(m["time/train"] for m in metrics if "time/train" in m)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.rl._grpo_worker import make_model_dir, write_prompts

    rows, result = [], {"bench": "activation_checkpointing", "goal": 0.8}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_model_dir(tmp / "model", hidden=128, layers=8)
        write_prompts(tmp / "prompts.jsonl", 64)
        for ranks in (1, 2):
            off = run(tmp, f"off{ranks}", ranks, args)
            on = run(tmp, f"on{ranks}", ranks, args, ("--activation-checkpointing",))
            ratios = [b / a for a, b in zip(off["peaks"], on["peaks"])]
            loss_rel = max(abs(on["loss"][s] / off["loss"][s] - 1) if off["loss"][s] else abs(on["loss"][s])
                           for s in off["loss"])
            for r in range(ranks):
                rows.append((ranks, r, off["peaks"][r], on["peaks"][r], ratios[r], off["train_s"], on["train_s"]))
            result[f"ranks{ranks}"] = {"peak_ratio": [round(x, 4) for x in ratios], "loss_max_rel_diff": loss_rel,
                                       "peak_off_mb": [round(x / 1e6, 1) for x in off["peaks"]],
                                       "peak_on_mb": [round(x / 1e6, 1) for x in on["peaks"]]}
    print(f"GRPO, 8 layers x hidden 128, 8 prompts x 8 samples, up to {args.max_new_tokens} new tokens, "
          f"{args.steps} steps, one micro-batch per step")
    print(f"{'ranks':>5}{'rank':>5}{'peak off MB':>13}{'peak on MB':>12}{'on/off':>8}{'goal':>6}{'train s off':>13}"
          f"{'train s on':>12}")
    for ranks, r, a, b, ratio, ta, tb in rows:
        print(f"{ranks:>5}{r:>5}{a / 1e6:>13.1f}{b / 1e6:>12.1f}{ratio:>8.3f}{0.8:>6}{ta:>13.1f}{tb:>12.1f}")
    for ranks in (1, 2):
        print(f"{ranks} rank(s): losses with and without checkpointing differ by at most "
              f"{result[f'ranks{ranks}']['loss_max_rel_diff']:.2e} (relative)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":   # one configuration's process (see run)
        sys.exit(child(sys.argv[sys.argv.index("--") + 1:], sys.argv[2]))
    main()
