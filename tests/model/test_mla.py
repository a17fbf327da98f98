"""MLA: the absorbed path (latent cache, W_UK folded into the query, W_UV into the output) equals
the naive path (k and v expanded from the latent), on random weights, in fp64 and fp32, causal and
over cached keys with a position mask; cached prefill (naive) and decode (absorbed) equal the
plain forward; the cache holds only the latent and the rope key; the YaRN softmax scale."""
import pytest
import torch

from model.attention import MLA
from model.cache import KVCache
from model.rope import RotaryEmbedding, mla_softmax_scale, yarn_mscale
from tests.model.conftest import randomize_, tiny_config


def _mla(dtype, **overrides):
    config = tiny_config("deepseek_v3", **overrides)
    attn = randomize_(MLA(config, layer_idx=0), seed=1).to(dtype)
    return config, attn


def _causal_visible(B, T):
    i = torch.arange(T)
    return (i[None, :] <= i[:, None]).expand(B, T, T)  # [B, T, S=T]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_equals_naive(dtype, tol, q_lora_rank):
    config, attn = _mla(dtype, q_lora_rank=q_lora_rank)
    B, T = 2, 13
    x = torch.randn(B, T, config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T).expand(B, T)
    cos, sin = RotaryEmbedding(config)(pos)
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe = attn.project(x, cos, sin)
        naive = attn.attend_naive(q_nope, q_pe, c_kv, k_pe)                       # [B, T, H, Dv]
        kv = torch.cat([c_kv, k_pe], dim=-1)                                       # [B, T, C + R]
        absorbed = attn.attend_absorbed(q_nope, q_pe, kv, _causal_visible(B, T))
    assert naive.shape == absorbed.shape == (B, T, config.num_attention_heads, config.v_head_dim)
    err = (naive - absorbed).abs().max().item()
    assert err <= tol, f"max |naive - absorbed| = {err:.2e}"


def test_absorbed_equals_naive_over_cached_keys_with_a_position_mask(fp64_default):
    config, attn = _mla(torch.float64, q_lora_rank=24)
    B, T, S = 2, 3, 11  # 3 queries at positions 8..10 of 11 cached keys
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, config.hidden_size, generator=g)
    pos = torch.arange(S).expand(B, S)
    cos, sin = RotaryEmbedding(config)(pos)
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe = attn.project(x, cos, sin)
        visible = (torch.arange(S)[None, :] <= pos[:, -T:, None])              # [B, T, S]
        naive = attn.attend_naive(q_nope[:, -T:], q_pe[:, -T:], c_kv, k_pe, visible=visible)
        absorbed = attn.attend_absorbed(q_nope[:, -T:], q_pe[:, -T:], torch.cat([c_kv, k_pe], -1), visible)
        causal = attn.attend_naive(q_nope, q_pe, c_kv, k_pe)[:, -T:]
    assert (naive - absorbed).abs().max().item() <= 1e-12
    assert (naive - causal).abs().max().item() <= 1e-12


def test_cached_prefill_and_absorbed_decode_match_the_plain_forward():
    config, attn = _mla(torch.float64)
    B, T = 3, 7
    x = torch.randn(B, T + 1, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T + 1).expand(B, T + 1)
    cos, sin = RotaryEmbedding(config)(pos)
    cache = KVCache(config, max_batch_size=4, max_seq_len=16, dtype=torch.float64)
    slots = torch.tensor([3, 0, 2])
    with torch.no_grad():
        plain = attn(x, cos, sin)                                                  # naive, causal
        prefill = attn(x[:, :T], cos[:, :T], sin[:, :T], step=cache.step(slots, pos[:, :T]))  # naive over the cache
        decode = attn(x[:, T:], cos[:, T:], sin[:, T:], step=cache.step(slots, pos[:, T:]))   # absorbed
    assert (plain[:, :T] - prefill).abs().max().item() <= 1e-12
    assert (plain[:, T:] - decode).abs().max().item() <= 1e-12
    # the cache holds exactly the normalised latent and the rotated rope key, nothing per head
    (buf,) = cache.layers[0]
    assert buf.shape == (4, 16, config.kv_lora_rank + config.qk_rope_head_dim)
    with torch.no_grad():
        _, _, c_kv, k_pe = attn.project(x, cos, sin)
    assert torch.allclose(buf[slots, : T + 1, : config.kv_lora_rank], c_kv, rtol=0, atol=1e-13)
    assert torch.allclose(buf[slots, : T + 1, config.kv_lora_rank:], k_pe, rtol=0, atol=1e-13)
    assert buf[1].abs().sum() == 0  # an unused slot stays untouched


def test_softmax_scale_with_yarn_mscale():
    config = tiny_config("deepseek_v3-moe")  # YaRN factor 4, mscale_all_dim 0.8
    m = 0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert yarn_mscale(4.0, 0.8) == pytest.approx(m)
    assert mla_softmax_scale(config) == pytest.approx(config.qk_head_dim ** -0.5 * m * m)
    plain = tiny_config("deepseek_v3")
    assert mla_softmax_scale(plain) == pytest.approx((14 + 6) ** -0.5)
