"""The tool-tiny recipe: RL that teaches a tiny model to call a calculator mid-reasoning, on the CPU.

    torchrun --nproc_per_node 2 train.py --recipe tool-tiny      # writes runs/tool-tiny/

Stages (each its own run directory under runs/tool-tiny/, each evaluated on the same held-out
problems with the tool available, figures in runs/tool-tiny/summary.json):

  data      3-digit x 3-digit multiplications (data/tasks.py): a pretraining corpus in which most
            examples answer "in the head" (a near miss: the model cannot multiply, and the corpus
            says so) and a few call the calculator in the fenced format (envs/formats.py), half of
            those with an operand miscopied into the call; RL prompts; held-out problems never seen
            in training; a byte-level BPE
  base      pretrain a tiny dense Qwen2-style model on the corpus
  tool_rl   GRPO from the base with --tools calculator: a rollout that writes a call pauses at the
            closing fence, the calculator's output is appended (masked out of the loss) and the
            rollout decodes on from its own cache; rewards: the task checker and the R1 format

What RL can do here: the base mostly answers in its head and is wrong; the samples that call the
tool and copy the operands right are the ones rewarded, so the policy comes to call the tool, and
to copy carefully.

Evaluation of every stage: sampled (T = 1, mean of 4) and greedy accuracy, strict (the task checker
times the format) and lenient (the answer right whatever the format), and tool_share, the share of
sampled answers that called the tool.

Settings (RECIPE below) and what they gave, on 2 CPU cores (2 ranks), 200 held-out problems:
- corpus: 20,000 multiplications; 30% call the calculator, 30% of those with a miscopied operand;
  the rest answer in the head, right 5% of the time. Base: the tiny-sft preset (dense, 8 heads of
  16, 0.44M parameters), 600 steps of 128 at lr 2e-3. The 4-head tiny preset after 400 steps called
  the tool in 24% of its samples but never copied an operand or the result right (0% accuracy, and
  RL then dropped the tool, 24% -> 4%): the 8 heads learn the copy.
- tool_rl: GRPO, 16 prompts x 8 samples a step, 60 steps, lr 1e-4 constant, no KL, rewards task +
  format, up to 48 model tokens and 72 tokens in all, at most 2 calls.

    seed  stage    sampled  greedy  lenient (sampled / greedy)  tool_share  wall
    0     base     0.186    0.000   0.186 / 0.000               0.297
          tool_rl  0.922    0.995   0.924 / 0.995               0.990       249 s in all
    1     base     0.199    0.000   0.199 / 0.000               0.311
          tool_rl  0.891    0.995   0.891 / 0.995               0.994       278 s
    2     base     0.201    0.000   0.201 / 0.000               0.296
          tool_rl  0.931    1.000   0.931 / 1.000               0.988       343 s (a busier machine)

The base's greedy answer is its head guess (it never calls the tool greedily); after RL nearly every
sample calls the calculator with the operands copied right and reads the answer off its output.
runs/tool-tiny/tool_rl_curves.png plots reward, accuracy and calls per rollout against step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from recipes.flags import stage_args
from recipes.stages import run_recipe_stage
from runtime.distributed import DistInfo, barrier, print0
from runtime.rundir import write_json_atomic

TEMPLATE = "r1-zero-short"
TOOLS = "calculator"

RECIPE = {
    "data": dict(corpus_rows=20000, tool_rate=0.3, miscopy=0.3, head_right=0.05, prompt_rows=5000, heldout_rows=200,
                 vocab_size=384),
    "base": dict(stage="pretrain", preset="tiny-sft", max_steps=600, batch_size=128, micro_batch_size=128,
                 seq_len=512, lr=2e-3, warmup_steps=20, min_lr_ratio=0.1),
    "tool_rl": dict(stage="grpo", prompts_per_step=16, group_size=8, temperature=1.0, max_new_tokens=48,
                    max_rollout_tokens=72, max_tool_calls=2, tools=TOOLS, lr=1e-4, warmup_steps=0,
                    lr_schedule="constant", beta=0.0, reward="task,format", reward_workers=0,
                    micro_batch_tokens=8192, sampler_batch_size=128, max_steps=60),
    "eval": dict(samples=4, temperature=1.0, max_new_tokens=48, max_rollout_tokens=72, batch_size=128),
}

SMOKE = {
    "data": dict(corpus_rows=400, prompt_rows=200, heldout_rows=8),
    "base": dict(max_steps=3, batch_size=8, micro_batch_size=8, warmup_steps=0),
    "tool_rl": dict(prompts_per_step=2, group_size=2, max_new_tokens=8, max_rollout_tokens=16, max_steps=1),
    "eval": dict(samples=2, max_new_tokens=8, max_rollout_tokens=16),
}


def _settings(smoke: bool) -> dict:
    return {k: {**v, **SMOKE.get(k, {})} for k, v in RECIPE.items()} if smoke else RECIPE


def _make_data(root: Path, seed: int, info: DistInfo, R: dict) -> dict:
    from data.tasks import arithmetic_problems, tool_use_corpus, write_jsonl
    from data.tokenizer import Tokenizer

    d = R["data"]
    paths = {k: root / f for k, f in (("corpus", "corpus.jsonl"), ("prompts", "prompts.jsonl"),
                                       ("heldout", "heldout.jsonl"), ("tokenizer", "tokenizer"))}
    if info.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        corpus = tool_use_corpus(d["corpus_rows"], seed, tool_rate=d["tool_rate"], miscopy=d["miscopy"],
                                 head_right=d["head_right"], template=TEMPLATE)
        write_jsonl(corpus, paths["corpus"], force=True)
        write_jsonl(arithmetic_problems(d["prompt_rows"], seed + 1, ops=("*",)), paths["prompts"], force=True)
        write_jsonl(arithmetic_problems(d["heldout_rows"], seed + 2, ops=("*",), split="test"), paths["heldout"],
                    force=True)
        Tokenizer.train((r["text"] for r in corpus), vocab_size=d["vocab_size"]).save(paths["tokenizer"])
    barrier()
    return paths


def _evaluate(model_dir: Path, tok, rows, info: DistInfo, R: dict) -> dict:
    """Held-out figures of one stage's model, with the calculator available."""
    from envs import ToolEnvironment
    from evaluation.evaluate import evaluate_sharded
    from model.checkpoint import load_pretrained

    e = R["eval"]
    model = load_pretrained(model_dir, device=info.device).eval()
    env = ToolEnvironment([TOOLS], max_calls=R["tool_rl"]["max_tool_calls"])
    common = dict(max_new_tokens=e["max_new_tokens"], template=TEMPLATE, max_batch_size=e["batch_size"], env=env,
                  max_total_tokens=e["max_rollout_tokens"])
    sampled = evaluate_sharded(model, tok, rows, "arithmetic", info.rank, info.world_size, n=e["samples"],
                               temperature=e["temperature"], seed=1, **common)
    greedy = evaluate_sharded(model, tok, rows, "arithmetic", info.rank, info.world_size, n=1, temperature=0.0,
                              **common)
    return {"accuracy": sampled.accuracy, "greedy_accuracy": greedy.accuracy,
            "lenient_accuracy": sampled.lenient_accuracy, "greedy_lenient_accuracy": greedy.lenient_accuracy,
            "tool_share": sampled.tool_share, "greedy_tool_share": greedy.tool_share,
            "response_length": sampled.mean_length}


def run_tool_tiny(args, run, info: DistInfo) -> int:
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
               f"{figures['lenient_accuracy']:.3f}), tool share {figures['tool_share']:.3f}, {entry['wall_s']:.0f}s")
        if info.rank == 0:
            write_json_atomic(root / "summary.json", {**summary, "wall_s": time.perf_counter() - t_start})
        return model_dir

    base = stage("base", stage_args(R["base"], data=str(paths["corpus"]), **common))
    stage("tool_rl", stage_args(R["tool_rl"], model=str(base), data=str(paths["prompts"]), **common))
    summary["wall_s"] = time.perf_counter() - t_start
    if info.rank == 0:
        write_json_atomic(root / "summary.json", summary)
        _plots(root)
        print0(json.dumps({s["name"]: {k: round(s[k], 3) for k in ("accuracy", "greedy_accuracy", "tool_share")}
                           for s in summary["stages"]}))
    return 0


def _plots(root: Path) -> None:
    """Reward, accuracy and tool calls per rollout against step of the tool_rl stage."""
    from recipes.plots import pyplot
    from runtime.metrics import read_metrics

    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in read_metrics(root / "tool_rl" / "metrics.jsonl") if "reward/mean" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("reward/mean", "accuracy", "tool/calls_per_rollout")):
        ax.plot([r["step"] for r in rows], [r.get(key) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(root / "tool_rl_curves.png", dpi=100)
    print0(f"plots: {root / 'tool_rl_curves.png'}")
