"""Parameter and FLOP counts from a ModelConfig alone (no weights needed: works for a 671B config).

Letters: L layers, D model dim, V vocab, H heads, K kv heads, Dh head dim, I MLP intermediate,
E routed experts, k experts per token, S sequence length.

`count_params(model_or_config)` -> ParamCount:
- total: every parameter of Transformer(config), shared tensors once (MTP modules included);
- mtp: the MTP modules' own parameters (their embedding and head are the main model's);
- embedding: the input embedding V·D plus, when untied, the output head V·D;
- active: parameters one token uses at inference in the main model: routed experts count only k
  of E per MoE layer (shared experts always), MTP modules not at all (DeepSeek-V3's "37B
  activated" counts this way, embedding and head included);
- total_without_embedding, active_without_embedding: the same minus `embedding`.

`flops_per_token(config, seq_len)` (the PaLM appendix B / Chinchilla convention), training:

    F = 6 N + 6 L S H (Dqk + Dv)

N = active parameters that do matrix multiplies (all active ones except the input embedding,
which is a lookup; the output head counts once even when tied). 6 = 2 FLOPs per multiply-add ×
(forward + 2 for backward). The second term is attention's q·k and p·v products over S keys per
query per layer (2 S H Dqk + 2 S H Dv forward), counted without halving for the causal mask, as
PaLM does; for GQA with Dqk = Dv = Dh it is PaLM's 12 L H Dh S. `training=False` gives the forward
alone: 2 N + 2 L S H (Dqk + Dv). MLA counts Dqk = qk_nope + qk_rope, Dv = v_head_dim (the naive
form; the absorbed decode form does the same products in latent space).

Used by model.stats (which re-exports them) and the memory planner (model/memory_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int
    mtp: int

    @property
    def total_without_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_without_embedding(self) -> int:
        return self.active - self.embedding


def _linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _mlp(D: int, I: int, bias: bool = False) -> int:
    return 2 * _linear(D, I, bias) + _linear(I, D, bias)


def attention_params(c: ModelConfig) -> int:
    """One layer's attention parameters (norms inside attention included)."""
    D, H = c.hidden_size, c.num_attention_heads
    if c.is_mla:
        Dqk, C, R = c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
        if c.q_lora_rank is None:
            q = _linear(D, H * Dqk)
        else:
            q = _linear(D, c.q_lora_rank, c.attention_bias) + c.q_lora_rank + _linear(c.q_lora_rank, H * Dqk)
        kv = _linear(D, C + R, c.attention_bias) + C + _linear(C, H * (c.qk_nope_head_dim + c.v_head_dim))
        return q + kv + _linear(H * c.v_head_dim, D, c.attention_bias)
    K, Dh = c.num_key_value_heads, c.head_dim
    qkv = _linear(D, H * Dh, c.attention_bias) + 2 * _linear(D, K * Dh, c.attention_bias)
    return qkv + _linear(H * Dh, D, c.o_bias) + (2 * Dh if c.qk_norm else 0)


def ffn_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, active per token) parameters of one layer's feed-forward."""
    D = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        n = _mlp(D, c.intermediate_size, c.mlp_bias)
        return n, n
    expert = _mlp(D, c.moe_intermediate_size)
    shared = _mlp(D, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else 0
    # gate.weight, and DeepSeek-V3's e_score_correction_bias
    router = c.n_routed_experts * D + (c.n_routed_experts if c.router_correction_bias else 0)
    total = router + shared + c.n_routed_experts * expert
    return total, router + shared + c.num_experts_per_tok * expert


def block_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, active) of one decoder layer: two norms, attention, feed-forward."""
    attn = attention_params(c) + 2 * c.hidden_size
    total, active = ffn_params(c, layer_idx)
    return attn + total, attn + active


def count_params(model_or_config: nn.Module | ModelConfig) -> ParamCount:
    """Parameter counts (see the module docstring) of a Transformer or of a ModelConfig."""
    c = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    embedding = V * D * (1 if c.tie_word_embeddings else 2)
    total = active = embedding + D  # + the final norm
    for i in range(L):
        t, a = block_params(c, i)
        total, active = total + t, active + a
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        t, _ = block_params(c, L + k)
        mtp += t + 3 * D + _linear(2 * D, D)  # enorm, hnorm, shared_head.norm; eh_proj
    return ParamCount(total=total + mtp, active=active, embedding=embedding, mtp=mtp)


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs per token: 6 N + 6 L S H (Dqk + Dv) for training, 2 N + 2 L S H (Dqk + Dv) forward only."""
    c = config
    counts = count_params(c)
    n_matmul = counts.active - c.vocab_size * c.hidden_size  # drop the input lookup ...
    if c.tie_word_embeddings:
        n_matmul += c.vocab_size * c.hidden_size  # ... but keep the (tied) output head's matmul
    Dqk = c.qk_head_dim
    Dv = c.v_head_dim if c.is_mla else c.head_dim
    attn = c.num_hidden_layers * seq_len * c.num_attention_heads * (Dqk + Dv)
    k = 6 if training else 2
    return float(k * n_matmul + k * attn)
