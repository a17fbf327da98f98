"""Self-attention: grouped-query attention (Qwen2, Llama, Qwen3) and DeepSeek's multi-head latent
attention (MLA), each in one class whose parameter names are Hugging Face's on-disk names.

Letters: B batch, T query tokens, S key positions, H query heads, K kv heads, Dh head dim,
D model dim, C kv_lora_rank (latent), Cq q_lora_rank, Dn qk_nope_head_dim, R qk_rope_head_dim,
Dv v_head_dim.

Both classes take x [B, T, D] and rope tables cos, sin [B, T, R/2] and return [B, T, D], through
one of two attention paths:
- plain (no cache): causal flash attention (kernels.flash_attention) over the call's own tokens;
  with `cu_seqlens` the call is one packed row (B = 1) of documents that attend only within
  themselves (the varlen path), and `max_seqlen` (a Python int, the longest document) spares the
  kernel a copy of cu_seqlens to the host in every layer;
- cached (`step`, a model.cache.CacheStep): the call's keys are written into the KV cache and each
  query attends over its slot's cached positions with a position mask (`masked_attention`, torch
  SDPA). MLA does this in its naive form for prefill (T > 1) and its absorbed form for decode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import flash_attention
from model.cache import CacheStep
from model.config import ModelConfig
from model.layers import RMSNorm
from model.rope import apply_rope, mla_softmax_scale


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ, masked to `visible`) v, for queries over a cache.

    q [B, T, H, Dqk], k [B, S, K, Dqk], v [B, S, K, Dv], visible [B, T, S] bool -> o [B, T, H, Dv].
    Query head h reads kv head h // (H / K). Every query must see at least one key.

    A CPU decode step (T = 1) goes through two batched matmuls over the kv-head groups instead of
    SDPA: with one query per row there is too little work to split across threads, yet SDPA's CPU
    kernel opens a thread-parallel region per call, whose start and join cost more than the
    arithmetic (at batch 1: 16 ms against 40 µs per call, median, on a busy 2-core machine).
    """
    B, T, H, _ = q.shape
    K = k.shape[2]
    if T == 1 and q.is_cpu:
        qg = q.reshape(B, K, H // K, q.shape[-1])                      # [B, K, G, Dqk], head h = k·G + g
        scores = (qg @ k.permute(0, 2, 3, 1)) * scale                   # [B, K, G, S]
        scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))  # visible [B, 1, 1, S]
        o = torch.softmax(scores, dim=-1) @ v.permute(0, 2, 1, 3)      # [B, K, G, Dv]
        return o.reshape(B, 1, H, v.shape[-1])                         # [B, T=1, H, Dv]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T, Dqk], [B, K, S, Dqk], [B, K, S, Dv]
        attn_mask=visible[:, None], scale=scale, enable_gqa=q.shape[2] != k.shape[2])  # [B, H, T, Dv]
    return o.transpose(1, 2)  # [B, T, H, Dv]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     cu_seqlens: torch.Tensor | None, max_seqlen: int | None = None) -> torch.Tensor:
    """Causal attention of a call over its own tokens: q [B, T, H, Dqk], k/v [B, T, K, D*] -> [B, T, H, Dv];
    with cu_seqlens (B must be 1) each packed document attends only within itself; max_seqlen, when
    known, is the longest of them (passed to kernels.flash_attention).

    kernels.flash_attention takes fp32/fp16/bf16; float64 (exactness checks) goes through
    masked_attention with the same causal, per-document mask.
    """
    if q.dtype == torch.float64:
        B, T = q.shape[:2]
        i = torch.arange(T, device=q.device)
        visible = i[None, :] <= i[:, None]                                      # [T, S=T]
        if cu_seqlens is not None:
            doc = torch.bucketize(i, cu_seqlens.to(device=q.device, dtype=torch.long)[1:], right=True)
            visible = visible & (doc[None, :] == doc[:, None])
        return masked_attention(q, k, v, visible.expand(B, T, T), scale)
    if cu_seqlens is None:
        return flash_attention(q, k, v, causal=True, softmax_scale=scale)
    assert q.shape[0] == 1, f"packed sequences (cu_seqlens) need batch size 1, got {q.shape[0]}"
    return flash_attention(q[0], k[0], v[0], causal=True, softmax_scale=scale, cu_seqlens=cu_seqlens,
                           max_seqlen=max_seqlen)[None]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al., 2023) with RoPE:

        q = W_q x, k = W_k x, v = W_v x  (K ≤ H kv heads, shared by H/K query heads each)
        o = W_o softmax(q kᵀ / √Dh + causal mask) v

    Qwen2: q/k/v biases; Llama: `attention_bias` on q/k/v/o; Qwen3: RMSNorm over each head's q
    and k (q_norm, k_norm) before RoPE.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, H, K, Dh = config.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, K * Dh, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, K * Dh, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = Dh ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, step: CacheStep | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # [B, T, H, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step is None:
            o = causal_attention(q, k, v, self.scale, cu_seqlens, max_seqlen)  # [B, T, H, Dh]
        elif step.decode_kernel:  # paged decode: attend over the pages in place
            step.write(self.layer_idx, k, v)
            o = step.attend(self.layer_idx, q, self.scale)
        else:
            k_all, v_all = step.update(self.layer_idx, k, v)              # [B, S, K, Dh] each
            o = masked_attention(q, k_all, v_all, step.visible, self.scale)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))  # [B, T, D]


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

    Queries, through a low-rank bottleneck when q_lora_rank is set (a plain q_proj otherwise):
        c_q = RMSNorm(W_DQ x) [Cq],   [q_nope; q_pe] = W_UQ c_q  per head [Dn + R]
    Keys and values share one compressed latent, and one rope key shared by all heads:
        [c_kv; k_pe] = W_DKV x   (kv_a_proj_with_mqa: [C + R]),   c_kv ← RMSNorm(c_kv)
        [k_nope; v] = W_UKV c_kv per head (kv_b_proj: [Dn + Dv])
        q_pe, k_pe ← RoPE(q_pe), RoPE(k_pe)          (decoupled RoPE: only R dims rotate)
        o_h = softmax(([q_nope; q_pe] · [k_nope; k_pe]) · scale) v,   out = W_O [o_1; ...; o_H]
    scale = (Dn + R)^-0.5, times mscale² under YaRN (model.rope.mla_softmax_scale).

    Two equal ways to compute o (tests/model/test_mla.py):
    - naive: expand k_nope and v for every key with W_UKV, then ordinary attention with
      Dqk = Dn + R, Dv. Used for training and for prefill (T > 1), with or without a cache (with
      one, the latents are written first and the slot's cached latents are expanded);
    - absorbed: fold W_UK into the query and W_UV into the output, since
      q_nope · (W_UK c) = (W_UKᵀ q_nope) · c and Σ p (W_UV c) = W_UV Σ p c:
          q_lat = W_UKᵀ q_nope [C],  score = q_lat · c_kv + q_pe · k_pe,
          o_lat = Σ_s p_s c_kv,s [C],  o = W_UV o_lat [Dv]
      i.e. multi-query attention over the cache with one kv head [c_kv; k_pe] of width C + R.
      Used for cached decode (T = 1): it reads C + R numbers per cached key instead of expanding
      H (Dn + Dv) per key. For a long prefill it would do more FLOPs than the naive form
      (per score C + R + C multiply-adds instead of Dn + R + Dv: 1088 vs 320 for DeepSeek-V3).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.interleaved = config.rope_interleave
        D, H, C, R = config.hidden_size, self.n_heads, self.kv_lora_rank, self.rope_dim
        Dqk = self.nope_dim + R
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * Dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * Dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(C, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=config.attention_bias)
        self.scale = mla_softmax_scale(config)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The per-token projections both paths share: x [B, T, D] ->
        q_nope [B, T, H, Dn], q_pe [B, T, H, R] (rotated), c_kv [B, T, C] (normalised), k_pe [B, T, R] (rotated)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)           # [B, T, H, Dn + R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [B, T, C], [B, T, R]
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleaved)[:, :, 0]  # [B, T, R]
        return q_nope, q_pe, c_kv, k_pe

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, cu_seqlens=None, visible=None, max_seqlen=None) -> torch.Tensor:
        """Attention with k and v expanded from the latents c_kv [B, S, C], k_pe [B, S, R] -> o [B, T, H, Dv]:
        causal over the call's own tokens (S = T; cu_seqlens and max_seqlen for packed rows) when
        `visible` is None, else masked to visible [B, T, S] (keys from a cache)."""
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)       # [B, S, H, Dn + Dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1)  # [B, S, H, Dn + R]
        q = torch.cat([q_nope, q_pe], dim=-1)                                      # [B, T, H, Dn + R]
        if visible is None:
            return causal_attention(q, k, v, self.scale, cu_seqlens, max_seqlen)   # [B, T, H, Dv]
        return masked_attention(q, k, v, visible, self.scale)

    def attend_absorbed(self, q_nope, q_pe, kv, visible, step=None) -> torch.Tensor:
        """Attention in latent space over cached keys kv [B, S, C + R] ([c_kv; k_pe]) with
        visible [B, T, S] -> o [B, T, H, Dv]; or, given a paged decode `step` (kv and visible
        None), over the latent pages in place (kernels.paged_decode_attention)."""
        H, C = self.n_heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]                  # [H, Dn, C], [H, Dv, C]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                       # [B, T, H, C]
        q = torch.cat([q_lat, q_pe], dim=-1)                                       # [B, T, H, C + R]
        if step is not None:
            o_lat = step.attend(self.layer_idx, q, self.scale, v_dim=C)            # [B, 1, H, C]
        else:
            kv = kv[:, :, None, :]                                                 # [B, S, 1, C + R]
            o_lat = masked_attention(q, kv, kv[..., :C], visible, self.scale)      # [B, T, H, C]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)                         # [B, T, H, Dv]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, step: CacheStep | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if step is None:
            o = self.attend_naive(q_nope, q_pe, c_kv, k_pe, cu_seqlens, max_seqlen=max_seqlen)
        elif step.decode_kernel:  # paged decode: absorbed attention over the latent pages in place
            step.write(self.layer_idx, torch.cat([c_kv, k_pe], dim=-1))
            o = self.attend_absorbed(q_nope, q_pe, None, None, step=step)
        else:
            (kv,) = step.update(self.layer_idx, torch.cat([c_kv, k_pe], dim=-1))  # [B, S, C + R]
            if T == 1:  # decode
                o = self.attend_absorbed(q_nope, q_pe, kv, step.visible)
            else:       # prefill
                C = self.kv_lora_rank
                o = self.attend_naive(q_nope, q_pe, kv[..., :C], kv[..., C:], visible=step.visible)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.v_dim))             # [B, T, D]
