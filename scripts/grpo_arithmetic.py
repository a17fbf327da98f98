"""GRPO fixes what pretraining taught wrong: the acceptance run of the GRPO loop on a CPU.

    python scripts/grpo_arithmetic.py --out runs/grpo-arithmetic              # one process
    python scripts/grpo_arithmetic.py --out runs/grpo-arithmetic-2 --nproc 2  # torchrun, 2 gloo ranks

1. data: a corpus of worked 3-digit additions in the R1-Zero format (data/tasks.py) whose traces
   mostly carry a systematic carry bug (70%; 5% wrong final answers, 5% missing tags), RL prompts,
   200 held-out problems never seen in training, a byte-level BPE trained on the corpus;
2. base: `train.py --stage pretrain` of the tiny dense preset on the corpus; it copies the corpus's
   habits, so it is right mostly when no column carries;
3. RL: `train.py --stage grpo` from the base with the task checker + format rewards (R1-Zero's
   accuracy + format), 16 prompts x 8 samples a step, lr 1e-4, no KL; held-out greedy and sampled
   (temperature 1, mean of 4) accuracy, strict (format and answer) and lenient (answer only), at
   step 0 and every --eval-every steps.
Prints the before/after figures and the wall times, and writes them to <out>/result.json.
`--base DIR` skips the pretraining and starts RL from a model folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "r1-zero-short"


def run(cmd: list[str], nproc: int, log: Path) -> float:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(launch + [str(ROOT / "train.py"), *cmd], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def evals(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval/greedy_accuracy" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grpo-arithmetic")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun with gloo when > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="start RL from this model folder (skip pretraining)")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--heldout", type=int, default=200)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = out / "data"
    py = [sys.executable, "-m"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["data.tasks", "--task", "arithmetic", "--n", "20000", "--seed", str(args.seed), "--corpus",
                 "--template", TEMPLATE, "--out", str(d / "corpus.jsonl"), "--force"],
                ["data.tasks", "--task", "arithmetic", "--n", "5000", "--seed", str(args.seed + 1),
                 "--out", str(d / "prompts.jsonl"), "--force"],
                ["data.tasks", "--task", "arithmetic", "--n", str(args.heldout), "--seed", str(args.seed + 2),
                 "--split", "test", "--out", str(d / "heldout.jsonl"), "--force"],
                ["data.tokenizer", "train", "--data", str(d / "corpus.jsonl"), "--vocab-size", "512",
                 "--out", str(d / "tok"), "--force"]):
        subprocess.run(py + cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = {"nproc": args.nproc, "seed": args.seed}
    base = args.base
    if base is None:
        result["pretrain_wall_s"] = run(
            ["--stage", "pretrain", "--preset", "tiny", "--tokenizer", str(d / "tok"), "--data",
             str(d / "corpus.jsonl"), "--out", str(out / "base"), "--max-steps", str(args.pretrain_steps),
             "--warmup-steps", "20", "--batch-size", "128", "--micro-batch-size", "128", "--seq-len", "512",
             "--lr", "2e-3", "--seed", str(args.seed)], args.nproc, out / "base.log")
        base = str(sorted((out / "base" / "checkpoints").glob("step-*"))[-1] / "hf")
    result["rl_wall_s"] = run(
        ["--stage", "grpo", "--model", base, "--chat-template", TEMPLATE, "--data", str(d / "prompts.jsonl"),
         "--out", str(out / "rl"), "--max-steps", str(args.rl_steps), "--prompts-per-step", "16",
         "--group-size", "8", "--max-new-tokens", "64", "--reward", "task,format", "--reward-workers", "0",
         "--lr", "1e-4", "--warmup-steps", "0", "--lr-schedule", "constant", "--eval-data",
         str(d / "heldout.jsonl"), "--eval-problems", str(args.heldout), "--eval-every", str(args.eval_every),
         "--eval-samples", "4", "--eval-max-new-tokens", "64", "--sampler-batch-size", "128",
         "--seed", str(args.seed)], args.nproc, out / "rl.log")
    summary = json.loads((out / "rl" / "summary.json").read_text())
    result["rl_loop_wall_s"] = summary["wall_s"]
    result["evals"] = evals(out / "rl" / "metrics.jsonl")
    first, last = result["evals"][0], result["evals"][-1]
    for k in ("greedy_accuracy", "sampled_accuracy", "greedy_lenient_accuracy", "sampled_lenient_accuracy"):
        result[f"before/{k}"], result[f"after/{k}"] = first[f"eval/{k}"], last[f"eval/{k}"]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"held-out ({args.heldout} problems)        before   after")
    for k in ("greedy_accuracy", "sampled_accuracy", "greedy_lenient_accuracy", "sampled_lenient_accuracy"):
        print(f"  {k:28s} {result[f'before/{k}']:.3f}   {result[f'after/{k}']:.3f}")
    print(f"RL: {args.rl_steps} steps in {result['rl_loop_wall_s']:.0f}s (evaluations included); "
          f"pretraining {result.get('pretrain_wall_s', 0):.0f}s")
    print(json.dumps({k: v for k, v in result.items() if k != "evals"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
