"""LoRA against full fine-tuning of the same model, SFT and GRPO: what each learns and what each holds.

    python bench/lora.py memory                                             # a 100M Qwen2, one process per run
    torchrun --nproc_per_node 2 bench/lora.py learning --from-run runs/r1-tiny   # the r1-tiny recipe's stages

memory: a 100M-parameter Qwen2 (bench/grpo_step.py's: hidden 768, 12 layers, vocab 32000, fp32,
random weights) trained for 2 steps of SFT (8 sequences of about 250 tokens, in micro-batches of 2) and of GRPO (4 prompts x 4
samples of 32 tokens, beta 0.04: full fine-tuning holds a frozen reference model, LoRA uses its own
base with the adapters switched off), full and with --lora-rank 16 on every linear layer, each run
in a process of its own, --rounds times interleaved. Per run: trainable parameters and
optimizer-state bytes (the loop's summary.json); what it holds besides activations (fp32 weights,
the trainable ones' gradients, optimizer state, and GRPO's reference model under full fine-tuning);
the process's resident high-water mark (VmHWM after the last step: all of that, activations, the KV
cache and whatever the process keeps of freed memory, so it moves between rounds; the median is
printed) and the last step's wall time.

learning: from a finished r1-tiny run (its data, tokenizer, pretrained base and the traces
rejection-sampled from its r1_zero model), the recipe's cold-start SFT (80 steps of 64 traces) and
its R1-Zero GRPO (40 steps of 16 prompts x 8 samples), each full (the recipe's lr) and with LoRA
(rank 16, alpha 32 on every linear layer but the routed experts, 10x the lr, the usual LoRA
rule), every model evaluated as r1-tiny evaluates its stages (200 held-out problems, sampled T = 1
mean of 4, and greedy). Per run: the loss (SFT) or reward (GRPO) over the first and last 5 steps,
held-out accuracy, trainable parameters, optimizer bytes, peak memory per rank, wall time.

Both print a table and write <out>/lora-<part>.json (default out: runs/bench-lora).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LORA = dict(lora_rank=16, lora_alpha=32.0)
LR_FACTOR = 10.0      # LoRA's learning rate: 10x full fine-tuning's


# ---- memory: a 100M model, one process per run ------------------------------------------------------

def _memory_child(kind: str, stage: str, d: Path) -> dict:
    import torch
    import train
    from bench.grpo_step import vm_hwm_bytes

    torch.set_num_threads(2)
    run = d / f"{stage}-{kind}"
    common = ["--model", str(d / "model"), "--tokenizer", str(d / "tok-no-eos"), "--out", str(run), "--max-steps", "2",
              "--warmup-steps", "0", "--log-every-s", "1000", "--compile", "off"]
    lora = ["--lora-rank", "16", "--lora-alpha", "32"] if kind == "lora" else []
    if stage == "sft":
        argv = ["--stage", "sft", *common, "--data", str(d / "sft.jsonl"), "--chat-template", "chatml",
                "--batch-size", "8", "--micro-batch-size", "2", "--seq-len", "512", "--lr", "1e-5", *lora]
    else:
        argv = ["--stage", "grpo", *common, "--data", str(d / "prompts.jsonl"), "--chat-template",
                "{{ messages[0]['content'] }}", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens",
                "32", "--reward", "bench.grpo_step:random_reward", "--reward-workers", "0", "--beta", "0.04",
                "--lr", "1e-6", "--sampler-batch-size", "16", *lora]
    assert train.main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"trainable_params": summary["trainable_params"], "params": summary["params"],
            "optimizer_state_bytes": summary["optimizer_state_bytes"], "peak_bytes": vm_hwm_bytes(),
            "step_s": rows[-1].get("step_s")}


def _make_memory_assets(d: Path) -> None:
    from bench.grpo_step import make_assets
    make_assets(d, steps=2)
    rows = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
    sft = [{"prompt": r["prompt"], "completion": " The sum is computed digit by digit, from the right. " * 4}
           for r in rows for _ in range(2)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))


def _held_bytes(r: dict, stage: str, kind: str) -> int:
    """Weights (fp32 here) + gradients of the trainable ones + optimizer state + GRPO's reference
    model (full fine-tuning only: LoRA's reference is its own base): what the run holds besides
    activations, the KV cache and the process itself."""
    reference = 4 * r["params"] if stage == "grpo" and kind == "full" else 0
    return 4 * r["params"] + 4 * r["trainable_params"] + r["optimizer_state_bytes"] + reference


def run_memory(out: Path, rounds: int) -> dict:
    import statistics

    runs = [(stage, kind) for stage in ("sft", "grpo") for kind in ("full", "lora")]
    per_round = {f"{s}/{k}": [] for s, k in runs}
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        d = Path(tmp)
        _make_memory_assets(d)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        for _ in range(rounds):   # interleaved: the machine's drifts hit every run alike
            for stage, kind in runs:
                cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--kind", kind, "--stage", stage,
                       "--assets", str(d)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if p.returncode != 0:
                    raise RuntimeError(f"{stage} {kind} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
                per_round[f"{stage}/{kind}"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    results = {}
    for (stage, kind), (name, rs) in zip(runs, per_round.items()):
        results[name] = {**rs[0], "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
                         "step_s": statistics.median(r["step_s"] for r in rs),
                         "peak_bytes_rounds": [r["peak_bytes"] for r in rs], "held_bytes": _held_bytes(rs[0], stage, kind)}
    print(f"medians of {rounds} rounds")
    print(f"{'run':<12}{'trainable':>14}{'of params':>11}{'optimizer MiB':>15}{'held GiB':>10}{'peak RSS GiB':>14}"
          f"{'step s':>8}")
    for name, r in results.items():
        print(f"{name:<12}{r['trainable_params']:>14,}{r['trainable_params'] / r['params']:>11.2%}"
              f"{r['optimizer_state_bytes'] / 2**20:>15.1f}{r['held_bytes'] / 2**30:>10.2f}{r['peak_bytes'] / 2**30:>14.2f}"
              f"{r['step_s']:>8.1f}")
    for stage in ("sft", "grpo"):
        f, lo = results[f"{stage}/full"], results[f"{stage}/lora"]
        print(f"{stage}: LoRA / full  optimizer state {lo['optimizer_state_bytes'] / f['optimizer_state_bytes']:.4f}x, "
              f"held {lo['held_bytes'] / f['held_bytes']:.2f}x, peak RSS {lo['peak_bytes'] / f['peak_bytes']:.2f}x, "
              f"step time {lo['step_s'] / f['step_s']:.2f}x")
    return results


# ---- learning: the r1-tiny recipe's SFT and GRPO stages ---------------------------------------------

def _window(rows: list[dict], key: str, first: bool) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    part = values[:5] if first else values[-5:]
    return sum(part) / len(part) if part else None


def run_learning(args, out: Path) -> dict:
    from data.datasets import read_jsonl
    from data.tokenizer import load_tokenizer
    from recipes.flags import stage_args
    from recipes.r1_tiny import RECIPE as R, TEMPLATE, _evaluate, _hf_dir
    from recipes.stages import run_recipe_stage
    from runtime.distributed import init_distributed, print0, teardown

    info = init_distributed()
    source = Path(args.from_run)
    data, traces = source / "data", source / "generate_r1_zero" / "generated.jsonl"
    base = _hf_dir(source / "base")
    for p in (data, traces):
        if not p.exists():
            raise FileNotFoundError(f"--from-run {source}: not a finished r1-tiny run (no {p})")
    tok = load_tokenizer(data / "tokenizer")
    heldout = read_jsonl(data / "heldout.jsonl")
    common = dict(tokenizer=str(data / "tokenizer"), chat_template=TEMPLATE, seed=args.seed, log_every_s=30.0)
    runs = {
        "sft/full": stage_args({**R["sft"], **R["cold_start_sft"]}, model=str(base), data=str(traces), **common),
        "sft/lora": stage_args({**R["sft"], **R["cold_start_sft"]}, model=str(base), data=str(traces), **common,
                               **LORA, lr=R["sft"]["lr"] * LR_FACTOR),
        "grpo/full": stage_args({**R["rl"], **R["r1_zero"]}, model=str(base), data=str(data / "prompts.jsonl"), **common),
        "grpo/lora": stage_args({**R["rl"], **R["r1_zero"]}, model=str(base), data=str(data / "prompts.jsonl"), **common,
                                **LORA, lr=R["rl"]["lr"] * LR_FACTOR),
    }
    results = {"base": _evaluate(base, tok, heldout, info, R)}
    for name, stage_flags in runs.items():
        t0 = time.perf_counter()
        path, model_dir = run_recipe_stage(name.replace("/", "_"), stage_flags, out / "learning", info)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((path / "summary.json").read_text())
        key = "loss" if name.startswith("sft") else "reward/mean"
        results[name] = {**_evaluate(model_dir, tok, heldout, info, R), "lr": stage_flags.lr, "wall_s": wall,
                         f"{key}_first5": _window(rows, key, True), f"{key}_last5": _window(rows, key, False),
                         **{k: summary.get(k) for k in ("trainable_params", "params", "optimizer_state_bytes",
                                                        "peak_memory_gib")}}
    if info.rank == 0:
        b = results["base"]
        print0(f"base: accuracy {b['accuracy']:.3f} sampled / {b['greedy_accuracy']:.3f} greedy")
        print0(f"{'run':<11}{'lr':>8}{'first 5':>9}{'last 5':>8}{'sampled':>9}{'greedy':>8}{'trainable':>11}"
               f"{'optim MiB':>10}{'peak GiB':>9}{'wall s':>8}")
        for name, r in results.items():
            if name == "base":
                continue
            key = "loss" if name.startswith("sft") else "reward/mean"
            print0(f"{name:<11}{r['lr']:>8.0e}{r[f'{key}_first5']:>9.3f}{r[f'{key}_last5']:>8.3f}{r['accuracy']:>9.3f}"
                   f"{r['greedy_accuracy']:>8.3f}{r['trainable_params']:>11,}{r['optimizer_state_bytes'] / 2**20:>10.2f}"
                   f"{r['peak_memory_gib'] or float('nan'):>9.2f}{r['wall_s']:>8.0f}")
    teardown()
    return results if info.rank == 0 else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("memory", "learning", "child"))
    p.add_argument("--from-run", default="runs/r1-tiny", help="learning: a finished r1-tiny run")
    p.add_argument("--out", default="runs/bench-lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="memory: interleaved rounds (medians are printed)")
    p.add_argument("--kind", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--stage", choices=("sft", "grpo"), help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part == "child":
        print(json.dumps(_memory_child(args.kind, args.stage, Path(args.assets))))
        return 0
    out = Path(args.out)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = run_memory(out, args.rounds) if args.part == "memory" else run_learning(args, out)
    if results:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"lora-{args.part}.json").write_text(json.dumps({"uptime": uptime, **results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
