"""SFT with LoRA (model/lora.py through sft/loop.py): 2 ranks (FSDP2, gloo) give one process's
per-step losses and merged weights; the loss falls with the adapters alone trained; the base is
stored in the compute dtype (bf16) beside fp32 adapters under FSDP2's mixed precision, and only the
adapters get gradients; a kill -9 in the middle of a save resumes to the uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.checkpoint import latest_checkpoint
from tests.sft.conftest import final_weights, losses, max_rel_diff, run_worker, sft_flags

TORCHRUN_TIMEOUT = 300
LORA = ("--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-2", "--save-every", "2")


@pytest.fixture(scope="module")
def lora_one_and_two_ranks(sft_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_lora")
    p = run_worker(sft_flags(sft_files, d / "one", *LORA), ranks=1, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    q = run_worker(sft_flags(sft_files, d / "two", *LORA), ranks=2, timeout=TORCHRUN_TIMEOUT)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-3000:]
    return d / "one", d / "two", p.stdout


@pytest.mark.distributed
def test_lora_two_ranks_match_one_process_step_by_step(lora_one_and_two_ranks):
    one, two, out = lora_one_and_two_ranks
    assert "LoRA rank 8, alpha 16 on" in out and "the base frozen" in out
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(b[step] / a[step] - 1) <= 1e-5, f"step {step}: 2 ranks {b[step]}, 1 process {a[step]}"
    assert a[6] < a[1]                                    # it learns with the adapters alone
    assert max_rel_diff(final_weights(two, 6), final_weights(one, 6)) <= 1e-4   # the merged exports
    for run in (one, two):
        s = json.loads((run / "summary.json").read_text())
        assert 0 < s["trainable_params"] < s["params"] / 10
        assert s["optimizer_state_bytes"] >= 8 * s["trainable_params"]
        adapter = run / "checkpoints" / "step-00000006" / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file
    x, y = (load_file(r / "checkpoints" / "step-00000006" / "adapter" / "adapter_model.safetensors") for r in (one, two))
    assert max_rel_diff(y, x) <= 1e-4                     # the 2-rank adapter, gathered from its shards
    # the sharded resumable state holds the adapters, not the frozen base
    state = json.loads((two / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["model_keys"] and all(k.endswith((".lora_A", ".lora_B")) for k in state["model_keys"])


@pytest.mark.distributed
def test_lora_kill_9_mid_save_then_resume(sft_files, lora_one_and_two_ranks, tmp_path):
    one = lora_one_and_two_ranks[0]
    run = tmp_path / "killed"
    p = run_worker(sft_flags(sft_files, run, *LORA), "--kill-at-save", 4, "--kill-point", "hf", ranks=1,
                   timeout=TORCHRUN_TIMEOUT)
    assert p.returncode != 0
    assert latest_checkpoint(run).name == "step-00000002"
    p = run_worker(sft_flags(sft_files, run, *LORA, "--resume"), ranks=1, timeout=TORCHRUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = losses(one), losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and all(a[s] == b[s] for s in a), (a, b)
    assert max_rel_diff(final_weights(run, 6), final_weights(one, 6)) == 0.0


@pytest.fixture
def process_group_torn_down():
    """build_trained_model makes a one-rank process group in this process: gone after the test, so
    later tests can start their own."""
    from runtime.distributed import teardown
    yield
    teardown()


def test_bf16_lora_stores_the_base_in_bf16_and_trains_fp32_adapters(sft_files, process_group_torn_down):
    """One process under FSDP2's bf16 policy (a one-rank mesh, as the loop builds it): the frozen base
    (but the MoE router) in bf16, the adapters fp32 masters; a step's gradients reach the adapters alone."""
    from data.tokenizer import load_tokenizer
    from model.build import build_trained_model
    from model.lora import lora_layers
    from recipes.flags import stage_args
    from runtime.distributed import init_distributed

    args = stage_args(stage="sft", preset="tiny-moe", tokenizer=str(sft_files.tok), param_dtype="bf16", lora_rank=4,
                      max_steps=1)
    tok = load_tokenizer(args.tokenizer, None)
    model, _, param_dtype, fsdp, _ = build_trained_model(args, tok, init_distributed(), torch.device("cpu"))
    assert param_dtype == torch.bfloat16 and fsdp is not None
    local = {n: (p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()}
    adapters = {n for n in local if n.endswith((".lora_A", ".lora_B"))}
    assert adapters and all(local[n].dtype == torch.float32 for n in adapters)
    for n, t in local.items():
        if n not in adapters:
            want = torch.float32 if ".mlp.gate." in n else torch.bfloat16
            assert t.dtype == want, (n, t.dtype)
    assert any(".self_attn.kv_b_proj" in n for n in lora_layers(model))   # MLA's projections are targets
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    mtp = f"model.layers.{model.config.num_hidden_layers}."          # the MTP module: trained by the MTP loss only
    assert grads == {n for n in adapters if not n.startswith(mtp)}
