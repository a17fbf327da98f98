"""Multi-token prediction (DeepSeek-V3 §2.2): extra modules that predict the token after next.

Letters: B batch, T tokens, D model dim, V vocab, K MTP depth index (1..num_nextn_predict_layers).

Module k (stored at `model.layers.{num_hidden_layers + k - 1}` in V3 checkpoints) maps the
previous depth's representation h^{k-1}_t (h^0 = the main model's final normalised hidden state)
and the embedding of token t+k to a representation that predicts token t+k+1:

    h'_t  = eh_proj([enorm(Emb(x_{t+k})); hnorm(h^{k-1}_t)])        eh_proj: Linear 2D -> D, no bias
    h^k   = Block_k(h'_{1..T})                                      (causal, like the main layers)
    P^k_t = softmax(shared_head.head(shared_head.norm(h^k_t)))      predicts x_{t+k+1}

    L_MTP = λ / K_max · Σ_k  mean_t  -log P^k_t[x_{t+k+1}]           λ = config.mtp_loss_weight

Notes on the choices made here:
- The concatenation puts the embedding first: the report's eq. 21 writes [h; Emb] but the
  published weights are used as [enorm(Emb); hnorm(h)] by the inference engines that load them
  (vLLM, SGLang), so eh_proj's columns follow that order.
- `embed_tokens` and `shared_head.head` are the main model's embedding and output head (one
  Parameter each, as the report and README_WEIGHTS.md say they are shared): their names exist in
  the state dict (the V3 checkpoint stores copies) but training updates one tensor. FSDP2 needs a
  shared Parameter inside one group: model/parallel.py keeps the MTP modules in the root's group
  (at scale one would shard a module's own parts together, `fully_shard([input_layernorm,
  self_attn, post_attention_layernorm, mlp, enorm, hnorm, eh_proj, shared_head.norm])`, leaving
  the two aliases to the root). Either way take the loss from
  `Transformer.forward(..., with_mtp_loss=True)`, inside the root's forward.
  `shared_head.norm` is the module's own final norm.
- h^0 is the main model's final *normalised* hidden state (what Transformer.forward_hidden
  returns, and what vLLM passes to its MTP drafter); hnorm normalises it again with its own weight.
- Targets that would cross a document boundary (packed rows) or run past the row are not
  counted; `target_mask` [B, T] (e.g. SFT's assistant-token mask, True = train on this target
  token) further restricts which x_{t+k+1} count.
The modules are unused at inference, skipped when λ = 0, and not built when there are none.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import token_logprobs
from model.config import ModelConfig
from model.layers import RMSNorm
from model.block import Block


class SharedHead(nn.Module):
    """`shared_head.norm` (own RMSNorm) and `shared_head.head` (the main output head, tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(Block):
    """One MTP module: a Block (same names: input_layernorm, self_attn, post_attention_layernorm,
    mlp; MoE or dense per config.is_moe_layer(layer_idx)) plus enorm, hnorm, eh_proj, embed_tokens
    and shared_head. `forward` (the Block's) runs the block; `combine` forms its input."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)  # tied to the main embedding
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """h_prev [B, T, D], next_ids [B, T] (token t+k at row position t) -> h' [B, T, D]."""
        e = self.enorm(self.embed_tokens(next_ids))                       # [B, T, D]
        return self.eh_proj(torch.cat([e, self.hnorm(h_prev)], dim=-1))   # [B, T, 2D] -> [B, T, D]


def _same_document(T: int, shift: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[T] bool: position t and t + shift lie in the same row and (packed rows) the same document."""
    t = torch.arange(T, device=device)
    ok = t + shift < T
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.bucketize(t, cu[1:], right=True)  # [T] document index of each position
        ok = ok & (doc == doc[(t + shift).clamp(max=T - 1)])
    return ok


def mtp_loss(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
             position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
             target_mask: torch.Tensor | None = None):
    """(λ · L_MTP, metrics) for a Transformer `model` with MTP modules.

    hidden [B, T, D]: model.forward_hidden(input_ids, position_ids, cu_seqlens) (keep its graph so
    the loss trains the trunk too); input_ids [B, T]; position_ids / cu_seqlens as that call's;
    target_mask [B, T] bool or None. Each depth's loss is the mean over its counted targets, then the
    depths are averaged and multiplied by config.mtp_loss_weight. metrics: {"mtp_loss/k": float}.
    Returns a zero scalar (no compute) when λ = 0 or there are no MTP modules.
    """
    config = model.config
    lam, layers = config.mtp_loss_weight, list(model.mtp)
    if lam == 0 or not layers:
        return hidden.new_zeros(()), {}
    B, T = input_ids.shape
    if position_ids is None:
        position_ids = model._default_positions(B, T, cu_seqlens, input_ids.device)
    cos, sin = model.rope(position_ids)
    h, total, metrics = hidden, hidden.new_zeros((), dtype=torch.float32), {}
    for k, layer in enumerate(layers, start=1):
        next_ids = torch.roll(input_ids, -k, dims=1)          # [B, T]: x_{t+k} (wrapped tail is masked)
        h = layer(layer.combine(h, next_ids), cos, sin, cu_seqlens)  # [B, T, D]
        targets = torch.roll(input_ids, -(k + 1), dims=1)      # [B, T]: x_{t+k+1}
        counted = _same_document(T, k + 1, cu_seqlens, input_ids.device).expand(B, T)
        if target_mask is not None:
            counted = counted & torch.roll(target_mask.bool(), -(k + 1), dims=1)
        out = layer.shared_head.norm(h)[counted]               # [M, D]
        logp = token_logprobs(out, layer.shared_head.head.weight, targets[counted])  # [M]
        loss_k = -logp.mean() if logp.numel() else logp.sum()
        metrics[f"mtp_loss/{k}"] = float(loss_k.detach())
        total = total + loss_k
    return lam * total / len(layers), metrics
