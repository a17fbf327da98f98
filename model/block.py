"""One decoder layer of every model family: pre-norm attention, then pre-norm FFN.

Letters: B batch, T tokens, D model dim.

    h' = h + Attn(RMSNorm(h));   out = h' + FFN(RMSNorm(h'))

Attn is GQA (qwen2, llama, qwen3, qwen3_moe) or MLA (deepseek_v3), FFN a SwiGLU MLP or the MoE
layer (DeepSeekMoE or Qwen3-MoE, model/moe.py; `config.is_moe_layer(i)`). The main layers (model/transformer.py) and DeepSeek-V3's MTP modules
(model/mtp.py, which add their own parts around one) are both Blocks, so it lives below both.
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import MLA, Attention
from model.cache import CacheStep
from model.config import ModelConfig
from model.layers import MLP, RMSNorm
from model.moe import MoE


class Block(nn.Module):
    """One pre-norm decoder layer: x [B, T, D] -> [B, T, D].

        x = x + self_attn(input_layernorm(x));   x = x + mlp(post_attention_layernorm(x))
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D = config.hidden_size
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx) if config.is_mla else Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, layer_idx)
        else:
            self.mlp = MLP(D, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, step: CacheStep | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """cu_seqlens/max_seqlen: packed documents (model.attention); step: the KV-cached path."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, step, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))
