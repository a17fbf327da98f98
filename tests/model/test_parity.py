"""Logits equal transformers' (eager attention, float32) for random-weight models of every family.

Configs (tests/model/conftest.py) use odd sizes: hidden 72, 6 heads with 2/3/6 kv heads,
intermediate 100, vocab 301, MLA ranks 20/24 with rope dim 6 and v dim 10. Each is run on separate
sequences of lengths 5, 11 and 17 and on a right-padded batch of the three (compared on the valid
positions). Bad input: unsupported model types, missing config keys, out-of-vocab ids.
"""
import warnings

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer

from tests.model.conftest import TINY, hf_model_for, our_model_from_hf, random_model, tiny_config

LENGTHS = (5, 11, 17)
TOL = 1e-4

CASES = {
    "qwen2": {},
    "qwen2-tied": {},
    "llama": {},
    "qwen3": {},
    "deepseek_v3": {},  # q_proj (q_lora_rank null), dense
    "deepseek_v3-moe": {},  # q_lora_rank, YaRN with mscale_all_dim, MoE with n_group 3, first_k_dense 1
    "deepseek_v3-noninterleaved": dict(kind="deepseek_v3", rope_interleave=False, num_key_value_heads=6),
    # (transformers' DeepseekV3 routes with sigmoid scores only; softmax routing is model/moe.py's tests')
    "deepseek_v3-moe-plain": dict(kind="deepseek_v3-moe", norm_topk_prob=False, n_group=1, topk_group=1,
                                  rope_scaling=None, q_lora_rank=None, n_shared_experts=2),
    "qwen2-linear-rope": dict(kind="qwen2", rope_scaling=dict(rope_type="linear", factor=2.5)),
    "qwen3-bias": dict(kind="qwen3", attention_bias=True, o_bias=True),
    "llama-yarn": dict(kind="llama", rope_scaling=dict(rope_type="yarn", factor=3.0,
                                                       original_max_position_embeddings=64)),
    "qwen3_moe": {},  # norm_topk_prob, untied, layer 1 MLP-only
    # the combine weights as the softmax gives them, tied embeddings, every other layer MoE
    "qwen3_moe-plain-tied": dict(kind="qwen3_moe", norm_topk_prob=False, tie_word_embeddings=True, mlp_only_layers=[],
                                 decoder_sparse_step=2, num_hidden_layers=4),
}


def _pair(name):
    overrides = dict(CASES[name])
    kind = overrides.pop("kind", name)
    config = tiny_config(kind, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_model_for(config, seed=hash(name) % 1000)
    return config, hf, our_model_from_hf(hf, config)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(name):
    config, hf, ours = _pair(name)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in LENGTHS]
    with torch.no_grad():
        for s in seqs:  # separate sequences
            ref = hf(s[None]).logits
            got = ours(s[None])
            assert got.shape == ref.shape == (1, len(s), config.vocab_size)
            assert got.dtype == torch.float32
            err = (got - ref).abs().max().item()
            assert err <= TOL, f"{name} length {len(s)}: max |ours - transformers| = {err:.2e}"
        # one right-padded batch: padding at the end never reaches the real tokens (causal)
        T = max(LENGTHS)
        batch = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        got = ours(batch)
        for i, s in enumerate(seqs):
            ref = hf(s[None]).logits[0]
            err = (got[i, : len(s)] - ref).abs().max().item()
            assert err <= TOL, f"{name} padded row {i}: max |ours - transformers| = {err:.2e}"


def test_tied_embeddings_share_one_parameter():
    config, hf, ours = _pair("qwen2-tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.output_weight is ours.model.embed_tokens.weight
    untied = Transformer(tiny_config("qwen2"))
    assert untied.output_weight is untied.lm_head.weight
    assert untied.output_weight is not untied.model.embed_tokens.weight


def test_forward_hidden_is_the_normed_state_before_the_head():
    config, hf, ours = _pair("qwen3")
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = ours.forward_hidden(ids)
        ref = hf(ids, output_hidden_states=True).hidden_states[-1]  # transformers' last entry is normed
        assert h.shape == (2, 9, config.hidden_size)
        assert (h - ref).abs().max().item() <= TOL
        assert torch.allclose(ours(ids), h @ ours.output_weight.T, atol=1e-5)
        assert torch.equal(ours(ids, return_hidden=True), h)


def test_meta_construction_allocates_nothing_and_keeps_ties():
    config = tiny_config("qwen2-tied")
    with torch.device("meta"):
        m = Transformer(config)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.init_weights()
    ids = torch.randint(0, config.vocab_size, (1, 4))
    assert torch.isfinite(m(ids)).all()


def test_unsupported_model_type_and_missing_key_are_named():
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        ModelConfig.from_hf_config({"model_type": "mistral", "vocab_size": 10})
    with pytest.raises(ValueError, match="missing config key 'kv_lora_rank'"):
        d = tiny_config("deepseek_v3").to_hf_config()
        del d["kv_lora_rank"]
        ModelConfig.from_hf_config(d)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_moe"])
def test_sliding_window_configs_are_refused(kind):
    d = tiny_config(kind).to_hf_config()
    d.update(use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="use_sliding_window=true: sliding-window attention is not supported"):
        Transformer(ModelConfig.from_hf_config(d))
    d["use_sliding_window"] = False  # what Qwen2/2.5 and Qwen3-MoE checkpoints ship
    Transformer(ModelConfig.from_hf_config(d))


def test_qwen3_moe_config_keys_are_read_checked_and_written_back():
    d = tiny_config("qwen3_moe").to_hf_config()
    assert d["architectures"] == ["Qwen3MoeForCausalLM"] and d["num_experts"] == 6 and d["mlp_only_layers"] == [1]
    c = ModelConfig.from_hf_config({**d, "output_router_logits": True, "router_aux_loss_coef": 0.01})
    assert (c.n_routed_experts, c.scoring_func, c.qk_norm, c.norm_topk_prob) == (6, "softmax", True, True)
    assert [c.is_moe_layer(i) for i in range(3)] == [True, False, True] and c.num_moe_layers == 2
    assert c.output_router_logits and c.router_aux_loss_coef == 0.01 and not c.router_correction_bias
    assert ModelConfig.from_hf_config(c.to_hf_config()) == c                       # a round trip loses nothing
    every_other = ModelConfig.from_hf_config({**d, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert [every_other.is_moe_layer(i) for i in range(3)] == [False, True, False]
    with pytest.raises(ValueError, match=r"config.json: mlp_only_layers \[1, 7\]: 7 is not a layer index \(0..2\)"):
        ModelConfig.from_hf_config({**d, "mlp_only_layers": [1, 7]})
    with pytest.raises(ValueError, match="decoder_sparse_step 0: expected an integer >= 1"):
        ModelConfig.from_hf_config({**d, "decoder_sparse_step": 0})
    with pytest.raises(ValueError, match="missing config key 'moe_intermediate_size'"):
        ModelConfig.from_hf_config({k: v for k, v in d.items() if k != "moe_intermediate_size"})
    with pytest.raises(ValueError, match="aux-loss-free balancing needs the router's correction bias"):
        tiny_config("qwen3_moe", bias_update_speed=1e-3)
    # no correction bias on the router: nothing of the kind in the state dict (transformers has none)
    assert not any("e_score_correction_bias" in k for k in Transformer(c).state_dict())


def test_out_of_vocab_ids_name_the_max_id_and_vocab_size():
    m = Transformer(tiny_config("qwen2"))
    with pytest.raises(ValueError, match=r"max id 301\b.*vocab_size is 301"):
        m(torch.tensor([[1, 2, 301]]))
    with pytest.raises(ValueError, match=r"input_ids out of range.*-1"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        m(torch.tensor([1, 2]))


def test_every_case_config_is_a_family_we_cover():
    kinds = {CASES[n].get("kind", n) for n in CASES}
    assert kinds == set(TINY)
    assert {tiny_config(k).model_type for k in kinds} == {"deepseek_v3", "qwen2", "llama", "qwen3", "qwen3_moe"}


def test_init_is_seeded_and_follows_the_config():
    config = tiny_config("deepseek_v3-moe", initializer_range=0.05)
    torch.manual_seed(0)
    a = Transformer(config)
    torch.manual_seed(0)
    b = Transformer(config)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    w = a.model.layers[1].self_attn.kv_b_proj.weight
    assert abs(w.std().item() - 0.05) < 0.005
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(config.hidden_size))
    assert torch.equal(a.model.layers[1].mlp.gate.e_score_correction_bias, torch.zeros(config.n_routed_experts))


def test_bfloat16_model_and_cache_follow_the_model_dtype():
    config = tiny_config("qwen2")
    model = random_model(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids)
        model.to(torch.bfloat16)
        got = model(ids)
        cache = model.make_cache(2, 16)
        cached = model(ids, torch.arange(9).expand(2, 9), cache=cache)
    assert got.dtype == cached.dtype == cache.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
    assert (cached.float() - got.float()).abs().max().item() <= 0.1 * ref.abs().max().item()
