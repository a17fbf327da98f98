"""RoPE: frequencies and cos/sin of every scaling equal transformers' (modeling_rope_utils), the
rotation is relative (q·k depends only on the position difference), and the interleaved layout
equals de-interleaving then rotate-half."""
import warnings

import pytest
import torch

from model.config import ModelConfig
from model.rope import RotaryEmbedding, apply_rope, rope_frequencies
from tests.model.conftest import tiny_config

SCALINGS = {
    "default": ("qwen2", None),
    "linear": ("qwen2", dict(rope_type="linear", factor=2.5)),
    "llama3": ("llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
    "yarn": ("qwen2", dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=64)),
    "yarn-deepseek": ("deepseek_v3", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=32, beta_slow=1, mscale=0.9, mscale_all_dim=0.7)),
    "yarn-attention-factor": ("qwen2", dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=128,
                                            attention_factor=1.3, beta_fast=16, beta_slow=2)),
}


def _hf_rotary(config: ModelConfig):
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = {k: v for k, v in config.to_hf_config().items() if k != "architectures"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.for_model(**d)
    cls = DeepseekV3RotaryEmbedding if config.is_mla else LlamaRotaryEmbedding
    return cls(hf_config)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cos_sin_equal_transformers(name):
    kind, scaling = SCALINGS[name]
    config = tiny_config(kind, rope_scaling=scaling)
    hf = _hf_rotary(config)
    inv_freq, factor = rope_frequencies(config)
    assert torch.allclose(inv_freq, hf.inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf.attention_scaling)
    pos = torch.tensor([[0, 1, 2, 3, 31, 64, 200], [5, 5, 9, 100, 255, 17, 0]])
    cos, sin = RotaryEmbedding(config)(pos)                 # [B, T, R/2]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), pos)  # [B, T, R] = cat(half, half)
    R = config.rope_dim
    assert cos.shape == (2, 7, R // 2)
    for ours, theirs in ((cos, hf_cos), (sin, hf_sin)):
        assert torch.allclose(ours, theirs[..., : R // 2], atol=1e-6)
        assert torch.allclose(ours, theirs[..., R // 2:], atol=1e-6)


def test_rotation_is_relative():
    config = tiny_config("qwen2")
    rope = RotaryEmbedding(config)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, config.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, config.head_dim, generator=g, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq.double(), sq.double()) * apply_rope(k, ck.double(), sk.double())).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)  # fp32 tables
    assert score(7, 3) == pytest.approx(score(255, 251), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(8, 3), abs=1e-3)
    # position 0 is the identity
    c0, s0 = rope(torch.zeros(1, 1, dtype=torch.long))
    assert torch.equal(apply_rope(q.float(), c0, s0), q.float())


def test_interleaved_is_deinterleave_then_rotate_half():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 8, generator=g)  # [B, T, H, R]
    ang = torch.randn(2, 5, 4, generator=g)
    cos, sin = ang.cos(), ang.sin()
    halves = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)  # [x0 x2 x4 x6 | x1 x3 x5 x7]
    assert torch.equal(apply_rope(x, cos, sin, interleaved=True), apply_rope(halves, cos, sin))
    # rotate-half by hand: pair (x[i], x[i + R/2]) rotated by angle i
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = cos[:, :, None], sin[:, :, None]
    assert torch.allclose(apply_rope(x, cos, sin), torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1))


def test_table_grows_beyond_max_position_embeddings_and_is_meta_safe():
    config = tiny_config("qwen2")  # max_position_embeddings 256
    with torch.device("meta"):
        rope = RotaryEmbedding(config)
    assert not rope.inv_freq.is_meta  # frequencies are computed on CPU even under a meta context
    rope.ensure(1000, "cpu")
    assert rope.length("cpu") == 1000
    cos, _ = rope(torch.tensor([[999]]))
    assert torch.allclose(cos[0, 0], torch.cos(999.0 * rope.inv_freq), atol=1e-5)


def test_bad_rope_scaling_is_named():
    with pytest.raises(ValueError, match="needs key 'low_freq_factor'"):
        rope_frequencies(tiny_config("llama", rope_scaling=dict(rope_type="llama3", factor=8.0)))
    with pytest.raises(ValueError, match="rope_scaling type 'ntk' is not supported"):
        tiny_config("qwen2", rope_scaling=dict(rope_type="ntk", factor=2.0))
