"""The r1-tiny recipe: DeepSeek-R1's stages at toy scale, the default of `torchrun train.py`.

    torchrun --nproc_per_node 2 train.py            # writes runs/r1-tiny/

Stages (each its own run directory under runs/r1-tiny/, each evaluated on the same held-out
problems, figures in runs/r1-tiny/summary.json):

  data            synthetic 3-digit addition (data/tasks.py): a pretraining corpus of worked
                  examples with a systematic carry bug in most of them, RL prompts, held-out
                  problems never seen in training, and a byte-level BPE with <think>/<answer>
  base            pretrain a tiny DeepSeek-V3-architecture model (MLA + DeepSeekMoE) on the corpus
  r1_zero         R1-Zero: GRPO from the base with accuracy (task checker) + format rewards
  (generate)      rejection sampling from r1_zero: keep correct, well-formatted traces
  cold_start_sft  SFT of the base (a fresh copy, not r1_zero) on those traces (R1's cold start)
  reasoning_rl    GRPO from cold_start_sft
  (generate)      rejection sampling from reasoning_rl
  rejection_sft   SFT of the base on those samples
  final_rl        GRPO from rejection_sft
  (generate)      rejection sampling from final_rl: the distillation data
  student         SFT of a smaller dense Qwen2-style model (fresh weights, the tiny-sft preset) on
                  final_rl's traces (the R1-Distill recipe)

What RL can do here: the base copies the corpus, so it mostly makes the carry bug; RL rewards the
samples that do carry and the model comes to carry. The rejection-sampled traces are then all
correct, so SFT on them teaches the carry directly, and each later stage starts higher.

Settings, as measured on 2 CPU cores (2 ranks; seeds 0-2: 10-12 minutes in all, 4-5 of them the
base's pretraining):
- GRPO lr 5e-5. At 1e-4 (what lifts the dense tiny base of scripts/grpo_arithmetic.py from 14%
  to 99% greedy) the MoE base gets worse: accuracy falls and entropy rises within 10 steps. It is
  not the routing: with the router frozen, or all experts and routers frozen, it falls as well;
  the sampler's log-probs equal the trainer's (1e-5) and the policy gradient passes a
  finite-difference check, so the update is right and its size is what this model does not take.
- Rejection sampling over 2048 prompts x 4 samples, at most 2 kept per prompt (about 2,000 traces
  a round); SFT stages 80 steps of 64 at lr 1e-3 from the base.
- The student learns from scratch: 800 steps of 32 at lr 3e-3 (the tiny-sft preset, 8 heads of
  16, finds the digit alignment in about half the steps of the 4-head tiny preset).

A second run never overwrites the first: an existing runs/r1-tiny is moved aside with a
timestamp suffix (runtime.rundir), and the console says so.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from recipes.flags import stage_args
from recipes.stages import check_stage, run_recipe_stage, run_stage
from runtime.distributed import DistInfo, barrier, print0
from runtime.rundir import RunDir, write_json_atomic

# The prompt: R1-Zero's template with a one-line system text (data.templates.R1_ZERO_SHORT_SYSTEM). R1's
# own system prompt is about 85 of the ~145 tokens of an example here, and every stage pays for it.
TEMPLATE = "r1-zero-short"

# The recipe's settings: one dict per stage, flags of train.py (dashes as underscores).
RECIPE = {
    "data": dict(corpus_rows=20000, carry_bug=0.7, wrong_answer=0.05, missing_tags=0.05, prompt_rows=5000,
                 heldout_rows=200, vocab_size=512),
    "base": dict(stage="pretrain", preset="tiny-moe", max_steps=400, batch_size=128, micro_batch_size=128,
                 seq_len=512, lr=2e-3, warmup_steps=20, min_lr_ratio=0.1),
    "rl": dict(stage="grpo", prompts_per_step=16, group_size=8, temperature=1.0, max_new_tokens=64, lr=5e-5,
               warmup_steps=0, lr_schedule="constant", beta=0.0, reward="task,format", reward_workers=0,
               micro_batch_tokens=8192, sampler_batch_size=128),
    "r1_zero": dict(max_steps=40),
    "reasoning_rl": dict(max_steps=30),
    "final_rl": dict(max_steps=30),
    "generate": dict(gen_n=4, gen_temperature=1.0, gen_top_p=1.0, gen_max_new_tokens=64, num_prompts=2048,
                     keep_if="task>=1,format>=1", max_per_prompt=2, reward="task,format", reward_workers=1,
                     gen_batch_prompts=128, sampler_batch_size=128),
    "sft": dict(stage="sft", batch_size=64, micro_batch_size=64, seq_len=512, lr=1e-3, warmup_steps=5,
                min_lr_ratio=0.1),
    "cold_start_sft": dict(max_steps=80),
    "rejection_sft": dict(max_steps=80),
    "student": dict(preset="tiny-sft", max_steps=800, batch_size=32, micro_batch_size=32, lr=3e-3, warmup_steps=10),
    "eval": dict(samples=4, temperature=1.0, max_new_tokens=64, batch_size=128),
}


# --recipe-smoke: every stage for a few steps on small data (checks that the stages chain; not the figures)
SMOKE = {
    "data": dict(corpus_rows=400, prompt_rows=200, heldout_rows=8),
    "base": dict(max_steps=3, batch_size=8, micro_batch_size=8),
    "rl": dict(prompts_per_step=2, group_size=2, max_new_tokens=8),
    "r1_zero": dict(max_steps=1), "reasoning_rl": dict(max_steps=1), "final_rl": dict(max_steps=1),
    "generate": dict(gen_n=2, num_prompts=8, gen_max_new_tokens=8, keep_if="none"),
    "sft": dict(batch_size=4, micro_batch_size=4),
    "cold_start_sft": dict(max_steps=1), "rejection_sft": dict(max_steps=1),
    "student": dict(max_steps=1, batch_size=4, micro_batch_size=4),
    "eval": dict(samples=2, max_new_tokens=8),
}


def _settings(smoke: bool) -> dict:
    if not smoke:
        return RECIPE
    out = {k: {**v, **SMOKE.get(k, {})} for k, v in RECIPE.items()}
    for name in ("base", "sft", "student", "cold_start_sft", "rejection_sft"):
        if "warmup_steps" in out[name]:
            out[name]["warmup_steps"] = 0
    return out


def _make_data(root: Path, seed: int, info: DistInfo, R: dict) -> dict:
    """The task data and tokenizer (rank 0 writes; everyone gets the paths)."""
    from data.tasks import arithmetic_problems, pretraining_corpus, write_jsonl
    from data.tokenizer import Tokenizer

    d = R["data"]
    paths = {k: root / f for k, f in (("corpus", "corpus.jsonl"), ("prompts", "prompts.jsonl"),
                                       ("heldout", "heldout.jsonl"), ("tokenizer", "tokenizer"))}
    if info.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        corpus = pretraining_corpus("arithmetic", d["corpus_rows"], seed, carry_bug=d["carry_bug"],
                                    wrong_answer=d["wrong_answer"], missing_tags=d["missing_tags"], template=TEMPLATE)
        write_jsonl(corpus, paths["corpus"], force=True)
        write_jsonl(arithmetic_problems(d["prompt_rows"], seed + 1), paths["prompts"], force=True)
        write_jsonl(arithmetic_problems(d["heldout_rows"], seed + 2, split="test"), paths["heldout"], force=True)
        tok = Tokenizer.train((r["text"] for r in corpus), vocab_size=d["vocab_size"])
        tok.save(paths["tokenizer"])
    barrier()
    return paths


def _hf_dir(run_path: Path) -> Path:
    from runtime.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_path)
    if ckpt is None:
        raise RuntimeError(f"{run_path}: the stage finished without a checkpoint")
    return ckpt / "hf"


def _evaluate(model_dir: Path, tok, rows, info: DistInfo, R: dict) -> dict:
    """Held-out accuracy of one stage's model: sampled (temperature 1, mean over n) and greedy, strict and lenient."""
    from evaluation.evaluate import evaluate_sharded
    from model.checkpoint import load_pretrained
    from model.stats import count_params

    e = R["eval"]
    model = load_pretrained(model_dir, device=info.device).eval()
    sampled = evaluate_sharded(model, tok, rows, "arithmetic", info.rank, info.world_size, n=e["samples"],
                               temperature=e["temperature"], max_new_tokens=e["max_new_tokens"], template=TEMPLATE,
                               max_batch_size=e["batch_size"], seed=1)
    greedy = evaluate_sharded(model, tok, rows, "arithmetic", info.rank, info.world_size, n=1, temperature=0.0,
                              max_new_tokens=e["max_new_tokens"], template=TEMPLATE, max_batch_size=e["batch_size"])
    return {"accuracy": sampled.accuracy, "greedy_accuracy": greedy.accuracy,
            "lenient_accuracy": sampled.lenient_accuracy, "greedy_lenient_accuracy": greedy.lenient_accuracy,
            "response_length": sampled.mean_length, "params": count_params(model).total}


def _generate(name: str, root: Path, model_dir: Path, paths: dict, seed: int, info: DistInfo,
              R: dict) -> Path:
    """Rejection sampling from `model_dir` over the first prompts; each rank takes a share; one merged file."""
    from data.datasets import read_jsonl
    from data.tasks import write_jsonl

    g = R["generate"]
    out_dir = root / name
    prompts = read_jsonl(paths["prompts"])[-g["num_prompts"]:]  # the RL steps read prompts in a shuffled order
    shard_dir = out_dir / f"rank{info.rank}"
    if info.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    write_jsonl(prompts[info.rank::info.world_size], out_dir / f"prompts-rank{info.rank}.jsonl", force=True)
    args = stage_args({k: v for k, v in g.items() if k != "num_prompts"}, stage="generate",
                      model=str(model_dir), tokenizer=str(paths["tokenizer"]), chat_template=TEMPLATE,
                      data=str(out_dir / f"prompts-rank{info.rank}.jsonl"), seed=seed, log_every_s=30.0)
    # each rank generates its share as a single process into its own directory (prepare_run_dir is
    # collective, so the directory is made here)
    local = DistInfo(rank=0, world_size=1, local_rank=0, device=info.device, backend=None)
    check_stage(args, local, log=print0)
    shard_dir.mkdir(parents=True, exist_ok=False)
    run_stage(args, RunDir(shard_dir, moved_to=None, resumed=False), local)
    barrier()
    merged = out_dir / "generated.jsonl"
    if info.rank == 0:
        rows = [r for k in range(info.world_size) for r in read_jsonl(out_dir / f"rank{k}" / "generated.jsonl")]
        write_jsonl(rows, merged, force=True)
        print0(f"{name}: {len(rows)} traces kept from {len(prompts)} prompts x {g['gen_n']} samples")
    barrier()
    return merged


def run_r1_tiny(args, run, info: DistInfo) -> int:
    from data.datasets import read_jsonl
    from data.tokenizer import load_tokenizer

    root, seed = run.path, args.seed
    R = _settings(args.recipe_smoke)
    t_start = time.perf_counter()
    paths = _make_data(root / "data", seed, info, R)
    tok = load_tokenizer(paths["tokenizer"])
    heldout = read_jsonl(paths["heldout"])
    summary = {"eval_problems": len(heldout), "seed": seed, "world_size": info.world_size, "stages": []}
    common = dict(tokenizer=str(paths["tokenizer"]), chat_template=TEMPLATE, seed=seed, log_every_s=10.0)

    def stage(name: str, args) -> Path:
        t0 = time.perf_counter()
        _, model_dir = run_recipe_stage(name, args, root, info)
        figures = _evaluate(model_dir, tok, heldout, info, R)
        entry = {"name": name, **figures, "wall_s": time.perf_counter() - t0, "model": str(model_dir)}
        summary["stages"].append(entry)
        print0(f"{name}: accuracy {figures['accuracy']:.3f} (greedy {figures['greedy_accuracy']:.3f}, lenient "
               f"{figures['lenient_accuracy']:.3f}), {figures['params'] / 1e6:.2f}M parameters, {entry['wall_s']:.0f}s")
        if info.rank == 0:
            write_json_atomic(root / "summary.json", {**summary, "wall_s": time.perf_counter() - t_start})
        return model_dir

    def rl(name, model_dir):
        return stage(name, stage_args({**R["rl"], **R[name]}, model=str(model_dir), data=str(paths["prompts"]),
                                      **common))

    def sft(name, data, **kw):
        return stage(name, stage_args({**R["sft"], **R[name]}, data=str(data), **{**common, **kw}))

    base = stage("base", stage_args(R["base"], data=str(paths["corpus"]), **common))
    r1_zero = rl("r1_zero", base)
    traces = _generate("generate_r1_zero", root, r1_zero, paths, seed, info, R)
    cold = sft("cold_start_sft", traces, model=str(base))  # R1: the cold start fine-tunes the base, not R1-Zero
    reasoning = rl("reasoning_rl", cold)
    samples = _generate("generate_reasoning_rl", root, reasoning, paths, seed + 1, info, R)
    rejection = sft("rejection_sft", samples, model=str(base))  # R1: the base again, on the new samples
    final = rl("final_rl", rejection)
    distill = _generate("generate_final_rl", root, final, paths, seed + 2, info, R)
    sft("student", distill)
    summary["wall_s"] = time.perf_counter() - t_start
    if info.rank == 0:
        write_json_atomic(root / "summary.json", summary)
        _plots(root, summary)
        print0(json.dumps({s["name"]: round(s["accuracy"], 3) for s in summary["stages"]}))
    return 0


def _plots(root: Path, summary: dict) -> None:
    """The RL stages' curves (reward, accuracy with the held-out evaluations marked, length, KL,
    entropy) and the held-out accuracy per stage (recipes/plots.py)."""
    from recipes.plots import accuracy_bars, rl_curves
    from runtime.metrics import read_metrics

    rl = [(s["name"], read_metrics(root / s["name"] / "metrics.jsonl"), s) for s in summary["stages"]
          if s["name"].endswith(("rl", "zero"))]
    curves = rl_curves(rl, root / "rl_curves.png")
    bars = accuracy_bars(summary["stages"], root / "accuracy_per_stage.png")
    if curves and bars:
        print0(f"plots: {curves}, {bars}")
