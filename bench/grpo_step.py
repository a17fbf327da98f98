"""One GRPO step of our loop (train.py --stage grpo) against TRL's GRPOTrainer on the same weights, CPU.

    python bench/grpo_step.py [--rounds 2] [--steps 2] [--threads 2] [--trl-gradient-checkpointing]

The work of one step, on both sides: 8 prompts x group 8 = 64 completions of exactly 64 new tokens
(temperature 1; ours samples with no stop token, TRL generates with min_new_tokens = 64), a random
reward per completion, group advantages, the frozen reference model's log-probs (beta 0.04, k3 KL),
one forward + backward over the 64 sequences (prompt + completion) and one AdamW update. TRL: its
transformers `generate` path (no vLLM), num_generations 8, per_device_train_batch_size 64 (the 64
completions in one optimizer step), max_completion_length 64, bf16 off, gradient checkpointing off
unless --trl-gradient-checkpointing (TRL's default is on: it recomputes activations, less memory,
more time; off is the same work as ours). Ours runs as train.py runs, with its host malloc tuning
(runtime/host_memory.py: freed memory stays in the process, so a step does not fault its
activations in afresh); TRL runs with glibc's defaults unless --trl-keep-host-memory gives it the
same tuning.

Model: a 100M-parameter Qwen2 (hidden D = 768, 12 layers, 12 heads, 2 KV heads, intermediate 2048,
vocab V = 32000, tied embeddings, q/k/v biases), random weights from seed 0, fp32, saved once with
model.checkpoint.save_pretrained beside a small byte-level BPE tokenizer (ids it lacks decode to
nothing on both sides); both sides load that folder.

Floors, from the matrices a token passes through (per layer q, k, v, o, gate, up, down, plus the
output head; the embedding lookup is not a matmul): N_mm = 12 * 6.09M + V * D = 97.7M.
    train floor    6 * N_mm * trained tokens (64 sequences x (prompt + 64)) at the big-GEMM rate
                   (forward 2, backward 4 FLOPs per weight per token)
    sampler floor  2 * N_mm * generated tokens (64 x 64) at the rate of a [64, D] x [D, 2048] GEMM
                   (a decode step's shape)
    ref forward    2 * N_mm * trained tokens at the big-GEMM rate (listed apart: the issue's floor is
                   train + sampler)
The GEMM rates are measured in this process between the runs (torch.mm, --threads threads).

Measurement: each side runs in its own subprocess (ours, then TRL, then TRL, then ours, ...:
interleaved so that the shared machine's drifts hit both), `--steps` steps each; the step time is
the last step's wall time (the first pays one-time allocations), the peak is the process's VmHWM
(resident high-water mark, /proc/self/status) after its last step: model, reference model, AdamW
state, activations and whatever the libraries hold. Our run skips its final checkpoint write
(the benchmark keeps nothing). Prints `uptime`, a table (medians over rounds), then one JSON line.
Ours runs twice, eager (--compile off) and with compiled blocks (--compile on; its first step
pays the compile warm-up, reported apart). Goals: ours >= 1.6x faster per step than TRL and
<= 0.6x its peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_STEP, GROUP, NEW_TOKENS, BETA, LR = 8, 8, 64, 0.04, 1e-6
CONFIG = dict(model_type="qwen2", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
              max_position_embeddings=2048, rope_theta=10000.0)
TEMPLATE = "{{ messages[0]['content'] }}"  # the prompt text as it is, as TRL takes a plain-string prompt


def random_reward(completions, **kwargs) -> list[float]:
    """A reward per completion drawn uniformly from [0, 1) (the reward's cost is not what is measured)."""
    return [random.random() for _ in completions]


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux only)")


# ---- assets: one model folder, prompts ------------------------------------------------------------

def make_assets(d: Path, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from data.tokenizer import Tokenizer
    from model.checkpoint import save_pretrained
    from model.config import ModelConfig
    from model.transformer import Transformer

    rng = random.Random(0)
    problems = [f"What is {rng.randint(100, 999)} + {rng.randint(100, 999)}? Think step by step." for _ in range(400)]
    tok = Tokenizer.train(problems + [" ".join(problems)], vocab_size=1000, min_frequency=1)
    # no EOS in the model config: our sampler then stops only at max_new_tokens (fixed length); TRL
    # takes its EOS from the tokenizer and is held to 64 tokens by min_new_tokens
    config = ModelConfig(**CONFIG, bos_token_id=tok.bos_id, eos_token_id=None, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(config)
    save_pretrained(model, d / "model", tokenizer=tok)
    # ours reads the same tokenizer with no EOS named (the sampler falls back to the tokenizer's EOS)
    Tokenizer(tok.backend, {"bos_token": tok.bos_token, "pad_token": tok.pad_token}).save(d / "tok-no-eos")
    rows = [{"prompt": p} for p in problems[:PROMPTS_PER_STEP * steps]]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_mm = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."))
    n_mm += model.output_weight.numel()
    return {"prompt_tokens": len(tok.encode(problems[0])), "n_mm": n_mm,
            "params": sum(p.numel() for p in model.parameters())}


def gemm_rates(threads: int, reps: int = 3) -> tuple[float, float]:
    """(FLOP/s of a [4096, 768] x [768, 2048] GEMM, FLOP/s of [64, 768] x [768, 2048]), best of reps."""
    import torch

    torch.set_num_threads(threads)
    out = []
    for rows, inner_reps in ((4096, 1), (64, 50)):
        x, w = torch.randn(rows, 768), torch.randn(2048, 768)
        y = torch.empty(rows, 2048)
        torch.mm(x, w.t(), out=y)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner_reps):
                torch.mm(x, w.t(), out=y)
            best = min(best, (time.perf_counter() - t0) / inner_reps)
        out.append(2 * rows * 768 * 2048 / best)
    return out[0], out[1]


# ---- the two sides, each in its own process -----------------------------------------------------------

def child_ours(d: Path, steps: int, compile: str = "off") -> dict:
    sys.path.insert(0, str(ROOT))
    import train
    from rl import loop

    peak = []

    def record_peak_instead_of_saving(*args, **kwargs):  # the final checkpoint: the steps are done
        peak.append(vm_hwm_bytes())

    loop.save_checkpoint = record_peak_instead_of_saving
    run = d / "ours-run"
    argv = ["--stage", "grpo", "--model", str(d / "model"), "--tokenizer", str(d / "tok-no-eos"),
            "--chat-template", TEMPLATE,
            "--data", str(d / "prompts.jsonl"), "--out", str(run), "--max-steps", str(steps), "--warmup-steps", "0",
            "--prompts-per-step", str(PROMPTS_PER_STEP), "--group-size", str(GROUP),
            "--max-new-tokens", str(NEW_TOKENS), "--reward", "bench.grpo_step:random_reward", "--reward-workers", "0",
            "--beta", str(BETA), "--lr", str(LR), "--sampler-batch-size", str(PROMPTS_PER_STEP * GROUP),
            "--log-every-s", "1000", "--compile", compile]
    assert train.main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response_length/min"] == NEW_TOKENS for r in rows), "completions must all be 64 tokens"
    last = rows[-1]
    return {"step_s": [r["step_s"] for r in rows], "rollout_s": last["time/rollout"],
            "logprobs_s": last.get("time/logprobs", float("nan")), "train_s": last["time/train"],
            "peak_bytes": peak[-1]}


def child_trl(d: Path, steps: int, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    rows = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
    config = GRPOConfig(output_dir=str(d / "trl-run"), use_cpu=True, bf16=False, max_steps=steps,
                        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
                        num_generations=GROUP, max_completion_length=NEW_TOKENS, beta=BETA, learning_rate=LR,
                        temperature=1.0, top_p=1.0, generation_kwargs={"min_new_tokens": NEW_TOKENS},
                        gradient_checkpointing=gradient_checkpointing, lr_scheduler_type="constant",
                        warmup_steps=0, save_strategy="no", report_to=[], logging_steps=1, seed=0,
                        dataloader_num_workers=0, use_vllm=False, model_init_kwargs={"dtype": torch.float32})
    timer = StepTimer()
    trainer = GRPOTrainer(model=str(d / "model"), reward_funcs=random_reward, args=config,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(d / "model"), callbacks=[timer])
    trainer.train()
    lengths = [h["completions/min_length"] for h in trainer.state.log_history if "completions/min_length" in h]
    assert lengths and all(n == NEW_TOKENS for n in lengths), f"TRL completion lengths {lengths}"
    return {"step_s": timer.times, "peak_bytes": vm_hwm_bytes()}


def run_child(side: str, d: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--assets", str(d),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    if args.trl_keep_host_memory:
        cmd.append("--trl-keep-host-memory")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each side")
    p.add_argument("--steps", type=int, default=2, help="GRPO steps per run (the last one is timed)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL with its default checkpointing")
    p.add_argument("--trl-keep-host-memory", action="store_true",
                   help="give TRL's process the malloc tuning train.py applies to ours (runtime/host_memory.py)")
    p.add_argument("--child", choices=("ours", "ours-compiled", "trl"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--assets", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child is not None:
        import torch
        torch.set_num_threads(args.threads)
        d = Path(args.assets)
        if args.child == "trl":
            if args.trl_keep_host_memory:
                sys.path.insert(0, str(ROOT))
                from runtime.host_memory import keep_freed_host_memory
                assert keep_freed_host_memory(), "the malloc tuning did not apply (not glibc, or MALLOC_*_ set)"
            result = child_trl(d, args.steps, args.trl_gradient_checkpointing)
        else:
            result = child_ours(d, args.steps, "on" if args.child == "ours-compiled" else "off")
        print(json.dumps(result))
        return 0

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime}")
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        d = Path(tmp)
        assets = make_assets(d, args.steps)
        results = {"ours": [], "ours-compiled": [], "trl": []}
        big, small = [], []
        order = ("ours", "ours-compiled", "trl")
        for r in range(args.rounds):
            for side in (order if r % 2 == 0 else order[::-1]):
                res = run_child(side, d, args)
                results[side].append(res)
                print(f"round {r + 1} {side}: steps {', '.join(f'{t:.1f}' for t in res['step_s'])} s, "
                      f"peak {res['peak_bytes'] / 2**30:.2f} GiB", flush=True)
                rate_big, rate_small = gemm_rates(args.threads)
                big.append(rate_big)
                small.append(rate_small)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    med = statistics.median
    ours_s, trl_s = med([r["step_s"][-1] for r in results["ours"]]), med([r["step_s"][-1] for r in results["trl"]])
    ours_m, trl_m = med([r["peak_bytes"] for r in results["ours"]]), med([r["peak_bytes"] for r in results["trl"]])
    comp_s = med([r["step_s"][-1] for r in results["ours-compiled"]])
    comp_m = med([r["peak_bytes"] for r in results["ours-compiled"]])
    comp_first = med([r["step_s"][0] for r in results["ours-compiled"]])
    comp_train_s = med([r["train_s"] for r in results["ours-compiled"]])
    comp_logprobs_s = med([r["logprobs_s"] for r in results["ours-compiled"]])
    rate_big, rate_small = med(big), med(small)
    n_mm, prompt_tokens = assets["n_mm"], assets["prompt_tokens"]
    seqs = PROMPTS_PER_STEP * GROUP
    trained_tokens, generated_tokens = seqs * (prompt_tokens + NEW_TOKENS), seqs * NEW_TOKENS
    floor_train = 6 * n_mm * trained_tokens / rate_big
    floor_gen = 2 * n_mm * generated_tokens / rate_small
    floor_ref = 2 * n_mm * trained_tokens / rate_big
    floor = floor_train + floor_gen
    rollout_s, train_s = med([r["rollout_s"] for r in results["ours"]]), med([r["train_s"] for r in results["ours"]])
    logprobs_s = med([r["logprobs_s"] for r in results["ours"]])

    print(f"\nGRPO step: {PROMPTS_PER_STEP} prompts x {GROUP} = {seqs} completions of {NEW_TOKENS} tokens, prompts "
          f"{prompt_tokens} tokens, beta {BETA}; model {assets['params'] / 1e6:.1f}M parameters ({n_mm / 1e6:.1f}M in "
          f"matmuls), fp32, {args.threads} threads; medians over {args.rounds} rounds")
    print(f"GEMM rates: [4096, 768] x [768, 2048] {rate_big / 1e9:.1f} GFLOP/s, [64, 768] x [768, 2048] "
          f"{rate_small / 1e9:.1f} GFLOP/s")
    print(f"{'':34}{'step s':>10}{'peak GiB':>10}")
    print(f"{'ours (train.py --stage grpo)':34}{ours_s:>10.1f}{ours_m / 2**30:>10.2f}")
    print(f"{'  of which rollout / ref / train':34}{rollout_s:>5.1f} / {logprobs_s:.1f} / {train_s:.1f}")
    print(f"{'ours --compile on':34}{comp_s:>10.1f}{comp_m / 2**30:>10.2f}   (first step {comp_first:.1f} s: "
          f"the compile warm-up)")
    print(f"{'  of which ref / train':34}{comp_logprobs_s:>5.1f} / {comp_train_s:.1f}")
    print(f"{'TRL GRPOTrainer' + (' (grad ckpt)' if args.trl_gradient_checkpointing else '') + (' (kept malloc)' if args.trl_keep_host_memory else ''):34}"
          f"{trl_s:>10.1f}{trl_m / 2**30:>10.2f}")
    print(f"{'floor: train 6NT + sampler 2NT':34}{floor:>10.1f}     (train {floor_train:.1f}, sampler "
          f"{floor_gen:.1f}; + reference forward {floor_ref:.1f})")
    print(f"speed-up {trl_s / ours_s:.2f}x eager, {trl_s / comp_s:.2f}x compiled (goal >= 1.6), memory "
          f"{ours_m / trl_m:.2f}x / {comp_m / trl_m:.2f}x of TRL's (goal <= 0.6), ours / floor {ours_s / floor:.2f} "
          f"eager, {comp_s / floor:.2f} compiled ({comp_s / (floor + floor_ref):.2f} with the reference forward)")
    print(f"uptime after: {uptime_after}")
    print(json.dumps({"bench": "grpo_step", "rounds": args.rounds, "threads": args.threads,
                      "ours_step_s": ours_s, "trl_step_s": trl_s, "speedup": trl_s / ours_s,
                      "ours_peak_bytes": ours_m, "trl_peak_bytes": trl_m, "memory_ratio": ours_m / trl_m,
                      "ours_rollout_s": rollout_s, "ours_logprobs_s": logprobs_s, "ours_train_s": train_s,
                      "compiled_step_s": comp_s, "compiled_speedup": trl_s / comp_s, "compiled_peak_bytes": comp_m,
                      "compiled_memory_ratio": comp_m / trl_m, "compiled_first_step_s": comp_first,
                      "compiled_train_s": comp_train_s, "compiled_logprobs_s": comp_logprobs_s,
                      "floor_s": floor,
                      "floor_train_s": floor_train, "floor_sampler_s": floor_gen, "floor_ref_s": floor_ref,
                      "gemm_flops_big": rate_big, "gemm_flops_decode": rate_small,
                      "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                      "trl_keep_host_memory": args.trl_keep_host_memory,
                      "all": results, "uptime_before": uptime, "uptime_after": uptime_after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
