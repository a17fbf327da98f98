"""Helpers shared by the model tests: tiny configs of every family, transformers oracles, weight copies.

- `tiny_config(kind, **overrides)`: small ModelConfigs with odd sizes (not only powers of two).
- `hf_model_for(config, seed)`: the transformers model of that config (float32, eager attention,
  eval mode) with *every* parameter and buffer randomised (norm weights around 1, biases and the
  router's correction bias non-zero), so that a wrong name, order or transpose shows up.
- `our_model_from_hf(hf_model, config)`: our Transformer holding the same weights (the in-memory
  transformers names are the on-disk ones except DeepSeek-V3's fused experts, split here).
- `random_model(config, seed)`: our Transformer with all parameters randomised the same way.
"""
import re

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer

# Odd sizes everywhere: hidden 72, 6 heads (2 or 3 kv heads), intermediate 100, vocab 301.
_BASE = dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0)

TINY = {
    "qwen2": dict(_BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=False),
    "qwen2-tied": dict(_BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                       num_key_value_heads=3),
    "llama": dict(_BASE, model_type="llama", attention_bias=True, o_bias=True, mlp_bias=True,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=16),
                  rope_theta=500000.0),
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=16, qk_norm=True, num_key_value_heads=3),
    # MLA with a plain q_proj, dense layers only
    "deepseek_v3": dict(_BASE, model_type="deepseek_v3", num_key_value_heads=6, q_lora_rank=None,
                        kv_lora_rank=20, qk_nope_head_dim=14, qk_rope_head_dim=6, v_head_dim=10,
                        rope_interleave=True, first_k_dense_replace=2),
    # MLA with a low-rank query, YaRN, and DeepSeekMoE after one dense layer, group-limited routing
    "deepseek_v3-moe": dict(_BASE, model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=6,
                            q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=14, qk_rope_head_dim=6,
                            v_head_dim=10, rope_interleave=True,
                            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
                            n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
                            moe_intermediate_size=26, first_k_dense_replace=1, n_group=3, topk_group=2,
                            routed_scaling_factor=2.5, norm_topk_prob=True),
    # Qwen3-MoE: Qwen3's attention, softmax top-2 of 6 experts renormalised, layer 1 dense (mlp_only_layers)
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", num_hidden_layers=3, head_dim=16, num_key_value_heads=3,
                      n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=26, norm_topk_prob=True,
                      mlp_only_layers=[1]),
}


def tiny_config(kind: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY[kind], **overrides})


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every floating tensor of `module`'s state dict random values (in place; non-persistent
    buffers such as rope frequencies are left alone): matrices ~ N(0, 1/fan_in) so activations stay
    O(1); vectors named like norms ~ 1 + N(0, 0.1²); other vectors (biases, router correction
    biases) ~ N(0, 0.1²). Shared tensors are set once."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        r = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if t.dim() >= 2:
            r = r / t.shape[-1] ** 0.5
        elif re.search(r"norm", name):
            r = 1.0 + 0.1 * r
        else:
            r = 0.1 * r
        t.copy_(r.to(t.dtype))
    return module


def hf_model_for(config: ModelConfig, seed: int = 0):
    """The transformers model of `config`: float32, eager attention, eval, randomised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = config.to_hf_config()
    hf_config = AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", experts_implementation="eager",
                                             dtype=torch.float32)
    return randomize_(model, seed).eval()


def hf_state_dict_on_disk_names(hf_model) -> dict[str, torch.Tensor]:
    """transformers' in-memory state dict with DeepSeek-V3's fused experts split into the on-disk
    per-expert names: experts.gate_up_proj [E, 2I, D] -> experts.{e}.gate_proj/up_proj [I, D],
    experts.down_proj [E, D, I] -> experts.{e}.down_proj [D, I]."""
    out = {}
    for name, t in hf_model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


@torch.no_grad()
def our_model_from_hf(hf_model, config: ModelConfig) -> Transformer:
    """Our Transformer with hf_model's weights; every one of our tensors must be covered, except the
    MTP modules (transformers has none) and lm_head when tied."""
    ours = Transformer(config).eval()
    theirs = hf_state_dict_on_disk_names(hf_model)
    mtp_prefix = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    missing = []
    for name, t in ours.state_dict().items():
        if name in theirs:
            if theirs[name].shape != t.shape:
                raise AssertionError(f"{name}: ours {tuple(t.shape)} vs transformers {tuple(theirs[name].shape)}")
            t.copy_(theirs[name])
        elif not (mtp_prefix and name.startswith(mtp_prefix)):
            missing.append(name)
    assert not missing, f"weights transformers does not have: {missing}"
    unused = set(theirs) - set(ours.state_dict())
    assert not unused, f"transformers weights we have no place for: {sorted(unused)}"
    return ours


def random_model(config: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    """Our Transformer with every parameter randomised (see randomize_), in eval mode."""
    torch.manual_seed(seed)
    return randomize_(Transformer(config), seed).to(dtype).eval()


@pytest.fixture
def fp64_default():
    """Run the test with float64 as the default dtype (for tight equalities)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
