"""The static KV cache that the sampler drives: preallocated slots × positions, per layer.

Letters: B batch (rows of one forward call), T tokens of the call, S attended key positions,
N slots (max_batch_size), L positions per slot (max_seq_len), Hkv kv heads, Dh head dim,
C kv_lora_rank (MLA latent), R qk_rope_head_dim (MLA rope key).

What one layer keeps, per slot and position:
- dense GQA: k, v [N, L, Hkv, Dh] (keys after RoPE and, for Qwen3, after k_norm);
- MLA (deepseek_v3): only what the absorbed decode needs, one buffer `kv` [N, L, C + R] holding the
  normalised latent c_kv = kv_a_layernorm(...) in [..., :C] and the rotated rope key k_pe in
  [..., C:] (MLA is then multi-query attention with one kv "head" of width C + R whose values
  are the first C dims; FlashMLA uses the same layout). That is (C + R) numbers per token per
  layer instead of H (2 Dh) for GQA: 576 vs 32768 for DeepSeek-V3.

Protocol (Transformer.forward with cache=..., slots=..., position_ids=...): row b of the call
writes its keys at (slots[b], position_ids[b, t]) (slot b when slots=None) and then each query
attends over positions 0..attn_len-1 of its slot, a key at position p' being visible iff p' ≤ the
query's position.
Entries beyond a query's position (left over from an earlier, longer use of the slot) are never
seen, so slots are reused without clearing. Prefill (T > 1) and decode (T = 1) go through the same
code; a decode step with fixed B and attn_len has static shapes (torch.compile fullgraph).
Consecutive slots (slots=None, or a CPU slots tensor holding a run s..s+B-1) are read as views of
the buffers; any other set is gathered, a copy of B × attn_len entries per buffer per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig


class KVCache:
    """Preallocated per-layer buffers for `max_batch_size` slots × `max_seq_len` positions.

    `layers[i]` is a tuple of tensors whose first two dims are [N, L]: (k, v) for GQA, (kv,) for
    MLA (see the module docstring). Build it with `Transformer.make_cache(...)`.
    """

    def __init__(self, config: ModelConfig, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache: max_batch_size and max_seq_len must be ≥ 1, got {max_batch_size}, {max_seq_len}")
        self.config = config
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = layer_buffers(config, (max_batch_size, max_seq_len), dtype, device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one slot takes, summed over layers."""
        return bytes_per_token(self.layers)

    @property
    def nbytes(self) -> int:
        return buffer_bytes(self.layers)

    def copy_slots(self, src: int, dst: torch.Tensor | list[int], length: int) -> None:
        """Copy positions 0..length-1 of slot `src` into every slot of `dst` (e.g. a GRPO group's
        shared prompt, prefilled once)."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"copy_slots: length {length} is outside 0..max_seq_len ({self.max_seq_len})")
        dst = torch.as_tensor(dst, dtype=torch.long, device=self.device).reshape(-1)
        rows = _consecutive(dst) or dst  # a run of slots is written through a view
        for layer in self.layers:
            for t in layer:
                t[rows, :length] = t[src, :length]  # [len(dst), length, ...] <- broadcast [length, ...]

    def step(self, slots: torch.Tensor | None, position_ids: torch.Tensor, attn_len: int | None = None) -> "CacheStep":
        """The view of this cache one forward call uses (see CacheStep). slots=None means row b is
        slot b, known without looking at any tensor (so also on GPU and under torch.compile)."""
        attn_len = self.max_seq_len if attn_len is None else attn_len
        if not 0 < attn_len <= self.max_seq_len:
            raise ValueError(f"attn_len {attn_len} is outside 1..max_seq_len ({self.max_seq_len})")
        key_pos = torch.arange(attn_len, device=position_ids.device)
        visible = key_pos[None, None, :] <= position_ids[:, :, None]  # [B, T, S]
        if slots is None:
            B = position_ids.shape[0]
            return CacheStep(self, torch.arange(B, device=position_ids.device), position_ids, attn_len, visible,
                             slice(0, B))
        return CacheStep(self, slots, position_ids, attn_len, visible, _consecutive(slots))


def layer_buffers(config: ModelConfig, lead: tuple[int, int], dtype: torch.dtype,
                  device: torch.device | str) -> list[tuple[torch.Tensor, ...]]:
    """Zeroed per-layer cache buffers whose first two dims are `lead` ([N, L] slots x positions, or
    [M, P] pages x positions): (k, v) [*lead, Hkv, Dh] for GQA, (kv,) [*lead, C + R] for MLA."""
    if config.is_mla:
        shapes = [(*lead, config.kv_lora_rank + config.qk_rope_head_dim)]
    else:
        shapes = [(*lead, config.num_key_value_heads, config.head_dim)] * 2
    return [tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes) for _ in range(config.num_hidden_layers)]


def bytes_per_token(layers: list[tuple[torch.Tensor, ...]]) -> int:
    """Bytes one position takes in buffers laid out as layer_buffers makes them, summed over layers."""
    return sum(t[0, 0].numel() * t.element_size() for layer in layers for t in layer)


def buffer_bytes(layers: list[tuple[torch.Tensor, ...]]) -> int:
    """Bytes of all the buffers."""
    return sum(t.numel() * t.element_size() for layer in layers for t in layer)


def _consecutive(slots: torch.Tensor) -> slice | None:
    """`slots` as a slice when they are s, s+1, ..., s+B-1, else None.

    Reading a consecutive run of slots is a view of the buffers; any other set of slots is a gathered
    copy of B × attn_len entries per buffer per layer (at batch 32 and a few hundred positions, a
    copy as large as the attention's own reads). The test reads the slots on the host, so it runs
    only where that is free: CPU tensors outside torch.compile (a static compiled step gathers).
    """
    if not slots.is_cpu or torch.compiler.is_compiling():
        return None
    s = slots.tolist()
    return slice(s[0], s[0] + len(s)) if s and s == list(range(s[0], s[0] + len(s))) else None


@dataclass
class CacheStep:
    """One forward call's use of a KVCache: rows `slots` [B] at positions `position_ids` [B, T],
    attending over positions 0..attn_len-1 with `visible` [B, T, S] (S = attn_len). `run` is
    `slots` as a slice when they are consecutive (the buffers are then read as views)."""

    cache: KVCache
    slots: torch.Tensor
    position_ids: torch.Tensor
    attn_len: int
    visible: torch.Tensor
    run: slice | None = None
    decode_kernel: bool = False   # the slot cache always gathers or views (see PagedCacheStep)

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this call's entries (each [B, T, ...]) into layer `layer_idx` and return that
        layer's buffers for the call's slots, [B, S, ...] each."""
        buffers = self.cache.layers[layer_idx]
        assert len(new) == len(buffers), f"layer {layer_idx}: {len(new)} tensors for {len(buffers)} buffers"
        rows = self.slots[:, None]  # [B, 1], broadcast against position_ids [B, T]
        read = self.slots if self.run is None else self.run
        out = []
        for buf, x in zip(buffers, new):
            buf[rows, self.position_ids] = x.to(buf.dtype)         # scatter [B, T, ...]
            out.append(buf[read, : self.attn_len])                  # [B, S, ...] (a view for a run)
        return tuple(out)
