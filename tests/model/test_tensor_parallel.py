"""Tensor-parallel sampling (model/tensor_parallel.py, sampling/group.py) on gloo ranks against the
unsharded model in one process: the share built from FSDP2 shards computes the same logits, and a
tensor-parallel group samples the same tokens (log-probs within 1e-5, relative past 1), greedy and seeded, eager and
compiled, for GQA (qwen2 with biases, llama with o_proj and MLP biases, qwen3 with qk-norm and tied
embeddings) and MLA + MoE (deepseek_v3); each rank holds about half the weights and nothing after
the rollout; with 4 ranks and groups of 2, each group samples its own prompts (data parallel
around tensor parallel)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.tensor_parallel import Piece, check_tensor_parallel, cut, local_config
from tests.sampling.test_sampler import CONFIGS as SAMPLER_CONFIGS

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = {
    **SAMPLER_CONFIGS,   # qwen2 (6 heads, 2 kv heads, vocab 211: padded vocabulary rows), deepseek_v3 (MLA, 6 experts),
                         # qwen3_moe (q/k norms, 6 experts, no shared expert, a dense layer)
    "llama": dict(model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, o_bias=True, mlp_bias=True,
                  max_position_embeddings=256),
    "qwen3": dict(model_type="qwen3", vocab_size=203, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                  max_position_embeddings=256),
}

_WORKER = r'''
import json, sys
from pathlib import Path
import torch
from model import ModelConfig, Transformer
from model.parallel import apply_fsdp
from model.tensor_parallel import TensorParallelMoE, TensorParallelRollout, weight_bytes
from runtime.distributed import all_gather_object, init_distributed, subgroup, teardown
from sampling import Sampler, SamplingParams

info = init_distributed()
rank, world = info.rank, info.world_size
out, configs, tp_size, modes = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
tp = subgroup(tp_size)
result = {}
for name, cfg in configs.items():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    reference = Transformer(ModelConfig(**cfg)).eval()
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model)
    rollout = TensorParallelRollout(model, tp)
    # every rank its own prompts (rank 1 has two, so the group's union is uneven); seeds per rank
    prompts = [[5 + rank, 6, 7], list(range(1, 14 + rank))][: 2 if rank % 2 else 1] + [[3, 1, 4, 1, 5, rank]]
    entry = {}
    for mode in modes:
        temperature = 0.0 if mode == "greedy" else 0.9
        params = [SamplingParams(n=3, temperature=temperature, max_new_tokens=9, stop_token_ids=[], seed=100 * rank + i)
                  for i in range(len(prompts))]
        want = Sampler(reference, 8, 40, verbose=False).generate(prompts, params)
        with rollout.weights() as policy:
            ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
            logits_err = (policy(ids) - reference(ids)).abs().max().item()
            moe_static = None
            moes = [m for m in policy.modules() if isinstance(m, TensorParallelMoE)]
            if moes:
                x = torch.randn(5, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
                sorted_out = moes[0](x)
                moes[0].static_dispatch = True
                moe_static = (moes[0](x) - sorted_out).abs().max().item()
                moes[0].static_dispatch = False
            sampler = Sampler(policy, 32, 32, verbose=False, compile=(mode == "compiled"))
            got = sampler.generate(prompts, params)
            held = rollout.weight_bytes
        same = [a.token_ids == b.token_ids for ga, gb in zip(want, got) for a, b in zip(ga, gb)]
        # relative to the log-prob's size past 1: a sampled token of log-prob -30 carries fp32 rounding of 30x
        err = max(abs(x - y) / max(1.0, abs(x)) for ga, gb in zip(want, got) for a, b in zip(ga, gb)
                  for x, y in zip(a.logprobs, b.logprobs))
        entry[mode] = dict(same=all(same), lp_err=err, logits_err=logits_err, moe_static_err=moe_static,
                           distinct=len({tuple(c.token_ids) for g in got for c in g}),
                           held=held, full=weight_bytes(reference), after=weight_bytes(rollout.local),
                           rows=sampler.stats.peak_rows, own=sum(len(g) for g in got))
    result[name] = entry
(out / f"rank{rank}.json").write_text(json.dumps(result))
teardown()
'''


def _run(tmp_path, configs: dict, nproc: int, tp: int, modes: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), str(tmp_path), json.dumps(configs), str(tp), modes],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.distributed
def test_tp2_share_samples_what_the_unsharded_model_samples(tmp_path):
    ranks = _run(tmp_path, CONFIGS, 2, 2, "greedy,sampled")
    for r, result in enumerate(ranks):
        for name, entry in result.items():
            for mode, e in entry.items():
                where = f"rank {r}, {name}, {mode}"
                assert e["same"], where
                assert e["lp_err"] < 1e-5 and e["logits_err"] < 1e-5, (where, e)
                assert e["distinct"] > 1, where
                assert e["after"] == 0, where            # the share's memory is returned after the rollout
                assert 0.3 < e["held"] / e["full"] < 0.6, (where, e["held"], e["full"])
                if name in ("deepseek_v3", "qwen3_moe"):   # experts divided among the ranks
                    assert e["moe_static_err"] < 1e-5, where
                # the group decoded both ranks' samples as one batch: rows beyond this rank's own
                assert e["rows"] > e["own"], (where, e)


@pytest.mark.distributed
def test_tp2_compiled_decode_step_samples_the_same(tmp_path):
    ranks = _run(tmp_path, {"qwen2": CONFIGS["qwen2"]}, 2, 2, "compiled")
    for result in ranks:
        e = result["qwen2"]["compiled"]
        assert e["same"] and e["lp_err"] < 1e-5, e


@pytest.mark.distributed
def test_four_ranks_two_tp_groups_sample_their_own_prompts(tmp_path):
    ranks = _run(tmp_path, {"qwen2": CONFIGS["qwen2"]}, 4, 2, "sampled")
    for r, result in enumerate(ranks):
        e = result["qwen2"]["sampled"]
        assert e["same"] and e["lp_err"] < 1e-5, (r, e)
        # each group of 2 decodes its own ranks' requests (2 + 3 prompts x 3 samples), not the other group's
        assert e["rows"] == 15, (r, e)


def test_local_config_and_cut():
    c = ModelConfig(**CONFIGS["qwen2"])
    lc = local_config(c, 2)
    assert (lc.num_attention_heads, lc.num_key_value_heads, lc.intermediate_size, lc.vocab_size) == (3, 1, 50, 211)
    assert lc.head_dim == c.head_dim
    w = torch.arange(5 * 3.0).view(5, 3)
    assert cut(w, Piece("w", "w", 0, 1, 2)).tolist() == [[9.0, 10.0, 11.0], [12.0, 13.0, 14.0], [0.0, 0.0, 0.0]]
    assert cut(w, Piece("w", "w", 1, 0, 3)).tolist() == w[:, :1].tolist()
    with pytest.raises(ValueError, match="num_attention_heads = 6, num_key_value_heads = 2 are not divisible by 4"):
        check_tensor_parallel(c, 4)
    with pytest.raises(ValueError, match="--rollout-tp 0: expected >= 1"):
        check_tensor_parallel(c, 0)


def test_fill_holds_one_whole_tensor_at_a_time_and_only_its_share():
    """fill() reads each source tensor whole, keeps this rank's blocks, and lets the whole tensor go
    before it reads the next (no view of it survives); what it allocates is the share alone."""
    import weakref

    from model.tensor_parallel import _tensors, build_local_model, fill, plan
    from model.transformer import Transformer
    from runtime.distributed import Subgroup

    c = ModelConfig(**CONFIGS["deepseek_v3"])
    torch.manual_seed(0)
    full = Transformer(c)
    sources = dict(_tensors(full))
    for rank in (0, 1):
        local = build_local_model(c, Subgroup((0, 1), rank, 0))
        alive, worst = [], 0

        def read(name, needed):
            alive[:] = [r for r in alive if r() is not None]
            nonlocal worst
            worst = max(worst, len(alive))
            t = sources[name].detach().clone()   # a fresh whole tensor, as a gather or a file read gives
            alive.append(weakref.ref(t))
            return t

        held = fill(local, plan(local, Subgroup((0, 1), rank, 0)), read, list(sources), torch.float32,
                    torch.device("cpu"))
        assert worst == 0, "a whole tensor was still alive when the next one was read"
        share = sum(t.numel() * t.element_size() for _, t in _tensors(local))
        assert held == share and 0.3 < share / sum(t.numel() * 4 for t in sources.values()) < 0.6
