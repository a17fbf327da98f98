"""The paged KV cache: fixed-size pages shared out to sequences through block tables.

Letters: B rows of one forward call, T tokens of the call, S attended key positions, P page size
(positions per page), M pages in the pool, W pages in a row's block table, Hkv kv heads, Dh head
dim, C kv_lora_rank, R qk_rope_head_dim.

What one layer keeps (model/cache.py's layouts, with pages in place of slots):
- dense GQA: k, v [M, P, Hkv, Dh];
- MLA: one buffer kv [M, P, C + R] (the normalised latent and the rotated rope key).

Position p of a sequence lives at page table[p // P], offset p % P. A sequence holds pages only for
the positions it has written (`PagePool.ensure`), and `PagePool.fork` gives a new sequence the
full pages of another by reference (reference-counted; freed when the last holder lets go) and a
copy of a partly filled last page, so the n samples of a GRPO prompt pay for its pages once. A
page with more than one holder is never written: forks copy the page that is still being filled.

Protocol: the same as KVCache's (Transformer.forward with cache=...), with `slots` a block table
[B, W] int64 (rows padded with any valid page index past their own pages): row b writes its keys at
(table[b, p // P], p % P) and attends over positions 0..attn_len-1 (attn_len ≤ W·P) of its pages,
a key at position p' being visible iff p' ≤ the query's position. The read gathers each row's
pages: [B, W, P, ...] viewed as [B, W·P, ...] (the torch path, the spec of a paged-attention
kernel); entries past a row's own positions are masked, so stale pages are never seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import use_triton
from kernels.paged_attention import paged_decode_attention
from model.cache import buffer_bytes, bytes_per_token, layer_buffers
from model.config import ModelConfig


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a request needs (the caller may preempt and retry)."""


class PagePool:
    """The page allocator: a free list and a reference count per page, on the host.

    Sequences are named by the caller (any hashable). `ensure(seq, length)` gives `seq` pages for
    positions 0..length-1, `fork(src, dst, length)` starts `dst` on `src`'s first `length`
    positions, `free(seq)` drops its pages.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))   # pop() hands out low pages first
        self.tables: dict[object, list[int]] = {}
        self.copies: list[tuple[int, int, int]] = []       # (src page, dst page, positions) for the cache

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{n} pages needed, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def ensure(self, seq, length: int) -> list[int]:
        """The block table of `seq`, grown to cover positions 0..length-1 (a new seq starts empty).
        Raises OutOfPages, changing nothing, when the pool cannot cover it."""
        table = self.tables.setdefault(seq, [])
        need = self.pages_for(length) - len(table)
        if need > 0:
            table += self._take(need)
        return table

    def fork(self, src, dst, length: int) -> list[int]:
        """Start `dst` (new) on the first `length` positions of `src`: its full pages shared, a
        partly filled last page copied (recorded in `copies` for PagedKVCache.apply_copies)."""
        if dst in self.tables:
            raise ValueError(f"fork: sequence {dst!r} already holds pages")
        table = self.tables.get(src)
        if table is None or self.pages_for(length) > len(table):
            raise ValueError(f"fork: {src!r} does not hold {length} positions")
        full, rest = divmod(length, self.page_size)
        new = self._take(1) if rest else []
        for p in table[:full]:
            self.refcount[p] += 1
        if rest:
            self.copies.append((table[full], new[0], rest))
        self.tables[dst] = table[:full] + new
        return self.tables[dst]

    def free(self, seq) -> None:
        """Drop `seq`'s pages; a page returns to the free list when its last holder lets go."""
        for p in self.tables.pop(seq, []):
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self._free.append(p)

    def shared(self, page: int) -> bool:
        return self.refcount[page] > 1


class PagedKVCache:
    """Per-layer page buffers [M, P, ...] (module docstring) and their PagePool.

    `max_seq_len` bounds any one sequence (its block table), `max_batch_size` the rows of a call.
    """

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, max_seq_len: int,
                 max_batch_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"PagedKVCache: max_seq_len and max_batch_size must be >= 1, got {max_seq_len}, "
                             f"{max_batch_size}")
        self.config = config
        self.pool = PagePool(num_pages, page_size)
        self.page_size, self.max_seq_len, self.max_batch_size = page_size, max_seq_len, max_batch_size
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = layer_buffers(config, (num_pages, page_size), dtype, device)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.layers)

    @property
    def nbytes(self) -> int:
        return buffer_bytes(self.layers)

    def apply_copies(self) -> None:
        """Carry out the pool's pending page copies (forks' partly filled last pages)."""
        for src, dst, n in self.pool.copies:
            for layer in self.layers:
                for t in layer:
                    t[dst, :n] = t[src, :n]
        self.pool.copies.clear()

    def block_table(self, seqs: list, width: int | None = None) -> torch.Tensor:
        """[len(seqs), W] int64 block tables of `seqs` (W: the longest, or `width`), padded with page 0."""
        tables = [self.pool.tables[s] for s in seqs]
        W = max(len(t) for t in tables) if width is None else width
        out = torch.zeros(len(seqs), max(W, 1), dtype=torch.long)
        for i, t in enumerate(tables):
            out[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        return out.to(self.device)

    def check_call(self, B: int, max_position: int, slots: torch.Tensor | None) -> None:
        """Transformer._check_inputs' cache checks: a block table per row, positions within it."""
        if slots is None or slots.dim() != 2 or slots.shape[0] != B:
            raise ValueError(f"a paged cache needs slots = block tables [B = {B}, W], got "
                             f"{None if slots is None else tuple(slots.shape)}")
        if B > self.max_batch_size:
            raise ValueError(f"batch {B} exceeds the cache's max_batch_size {self.max_batch_size}")
        if max_position >= slots.shape[1] * self.page_size:
            raise ValueError(f"position {max_position} does not fit the block tables ({slots.shape[1]} pages of "
                             f"{self.page_size})")
        lo, hi = torch.stack([slots.min(), slots.max()]).tolist()
        if lo < 0 or hi >= self.pool.num_pages:
            raise ValueError(f"block tables span pages {lo}..{hi}; the pool has {self.pool.num_pages}")

    def step(self, slots: torch.Tensor, position_ids: torch.Tensor, attn_len: int | None = None) -> "PagedCacheStep":
        """The view of this cache one forward call uses: block tables `slots` [B, W]."""
        W = slots.shape[1]
        attn_len = W * self.page_size if attn_len is None else attn_len
        if not 0 < attn_len <= W * self.page_size:
            raise ValueError(f"attn_len {attn_len} is outside 1..{W * self.page_size} (the block tables' positions)")
        key_pos = torch.arange(attn_len, device=position_ids.device)
        visible = key_pos[None, None, :] <= position_ids[:, :, None]  # [B, T, S]
        kernel = position_ids.shape[1] == 1 and use_decode_kernel(position_ids)
        return PagedCacheStep(self, slots, position_ids, attn_len, visible, kernel)


def use_decode_kernel(position_ids: torch.Tensor) -> bool:
    """Whether a decode step (one query per row) attends with kernels.paged_decode_attention, which
    reads the pages in place, instead of gathering them (the torch path): where kernels.backend
    picks Triton (CUDA tensors by default)."""
    return use_triton(position_ids)


@dataclass
class PagedCacheStep:
    """One forward call's use of a PagedKVCache (CacheStep's protocol): rows with block tables
    `tables` [B, W] at `position_ids` [B, T], attending over positions 0..attn_len-1."""

    cache: PagedKVCache
    tables: torch.Tensor
    position_ids: torch.Tensor
    attn_len: int
    visible: torch.Tensor
    decode_kernel: bool = False   # attend with kernels.paged_decode_attention (write, then attend)

    def write(self, layer_idx: int, *new: torch.Tensor) -> None:
        """Write this call's entries (each [B, T, ...]) into their pages of layer `layer_idx`."""
        P = self.cache.page_size
        pages = self.tables.gather(1, self.position_ids // P)      # [B, T]
        offsets = self.position_ids % P
        for buf, x in zip(self.cache.layers[layer_idx], new):
            buf[pages, offsets] = x.to(buf.dtype)

    def attend(self, layer_idx: int, q: torch.Tensor, scale: float, v_dim: int | None = None) -> torch.Tensor:
        """Decode attention over the pages in place (after `write`): q [B, 1, H, Dqk] -> [B, 1, H, Dv].
        GQA layers read (k, v) pages; an MLA layer reads its one latent buffer [M, P, C + R] as keys
        and its first v_dim = C channels as values."""
        buffers = self.cache.layers[layer_idx]
        k, v = (buffers[0], buffers[1]) if len(buffers) == 2 else (buffers[0], None)
        o = paged_decode_attention(q[:, 0], k, v, self.tables, self.position_ids[:, 0] + 1, scale, v_dim)
        return o[:, None]

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this call's entries (each [B, T, ...]) into their pages of layer `layer_idx` and
        return each row's positions 0..attn_len-1 gathered from its pages, [B, S, ...] each."""
        buffers = self.cache.layers[layer_idx]
        assert len(new) == len(buffers), f"layer {layer_idx}: {len(new)} tensors for {len(buffers)} buffers"
        self.write(layer_idx, *new)
        B, W = self.tables.shape
        P = self.cache.page_size
        out = []
        for buf in buffers:
            rows = buf[self.tables]                                # [B, W, P, ...]
            out.append(rows.reshape(B, W * P, *buf.shape[2:])[:, : self.attn_len])
        return tuple(out)
