"""Parameter and FLOP counts: hand-computed numbers on a tiny config, agreement with the real module
tree for every family, and DeepSeek-V3's published 671B total / 37B activated."""
import pytest

from model.config import ModelConfig
from model.stats import count_params, flops_per_token
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
