"""sft/loop.py on 2 ranks (torchrun, gloo, CPU): the same per-step losses and weights as one process
on the same global batch, parameters really sharded, exact resume after kill -9 mid-save, and a
crashing rank ending the job promptly instead of hanging."""
from __future__ import annotations

import json
import time

import pytest

import train
from runtime.checkpoint import latest_checkpoint
from tests.sft.conftest import final_weights, losses, max_rel_diff, run_worker, sft_flags

pytestmark = pytest.mark.distributed

TORCHRUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def one_and_two_ranks(sft_files, tmp_path_factory):
    """The same short SFT run (checkpoint every 2 steps) in one process and on 2 ranks."""
    d = tmp_path_factory.mktemp("sft_ranks")
    assert train.main(sft_flags(sft_files, d / "one", "--save-every", "2")) == 0
    (d / "shards").mkdir()
    p = run_worker(sft_flags(sft_files, d / "two", "--save-every", "2"), "--shard-report", d / "shards", ranks=2,
                   timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return d / "one", d / "two"


def test_two_ranks_match_one_process_step_by_step(one_and_two_ranks):
    one, two = one_and_two_ranks
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-5, f"step {step}: 2 ranks {b[step]}, 1 process {a[step]}"
    assert a[6] < a[1]  # it learns
    assert max_rel_diff(final_weights(two, 6), final_weights(one, 6)) <= 1e-4
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    # the 2-rank checkpoint is sharded (DCP), the single-process one plain
    assert (two / "checkpoints" / "step-00000006" / "model_dcp").is_dir()
    assert (one / "checkpoints" / "step-00000006" / "model.pt").is_file()


def test_the_loop_shards_every_parameter_about_in_half(one_and_two_ranks):
    # what the 2-rank run's loop held right after model.parallel.apply_fsdp (tests/sft/_sft_worker.py)
    shards = one_and_two_ranks[1].parent / "shards"
    reports = [json.loads((shards / f"rank{r}.json").read_text()) for r in range(2)]
    total = reports[0]["global_numel"]
    for r in reports:
        assert r["world_size"] == 2 and r["sharded"] and r["all_dtensor"] and r["gathered_equal"]
        assert r["fsdp_modules"] == 3  # 2 blocks + the root
        assert abs(r["local_numel"] / total - 0.5) < 0.02, r
    assert sum(r["local_numel"] for r in reports) == total


def test_two_ranks_kill_9_mid_save_then_resume(sft_files, one_and_two_ranks, tmp_path):
    _, two = one_and_two_ranks
    run = tmp_path / "two_killed"
    p = run_worker(sft_flags(sft_files, run, "--save-every", "2"), "--kill-at-save", 4, "--kill-point", "hf",
                   ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode != 0
    assert latest_checkpoint(run).name == "step-00000002"  # the interrupted save replaced nothing
    p = run_worker(sft_flags(sft_files, run, "--save-every", "2", "--resume"), ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step-00000002" in p.stdout
    a, b = losses(two), losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-6, f"step {step}: resumed {b[step]}, uninterrupted {a[step]}"
    assert max_rel_diff(final_weights(run, 6), final_weights(two, 6)) <= 1e-6


def test_a_crashing_rank_ends_the_job_within_a_minute(sft_files, tmp_path):
    start = time.monotonic()
    p = run_worker(sft_flags(sft_files, tmp_path / "run"), "--fail-rank", 1, "--fail-at-call", 3, ranks=2,
                   timeout=120, env={"R1_DIST_TIMEOUT_S": "20"})
    elapsed = time.monotonic() - start
    assert p.returncode != 0
    assert "injected failure of rank 1" in p.stdout + p.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after rank 1 failed"
    assert latest_checkpoint(tmp_path / "run") is None


# ----------------------------------------------------------------------------- the GPU policy, on gloo

def _policy_flags(sft_files, out, *extra):
    """The tiny MoE preset (so a router is there to keep in fp32) under --param-dtype bf16, with a
    held-out greedy evaluation at the end (the path that used to all-reduce a CPU tensor)."""
    return sft_flags(sft_files, out, "--preset", "tiny-moe", "--param-dtype", "bf16", "--eval-data", sft_files.heldout,
                     "--eval-problems", "4", "--eval-max-new-tokens", "8", *extra)


@pytest.fixture(scope="module")
def bf16_one_and_two_ranks(sft_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_bf16")
    p = run_worker(_policy_flags(sft_files, d / "one"), ranks=1, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    q = run_worker(_policy_flags(sft_files, d / "two"), ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-3000:]
    return d / "one", d / "two", p.stdout, q.stdout


def test_bf16_policy_one_process_and_two_ranks_agree(bf16_one_and_two_ranks):
    one, two, out_one, out_two = bf16_one_and_two_ranks
    # one process computes under the same FSDP2 policy, on a one-rank mesh
    assert "computing in bfloat16, sharded over FSDP2" in out_one and "computing in bfloat16" in out_two
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-2, f"step {step}: 2 ranks {b[step]}, 1 process {a[step]}"
    assert a[6] < a[1]


def test_held_out_evaluation_runs_on_two_ranks(bf16_one_and_two_ranks):
    one, two, _, _ = bf16_one_and_two_ranks
    for run in (one, two):
        summary = json.loads((run / "summary.json").read_text())
        assert 0.0 <= summary["greedy_accuracy"] <= 1.0 and summary["eval_response_length"] > 0, summary
    # the export of a preset is fp32 (--export-dtype auto), whatever the compute dtype
    from safetensors import safe_open
    hf = two / "checkpoints" / "step-00000006" / "hf" / "model.safetensors"
    with safe_open(str(hf), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_gradients_are_reduce_scattered_every_micro_batch_or_once(sft_files, tmp_path):
    """Default: every micro-batch reduce-scatters (only sharded gradients live); --no-sync-accumulation
    accumulates unsharded gradients and reduce-scatters once. The same losses either way."""
    flags = ("--micro-batch-size", "1", "--max-steps", "4")   # 2 micro-batches per rank per step
    p = run_worker(sft_flags(sft_files, tmp_path / "every", *flags), ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    q = run_worker(sft_flags(sft_files, tmp_path / "once", *flags, "--no-sync-accumulation"), ranks=2,
                   timeout=TORCHRUN_TIMEOUT)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-3000:]
    a, b = losses(tmp_path / "every"), losses(tmp_path / "once")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-6, f"step {step}: once {b[step]}, every micro-batch {a[step]}"


def test_rank_0_only_work_is_waited_for_past_the_collective_timeout(sft_files, tmp_path):
    """Rank 0 publishes each checkpoint alone (fsync, rename); the other ranks wait for it on the gloo
    side group, whose timeout is not --dist-timeout-s: a publication slower than that timeout (and than
    the group's own watchdog) ends well. Before, the wait was a broadcast on the main group, and gloo
    gave up after --dist-timeout-s."""
    p = run_worker(sft_flags(sft_files, tmp_path / "run", "--max-steps", "2", "--dist-timeout-s", "3"),
                   "--slow-publish", 6, ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_qwen3_moe_two_ranks_match_one_process(sft_files, tmp_path):
    """The tiny Qwen3-MoE preset (softmax routing, a dense first layer, the Switch balance loss on):
    2 FSDP2 ranks give one process's per-step losses and weights."""
    flags = ("--preset", "tiny-qwen3-moe", "--max-steps", "3")
    p = run_worker(sft_flags(sft_files, tmp_path / "one", *flags), ranks=1, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "model qwen3_moe: 3 layers" in p.stdout
    q = run_worker(sft_flags(sft_files, tmp_path / "two", *flags), ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-5, f"step {step}: 2 ranks {b[step]}, 1 process {a[step]}"
    assert a[3] < a[1]
    assert max_rel_diff(final_weights(tmp_path / "two", 3), final_weights(tmp_path / "one", 3)) <= 1e-4
