"""rl/rollout.py: the layout and seeds of a RolloutBatch, the sampler's log-probs against the trainer's
recomputation, reward scoring, dynamic sampling's group selection, and (torchrun, 2 ranks, gloo)
rollouts of an FSDP-sharded model equal to one process's, plus a 2-step GRPO run on 2 ranks.

The tiny model, prompts and rewards come from tests/rl/_grpo_worker.py, which is also the 2-rank worker.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl.loop import sequence_logprobs
from rl.rollout import (SEED_MODULUS, RewardScorer, RolloutBatch, encode_prompt, generate_rollouts,
                        informative_groups, prompt_seed, select_for_dynamic_sampling)
from sampling.sampler import Sampler, SamplingParams
from tests.rl._grpo_worker import (FIXED_REWARD, GROUP_SIZE, MAX_NEW_TOKENS, ROLLOUT_SEED, make_model_dir,
                                   rollout_params, step_metric_keys, write_prompts)

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "rl" / "_grpo_worker.py"
NAN = math.nan


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, model, tokenizer, prompt rows)."""
    d = tmp_path_factory.mktemp("rollout")
    model, tok = make_model_dir(d / "model")
    rows = write_prompts(d / "prompts.jsonl", 6, fixed_every=3)
    return d, model.eval(), tok, rows


def sampler_for(model, tok) -> Sampler:
    return Sampler(model, max_batch_size=8, max_seq_len=256, tokenizer=tok, verbose=False)


# ---- generation ------------------------------------------------------------------------------------

def test_batch_layout_and_per_prompt_seeds(tiny):
    _, model, tok, rows = tiny
    rows = rows[:3]
    stops = list(range(40, 55))  # stop ids enough for some completions to stop, some to run to the budget
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=stops)
    batch = generate_rollouts(sampler_for(model, tok), tok, rows, group_size=GROUP_SIZE, params=params,
                              template="r1-zero", seed=5)
    assert {"stop", "length"} <= set(batch.finish_reasons)
    assert len(batch) == 3 * GROUP_SIZE and batch.num_groups == 3
    for k in range(len(batch)):  # completion k belongs to prompt k // G
        row = rows[k // GROUP_SIZE]
        assert batch.rows[k] is row and batch.prompts[k] == row["prompt"]
        assert batch.prompt_ids[k] == encode_prompt(tok, row, "r1-zero")
        assert 1 <= len(batch.completion_ids[k]) <= MAX_NEW_TOKENS
        assert len(batch.rollout_logp[k]) == len(batch.completion_ids[k])
        ids = batch.completion_ids[k]
        assert batch.finish_reasons[k] == ("stop" if ids[-1] in stops else "length")
        assert all(t not in stops for t in ids[:-1]) and (ids[-1] in stops or len(ids) == MAX_NEW_TOKENS)
        # the text leaves out the stop token that the ids keep (training must see EOS; rewards must not)
        assert batch.texts[k] == tok.decode(ids[:-1] if batch.finish_reasons[k] == "stop" else ids)
    # prompt i samples with prompt_seed(seed, i): alone, it draws the same group
    for i, row in enumerate(rows):
        alone = sampler_for(model, tok).generate(
            [encode_prompt(tok, row, "r1-zero")],
            SamplingParams(n=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=stops,
                           seed=prompt_seed(5, i)))[0]
        group = slice(i * GROUP_SIZE, (i + 1) * GROUP_SIZE)
        assert [c.token_ids for c in alone] == batch.completion_ids[group]
        for c, logp in zip(alone, batch.rollout_logp[group]):
            assert c.logprobs == pytest.approx(logp, abs=1e-5)
    # the same seed draws the same batch, another seed another one
    again = generate_rollouts(sampler_for(model, tok), tok, rows, group_size=GROUP_SIZE, params=params,
                              template="r1-zero", seed=5)
    other = generate_rollouts(sampler_for(model, tok), tok, rows, group_size=GROUP_SIZE, params=params,
                              template="r1-zero", seed=6)
    assert again.completion_ids == batch.completion_ids and other.completion_ids != batch.completion_ids


def test_any_seed_gives_valid_generator_seeds(tiny):
    """The sampler multiplies a request seed by about 2**20 once more; a large run seed used to overflow
    torch's 64-bit generator seed ("Overflow when unpacking long long")."""
    _, model, tok, rows = tiny
    assert prompt_seed(3, 4) == 3 * 1_000_003 + 4
    assert all(0 <= prompt_seed(s, i) < SEED_MODULUS for s in (0, 2**40, 10**30) for i in range(3))
    batch = generate_rollouts(sampler_for(model, tok), tok, rows[:1], group_size=2,
                              params=SamplingParams(max_new_tokens=2), template="r1-zero", seed=10**30)
    assert len(batch) == 2


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logprobs_equal_the_trainers_recomputation(tiny, temperature, top_p):
    """On-policy (mu = 1) the loop trains against the sampler's log-probs instead of recomputing them: they
    must be the trainer's (packed forward + kernels.token_logprobs) log-probs of the same tokens under the
    temperature-scaled distribution, before top-p truncation."""
    _, model, tok, rows = tiny
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS)
    batch = generate_rollouts(sampler_for(model, tok), tok, rows, group_size=GROUP_SIZE, params=params,
                              template="r1-zero", seed=1)
    with torch.no_grad():
        logp, _, mask = sequence_logprobs(model, batch.prompt_ids, batch.completion_ids, temperature)
    for i, sampled in enumerate(batch.rollout_logp):
        n = len(sampled)
        assert mask[i].sum() == n
        torch.testing.assert_close(logp[i, :n], torch.tensor(sampled), rtol=0, atol=1e-5)


# ---- rewards and dynamic sampling ----------------------------------------------------------------

def scripted_batch(rewards: list[float], group_size: int) -> RolloutBatch:
    """A scored batch whose completion k is the one-token sequence [k]."""
    n = len(rewards)
    return RolloutBatch(group_size, [{"k": k} for k in range(n)], [[0]] * n, [[k] for k in range(n)],
                        [[-1.0]] * n, ["stop"] * n, [str(k) for k in range(n)], ["p"] * n,
                        {"r": list(rewards)}, torch.tensor(rewards))


def test_reward_scorer_weights_and_abstentions():
    rows = [{"fixed": 0.5}, {}, {"fixed": 2.0}, {}]
    batch = scripted_batch([0.0] * 4, 2)
    batch.rows, batch.completion_ids = rows, [[1, 1], [1, 2], [2], [3]]  # parity: even, odd, even, odd
    parity = "tests.rl._grpo_worker:token_parity"
    fixed = "tests.rl._grpo_worker:fixed_or_none"
    scorer = RewardScorer(f"{parity}:2,{fixed}")
    scorer.score(batch)
    assert batch.reward_columns == {parity: [1.0, 0.0, 1.0, 0.0], fixed: [0.5, None, 2.0, None]}
    # weighted sum of the functions that gave a value
    assert batch.rewards.tolist() == [2.5, 0.0, 4.0, 0.0]
    RewardScorer(fixed).score(batch)  # only an abstaining function: no signal at all is NaN
    assert batch.rewards[[0, 2]].tolist() == [0.5, 2.0] and torch.isnan(batch.rewards[[1, 3]]).all()
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        RewardScorer("acuracy")


def test_informative_groups():
    rewards = torch.tensor([1, 1, 1,            # equal: no gradient
                            0, 1, 0,            # informative
                            NAN, 1, 1,          # one distinct valid value
                            NAN, 0, 1,          # informative despite a NaN
                            NAN, NAN, NAN])     # no signal
    assert informative_groups(rewards, 3) == [1, 3]


def test_dynamic_sampling_keeps_informative_groups_and_tops_up_on_the_last_round():
    batch = scripted_batch([1, 1, 0, 1, 2, 2, 0, 3, NAN, NAN], 2)  # groups 1 and 3 are informative
    kept, dropped = select_for_dynamic_sampling(batch, need=1, last_round=False)
    assert kept.completion_ids == [[2], [3]] and dropped == 4  # the first informative group only
    assert kept.rows == [{"k": 2}, {"k": 3}] and kept.reward_columns == {"r": [0, 1]}
    assert kept.rewards.tolist() == [0, 1]

    kept, dropped = select_for_dynamic_sampling(batch, need=3, last_round=False)
    assert [c[0] for c in kept.completion_ids] == [2, 3, 6, 7] and dropped == 3  # short: the loop samples more
    kept, dropped = select_for_dynamic_sampling(batch, need=3, last_round=True)
    assert [c[0] for c in kept.completion_ids] == [0, 1, 2, 3, 6, 7] and dropped == 2  # topped up in order

    both = RolloutBatch.concat([kept, batch.select_groups([4])])
    assert [c[0] for c in both.completion_ids] == [0, 1, 2, 3, 6, 7, 8, 9] and both.num_groups == 4
    assert both.reward_columns["r"][:6] == [1, 1, 0, 1, 0, 3]
    unscored = scripted_batch([0, 1], 2)
    unscored.rewards = None
    with pytest.raises(ValueError, match="no rewards; score it first"):
        select_for_dynamic_sampling(unscored, need=1, last_round=False)


# ---- two ranks ---------------------------------------------------------------------------------------

def _run_worker(d, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         "--model", str(d / "model"), "--prompts", str(d / "prompts.jsonl"), "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # their tracebacks
    assert proc.returncode == 0, proc.stdout[-2000:] + (ranks or proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def two_ranks(tiny):
    """Runs tests/rl/_grpo_worker.py under torchrun (2 processes, gloo) once for the tests below."""
    d = tiny[0]
    _run_worker(d, d / "two_ranks")
    return d / "two_ranks"


@pytest.mark.distributed
def test_two_rank_fsdp_rollouts_equal_one_process(tiny, two_ranks):
    """Each rank samples its share of the prompts (rank r: rows[r::2], seed ROLLOUT_SEED + r) from the
    FSDP-sharded model inside gathered(); one process with the whole model draws the same tokens."""
    sharded = json.loads((two_ranks / "rollouts.json").read_text())
    _assert_equal_one_process(sharded, *tiny[1:])
    assert sharded[0]["completion_ids"] != sharded[1]["completion_ids"]


def _assert_equal_one_process(per_rank: list[dict], model, tok, rows) -> None:
    """Rank r's rollouts (rows[r::2], seed ROLLOUT_SEED + r) equal one process's with the whole model:
    the same tokens and finish reasons, log-probs within 1e-5."""
    assert len(per_rank) == 2
    for rank, got in enumerate(per_rank):
        ref = generate_rollouts(sampler_for(model, tok), tok, rows[rank::2], group_size=GROUP_SIZE,
                                params=rollout_params(), template="r1-zero", seed=ROLLOUT_SEED + rank)
        assert got["completion_ids"] == ref.completion_ids
        assert got["finish_reasons"] == ref.finish_reasons
        for a, b in zip(got["rollout_logp"], ref.rollout_logp):
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.distributed
def test_two_rank_grpo_run_logs_every_metric(two_ranks):
    """2 steps of train.py's GRPO stage on 2 ranks (FSDP, reference model, dynamic sampling where rank 1
    needs more rounds than rank 0) finish, and each step's line has the issue's metrics."""
    run = two_ranks / "grpo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]   # step 0: the held-out evaluation before training
    held_out, rows = rows[0], rows[1:]
    assert 0.0 <= held_out["eval/greedy_accuracy"] <= 1.0 and "eval/greedy_accuracy" in rows[-1]
    keys = step_metric_keys([FIXED_REWARD, "format", "task"])
    for r in rows:
        missing = [k for k in keys if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert r["tokens"] == pytest.approx(4 * GROUP_SIZE * r["response_length/mean"])  # both ranks' tokens
        assert r["frac_groups_zero_std"] == 0.0 and r["grad_norm"] > 0
    # rank 1's first prompts have a constant reward: they were dropped and sampled again
    assert rows[0]["sampling/rounds"] >= 2 and rows[0]["sampling/groups_dropped"] >= 2
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and (run / "checkpoints" / "step-00000002" / "hf" / "config.json").exists()
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


@pytest.mark.distributed
def test_two_rank_grpo_with_activation_checkpointing_computes_the_same(tiny, two_ranks):
    _run_worker(tiny[0], two_ranks, "--activation-checkpointing-run")

    def by_step(run):
        return {r["step"]: r for r in map(json.loads, (two_ranks / run / "metrics.jsonl").read_text().splitlines())
                if r["step"] > 0}
    plain, ac = by_step("grpo"), by_step("grpo_ac")
    assert sorted(plain) == sorted(ac) == [1, 2]
    for step in plain:
        for key in ("loss", "reward/mean", "kl", "grad_norm"):
            a, b = plain[step][key], ac[step][key]
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-8), (step, key, a, b)
    assert json.loads((two_ranks / "grpo_ac" / "config.json").read_text())["activation_checkpointing"] is True


@pytest.mark.distributed
def test_two_rank_tensor_parallel_rollouts_and_grpo_equal_the_unsharded(tiny, two_ranks):
    """--rollout-tp 2: the pair samples both ranks' prompts as one batch with the model split between them;
    each rank's rollouts equal one process's with the whole model (tokens identical, log-probs within
    1e-5), and the GRPO run trains as the run with whole-model rollouts does, each rank holding about
    half the weights while it samples."""
    _run_worker(tiny[0], two_ranks, "--rollout-tp-run")
    _assert_equal_one_process(json.loads((two_ranks / "rollouts_tp.json").read_text()), *tiny[1:])

    def by_step(run):
        return {r["step"]: r for r in map(json.loads, (two_ranks / run / "metrics.jsonl").read_text().splitlines())
                if r["step"] > 0}
    whole, tp = by_step("grpo"), by_step("grpo_tp")
    assert sorted(whole) == sorted(tp) == [1, 2]
    for step in whole:
        for key in ("loss", "reward/mean", "kl", "grad_norm", "response_length/mean", "eval/greedy_accuracy"):
            if key in whole[step]:
                a, b = whole[step][key], tp[step][key]
                assert abs(a - b) <= 1e-5 * max(abs(a), 1.0), (step, key, a, b)
        ratio = tp[step]["memory/rollout_weight_gib"] / whole[step]["memory/rollout_weight_gib"]
        assert 0.45 < ratio < 0.55, ratio
        assert tp[step]["memory/rollout_peak_gib"] > 0 and whole[step]["memory/rollout_peak_gib"] > 0
    assert json.loads((two_ranks / "grpo_tp" / "config.json").read_text())["rollout_tp"] == 2
