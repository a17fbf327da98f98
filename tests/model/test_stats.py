"""Parameter and FLOP counts: hand-computed numbers on a tiny config, agreement with the real module
tree for every family, and DeepSeek-V3's published 671B total / 37B activated.

The memory planner (`python -m model.stats plan`): activation bytes equal to what autograd keeps (CPU
paths, every family, fp32 and bf16), KV bytes per token from the config (MLA latent vs GQA heads), the
parts adding up to phases and total, sharding dividing by the GPUs, activation checkpointing, the
reference model, the rollout-TP what-if, the advice of a plan that does not fit, the JSON line, a
--model folder of a 32B or 671B config.json without weights, bad flags, and the README's figures.
The measurement of real CPU runs against the planner is bench/planner_check.py, not a test."""
import json
import re
from pathlib import Path

import pytest
import torch

from kernels import token_logprobs
from model.cache import KVCache
from model.config import ModelConfig
from model.memory_plan import (PREFILL_TOKENS, GiB, PlanSettings, _layout, head_activation_bytes,
                               kv_cache_bytes_per_token, layer_activation_bytes, plan_memory, tp_share_elements)
from model.stats import count_params, flops_per_token, main
from model.transformer import Transformer
from tests.model.conftest import TINY, tiny_config


def test_hand_counted_tiny_qwen2():
    # vocab 10, D 4, I 6, 1 layer, 2 heads of 2, 1 kv head, q/k/v biases, tied embeddings
    c = ModelConfig(model_type="qwen2", vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True)
    attn = (4 * 4 + 4) + 2 * (4 * 2 + 2) + 4 * 4  # q 20, k 10, v 10, o 16 = 56
    mlp = 3 * 4 * 6  # 72
    norms = 4 + 4 + 4  # two in the block, the final one
    emb = 10 * 4
    n = count_params(c)
    assert (n.total, n.active, n.embedding, n.mtp) == (emb + attn + mlp + norms, emb + attn + mlp + norms, 40, 0)
    assert n.total_without_embedding == 140
    # forward: 2 N with N = 140 + the tied head 40 (the lookup is free), attention 2·L·S·H·(Dqk+Dv)
    assert flops_per_token(c, seq_len=8, training=False) == 2 * 180 + 2 * 1 * 8 * 2 * (2 + 2)
    assert flops_per_token(c, seq_len=8) == 6 * 180 + 6 * 1 * 8 * 2 * (2 + 2)


def test_hand_counted_tiny_moe_active():
    c = tiny_config("deepseek_v3-moe")  # 3 layers, first dense; 6 experts of I 26, top-2, 1 shared
    D, E, k, I = 72, 6, 2, 26
    expert = 3 * D * I
    n = count_params(c)
    assert n.total - n.active == 2 * (E - k) * expert  # two MoE layers, 4 idle experts each


@pytest.mark.parametrize("kind", list(TINY))
def test_counts_equal_the_module_tree(kind):
    for extra in ({}, {"num_nextn_predict_layers": 1} if kind.startswith("deepseek") else {}):
        c = tiny_config(kind, **extra)
        model = Transformer(c)
        assert count_params(model).total == sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
        if extra:
            mtp_own = {id(p): p.numel() for p in model.mtp.parameters()}
            for shared in (model.lm_head.weight, model.model.embed_tokens.weight):
                mtp_own.pop(id(shared), None)
            buffers = sum(b.numel() for b in model.mtp.buffers())
            assert count_params(c).mtp == sum(mtp_own.values()) + buffers


def test_deepseek_v3_published_sizes():
    v3 = ModelConfig(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                     num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
                     first_k_dense_replace=3, n_group=8, topk_group=4, num_nextn_predict_layers=1)
    n = count_params(v3)
    assert n.total - n.mtp == pytest.approx(671e9, rel=0.005)   # "671B total parameters"
    # "685B" on the Hub: the checkpoint also stores the MTP module's copies of embedding and head
    assert n.total + n.embedding == pytest.approx(685e9, rel=0.002)
    assert n.active == pytest.approx(37e9, rel=0.02)            # "37B activated per token"
    assert n.mtp == pytest.approx(11.5e9, rel=0.05)              # README_WEIGHTS: 11.5B unique MTP parameters


def test_qwen3_30b_a3b_published_sizes():
    """Qwen3-30B-A3B's config.json (PUBLISHED below): "30.5B total, 3.3B activated"."""
    q = published("Qwen3-30B-A3B-Base")
    assert q.num_moe_layers == 48 and q.head_dim == 128 and q.scoring_func == "softmax"
    n = count_params(q)
    assert n.total == pytest.approx(30.5e9, rel=0.005)
    assert n.active == pytest.approx(3.3e9, rel=0.02)


# ---- the memory planner ----------------------------------------------------------------------------

# config.json of the published checkpoints the README's recipes use (the keys that decide memory), and
# DeepSeek-V3's; written into temporary folders with no weights.
QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
             torch_dtype="bfloat16", use_sliding_window=False)
PUBLISHED = {
    "Qwen2.5-Math-1.5B": dict(QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                              rope_theta=10000.0, tie_word_embeddings=True),
    "Qwen2.5-Math-7B": dict(QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
                            rope_theta=10000.0, tie_word_embeddings=False),
    "Qwen2.5-32B": dict(QWEN2, vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                          max_position_embeddings=131072, rope_theta=10000.0,
                                          tie_word_embeddings=False),
    "DeepSeek-V3": dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280,
                        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4,
                        num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0,
                        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                        scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc",
                        tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6,
                        quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128])),
    "Qwen3-30B-A3B-Base": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                               hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                               mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=32768,
                               rope_theta=1000000.0, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
                               output_router_logits=False, use_sliding_window=False, sliding_window=None,
                               hidden_act="silu", torch_dtype="bfloat16"),
}


def published(name: str) -> ModelConfig:
    return ModelConfig.from_hf_config(PUBLISHED[name])


def folder(tmp_path: Path, name: str) -> Path:
    """A checkpoint folder holding only config.json (no safetensors, no tokenizer)."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PUBLISHED[name]))
    return d


def run_plan(argv: list[str], capsys) -> tuple[int, str, dict]:
    code = main(["plan", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, "\n".join(out[:-1]), json.loads(out[-1])


def _saved_bytes(model, tokens: int) -> int:
    """Bytes of the storages autograd keeps for backward (parameters aside) in a training forward of one
    packed row of two documents, the head through kernels.token_logprobs, as sft/loop.py runs it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32)
    keep = torch.ones(tokens, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model.forward_hidden(ids, cu_seqlens=cu).reshape(tokens, -1)[keep]
        token_logprobs(h, model.output_weight, ids[0][keep])
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(TINY))
def test_activation_bytes_equal_what_autograd_keeps_on_cpu(kind, dtype):
    """The planner's per-token activation bytes (--device cpu: SDPA and the RMSNorm twin) are exactly the
    storages autograd saves per extra token (the difference of two lengths cancels per-weight constants)."""
    c = tiny_config(kind)
    model = Transformer(c).to(dtype)
    b = torch.tensor([], dtype=dtype).element_size()
    per_token = (_saved_bytes(model, 40) - _saved_bytes(model, 24)) / 16
    planned = sum(layer_activation_bytes(c, i, b, cpu=True) for i in range(c.num_hidden_layers))
    planned += head_activation_bytes(c, 1, 1, b, cpu=True)
    assert per_token == planned


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "deepseek_v3", "deepseek_v3-moe"])
def test_kv_bytes_per_token_follow_the_config(kind):
    c = tiny_config(kind)
    for dtype, b in ((torch.float32, 4), (torch.bfloat16, 2)):
        assert kv_cache_bytes_per_token(c, b) == KVCache(c, 1, 1, dtype=dtype).bytes_per_token
    # MLA caches the latent and the rope key; GQA k and v of every kv head
    v3, q7 = published("DeepSeek-V3"), published("Qwen2.5-Math-7B")
    assert kv_cache_bytes_per_token(v3, 2) == 61 * (512 + 64) * 2          # 70 KB per token
    assert kv_cache_bytes_per_token(q7, 2) == 28 * 2 * 4 * 128 * 2         # 56 KB per token


@pytest.mark.parametrize("kind", list(TINY))
def test_layout_counts_every_parameter_once(kind):
    for extra in ({}, {"num_nextn_predict_layers": 1} if kind.startswith("deepseek") else {}):
        c = tiny_config(kind, **extra)
        lay = _layout(c)
        assert lay.total + lay.buffers == count_params(c).total
        assert lay.total == sum(p.numel() for p in Transformer(c).parameters())


def grpo(**kw) -> PlanSettings:
    return PlanSettings(**{**dict(stage="grpo", gpus=8, micro_batch_tokens=8192, gpu_mem_gib=79, rollout_batch=64,
                                  prompt_len=512, max_new_tokens=3000), **kw})


def test_parts_add_up_to_the_phases_and_the_total():
    plan = plan_memory(published("Qwen2.5-Math-7B"), grpo(beta=0.04))
    always = sum(p.bytes for p in plan.parts if p.phases == ("always",))
    for phase, total in plan.phases.items():
        assert total == always + sum(p.bytes for p in plan.parts if phase in p.phases)
    assert set(plan.phases) == {"train", "step", "rollout", "ref_pass"}
    assert plan.computed_bytes == max(plan.phases.values()) == plan.phases[plan.peak_phase]
    assert plan.rest_bytes == round(1.5 * GiB) + round(0.10 * plan.computed_bytes)   # the stated allowance
    assert plan.total_bytes == plan.computed_bytes + plan.rest_bytes
    cpu = plan_memory(published("Qwen2.5-Math-7B"), grpo(device="cpu", param_dtype="fp32"))
    assert cpu.rest_bytes == 0 and cpu.total_bytes == cpu.computed_bytes       # no CUDA allowance on CPU


def test_sharding_divides_the_sharded_parts_by_the_gpus():
    c = published("Qwen2.5-Math-7B")
    P = count_params(c).total
    one, eight = plan_memory(c, grpo(gpus=1, beta=0.04)), plan_memory(c, grpo(gpus=8, beta=0.04))
    rope = 2 * 4096 * 64 * 4                                          # fp32 cos/sin tables [4096, 64]
    assert one.part("weights") == 4 * P + rope and eight.part("weights") == 4 * P // 8 + rope
    assert one.part("optimizer") == 8 * P and eight.part("optimizer") == P
    assert one.part("gradients") == 4 * P and eight.part("gradients") == P // 2
    assert eight.part("reference") == 2 * P // 8 + rope                # bf16 copy, sharded
    for unsharded in ("activations", "kv_cache", "rollout_weights", "rollout_working"):
        assert one.part(unsharded) == eight.part(unsharded) > 0
    assert eight.part("rollout_weights") == 2 * P                      # the whole model, bf16, on every rank
    # one process in fp32 is a plain module (model.parallel.training_fsdp): nothing gathered
    plain = plan_memory(c, grpo(gpus=1, param_dtype="fp32"))
    assert plain.part("rollout_weights") == 0 and plain.part("train_gathered") == 0


def test_activation_checkpointing_keeps_only_block_inputs():
    c = published("Qwen2.5-Math-7B")
    full = plan_memory(c, grpo())
    ckpt = plan_memory(c, grpo(activation_checkpointing=True))
    T = 3512 * 2                                                       # sequences packed whole: 2 x (512 + 3000)
    head = head_activation_bytes(c, T, 2 * 3000, 2, cpu=False, checkpointing=True, grpo=True)
    assert ckpt.part("activations") == 28 * T * 3584 * 2 + head
    assert full.part("activations") > 10 * ckpt.part("activations")
    assert ckpt.phases["train"] < full.phases["train"]


def test_beta_adds_the_reference_model():
    c = published("DeepSeek-R1-Distill-Qwen-1.5B")
    no_ref, ref = plan_memory(c, grpo(beta=0)), plan_memory(c, grpo(beta=0.04))
    assert no_ref.part("reference") == 0 and "ref_pass" not in no_ref.phases
    lay = _layout(c)
    rope = 2 * 131072 * 64 * 4
    assert ref.part("reference") == -(-lay.copy_bytes(2) // 8) + rope   # bf16, sharded like the policy
    assert ref.phases["train"] == no_ref.phases["train"] + ref.part("reference")
    assert ref.part("ref_gathered") == lay.copy_bytes(2)                # gathered for its log-prob pass


def test_moe_router_stays_fp32_in_every_copy():
    v3 = published("DeepSeek-V3")
    lay = _layout(v3)
    assert lay.routers == 59 * 256 * 7168                              # 58 MoE layers + the MTP module's
    assert lay.copy_bytes(2) == 2 * (lay.total - lay.routers) + 4 * lay.routers


def test_rollout_tp_plans_the_tensor_parallel_share():
    c = published("Qwen2.5-32B")
    base, tp = plan_memory(c, grpo(gpus=128)), plan_memory(c, grpo(gpus=128, rollout_tp=8))
    low, fp32 = tp_share_elements(c, 8)
    assert tp.part("rollout_weights") == 2 * low + 4 * fp32 + 2 * _layout(c).largest
    # 1/8, plus the norms (whole on every rank) and the embedding gathered whole in bf16 while it is cut
    assert 0.14 < tp.part("rollout_weights") / base.part("rollout_weights") < 0.16
    assert tp.part("kv_cache") == base.part("kv_cache") // 8            # kv heads split over the TP group
    assert not any("not built" in n for n in tp.notes)
    v3 = plan_memory(published("DeepSeek-V3"), grpo(gpus=256, rollout_tp=8))
    assert v3.part("kv_cache") == plan_memory(published("DeepSeek-V3"), grpo(gpus=256)).part("kv_cache")  # MLA latent
    with pytest.raises(ValueError, match="num_attention_heads = 40, num_key_value_heads = 8 are not divisible by 16"):
        plan_memory(c, grpo(gpus=128, rollout_tp=16))
    with pytest.raises(ValueError, match="--rollout-tp 3: expected a divisor of --gpus 128"):
        plan_memory(c, grpo(gpus=128, rollout_tp=3))


def test_tp_share_elements_equal_the_share_module_tree():
    from model.tensor_parallel import _keeps_fp32, build_local_model, check_tensor_parallel
    from runtime.distributed import Subgroup

    checked = 0
    cases = [(tiny_config(kind), k) for kind in TINY for k in (2, 3)]
    cases += [(ModelConfig.from_preset("tiny-moe"), 2), (ModelConfig.from_preset("tiny"), 2),
              (ModelConfig.from_preset("tiny-qwen3-moe"), 2),
              (published("Qwen2.5-32B").replace(num_hidden_layers=2), 8)]
    for c, k in cases:
        try:
            check_tensor_parallel(c, k)
        except ValueError:
            continue
        for rank in range(k):
            local = build_local_model(c, Subgroup(tuple(range(k)), rank, 0))
            seen, low, fp32 = set(), 0, 0
            for name, t in [*local.named_parameters(), *local.named_buffers()]:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                if _keeps_fp32(name):
                    fp32 += t.numel()
                else:
                    low += t.numel()
            assert tp_share_elements(c, k) == (low, fp32), (c.model_type, k, rank)
        checked += 1
    assert checked >= 6


def test_a_plan_that_does_not_fit_says_what_to_change(tmp_path, capsys):
    d = folder(tmp_path, "Qwen2.5-32B")
    code, table, line = run_plan(["--model", str(d), "--stage", "grpo", "--gpus", "128", "--gpu-mem-gib", "79",
                                  "--micro-batch-tokens", "8192", "--max-new-tokens", "20480",
                                  "--activation-checkpointing"], capsys)
    assert code == 1 and line["fits"] is False and line["peak_phase"] == "rollout"
    assert "does NOT fit" in table and "to make it fit:" in table
    assert any(a.startswith("tensor-parallel rollouts: --rollout-tp 8 gives") for a in line["advice"])
    assert any("--rollout-batch" in a and "--sampler-batch-size" in a for a in line["advice"])
    assert any(a.startswith("more GPUs alone do not fit") for a in line["advice"])   # the gathered model is whole
    for a in line["advice"]:
        assert a in table
    # 32B SFT on 8 GPUs: the optimizer step alone (shards + AdamW's foreach temporary) is over 79 GiB
    code, table, line = run_plan(["--model", str(d), "--stage", "sft", "--gpus", "8", "--gpu-mem-gib", "79",
                                  "--micro-batch-tokens", "1024"], capsys)
    assert code == 1 and line["phases"]["step"] > 79 * GiB / 1.1 - 1.5 * GiB    # over, with the allowance
    assert any(a.startswith("smaller micro-batches do not fit") for a in line["advice"])
    assert any(a.startswith("more GPUs: --gpus 16 gives") for a in line["advice"])
    # a training-bound plan: checkpointing, smaller micro-batches, more GPUs
    code, table, line = run_plan(["--model", str(folder(tmp_path, "Qwen2.5-Math-7B")), "--stage", "sft", "--gpus", "8",
                                  "--gpu-mem-gib", "79", "--micro-batch-tokens", "32768"], capsys)
    assert code == 1 and line["peak_phase"] == "train"
    assert any(a.startswith("--activation-checkpointing gives") and "still over" not in a for a in line["advice"])
    assert any(a.startswith("smaller micro-batches: --micro-batch-tokens") for a in line["advice"])
    assert any(a.startswith("more GPUs alone do not fit") for a in line["advice"])   # activations are per GPU


def test_json_line_holds_every_part_and_matches_the_plan(tmp_path, capsys):
    d = folder(tmp_path, "DeepSeek-R1-Distill-Qwen-1.5B")
    code, table, line = run_plan(["--model", str(d), "--stage", "grpo", "--gpus", "8", "--gpu-mem-gib", "79",
                                  "--micro-batch-tokens", "8192", "--max-new-tokens", "2048", "--beta", "0.04",
                                  "--group-size", "16"], capsys)
    plan = plan_memory(published("DeepSeek-R1-Distill-Qwen-1.5B"),
                       grpo(max_new_tokens=2048, beta=0.04, group_size=16))
    assert code == 0 and line["fits"] is True
    assert line["total_bytes"] == plan.total_bytes and line["phases"] == plan.phases
    assert set(line["parts"]) == {p.name for p in plan.parts} | {"rest"}
    assert {"weights", "gradients", "optimizer", "activations", "rollout_weights", "kv_cache", "reference",
            "rest"} <= set(line["parts"])
    assert f"{plan.total_bytes / GiB:.2f} GiB per GPU" in table


def test_model_folder_needs_only_config_json(tmp_path, capsys):
    for name, params in (("Qwen2.5-32B", 32.76e9), ("DeepSeek-V3", 684.5e9)):
        d = folder(tmp_path, name)
        assert [f.name for f in d.iterdir()] == ["config.json"]
        code, table, line = run_plan(["--model", str(d), "--stage", "sft", "--gpus", "256", "--gpu-mem-gib", "139",
                                      "--micro-batch-tokens", "4096", "--activation-checkpointing"], capsys)
        assert code in (0, 1) and line["params"] == pytest.approx(params, rel=0.003)
        assert line["total_bytes"] == sum([max(line["phases"].values()), line["rest_bytes"]])
    assert "MTP modules" in table                                      # DeepSeek-V3's, gathered, never trained


def test_bad_flags_are_named(tmp_path, capsys):
    base = ["--stage", "sft", "--gpus", "8", "--gpu-mem-gib", "79", "--micro-batch-tokens", "4096"]
    for argv, expected in (
            (["--preset", "tiny", *base, "--beta", "0.04"], "--beta"),
            (["--preset", "nope", *base], "--preset 'nope'"),
            (["--preset", "tiny", *base[:3], "0", *base[4:]], "--gpus 0"),
            (["--model", str(tmp_path), *base], "config.json"),
            (["--model", str(tmp_path), "--preset", "tiny", *base], "exactly one of --model"),
            (["--preset", "tiny", *base, "--rollout-tp", "2"], "--rollout-tp")):
        assert main(["plan", *argv]) == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a required flag missing
        main(["plan", "--preset", "tiny", "--stage", "grpo"])
    assert e.value.code == 2


def test_prefill_budget_is_the_samplers():
    from model.memory_plan import PAGE_SIZE
    from sampling.engine import PAGE_SIZE as engine_page_size
    from sampling.engine import PREFILL_TOKENS as sampler_budget   # model/ cannot import sampling/
    assert PREFILL_TOKENS == sampler_budget
    assert PAGE_SIZE == engine_page_size


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_planner_figures_are_the_planners(tmp_path, capsys):
    """Each planner command of the README's real-scale section, run on the published config.json it names,
    prints the per-GPU figure and verdict the README states next to it."""
    text = README.read_text()
    section = text[text.index("## Real-scale recipes"):text.index("## Tests")]
    found = re.findall(r"`python -m model\.stats plan ([^`]+)`:\s+([\d.]+) GiB per GPU,\s+(fits|does not fit)", section)
    assert len(found) == 6   # one per recipe, and recipe 3 without --rollout-tp
    for flags, gib, verdict in found:
        argv = flags.split()
        name = argv[argv.index("--model") + 1]
        argv[argv.index("--model") + 1] = str(tmp_path / name if (tmp_path / name).exists() else folder(tmp_path, name))
        code, _, line = run_plan(argv, capsys)
        assert f"{line['total_bytes'] / GiB:.1f}" == gib, flags
        assert line["fits"] == (verdict == "fits") and code == (0 if line["fits"] else 1), flags
