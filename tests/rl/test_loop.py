"""rl/loop.py, the GRPO loop, run through train.py in this process on a tiny model (hidden 32, vocab 320):
the metrics, checkpoint and summary of a 2-step run; exact resume after a crash; dynamic sampling
dropping zero-std groups and refilling the batch; mu = 2 recomputing old log-probs so that the clip
binds; and a training step that never builds a [B, T, V] logits tensor.

Rewards come from tests/rl/_grpo_worker.py (token-id parity: a random model earns no task reward,
and a reward that varies within a group is what makes the gradient non-zero). torch runs on one
thread here: a model this small only loses from a second thread, badly so on a loaded machine.
"""
import json
import math

import pytest
import torch

import train
from model.checkpoint import load_pretrained
from model.config import ModelConfig
from model.transformer import Transformer
from rl import loop
from rl.loss import policy_loss
from tests.rl._grpo_worker import (FIXED_REWARD, GROUP_SIZE, MAX_NEW_TOKENS, PARITY_REWARD,
                                   crash_at_step_3_then_resume, grpo_argv, make_model_dir, step_metric_keys,
                                   write_prompts)

STEP_KEYS = step_metric_keys([PARITY_REWARD, "format", "task"])
# what differs between two runs that compute the same thing
# measured, not computed: times and the rollout's resident-memory high-water mark
TIMING_KEYS = ("time/rollout", "time/reward", "time/logprobs", "time/train", "step_s", "tokens_per_s",
               "memory/rollout_peak_gib", "memory/step_peak_gib")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    make_model_dir(d / "model")
    write_prompts(d / "prompts.jsonl", 32)
    write_prompts(d / "half_fixed.jsonl", 32, fixed_every=2)
    return d


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder) -> dict:
    return load_pretrained(folder).state_dict()


def test_two_steps_write_metrics_checkpoint_and_summary(assets, tmp_path):
    run = tmp_path / "run"
    argv = grpo_argv(assets / "model", assets / "prompts.jsonl", run, "--reward", f"{PARITY_REWARD},format,task",
                     "--eval-data", assets / "prompts.jsonl", "--eval-problems", 2, "--eval-max-new-tokens", 8,
                     "--eval-samples", 1)
    assert train.main(argv) == 0

    rows = metrics_of(run)
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the held-out evaluation before training
    assert "eval/greedy_accuracy" in rows[0] and "eval/sampled_accuracy" in rows[0]
    for r in rows[1:]:
        missing = [k for k in STEP_KEYS if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        # the total is the sum of the three functions (none abstains)
        parts = r[f"reward/{PARITY_REWARD}"] + r["reward/format"] + r["reward/task"]
        assert r["reward/mean"] == pytest.approx(parts, abs=1e-6)
        assert 1 <= r["response_length/min"] <= r["response_length/mean"] <= r["response_length/max"] <= MAX_NEW_TOKENS
        assert 0.0 <= r["truncated"] <= 1.0 and 0.0 <= r["frac_groups_zero_std"] <= 1.0
        assert 0.0 < r["entropy"] <= math.log(320) + 1e-4
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["time/rollout"] > 0 and r["time/train"] > 0
        # all completions train: tokens = 4 prompts x G x the mean length
        assert r["tokens"] == pytest.approx(4 * GROUP_SIZE * r["response_length/mean"])
    # the policy equals the reference before its first update, and has moved away from it after
    assert rows[1]["kl"] == 0.0 and rows[2]["kl"] > 0.0
    assert rows[1]["lr"] == pytest.approx(1e-3) and rows[2]["lr"] < rows[1]["lr"]  # cosine decay, no warmup
    assert "eval/greedy_accuracy" in rows[2]  # the final evaluation is logged with the last step

    ckpt = run / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["trainer"]["step"] == 2 and state["trainer"]["sampler"]
    before, after = weights(assets / "model"), weights(ckpt / "hf")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert summary["initial_eval"] == {k: v for k, v in rows[0].items() if k != "step"}
    assert summary["final_eval"]["eval/greedy_accuracy"] == rows[2]["eval/greedy_accuracy"]
    assert json.loads((run / "config.json").read_text())["group_size"] == GROUP_SIZE


def test_prompt_column_reads_the_problem_text_from_another_column(assets, tmp_path):
    """--prompt-column problem: rows shaped like OpenR1-Math-220k's (problem, answer) train; without
    the flag the loader names the missing column."""
    rows = [json.loads(line) for line in (assets / "prompts.jsonl").read_text().splitlines()]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": r.pop("prompt"), **r}) + "\n" for r in rows))
    run = tmp_path / "run"
    assert train.main(grpo_argv(assets / "model", data, run, "--max-steps", 1, "--beta", 0,
                                "--prompt-column", "problem")) == 0
    assert [r["step"] for r in metrics_of(run)] == [1]
    with pytest.raises(ValueError, match="missing column 'prompt'"):
        train.main(grpo_argv(assets / "model", data, tmp_path / "run2", "--max-steps", 1, "--beta", 0))


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(assets, tmp_path, monkeypatch):
    """4 steps straight, against 4 steps that crash in the rollout of step 3 (checkpoint at step 2)
    and are resumed with --resume in the same process: same weights bit for bit, same metrics."""
    common = ("--max-steps", 4, "--save-every", 2, "--keep-last", 3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", straight, *common)) == 0

    crash_at_step_3_then_resume(monkeypatch, grpo_argv(assets / "model", assets / "prompts.jsonl", split, *common))

    end_straight = weights(straight / "checkpoints" / "step-00000004" / "hf")
    end_split = weights(split / "checkpoints" / "step-00000004" / "hf")
    for k in end_straight:
        assert torch.equal(end_straight[k], end_split[k]), f"{k}: max difference " \
            f"{(end_straight[k] - end_split[k]).abs().max().item()}"
    # the comparison is not vacuous: steps 3 and 4 moved the weights
    mid = weights(straight / "checkpoints" / "step-00000002" / "hf")
    assert any(not torch.equal(mid[k], end_straight[k]) for k in mid)

    a, b = metrics_of(straight), metrics_of(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # the crashed step left no line behind
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in rb.items() if k not in TIMING_KEYS}


def test_rollout_seeds_differ_by_step_round_and_rank():
    seeds = {loop.rollout_seed(s, step, r, rank) for s in (0, 1) for step in range(50) for r in range(4)
             for rank in range(8)}
    assert len(seeds) == 2 * 50 * 4 * 8


def test_dynamic_sampling_drops_constant_groups_and_refills(assets, tmp_path, monkeypatch):
    """Half the prompts carry a fixed reward (a zero-std group); with --dynamic-sampling the step trains
    on 4 groups that all have reward spread, sampled over more than one round."""
    seen = []
    real = loop.group_advantages

    def spy(rewards, group_size, **kwargs):
        seen.append(rewards.clone())
        return real(rewards, group_size, **kwargs)

    monkeypatch.setattr(loop, "group_advantages", spy)
    run = tmp_path / "run"
    argv = grpo_argv(assets / "model", assets / "half_fixed.jsonl", run, "--reward", FIXED_REWARD,
                     "--dynamic-sampling", "--max-steps", 1, "--beta", 0)
    assert train.main(argv) == 0

    (rewards,) = seen
    assert rewards.shape == (4 * GROUP_SIZE,)
    groups = rewards.view(4, GROUP_SIZE)
    assert all(len(set(g.tolist())) > 1 for g in groups)  # every trained group carries a gradient
    (row,) = metrics_of(run)
    assert row["sampling/rounds"] >= 2 and row["sampling/groups_dropped"] >= 1
    assert row["frac_groups_zero_std"] == 0.0


def test_mu_2_recomputes_old_logprobs_and_the_clip_binds(assets, tmp_path, monkeypatch):
    """mu = 1 takes the sampler's log-probs as old ones (no recomputation; the ratio is 1 and never
    clipped); mu = 2 recomputes them before the first update, and the second pass, after a large
    update, sees ratios away from 1 and clipped tokens."""
    no_grad_calls = []
    real = loop.sequence_logprobs

    def spy(*args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_calls.append(len(args[2]))  # completions in the call
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sequence_logprobs", spy)
    rows = {}
    for mu in (1, 2):
        no_grad_calls.clear()
        run = tmp_path / f"mu{mu}"
        assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", run, "--mu", mu, "--beta", 0,
                                    "--lr", 5e-2, "--max-steps", 1)) == 0
        (rows[mu],) = metrics_of(run)
        # beta = 0: no reference model, so every no-grad log-prob pass is an old-log-prob recomputation
        assert sum(no_grad_calls) == (0 if mu == 1 else 4 * GROUP_SIZE)
    assert rows[1]["clip_ratio"] == 0.0 and rows[1]["ratio/min"] == rows[1]["ratio/max"] == 1.0
    assert rows[2]["clip_ratio"] > 0.0 and rows[2]["ratio/min"] < 1.0 < rows[2]["ratio/max"]
    assert rows[2]["clip_ratio"] == pytest.approx(rows[2]["clip_ratio/low"] + rows[2]["clip_ratio/high"])


# ---- no [B, T, V] logits in a training step ---------------------------------------------------------

def allocation_profile(fn, trace_path) -> tuple[int, int]:
    """(peak bytes allocated, largest single allocation) of the CPU allocator while fn() runs, counted
    from the start of the call: torch.profiler's memory events ("Total Allocated" is the running total
    since the profiler started). tracemalloc would not see torch's allocations."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    events = [e["args"] for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no CPU memory events"
    return max(e["Total Allocated"] for e in events), max(e["Bytes"] for e in events)


def test_training_step_never_builds_batch_by_vocab_logits(tmp_path):
    """Vocabulary 100k, hidden 32, 16 sequences of 128 tokens: [B, T, V] fp32 logits alone would take
    16 x 128 x 100k x 4 B = 819 MB. The policy-loss part of a step (packed forward, fused log-probs
    and entropy, policy_loss, backward) peaks at a quarter of that (the log-prob kernel's tiles),
    while a plain forward of one sequence already allocates its whole [1, T, V] logits."""
    V, B, P, C = 100_000, 16, 28, 100
    config = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Transformer(config)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(B)]
    completions = [torch.randint(0, V, (C,), generator=g).tolist() for _ in range(B)]
    advantages = torch.randn(B, generator=g)
    btv_bytes = B * (P + C) * V * 4

    def step():
        logp, entropy, mask = loop.sequence_logprobs(model, prompts, completions, 1.0, with_entropy=True)
        loss, _ = policy_loss(logp, logp.detach(), advantages, mask.float(), None, entropy=entropy)
        loss.backward()

    step()  # warm up (lazy initialisation is not the step's memory)
    model.zero_grad(set_to_none=False)
    peak, largest = allocation_profile(step, tmp_path / "step.json")
    assert peak < btv_bytes / 3, f"peak {peak / 2**20:.0f} MiB vs [B, T, V] fp32 {btv_bytes / 2**20:.0f} MiB"
    assert largest < btv_bytes / 10
    assert model.output_weight.grad.abs().sum() > 0  # the step did train the (tied) head

    # the probe sees logits when they exist: one plain forward allocates [1, P + C, V] fp32 at once
    with torch.no_grad():
        _, largest_forward = allocation_profile(lambda: model(torch.tensor([prompts[0] + completions[0]])),
                                                 tmp_path / "forward.json")
    assert largest_forward >= (P + C) * V * 4


@pytest.mark.parametrize("lora", [(), ("--lora-rank", 4)], ids=["full", "lora"])
def test_activation_checkpointing_is_applied_and_computes_the_same(assets, tmp_path, capsys, lora):
    """--activation-checkpointing reaches the GRPO stage (it was accepted and ignored) and recomputes
    the same losses, with every weight trained or LoRA adapters; its memory saving is measured by
    bench/activation_checkpointing.py."""
    common = ("--max-steps", 2, "--beta", 0, *lora)
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", tmp_path / "plain", *common)) == 0
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", tmp_path / "ac", *common,
                                "--activation-checkpointing")) == 0
    assert "activation checkpointing" in capsys.readouterr().out
    plain, ac = metrics_of(tmp_path / "plain"), metrics_of(tmp_path / "ac")
    assert [r["step"] for r in plain] == [r["step"] for r in ac] == [1, 2]
    for a, b in zip(plain, ac):
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * max(abs(a["loss"]), 1e-8), (a["loss"], b["loss"])
        assert abs(b["grad_norm"] / a["grad_norm"] - 1) <= 1e-5


def test_bf16_policy_with_a_reference_model_in_one_process(assets, tmp_path, capsys):
    """--param-dtype bf16 in one process: the policy computes under FSDP2's policy on a one-rank mesh
    (as one GPU would), the reference model is built from the checkpoint stored in bf16, and the run
    samples, scores, takes the KL to the reference and trains."""
    run = tmp_path / "bf16"
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", run, "--max-steps", 2,
                                "--param-dtype", "bf16", "--beta", "0.04")) == 0
    out = capsys.readouterr().out
    assert "computing in bfloat16, sharded over FSDP2" in out
    rows = metrics_of(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["kl"] >= 0.0
    assert rows[1]["kl"] > 0.0    # the policy moved away from its bf16 reference


def test_grpo_trains_a_qwen3_moe_preset(assets, tmp_path):
    """GRPO on the tiny Qwen3-MoE preset (with the reference model and the Switch balance loss):
    rollouts on the engine, finite losses and gradients, expert loads in the metrics, an HF export
    transformers reads."""
    argv = grpo_argv(assets / "model", assets / "prompts.jsonl", tmp_path / "run")
    i = argv.index("--model")
    argv[i:i + 2] = ["--preset", "tiny-qwen3-moe", "--tokenizer", str(assets / "model")]
    assert train.main(argv) == 0
    rows = metrics_of(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["moe/imbalance"] >= 1.0 and "moe/layer1/max_load_ratio" in r and "moe/layer0/max_load_ratio" not in r
    hf = tmp_path / "run" / "checkpoints" / "step-00000002" / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours = load_pretrained(hf).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-4
