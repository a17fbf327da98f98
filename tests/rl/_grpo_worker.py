"""Helpers of the GRPO tests: a tiny model folder and prompt file, rewards with a signal, and the
two-rank worker.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/rl/_grpo_worker.py \\
        --model DIR --prompts P.jsonl --out OUT

Under torchrun (gloo) the worker
 1. loads the model folder on both ranks, shards it with model.parallel.apply_fsdp, and generates
    the rollouts of its share of the prompts (rank r: prompts[r::2], seed ROLLOUT_SEED + r) inside
    gathered(model); rank 0 gathers every rank's token ids, log-probs and finish reasons and writes
    them to OUT/rollouts.json (the test compares them with a one-process run on the same prompts);
 2. runs train.py's GRPO stage for 2 steps on both ranks into OUT/grpo (FSDP, the reference model,
    dynamic sampling over prompts where rank 1's first ones have a constant reward, so the ranks need
    different numbers of sampling rounds), whose metrics.jsonl and summary.json the test reads.
With --rollout-tp-run, step 1 samples with the model split over the two ranks by tensor parallelism
(OUT/rollouts_tp.json) and step 2 runs the GRPO stage with --rollout-tp 2 (OUT/grpo_tp).

A random model rarely earns the task rewards, so every advantage would be 0 and training would not
move. `token_parity` gives a reward that varies within a group (1 when the completion's token ids sum
to an even number): the gradient is then not zero, which is what the loop tests need.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROLLOUT_SEED = 7
GROUP_SIZE = 4
MAX_NEW_TOKENS = 12
# Spec of the parity reward for --reward ("package.module:function": importable by reward workers too)
PARITY_REWARD = "tests.rl._grpo_worker:token_parity"
FIXED_REWARD = "tests.rl._grpo_worker:parity_unless_fixed"


# ---- rewards ------------------------------------------------------------------------------------

def token_parity(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]:
    """1.0 when the completion's token ids sum to an even number, else 0.0."""
    return [1.0 if sum(ids) % 2 == 0 else 0.0 for ids in completion_ids]


def fixed_or_none(completions: list[str], fixed=None, **columns) -> list[float | None]:
    """The row's `fixed` value, None (no signal) for rows without one."""
    return list(fixed) if fixed is not None else [None] * len(completions)


def parity_unless_fixed(completions: list[str], completion_ids: list[list[int]], fixed=None,
                        **columns) -> list[float]:
    """The row's `fixed` value where the prompt row has one (the same reward for its whole group: zero
    std, no gradient), else token_parity."""
    fixed = fixed if fixed is not None else [None] * len(completions)
    parity = token_parity(completions, completion_ids)
    return [float(f) if f is not None else p for f, p in zip(fixed, parity)]


# ---- a tiny model folder and prompts ------------------------------------------------------------

def write_prompts(path: Path, n: int, seed: int = 0, fixed_every: int = 0, fixed_rows=()) -> list[dict]:
    """n arithmetic prompt rows as JSONL; every fixed_every-th row (when > 0) and the rows in fixed_rows
    get `fixed`: 1.0."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        row = {"id": f"p{i}", "task": "arithmetic", "prompt": f"What is {a} + {b}?", "answer": str(a + b)}
        if (fixed_every and i % fixed_every == 0) or i in fixed_rows:
            row["fixed"] = 1.0
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_model_dir(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A Qwen2-style model (hidden `hidden`, `layers` layers, 4 heads, 2 KV heads, tied embeddings) and a
    byte-level BPE tokenizer trained on arithmetic text and the R1-Zero system prompt, saved as one
    Hugging Face folder. Returns (model, tokenizer)."""
    from data.templates import R1_ZERO_SYSTEM
    from data.tokenizer import Tokenizer
    from model.checkpoint import save_pretrained
    from model.config import ModelConfig
    from model.transformer import Transformer

    rng = random.Random(seed)
    corpus = [R1_ZERO_SYSTEM] * 4 + [
        f"User: What is {a} + {b}?\nAssistant: <think>{a} + {b} = {a + b}</think> <answer>{a + b}</answer>"
        for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(200))]
    tok = Tokenizer.train(corpus, vocab_size=320, min_frequency=1)
    config = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(config)
    save_pretrained(model, path, tokenizer=tok)
    return model, tok


def rollout_params():
    from sampling.sampler import SamplingParams

    return SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)


def step_metric_keys(reward_specs: list[str]) -> list[str]:
    """The keys every GRPO step's metrics line must hold (the issue's list) for a run scoring reward_specs
    (the accuracy comes from the "task" reward)."""
    return ["reward/mean", "reward/std", *(f"reward/{r}" for r in reward_specs), "accuracy", "frac_groups_zero_std",
            "response_length/mean", "response_length/min", "response_length/max", "truncated", "kl", "entropy",
            "clip_ratio", "clip_ratio/low", "clip_ratio/high", "grad_norm", "lr", "time/rollout", "time/reward",
            "time/logprobs", "time/train", "tokens_per_s"]


def grpo_argv(model_dir, prompts, out, *extra) -> list[str]:
    """train.py flags of a short GRPO run on the tiny model (the tests add or override flags in `extra`)."""
    return ["--stage", "grpo", "--model", str(model_dir), "--chat-template", "r1-zero", "--data", str(prompts),
            "--out", str(out), "--max-steps", "2", "--warmup-steps", "0", "--prompts-per-step", "4",
            "--group-size", str(GROUP_SIZE), "--max-new-tokens", str(MAX_NEW_TOKENS), "--reward",
            f"{PARITY_REWARD},format", "--reward-workers", "0", "--beta", "0.04", "--lr", "1e-3",
            "--sampler-batch-size", "16", "--log-every-s", "1000", *map(str, extra)]


def crash_at_step_3_then_resume(monkeypatch, argv: list[str]) -> None:
    """train.main(argv) crashing in the rollout of step 3 (one rollout round per step without dynamic
    sampling), then train.main(argv + --resume) in the same process, with the global generator
    disturbed in between (the resume restores it from the checkpoint)."""
    import pytest

    import train
    from rl import loop

    real, calls = loop.generate_rollouts, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "generate_rollouts", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(argv)
    monkeypatch.setattr(loop, "generate_rollouts", real)
    torch.manual_seed(12345)
    assert train.main([*argv, "--resume"]) == 0


# ---- the two-rank worker ------------------------------------------------------------------------

def main() -> int:
    import train
    from data.datasets import read_jsonl
    from data.tokenizer import load_tokenizer
    from model.checkpoint import load_pretrained
    from model.parallel import apply_fsdp, gathered
    from model.tensor_parallel import TensorParallelRollout
    from rl.rollout import generate_rollouts
    from runtime.distributed import all_gather_object, barrier, init_distributed, subgroup
    from sampling.sampler import Sampler

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--activation-checkpointing-run", action="store_true",
                   help="only the GRPO run again, with --activation-checkpointing, into OUT/grpo_ac")
    p.add_argument("--rollout-tp-run", action="store_true",
                   help="the rollouts of step 1 with the model split over the 2 ranks (OUT/rollouts_tp.json), "
                   "then the GRPO run again with --rollout-tp 2, into OUT/grpo_tp")
    args = p.parse_args()
    out = Path(args.out)
    common = ("--dynamic-sampling", "--reward", f"{FIXED_REWARD},format,task", "--eval-data", args.prompts,
              "--eval-problems", 4, "--eval-max-new-tokens", 8, "--eval-samples", 1)
    if args.activation_checkpointing_run:   # a launch of its own: a process group is joined once per process
        return train.main(grpo_argv(args.model, out / "grpo_prompts.jsonl", out / "grpo_ac", *common,
                                    "--activation-checkpointing"))

    info = init_distributed()
    assert info.world_size == 2, f"run under torchrun with 2 processes, got world size {info.world_size}"
    tok = load_tokenizer(None, args.model)
    model = load_pretrained(args.model)
    apply_fsdp(model)
    rows = read_jsonl(args.prompts)[info.rank::info.world_size]
    if args.rollout_tp_run:   # each rank passes its own prompts; the pair samples them as one batch
        rollout = TensorParallelRollout(model, subgroup(2))
        with rollout.weights() as policy:
            sampler = Sampler(policy, max_batch_size=8, max_seq_len=256, tokenizer=tok, verbose=False)
            batch = generate_rollouts(sampler, tok, rows, group_size=GROUP_SIZE, params=rollout_params(),
                                      template="r1-zero", seed=ROLLOUT_SEED + info.rank)
    else:
        sampler = Sampler(model, max_batch_size=8, max_seq_len=256, tokenizer=tok, verbose=False)
        with gathered(model):
            batch = generate_rollouts(sampler, tok, rows, group_size=GROUP_SIZE, params=rollout_params(),
                                      template="r1-zero", seed=ROLLOUT_SEED + info.rank)
    mine = {"completion_ids": batch.completion_ids, "rollout_logp": batch.rollout_logp,
            "finish_reasons": batch.finish_reasons}
    every = all_gather_object(mine)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / ("rollouts_tp.json" if args.rollout_tp_run else "rollouts.json")).write_text(json.dumps(every))
    barrier()
    if args.rollout_tp_run:
        return train.main(grpo_argv(args.model, out / "grpo_prompts.jsonl", out / "grpo_tp", *common,
                                    "--rollout-tp", 2))

    # The GRPO stage on both ranks (train.main joins the same group and leaves it at the end), with
    # dynamic sampling over prompts where rank 1's first two are fixed-reward ones: rank 1 needs more
    # rounds than rank 0, whose collectives must stay in step with it; a held-out evaluation before
    # and after.
    grpo_prompts = out / "grpo_prompts.jsonl"
    if info.rank == 0:
        write_prompts(grpo_prompts, 32, fixed_rows=rank1_first_rows(32, per_rank=2))
    barrier()
    return train.main(grpo_argv(args.model, grpo_prompts, out / "grpo", *common))


def rank1_first_rows(num_rows: int, per_rank: int) -> set[int]:
    """The rows rank 1 of 2 draws first in a GRPO run with --seed 0 (data.datasets.ShardedBatchSampler)."""
    from data.datasets import ShardedBatchSampler

    return {int(i) for i in next(ShardedBatchSampler(num_rows, per_rank, rank=1, world_size=2, seed=0))}


if __name__ == "__main__":
    sys.exit(main())
