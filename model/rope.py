"""Rotary position embeddings (RoPE, Su et al., 2021) and their long-context scalings.

Letters: B batch, T tokens, H heads, R rotated dims per head (R/2 frequencies), L table length.

A pair of dims (x1, x2) at position p is rotated by the angle p·θ_i, θ_i = base^(-2i/R):

    x1' = x1 cos(pθ_i) - x2 sin(pθ_i),    x2' = x2 cos(pθ_i) + x1 sin(pθ_i)

so q·k depends on positions only through their difference. Two layouts of the pairs:
- rotate-half (Qwen, Llama, GPT-NeoX): pair i is (x[i], x[i + R/2]);
- interleaved (DeepSeek's published weights, `rope_interleave=True`): pair i is (x[2i], x[2i+1]).
  Like transformers, the interleaved path writes its output in the halves layout (all rotated first
  elements, then all rotated second elements). q and k are permuted the same way, so q·k is
  unchanged; the absorbed MLA cache keeps the rope key in that layout too.

Frequency scalings (`rope_scaling["rope_type"]`), as transformers' modeling_rope_utils computes them:
- linear: θ_i / factor (position interpolation, Chen et al., 2023).
- llama3: wavelengths λ_i = 2π/θ_i longer than original_max/low_freq_factor are divided by factor,
  shorter than original_max/high_freq_factor are kept, and those between are blended with
  s = (original_max/λ_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
  θ_i' = (1 - s) θ_i/factor + s θ_i.
- yarn (Peng et al., 2023): per frequency, a ramp between interpolation (θ_i/factor) and
  extrapolation (θ_i) over the dims [low, high] whose number of rotations over
  original_max_position_embeddings lies between beta_slow and beta_fast; cos and sin are
  multiplied by the attention factor
      mscale(factor, mscale) / mscale(factor, mscale_all_dim)   if both are given (DeepSeek),
      mscale(factor, 1) = 0.1 ln(factor) + 1                     otherwise,
  (or rope_scaling["attention_factor"] when set). DeepSeek-V3's attention additionally multiplies
  its softmax scale by mscale(factor, mscale_all_dim)²: see `mla_softmax_scale`.

cos/sin tables are computed in fp32 as cos(float(p) · θ) (the same arithmetic as transformers, so
results agree bit for bit), cached per device and length on a plain attribute (not a buffer: a model
built on the meta device needs nothing filled in for them).
"""
from __future__ import annotations

import math

import torch

from model.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 · mscale · ln(scale) + 1 for scale > 1, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """The inverse frequencies θ [R/2] (fp32, CPU) and the cos/sin attention factor for `config`.

    R is `config.rope_dim` (the decoupled rope key for MLA, the whole head otherwise).
    """
    dim = config.rope_dim
    base = config.rope_theta
    if dim % 2:
        raise ValueError(f"rope: the rotated dim must be even, got {dim} (model_type {config.model_type})")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))  # [R/2]
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    kind = rs["rope_type"]

    def need(key):
        if rs.get(key) is None:
            raise ValueError(f"rope_scaling of type {kind!r} needs key {key!r}; got {rs}")
        return rs[key]

    if kind == "linear":
        return inv_freq / need("factor"), 1.0
    if kind == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old_len = need("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        old_len = need("original_max_position_embeddings")
        factor = rs.get("factor") or config.max_position_embeddings / old_len
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction_dim(rotations):  # the dim index whose frequency turns `rotations` times over old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # [R/2]
        extrapolate = 1 - ramp  # 1: keep θ_i (high frequencies), 0: interpolate θ_i / factor
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv_freq, float(attention_factor)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


def mla_softmax_scale(config: ModelConfig) -> float:
    """DeepSeek-V3's softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)² under
    YaRN when mscale_all_dim is set (as transformers' DeepseekV3Attention and DeepSeek's own code)."""
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding:
    """cos/sin tables for one config, cached per device: `cos, sin = rope(position_ids)`.

    position_ids [B, T] (int) -> cos, sin [B, T, R/2] fp32, already multiplied by the attention
    factor. The table covers positions 0..L-1 with L ≥ config.max_position_embeddings, grown on demand
    by `ensure(length, device)`; `__call__` indexes it without checks (callers validate positions).
    """

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.attention_factor = rope_frequencies(config)  # [R/2], float
        self.min_length = config.max_position_embeddings
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def ensure(self, length: int, device: torch.device) -> None:
        device = torch.device(device)
        have = self._tables.get(device)
        if have is not None and have[0].shape[0] >= length:
            return
        L = max(length, self.min_length, 0 if have is None else have[0].shape[0])
        t = torch.arange(L, device=device, dtype=torch.int64).float()
        freqs = t[:, None] * self.inv_freq.to(device)[None, :]  # [L, R/2]
        self._tables[device] = (freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor)

    def length(self, device: torch.device) -> int:
        have = self._tables.get(torch.device(device))
        return 0 if have is None else have[0].shape[0]

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        if torch.device(device) not in self._tables:
            self.ensure(self.min_length, device)
        cos, sin = self._tables[torch.device(device)]
        return cos[position_ids], sin[position_ids]  # [B, T, R/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, T, H, R] by cos, sin [B, T, R/2]; returns [B, T, H, R] in x's dtype, halves layout.

    interleaved=False: pairs (x[i], x[i + R/2]); interleaved=True: pairs (x[2i], x[2i+1]), written
    out as [rotated x[0::2] | rotated x[1::2]] (transformers' apply_rotary_pos_emb_interleave).
    """
    R = x.shape[-1]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, T, H, R/2] each
    else:
        x1, x2 = x[..., : R // 2], x[..., R // 2:]
    cos = cos[:, :, None, :].to(x.dtype)  # [B, T, 1, R/2]
    sin = sin[:, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
