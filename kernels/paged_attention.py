"""Paged decode attention: one query token per row over its keys in a paged KV cache, the context
split over programs (flash-decoding, Dao et al., 2023) and the splits combined.

    o[b, h] = softmax_s(scale * q[b, h] . k[b, s, h // G]) @ v[b, s, h // G]     s < seq_lens[b]

Letters: B rows, H query heads, Hkv kv heads, G = H // Hkv query heads per kv head, Dqk the q/k head
dim, Dv the v head dim, M pages in the pool, P positions per page, W pages per block table (so a
table addresses W·P positions), NS splits of the context; MLA: C kv_lora_rank, R qk_rope_head_dim.

Contract:
- q [B, H, Dqk], k_pages [M, P, Hkv, Dqk], v_pages [M, P, Hkv, Dv], block_tables [B, W] and
  seq_lens [B] (int32 or int64) -> o [B, H, Dv] in q's dtype. Row b's position p lives at page
  block_tables[b, p // P], offset p % P; the row attends over its positions 0 .. seq_lens[b]-1
  (1 <= seq_lens[b] <= W·P). Table entries past a row's positions may name any valid page: they
  are never read. Query head h reads kv head h // G. The layout is model/paged_cache.py's.
- MLA form, v_pages=None with v_dim: the values are the first v_dim channels of the keys. DeepSeek
  MLA's absorbed decode is this with one kv head [c_kv; k_pe] of width C + R (k_pages [M, P, C + R]
  or [M, P, 1, C + R]) and v_dim = C, shared by all H query heads: o is the latent output [B, H, C].
- softmax_scale defaults to Dqk ** -0.5 (MLA passes the model's own); fp32, fp16 and bf16, one
  dtype for q and the pages; softmax statistics and accumulators in fp32, fp32 dots with
  input_precision="ieee" (no TF32).
- block_tables and seq_lens are trusted as they are: checking their contents would copy them to the
  host (PagedKVCache.check_call checks the tables' page range). A row with seq_lens 0, outside the
  contract, gets o = 0 on every path.

Kernels (split-K over the context):
1. `_paged_decode_split_kernel`, grid (Hkv · ceil(G / BLOCK_G), B, NS): one program takes a block
   of BLOCK_G query heads of one kv head (GQA's group, or MLA's H heads) over one range of
   positions, BLOCK_N positions a step, each position's page looked up in the block table. The
   group shares every key load: the scores are a [BLOCK_G, BLOCK_N] dot, not BLOCK_G dot products.
   It keeps a running max and sum of base-2 exponentials (online softmax) and writes its
   normalised partial output [Dv] and log-sum-exp per head, or, when NS = 1, the output itself.
   The range of split i is tiles i·t .. (i+1)·t - 1 of BLOCK_N positions, t = ceil(W·P / BLOCK_N / NS),
   clipped to the row's length: a split that starts past it writes lse = -inf and a zero partial.
   In the MLA form the key is loaded as two tiles, its first v_dim channels (C) and the rest (R),
   and the first tile is also the value tile: each latent is read once for both dots, and a
   576-wide key runs as 512 + 64 instead of padded to 1024.
2. `_paged_decode_combine_kernel`, grid (H, B), only when NS > 1: o = Σ_i 2^(lse_i - max) o_i /
   Σ_i 2^(lse_i - max), on the device (no host sync).

NS is chosen on the host from what the host knows without reading seq_lens (never copied to the
host): enough programs for two waves over the SMs, at most one split per SPLIT_MIN_POSITIONS of
the table's W·P positions, at most MAX_SPLITS. Rows shorter than the table leave their late splits
empty, which cost a program launch each and nothing else.

Compilation: constexprs come from the shape class only: the page size, the padded head dims
(BLOCK_D1, BLOCK_D2, BLOCK_DV: powers of two >= 16, masked loads), the head block BLOCK_G
(G padded to a power of two >= 16, at most BLOCK_G_MAX of the head-dim class: tl.dot needs 16
rows, and the fp32 accumulator [BLOCK_G, BLOCK_DV] must fit in registers), the MLA flags and the
dtypes; B, W and NS are runtime values (W, the tables' row stride and NS not specialised), so a new
batch compiles nothing (tests/kernels/test_paged_attention.py). BLOCK_N and the warps are autotuned
on CUDA per (G, head dims, page size, dtypes) among PAGED_CONFIGS; the interpreter runs the first.
The program dimension runs over the head blocks first, so that the programs reading the same keys
(MLA's head blocks over one latent) are launched together and share them through L2.

Paths: the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1); the torch twin
`paged_decode_attention_torch` (gather the pages, mask, fp32 softmax: the spec and the test
oracle, what PagedCacheStep.update + model.attention.masked_attention compute). The public
`paged_decode_attention` picks one by kernels.backend.use_triton.

Layout: jit kernels, launch configurations, host launcher, argument checks, the torch twin, the
Triton entry point, the public function, compile_specs().
"""
import functools

import torch

from kernels.backend import use_triton
from kernels.triton_import import tl, triton
from kernels.tuning import TunedKernel

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- jit kernels

@triton.jit(do_not_specialize=["stride_bt", "W"])
def _paged_decode_split_kernel(Q, K, V, TABLES, LENS, O, O_PART, LSE_PART, scale_log2,
                               stride_qb, stride_qh, stride_km, stride_kp, stride_kh, stride_vm, stride_vp, stride_vh,
                               stride_bt, stride_ob, stride_oh, W, H, GROUP, D1, DQK, DV,
                               PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
                               HAS_TAIL: tl.constexpr, SHARED_KV: tl.constexpr, PRECISION: tl.constexpr):
    # D1: the key channels of the first tile (Dqk, or v_dim in the MLA form); the tail D1..DQK-1
    # is a second tile (HAS_TAIL); SHARED_KV: the first tile is also the value (DV == D1)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    blocks_per_kv = tl.cdiv(GROUP, BLOCK_G)
    hk = pid // blocks_per_kv
    g = (pid % blocks_per_kv) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    h = hk * GROUP + g                                                         # [G] query heads

    positions = W * PAGE
    seq_len = tl.minimum(tl.load(LENS + b).to(tl.int32), positions)
    per_split = tl.cdiv(tl.cdiv(positions, BLOCK_N), num_splits) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = tl.arange(0, BLOCK_D2)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_row = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh
    q1 = tl.load(q_row + offs_d1[None, :], mask=g_ok[:, None] & (offs_d1 < D1)[None, :], other=0.0)   # [G, D1]
    q2 = q1
    if HAS_TAIL:
        q2 = tl.load(q_row + D1 + offs_d2[None, :], mask=g_ok[:, None] & (offs_d2 < DQK - D1)[None, :],
                     other=0.0)                                                # [G, D2]
    table = TABLES + b.to(tl.int64) * stride_bt

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    for start_n in range(start, end, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < end
        page = tl.load(table + n // PAGE, mask=n_ok, other=0).to(tl.int64)     # [N] page of each position
        slot = n % PAGE
        k_row = K + page * stride_km + slot * stride_kp + hk * stride_kh       # [N] pointers
        k1 = tl.load(k_row[:, None] + offs_d1[None, :], mask=n_ok[:, None] & (offs_d1 < D1)[None, :],
                     other=0.0)                                                # [N, D1]
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)                # [G, N]
        if HAS_TAIL:
            k2 = tl.load(k_row[:, None] + D1 + offs_d2[None, :],
                         mask=n_ok[:, None] & (offs_d2 < DQK - D1)[None, :], other=0.0)  # [N, D2]
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        # position start_n < end is visible, so every row's max is finite from the first step on
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SHARED_KV:
            v = k1                                                             # [N, Dv = D1]
        else:
            v = tl.load((V + page * stride_vm + slot * stride_vp + hk * stride_vh)[:, None] + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [N, Dv]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0                                                             # False: an empty split
    o = acc / tl.where(seen, l_i, 1.0)[:, None]                                # [G, Dv]
    out_ok = g_ok[:, None] & (offs_dv < DV)[None, :]
    if num_splits == 1:
        tl.store(O + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + offs_dv[None, :],
                 o.to(O.dtype.element_ty), mask=out_ok)
    else:
        row = (b.to(tl.int64) * H + h) * num_splits + split                    # [G] in [B, H, NS]
        tl.store(O_PART + row[:, None] * DV + offs_dv[None, :], o, mask=out_ok)
        tl.store(LSE_PART + row, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                 mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_combine_kernel(O_PART, LSE_PART, O, stride_ob, stride_oh, H, DV, num_splits,
                                 BLOCK_DV: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    row0 = (b.to(tl.int64) * H + h) * num_splits
    offs = tl.arange(0, BLOCK_DV)
    ok = offs < DV
    m = tl.load(LSE_PART + row0)
    for i in range(1, num_splits):
        m = tl.maximum(m, tl.load(LSE_PART + row0 + i))
    m = tl.where(m == float("-inf"), 0.0, m)  # a row with no key at all: every weight is 0, o = 0
    l = m * 0.0
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for i in range(0, num_splits):
        w = tl.exp2(tl.load(LSE_PART + row0 + i) - m)                          # 0 for an empty split
        acc += w * tl.load(O_PART + (row0 + i) * DV + offs, mask=ok, other=0.0)
        l += w
    o = acc / tl.where(l > 0, l, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs, o.to(O.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launch configurations

def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _positions(n, warps, stages):
    return triton.Config({"BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _wide(block_d1: int, block_dv: int) -> bool:
    """The head-dim class: wider than 128 (MLA's 512-channel latent) or not."""
    return max(block_d1, block_dv) > 128


# the most query heads one program takes, per head-dim class: the fp32 accumulator [BLOCK_G,
# BLOCK_DV] stays at 64 values a thread (64 x 128 over 4 warps; 32 x 512 over 8 warps)
BLOCK_G_MAX = {False: 64, True: 32}

# (wide head dims, fp32) -> the BLOCK_N (positions per step) tried on Hopper, the interpreter's
# first. Decode reads each key once, so the tiles only trade the loads in flight (BLOCK_N x
# num_stages) against registers; the wide class halves BLOCK_N for fp32 (twice the bytes) and runs
# 8 warps for its 32 x 512 accumulator (the 4-warp one trades registers for programs). Largest
# static shared memory on sm_90 (kernels.compile_check): 132 KiB (MLA, 16-bit, BLOCK_N = 64) and
# 148 KiB (MLA, fp32, BLOCK_N = 32), of 227.
PAGED_CONFIGS = {
    (False, False): [_positions(64, 4, 2), _positions(128, 4, 2), _positions(32, 4, 3)],
    (True, False): [_positions(32, 8, 2), _positions(64, 8, 2), _positions(32, 4, 2)],
    (False, True): [_positions(32, 4, 2), _positions(64, 4, 2)],
    (True, True): [_positions(16, 8, 2), _positions(32, 8, 2)],
}

# one program per (head, row) reading NS partials of Dv floats: the warps only
COMBINE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (1, 4)]


def _paged_configs(configs, named_args, BLOCK_D1, BLOCK_DV, PRECISION, **_):
    """autotune's early_config_prune: the configurations of a launch's head-dim class and dtype."""
    return PAGED_CONFIGS[(_wide(BLOCK_D1, BLOCK_DV), PRECISION == "ieee")]


_ALL_CONFIGS = list(dict.fromkeys(c for cs in PAGED_CONFIGS.values() for c in cs))  # Config compares by value
_split = TunedKernel(_paged_decode_split_kernel, _ALL_CONFIGS, key=["GROUP", "D1", "DQK", "DV", "PAGE", "SHARED_KV"],
                     prune=_paged_configs)
_combine = TunedKernel(_paged_decode_combine_kernel, COMBINE_CONFIGS, key=["DV"])

# how many splits the host asks for (see the module docstring)
SPLIT_MIN_POSITIONS = 256
MAX_SPLITS = 32


def _meta(dtype: torch.dtype, Dqk: int, Dv: int, G: int, P: int, shared: bool) -> dict:
    """The split kernel's constexprs other than BLOCK_N: its shape class."""
    d1 = Dv if shared else Dqk
    wide = _wide(_pad(d1), _pad(Dv))
    return dict(PAGE=P, BLOCK_G=min(_pad(G), BLOCK_G_MAX[wide]), BLOCK_D1=_pad(d1), BLOCK_D2=_pad(max(Dqk - d1, 1)),
                BLOCK_DV=_pad(Dv), HAS_TAIL=Dqk > d1, SHARED_KV=shared, PRECISION=_precision(dtype))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a number to exercise the split logic with


def num_splits_for(programs: int, positions: int, device: torch.device) -> int:
    """NS for `programs` programs per split (head blocks x rows) over tables of `positions` = W·P
    positions: 1 when the programs already fill two waves of the SMs, else enough splits for two
    waves, but no split shorter than SPLIT_MIN_POSITIONS and at most MAX_SPLITS. Host values only."""
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), positions // SPLIT_MIN_POSITIONS, MAX_SPLITS))


# ---------------------------------------------------------------- host launcher

def paged_decode_fwd(q, k_pages, v_pages, block_tables, seq_lens, scale, v_dim, num_splits=None, config=None):
    """q [B, H, Dqk], k_pages [M, P, Hkv, Dqk], v_pages [M, P, Hkv, Dv] or None (MLA form: values are
    k's first v_dim channels), last dims contiguous -> o [B, H, Dv]. num_splits: NS, or None
    (num_splits_for); config: a triton.Config of BLOCK_N, or None (autotuned on CUDA)."""
    B, H, Dqk = q.shape
    _, P, Hkv, _ = k_pages.shape
    W = block_tables.shape[1]
    shared = v_pages is None
    Dv = v_dim if shared else v_pages.shape[-1]
    G = H // Hkv
    meta = _meta(q.dtype, Dqk, Dv, G, P, shared)
    head_blocks = Hkv * triton.cdiv(G, meta["BLOCK_G"])
    o = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    ns = num_splits or num_splits_for(head_blocks * B, W * P, q.device)
    if ns > 1:
        o_part = torch.empty(B, H, ns, Dv, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, H, ns, dtype=torch.float32, device=q.device)
    else:  # the split kernel writes o itself: placeholders of the partials' dtype
        o_part = lse_part = torch.empty(1, dtype=torch.float32, device=q.device)
    v = k_pages if shared else v_pages
    _split((head_blocks, B, ns), q, k_pages, v, block_tables, seq_lens, o, o_part, lse_part, scale * LOG2E,
           q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
           v.stride(0), v.stride(1), v.stride(2), block_tables.stride(0), o.stride(0), o.stride(1),
           W, H, G, Dv if shared else Dqk, Dqk, Dv, config=config, **meta)
    if ns > 1:
        _combine((H, B), o_part, lse_part, o, o.stride(0), o.stride(1), H, Dv, ns, BLOCK_DV=meta["BLOCK_DV"])
    return o


# ---------------------------------------------------------------- argument checks

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k_pages, v_pages, block_tables, seq_lens, v_dim):
    """ValueError naming the tensor for inputs outside the contract; returns (k_pages as [M, P, Hkv, Dqk], Dv)."""
    name = "paged_decode_attention"
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [B, H, Dqk] (one query token per row), got {tuple(q.shape)}")
    B, H, Dqk = q.shape
    if v_pages is None and k_pages.dim() == 3:
        k_pages = k_pages.unsqueeze(2)                                         # [M, P, 1, C + R]
    if k_pages.dim() != 4:
        forms = "[M, P, Hkv, Dqk]" + (", or [M, P, Dqk] with v_pages=None" if v_pages is None else "")
        raise ValueError(f"{name}: k_pages must be {forms}; got {tuple(k_pages.shape)}")
    M, P, Hkv, Dk = k_pages.shape
    if Dk != Dqk:
        raise ValueError(f"{name}: k_pages' head dim {Dk} differs from q's Dqk = {Dqk} "
                         f"(k_pages {tuple(k_pages.shape)}, q {tuple(q.shape)})")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{name}: q's {H} heads must be a multiple of k_pages' Hkv = {Hkv} kv heads "
                         f"(k_pages [M, P, Hkv, Dqk] = {tuple(k_pages.shape)})")
    if v_pages is None:
        if v_dim is None or not 1 <= v_dim <= Dqk:
            raise ValueError(f"{name}: with v_pages=None (values = the keys' first v_dim channels) v_dim must be "
                             f"in 1..Dqk = {Dqk}, got {v_dim!r}")
        Dv = v_dim
    else:
        if v_pages.dim() != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
            raise ValueError(f"{name}: v_pages must be [M, P, Hkv, Dv] = [{M}, {P}, {Hkv}, Dv] like k_pages; got "
                             f"{tuple(v_pages.shape)}")
        if v_dim is not None and v_dim != v_pages.shape[-1]:
            raise ValueError(f"{name}: v_dim = {v_dim} but v_pages' head dim is {v_pages.shape[-1]} (v_dim is for "
                             "v_pages=None)")
        Dv = v_pages.shape[-1]
    dtypes = (q.dtype, k_pages.dtype) + (() if v_pages is None else (v_pages.dtype,))
    if q.dtype not in DTYPES or len(set(dtypes)) != 1:
        raise ValueError(f"{name}: q, k_pages{'' if v_pages is None else ', v_pages'} must share one of "
                         f"fp32/fp16/bf16; got {', '.join(str(d) for d in dtypes)}")
    int_types = (torch.int32, torch.int64)
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.shape[1] < 1 \
            or block_tables.dtype not in int_types:
        raise ValueError(f"{name}: block_tables must be int32/int64 [B = {B}, W >= 1]; got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype not in int_types:
        raise ValueError(f"{name}: seq_lens must be int32/int64 [B = {B}]; got {tuple(seq_lens.shape)} "
                         f"{seq_lens.dtype}")
    tensors = {"q": q, "k_pages": k_pages, "v_pages": v_pages, "block_tables": block_tables, "seq_lens": seq_lens}
    for t_name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: {t_name} is on {t.device}, q on {q.device}")
    return k_pages, Dv


# ---------------------------------------------------------------- the torch twin

def paged_decode_attention_torch(q, k_pages, v_pages, block_tables, seq_lens, softmax_scale=None, v_dim=None):
    """The torch twin (the spec, the CPU path and the test oracle): each row's pages gathered into
    [B, W·P, ...] as PagedCacheStep.update does, positions >= seq_lens masked, softmax in fp32 (as
    masked_attention does for T = 1, grouped by kv head). Same contract as paged_decode_attention."""
    k_pages, Dv = _check(q, k_pages, v_pages, block_tables, seq_lens, v_dim)
    B, H, Dqk = q.shape
    _, P, Hkv, _ = k_pages.shape
    W = block_tables.shape[1]
    scale = Dqk ** -0.5 if softmax_scale is None else softmax_scale
    tables = block_tables.long()
    k = k_pages[tables].reshape(B, W * P, Hkv, Dqk)                            # [B, S, Hkv, Dqk]
    v = k[..., :Dv] if v_pages is None else v_pages[tables].reshape(B, W * P, Hkv, Dv)  # [B, S, Hkv, Dv]
    visible = torch.arange(W * P, device=q.device)[None, :] < seq_lens[:, None]  # [B, S]
    qg = q.float().reshape(B, Hkv, H // Hkv, Dqk)                              # [B, Hkv, G, Dqk], head h = kv·G + g
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k.float()) * scale            # [B, Hkv, G, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    seen = visible.any(-1)[:, None, None, None]                                # [B, 1, 1, 1]
    p = torch.softmax(torch.where(seen, scores, 0.0), dim=-1) * seen           # a row with no key: p = 0
    o = torch.einsum("bkgs,bskd->bkgd", p, v.float())                          # [B, Hkv, G, Dv]
    return o.reshape(B, H, Dv).to(q.dtype)                                     # [B, H, Dv]


# ---------------------------------------------------------------- Triton entry point and public function

def paged_decode_attention_triton(q, k_pages, v_pages, block_tables, seq_lens, softmax_scale=None, v_dim=None, *,
                                  num_splits=None, block_n=None):
    """The Triton path; no copy to the host. num_splits fixes NS (else num_splits_for), block_n the
    positions per step (4 warps, 2 stages; else autotuned on CUDA, the class's first elsewhere)."""
    k_pages, Dv = _check(q, k_pages, v_pages, block_tables, seq_lens, v_dim)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"paged_decode_attention_triton: num_splits must be >= 1, got {num_splits}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    config = _positions(block_n, 4, 2) if block_n else None
    contig = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return paged_decode_fwd(contig(q), contig(k_pages), contig(v_pages), contig(block_tables), contig(seq_lens),
                            scale, Dv, num_splits=num_splits, config=config)


def paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, softmax_scale=None, v_dim=None):
    """Decode attention of one query per row over a paged KV cache (module docstring for the contract):
    q [B, H, Dqk], k_pages [M, P, Hkv, Dqk], v_pages [M, P, Hkv, Dv] (or None with v_dim: the MLA
    form), block_tables [B, W], seq_lens [B] -> o [B, H, Dv]. The backend follows KERNELS_BACKEND
    (see kernels.backend): Triton on CUDA tensors, the torch twin on CPU tensors under auto."""
    args = (q, k_pages, v_pages, block_tables, seq_lens, softmax_scale, v_dim)
    if use_triton(q):
        return paged_decode_attention_triton(*args)
    return paged_decode_attention_torch(*args)


# ---------------------------------------------------------------- GPU build configurations

# (name, Dqk, Dv, G, P, MLA form): Llama/Qwen GQA (128, 8 heads a kv head), DeepSeek-V3's absorbed
# MLA (C + R = 512 + 64, 128 heads on one latent), a small model (64, MQA over 4 heads)
SPEC_SHAPES = (("128x128", 128, 128, 8, 16, False), ("mla576x512", 576, 512, 128, 64, True),
               ("64x64", 64, 64, 4, 16, False))


def compile_specs():
    """Both kernels, every configuration of their class, per shape of SPEC_SHAPES and dtype (int64
    block tables and lengths, as PagedKVCache.block_table makes them)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    specs = []
    for tag, dqk, dv, G, P, shared in SPEC_SHAPES:
        for name, dt in dtypes.items():
            p = "*" + name
            meta = _meta(dt, dqk, dv, G, P, shared)
            specs += _split.compile_specs(f"paged_decode_split_{tag}", name, {
                "Q": p, "K": p, "V": p, "TABLES": "*i64", "LENS": "*i64", "O": p, "O_PART": "*fp32",
                "LSE_PART": "*fp32", "scale_log2": "fp32",
                **{s: "i32" for s in ("stride_qb", "stride_qh", "stride_km", "stride_kp", "stride_kh", "stride_vm",
                                      "stride_vp", "stride_vh", "stride_bt", "stride_ob", "stride_oh", "W", "H",
                                      "GROUP", "D1", "DQK", "DV")},
                **{k: "constexpr" for k in (*meta, "BLOCK_N")}}, meta)
            specs += _combine.compile_specs(f"paged_decode_combine_{tag}", name, {
                "O_PART": "*fp32", "LSE_PART": "*fp32", "O": p, "stride_ob": "i32", "stride_oh": "i32", "H": "i32",
                "DV": "i32", "num_splits": "i32", "BLOCK_DV": "constexpr"}, {"BLOCK_DV": meta["BLOCK_DV"]})
    return specs
