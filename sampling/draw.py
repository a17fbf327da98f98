"""Sampling on the device: per-row settings as tensors, counter-based uniforms, the inverse-CDF draw.

The decode loop (sampling/engine.py) runs several steps between host reads, so nothing here may
look at a tensor's values on the host. What the host knows of a batch (which filters any row uses,
the largest top-k) it decides once per batch when it builds the `RowParams`; the per-step work is
whole-batch tensor ops only.

Uniforms. Each sample has a 64-bit key (from its request's seed and its index among the request's
n samples) and draws its t-th token (t = 0, 1, ... over its sampled tokens) with the uniform
u(key, t), an integer hash of (key, t): a counter-based stream, as Philox is. A sample's draws
therefore depend on nothing but its key and how many tokens it has drawn: not on its batch
mates, nor on when the host reads the tokens, nor on a preemption that recomputes its cache. The
hash is integer arithmetic, so CPU and GPU give the same uniforms; each u has 53 random bits.

The draw: one uniform per token, and the token is the first whose running mass exceeds u times the
row's total (searchsorted over the cumulative sum of exp(logits - max)): a few passes over [B, V]
whatever B is. Truncation (top-k, top-p, min-p) masks the scaled logits first; a row whose setting
switches a filter off (top_k 0, top_p 1, min_p 0) is left exactly as it was.

Logprobs are those of the temperature-scaled distribution before truncation, log softmax(logits /
T) at the token (T = 1 for greedy rows), what GRPO's importance ratio compares with the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche hash of 32-bit values held in int64 (each product < 2**59)."""
    x = (((x >> 16) ^ x) * _MUL) & M32
    x = (((x >> 16) ^ x) * _MUL) & M32
    return (x >> 16) ^ x


def split_key(key: int) -> tuple[int, int]:
    """A Python int key as its (low, high) 32-bit words (the key is taken mod 2**64)."""
    key &= (1 << 64) - 1
    return key & M32, key >> 32


def uniforms(key_lo: torch.Tensor, key_hi: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """u(key, t) in [0, 1), float64 [B], for int64 [B] key words and counters (the sampled-token index)."""
    h = _mix32(key_hi ^ _mix32(key_lo ^ _GOLDEN))
    c = (counter & M32) * 2
    a = _mix32(h ^ _mix32(c))
    b = _mix32(h ^ _mix32(c + 1))
    return ((a >> 5) * 67108864 + (b >> 6)).double() / 9007199254740992.0  # (27 + 26 bits) / 2**53


def sample_key(seed: int, index: int) -> int:
    """The key of sample `index` of a request seeded with `seed` (the n samples get distinct keys)."""
    return seed * 1_000_003 + index


@dataclass
class RowParams:
    """The sampling settings of a batch's rows as device tensors, with what the host decided once
    for the batch (which filters any row needs, the largest top-k)."""

    inv_temp: torch.Tensor   # [B] fp32: 1 / temperature, 1 for greedy rows
    greedy: torch.Tensor     # [B] bool: temperature 0
    top_k: torch.Tensor      # [B] int64: 0 = off
    top_p: torch.Tensor      # [B] fp32: 1 = off
    min_p: torch.Tensor      # [B] fp32: 0 = off
    truncated: torch.Tensor  # [B] bool: a sampled row with any filter on
    key_lo: torch.Tensor     # [B] int64
    key_hi: torch.Tensor     # [B] int64
    all_greedy: bool
    any_greedy: bool
    scale: float | None      # the one 1/T every row shares (None: per row)
    top_k_max: int           # 0: no row uses top-k
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def build(cls, rows: list, keys: list[int], vocab: int, device) -> "RowParams":
        """From the rows' SamplingParams (temperature, top_k, top_p, min_p) and their sample keys."""
        temps = [p.temperature for p in rows]
        greedy = [t == 0 for t in temps]
        sampled = [not g for g in greedy]
        top_k = [p.top_k if s else 0 for p, s in zip(rows, sampled)]
        top_p = [p.top_p if s else 1.0 for p, s in zip(rows, sampled)]
        min_p = [p.min_p if s else 0.0 for p, s in zip(rows, sampled)]
        truncated = [k > 0 or q < 1 or m > 0 for k, q, m in zip(top_k, top_p, min_p)]
        inv = [1.0 / t if t > 0 else 1.0 for t in temps]
        lo, hi = zip(*(split_key(k) for k in keys))
        f32, i64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.long, device=device)
        return cls(
            inv_temp=torch.tensor(inv, **f32), greedy=torch.tensor(greedy, device=device),
            top_k=torch.tensor(top_k, **i64), top_p=torch.tensor(top_p, **f32), min_p=torch.tensor(min_p, **f32),
            truncated=torch.tensor(truncated, device=device), key_lo=torch.tensor(lo, **i64),
            key_hi=torch.tensor(hi, **i64), all_greedy=all(greedy), any_greedy=any(greedy),
            scale=inv[0] if all(i == inv[0] for i in inv) else None,
            top_k_max=min(max(top_k), vocab), any_top_p=any(q < 1 for q in top_p), any_min_p=any(m > 0 for m in min_p))


def truncate(scaled: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Mask scaled logits [B, V] outside each row's top-k, top-p and min-p (off values: no change)."""
    if rp.top_k_max > 0:
        vals = torch.topk(scaled, rp.top_k_max, dim=-1).values                          # [B, kmax]
        k = rp.top_k.clamp(1, rp.top_k_max)
        kth = vals.gather(1, (k - 1).unsqueeze(1))                                        # [B, 1]
        kth = torch.where(rp.top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if rp.any_min_p:
        probs = torch.softmax(scaled, dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * rp.min_p.unsqueeze(1)
        scaled = scaled.masked_fill(probs < thresh, float("-inf"))
    if rp.any_top_p:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token if the mass before it is < top_p (the first is always kept); top_p 1 keeps all
        drop_sorted = ((sorted_probs.cumsum(-1) - sorted_probs) >= rp.top_p.unsqueeze(1)) & (rp.top_p < 1).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B] from running masses cdf [B, V] (non-decreasing, unnormalised) and uniforms u [B]
    in [0, 1): the first v with cdf[v] > u · cdf[-1]. Tokens of zero mass are never drawn; the
    target stays strictly below the total, which float rounding of u · total could reach."""
    total = cdf[:, -1]
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def draw(logits: torch.Tensor, rp: RowParams, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of fp32 logits [B, V]: (token ids [B] int64, logprobs [B] fp32), on the device.

    `counter` [B] is each row's sampled-token index (its uniform's counter)."""
    if rp.scale is None:
        scaled = logits * rp.inv_temp.unsqueeze(1)
    else:
        scaled = logits if rp.scale == 1.0 else logits * rp.scale
    m = scaled.amax(dim=-1, keepdim=True)                      # [B, 1]
    mass = (scaled - m).exp_()                                  # [B, V], row max 1
    if rp.all_greedy:
        total = mass.sum(-1)
        tokens = scaled.argmax(-1)
    else:
        cdf = mass.cumsum_(-1)
        total = cdf[:, -1]
        u = uniforms(rp.key_lo, rp.key_hi, counter)
        tokens = inverse_cdf(cdf, u)
        if rp.top_k_max > 0 or rp.any_top_p or rp.any_min_p:
            sub = truncate(scaled, rp)
            cut = inverse_cdf((sub - m).exp_().cumsum_(-1), u)
            tokens = torch.where(rp.truncated, cut, tokens)
        if rp.any_greedy:
            tokens = torch.where(rp.greedy, scaled.argmax(-1), tokens)
    logp = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - (m.squeeze(1) + total.log())
    return tokens, logp
