"""Flash attention forward and backward (Dao et al., 2022; Dao, 2023) with GQA, MLA head dims and
packed variable-length sequences.

    o = softmax(scale * q @ k.T + causal_mask) @ v          per sequence, per head

Letters: B batch, T queries, S keys, H query heads, Hkv key/value heads (H % Hkv == 0; query head h
reads kv head h // (H / Hkv)), Dqk the q/k head dim, Dv the v head dim (MLA: 192 and 128).

Contract:
- batched: q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv];
- packed (cu_seqlens [n + 1] int, 0 = c0 < c1 < ... = total): q [total, H, Dqk], k [total, Hkv, Dqk],
  v [total, Hkv, Dv]; tokens c_i .. c_{i+1}-1 form sequence i and attend only within it;
- causal: the mask is aligned bottom-right, as flash-attn does: with T queries over S keys the queries
  are the last T positions, so query i sees key j iff j <= i + S - T. A query that sees no key
  (only when T > S) gets o = 0 and no gradient;
- softmax_scale defaults to Dqk ** -0.5; fp32, fp16 and bf16 inputs, o in the inputs' dtype,
  softmax statistics and accumulators in fp32; fp32 dots use input_precision="ieee" (no TF32).

Kernels: the forward keeps, per block of BLOCK_M queries, a running max and sum of the base-2
exponentials and rescales its output accumulator (online softmax); it stores the base-2 log-sum-exp
per query. The backward recomputes the probabilities from it in two kernels: dK/dV per block of
keys (looping over the query heads that share the kv head, so GQA needs no atomics) and dQ per
block of queries, with delta = rowsum(dO * O) computed first. Head dims that are not powers of two
are padded to the next one with masked loads (192 runs as 256).

Tiles: BLOCK_M x BLOCK_N and num_warps / num_stages are autotuned on CUDA per (head dims, heads,
causal, dtypes) among ATTN_CONFIGS, one short list per class of padded head dim (<= 128 or 256)
and element size (16-bit or fp32), each fitting sm_90's 227 KiB of shared memory; the interpreter
runs the first of the class. Token counts are runtime values: the grids follow max_seqlen and
the per-head stride of the lse (the total token count) is not specialised, so a new batch
compiles nothing.

Packed batches need the longest sequence for the grid. `max_seqlen` (a Python int, e.g. from the
packer, which knows the lengths on the host) spares the device-to-host copy that finding it from
cu_seqlens costs, and that copy's synchronisation, in every layer; with it given, cu_seqlens is
trusted as it is (its contents are not checked, which would need that copy too).

Paths:
- `flash_attention_flash_attn`: flash-attn's varlen kernel (FA3's flash_attn_interface if it
  imports, else FA2's flash_attn), imported lazily on the first CUDA call; batched inputs are laid
  out as varlen ones ([B*T, H, D] with cu_seqlens 0, T, 2T, ...). It takes fp16/bf16 with head dims
  that are multiples of 8 up to 256, the same for q/k and v, except that FA3 on Hopper also takes
  Dqk in (128, 192] with Dv in (96, 128] (MLA's 192/128); anything else (fp32, FA2 with MLA's
  unequal dims, odd head dims) falls back to the Triton kernels, explicitly (`_flash_attn_refusal`
  says why). GQA is native in both; both align causal masks bottom-right, as here (FA2 since
  2.1), and give a query that sees no key o = 0.
- the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1);
- the torch twin `flash_attention_torch` (explicit fp32 scores and mask: the spec and the test
  oracle);
- `flash_attention_sdpa`, torch's fused scaled_dot_product_attention per sequence, the fast CPU
  path, tested equal to the twin.

Layout: jit kernels, launch configurations, host launchers, autograd.Function, the torch twin, the
SDPA path, the flash-attn path, the public functions, compile_specs().
"""
import functools

import torch
import torch.nn.functional as F

from kernels.backend import backend_name, use_triton
from kernels.triton_import import HAVE_TRITON, tl, triton
from kernels.tuning import TunedKernel

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- jit kernels

@triton.jit(do_not_specialize=["stride_lh"])
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, scale_log2,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_lh, H, GROUP, DQK, DV,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q0 = tl.load(CU_Q + b).to(tl.int64)
    q_len = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
    k0 = tl.load(CU_K + b).to(tl.int64)
    k_len = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    if start_m >= q_len:
        return
    diag = k_len - q_len  # bottom-right alignment: query i sees key j iff j <= i + diag
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < q_len
    q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    end_n = k_len
    if CAUSAL:
        end_n = tl.minimum(k_len, start_m + BLOCK_M + diag)  # keys past this are masked for every row
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < k_len
        kt = tl.load(K + (k0 + n)[None, :] * stride_kt + hk * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & (offs_d < DQK)[:, None], other=0.0)      # [Dqk, N]
        v = tl.load(V + (k0 + n)[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)       # [N, Dv]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2                  # [M, N], base-2 units
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no inf - inf
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv < DV)[None, :])
    # +inf for a query that sees nothing: the backward's exp2(s - lse) is then 0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lh + q0 + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=["stride_lh"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, CU_Q, CU_K, scale_log2, scale,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                          stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, HKV, GROUP, DQK, DV,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = bh // HKV
    hk = bh % HKV
    q0 = tl.load(CU_Q + b).to(tl.int64)
    q_len = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
    k0 = tl.load(CU_K + b).to(tl.int64)
    k_len = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    if start_n >= k_len:
        return
    diag = k_len - q_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < k_len
    k = tl.load(K + (k0 + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)            # [N, Dqk]
    v = tl.load(V + (k0 + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)           # [N, Dv]
    dk = tl.zeros((BLOCK_N, BLOCK_DQK), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    begin_m = 0
    if CAUSAL:  # queries before this row see none of these keys
        begin_m = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
    for g in range(GROUP):  # the query heads that read this kv head
        h = hk * GROUP + g
        for start_m in range(begin_m, q_len, BLOCK_M):
            m = start_m + offs_m0
            m_ok = m < q_len
            q = tl.load(Q + (q0 + m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=m_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)    # [M, Dqk]
            do = tl.load(DO + (q0 + m)[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [M, Dv]
            lse = tl.load(LSE + h * stride_lh + q0 + m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + h * stride_lh + q0 + m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2     # [N, M]
            ok = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= m[None, :] + diag)
            pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)               # [N, M]
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + (k0 + offs_n)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d < DQK)[None, :])
    tl.store(DV_ + (k0 + offs_n)[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit(do_not_specialize=["stride_lh"])
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, scale_log2, scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_dqt, stride_dqh, stride_lh, H, GROUP, DQK, DV,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q0 = tl.load(CU_Q + b).to(tl.int64)
    q_len = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
    k0 = tl.load(CU_K + b).to(tl.int64)
    k_len = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < q_len
    q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)            # [M, Dqk]
    do = tl.load(DO + (q0 + offs_m)[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)          # [M, Dv]
    lse = tl.load(LSE + h * stride_lh + q0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + h * stride_lh + q0 + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DQK), tl.float32)
    end_n = k_len
    if CAUSAL:
        end_n = tl.minimum(k_len, start_m + BLOCK_M + diag)
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < k_len
        k = tl.load(K + (k0 + n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)        # [N, Dqk]
        v = tl.load(V + (k0 + n)[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)       # [N, Dv]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2          # [M, N]
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                    # [M, N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + (q0 + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < DQK)[None, :])


# ---------------------------------------------------------------- launch configurations

def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _tile(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


# (padded head dim > 128, fp32) -> the tiles tried on Hopper, the interpreter's first: 64 x 64 for
# 16-bit inputs with padded head dims up to 128, 32 x 32 for wider heads and for fp32 (twice the
# bytes per element), so that the tiles fit in registers and shared memory; the others trade
# programs for reuse (larger tiles for long sequences, narrower ones for many short documents).
# fp32 (exactness runs, not training) gets two: its builds are the slowest of kernels.compile_check.
# Largest static shared memory on sm_90 (kernels.compile_check): 97 KiB (16-bit), 105 KiB (fp32), of 227.
ATTN_CONFIGS = {
    (False, False): [_tile(64, 64, 4, 2), _tile(128, 64, 8, 2), _tile(64, 32, 4, 3)],
    (True, False): [_tile(32, 32, 4, 2), _tile(64, 32, 4, 2), _tile(64, 64, 8, 2)],
    (False, True): [_tile(32, 32, 4, 2), _tile(64, 32, 4, 2)],
    (True, True): [_tile(32, 32, 4, 2), _tile(32, 16, 4, 2)],
}


def _attn_configs(configs, named_args, BLOCK_DQK, BLOCK_DV, PRECISION, **_):
    """autotune's early_config_prune: the configurations of a launch's class of head dim and dtype."""
    return ATTN_CONFIGS[(max(BLOCK_DQK, BLOCK_DV) > 128, PRECISION == "ieee")]


_ALL_TILES = list(dict.fromkeys(c for cs in ATTN_CONFIGS.values() for c in cs))  # triton.Config compares by value
_fwd = TunedKernel(_attn_fwd_kernel, _ALL_TILES, key=["H", "GROUP", "DQK", "DV", "CAUSAL"], prune=_attn_configs)
_dkdv = TunedKernel(_attn_bwd_dkdv_kernel, _ALL_TILES, key=["HKV", "GROUP", "DQK", "DV", "CAUSAL"],
                    prune=_attn_configs)
_dq = TunedKernel(_attn_bwd_dq_kernel, _ALL_TILES, key=["H", "GROUP", "DQK", "DV", "CAUSAL"], prune=_attn_configs)


def _meta(q, v, causal) -> dict:
    """The launch's constexprs other than the tiles: its shape class."""
    return dict(CAUSAL=causal, BLOCK_DQK=_pad(q.shape[-1]), BLOCK_DV=_pad(v.shape[-1]), PRECISION=_precision(q.dtype))


# ---------------------------------------------------------------- host launchers

def attn_fwd(q, k, v, cu_q, cu_k, max_q, scale, causal, config=None):
    """q [Nq, H, Dqk], k [Nk, Hkv, Dqk], v [Nk, Hkv, Dv] (last dim contiguous) -> (o [Nq, H, Dv], lse [H, Nq]).
    config: a triton.Config of BLOCK_M/BLOCK_N, or None (autotuned on CUDA, the class's first elsewhere)."""
    Nq, H, Dqk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    o = torch.empty(Nq, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, Nq, dtype=torch.float32, device=q.device)
    nseq = cu_q.numel() - 1
    _fwd(lambda m: (nseq * H, triton.cdiv(max(max_q, 1), m["BLOCK_M"])),
         q, k, v, o, lse, cu_q, cu_k, scale * LOG2E,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         o.stride(0), o.stride(1), lse.stride(0), H, H // Hkv, Dqk, Dv, config=config, **_meta(q, v, causal))
    return o, lse


def attn_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, config=None):
    """Gradients (dq, dk, dv) in the inputs' dtypes, from dO [Nq, H, Dv] and the forward's o and lse."""
    Nq, H, Dqk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    nseq = cu_q.numel() - 1
    delta = (do.float() * o.float()).sum(-1).T.contiguous()  # [H, Nq] rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _meta(q, v, causal)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    _dkdv(lambda m: (nseq * Hkv, triton.cdiv(max(max_k, 1), m["BLOCK_N"])),
          q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, scale * LOG2E, scale, *strides,
          dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), Hkv, H // Hkv, Dqk, Dv,
          config=config, **meta)
    _dq(lambda m: (nseq * H, triton.cdiv(max(max_q, 1), m["BLOCK_M"])),
        q, k, v, do, lse, delta, dq, cu_q, cu_k, scale * LOG2E, scale, *strides,
        dq.stride(0), dq.stride(1), lse.stride(0), H, H // Hkv, Dqk, Dv, config=config, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------- autograd

class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, config):
        o, lse = attn_fwd(q, k, v, cu_q, cu_k, max_q, scale, causal, config)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, config = ctx.args
        dq, dk, dv = attn_bwd(do.contiguous(), q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, config)
        return dq, dk, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------- argument checks

def _check(q, k, v, cu_seqlens, max_seqlen=None):
    """ValueError for inputs outside the contract. cu_seqlens' contents are checked (one copy to the
    host) only when max_seqlen is None: a caller that passes max_seqlen vouches for both."""
    want = 3 if cu_seqlens is not None else 4
    layout = "[total, heads, dim] with cu_seqlens" if want == 3 else "[B, T, heads, dim]"
    if not (q.dim() == k.dim() == v.dim() == want):
        raise ValueError(f"flash_attention: q, k, v must be {layout}; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    H, Hkv = q.shape[-2], k.shape[-2]
    if v.shape[-2] != Hkv or H % Hkv:
        raise ValueError(f"flash_attention: k and v need the same number of heads dividing q's ({H}); got "
                         f"k {Hkv}, v {v.shape[-2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[:-2] != v.shape[:-2] or q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attention: leading dims disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if max_seqlen is not None and cu_seqlens is None:
        raise ValueError("flash_attention: max_seqlen goes with cu_seqlens (batched inputs have their lengths in "
                         "their shapes)")
    if cu_seqlens is not None:
        cu = cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(f"flash_attention: cu_seqlens must be a 1-D integer tensor [n + 1], got {tuple(cu.shape)} {cu.dtype}")
        if max_seqlen is not None:
            if not isinstance(max_seqlen, (int, torch.SymInt)) or not 0 <= max_seqlen <= q.shape[0]:
                raise ValueError(f"flash_attention: max_seqlen must be a Python int in [0, total = {q.shape[0]}], "
                                 f"got {max_seqlen!r}")
            return
        c = cu.tolist()
        if c[0] != 0 or c[-1] != q.shape[0] or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"flash_attention: cu_seqlens must rise from 0 to total = {q.shape[0]}; got {c}")


def _longest(cu: torch.Tensor, max_seqlen: int | None) -> int:
    """max_seqlen, or the longest sequence of cu_seqlens (a copy to the host, and a sync on CUDA)."""
    return max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())


# ---------------------------------------------------------------- public functions

def flash_attention_torch(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """The torch twin (the spec and the CPU path): scores in fp32, explicit mask, one sequence of a
    packed batch at a time. Same contract as flash_attention; autograd differentiates it. (It splits
    a packed batch on the host, so it reads cu_seqlens there whatever max_seqlen says.)"""
    _check(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens is not None:
        c = cu_seqlens.tolist()
        return torch.cat([_attend(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale)[0]
                          for a, b in zip(c, c[1:])], dim=0)
    return _attend(q, k, v, causal, scale)


def _attend(q, k, v, causal, scale):
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)                                   # [B, S, H, Dqk]
    v = v.repeat_interleave(H // Hkv, dim=2)                                   # [B, S, H, Dv]
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale          # [B, H, T, S]
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        visible = j <= i + (S - T)                                             # [T, S], bottom-right
        s = s.masked_fill(~visible, float("-inf"))
        seen = visible.any(-1)[:, None]                                        # [T, 1]
        s = torch.where(seen, s, 0.0)  # a query with no visible key: finite scores, zeroed below
        p = torch.softmax(s, dim=-1) * seen
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v.float()).to(q.dtype)           # [B, T, H, Dv]


def flash_attention_triton(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None, *,
                           block_m=None, block_n=None):
    """The Triton path; with cu_seqlens and max_seqlen it makes no copy to the host. block_m/block_n
    fix the tile sizes (tests use small ones; 4 warps, 2 stages), else they are autotuned on CUDA."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    config = _tile(block_m, block_n or block_m, 4, 2) if block_m else None
    contig = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        longest = _longest(cu, max_seqlen)
        return _FlashAttention.apply(contig(q), contig(k), contig(v), cu, cu, longest, longest, scale, causal, config)
    B, T, H, _ = q.shape
    S = k.shape[1]
    ar = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    q3, k3, v3 = (contig(t.reshape(-1, *t.shape[2:])) for t in (q, k, v))     # [B*T, H, D] / [B*S, Hkv, D]
    o = _FlashAttention.apply(q3, k3, v3, ar * T, ar * S, T, S, scale, causal, config)
    return o.view(B, T, H, v.shape[-1])


def flash_attention_sdpa(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """The fast torch path (CPU, or CUDA without Triton): torch's scaled_dot_product_attention, one
    sequence of a packed batch at a time. Same contract as flash_attention; tested equal to the twin.

    On CPU, SDPA's fused (flash) kernel ran forward + backward of one 256-token sequence (4 heads
    over 2 kv heads of 32) 10x faster than the twin's explicit fp32 softmax, because it never
    builds the [B, H, T, S] scores, mask and probabilities as separate tensors. That kernel wants one head dim for q, k and v and has only a top-left
    causal mask, so: the smaller of Dqk and Dv is zero-padded (zero columns change neither the
    scores nor the kept output columns), T == S uses is_causal, T < S an explicit bottom-right
    mask, and T > S answers the T - S queries that see no key with zeros. Like the twin it splits a
    packed batch on the host.
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if cu_seqlens is not None:
        return _sdpa_documents(q, k, v, cu_seqlens, causal, scale)
    return _sdpa(q, k, v, causal, scale)


@torch.compiler.disable
def _sdpa_documents(q, k, v, cu_seqlens, causal, scale):
    """SDPA of each packed document, eager even inside a compiled block: the loop reads cu_seqlens on
    the host, and traced it would unroll into one graph per number of documents (a recompile for
    nearly every packed batch, each with one SDPA per document to compile)."""
    # split, not slicing: the backward of one split is one cat, while every slice's backward
    # would write a zero tensor of the whole packed length (quadratic in the documents)
    c = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(c, c[1:])]
    parts = zip(q.split(lengths), k.split(lengths), v.split(lengths))
    return torch.cat([_sdpa(qi[None], ki[None], vi[None], causal, scale)[0] for qi, ki, vi in parts], dim=0)


def _sdpa(q, k, v, causal, scale):
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if T == 0 or S == 0:  # no query, or no key to see: o = 0
        return q.new_zeros(B, T, H, Dv)
    if causal and T > S:  # the first T - S queries see no key: o = 0, no gradient
        zeros = q.new_zeros(B, T - S, H, Dv)
        return torch.cat([zeros, _sdpa(q[:, T - S:], k, v, causal, scale)], dim=1)  # [B, T, H, Dv]
    D = max(Dqk, Dv)
    if Dqk < D:
        q, k = F.pad(q, (0, D - Dqk)), F.pad(k, (0, D - Dqk))                    # [B, T|S, H|Hkv, D]
    if Dv < D:
        v = F.pad(v, (0, D - Dv))                                                # [B, S, Hkv, D]
    mask = None
    if causal and T < S:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        mask = j <= i + (S - T)                                                  # [T, S], bottom-right
    # SDPA's flags as Python literals, decided by branches: under torch.compile with dynamic shapes
    # `T == S` is a SymBool, which SDPA refuses (an `if` makes dynamo guard on it instead)
    is_causal = gqa = False
    if causal and T == S:
        is_causal = True
    if H != Hkv:
        gqa = True
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, scale=scale,
                                       enable_gqa=gqa)                           # [B, H, T, D]
    return o.transpose(1, 2)[..., :Dv]                                           # [B, T, H, Dv]


# ---------------------------------------------------------------- flash-attn (CUDA, when installed)

@functools.cache
def _flash_attn_varlen():
    """(flash_attn_varlen_func, 3 or 2) of the installed flash-attn, FA3 first, or None. Imported on
    the first CUDA call (flash-attn needs CUDA to install, let alone to import) and remembered."""
    try:
        from flash_attn_interface import flash_attn_varlen_func  # FA3 (Hopper), flash-attention/hopper
        return flash_attn_varlen_func, 3
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func            # FA2
        return flash_attn_varlen_func, 2
    except ImportError:
        return None


def _on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda


def _cuda_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _flash_attn_refusal(q, k, v) -> str | None:
    """Why the installed flash-attn cannot take these inputs (then the Triton kernels run), or None."""
    found = _flash_attn_varlen()
    if found is None:
        return "flash-attn is not installed"
    version = found[1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16, not {q.dtype}"
    if q.dim() not in (3, 4) or q.dim() != k.dim() or q.numel() == 0 or k.numel() == 0:
        return "no tokens, or not a layout of flash_attention's"
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk % 8 or dv % 8 or max(dqk, dv) > 256:
        return f"flash-attn takes head dims that are multiples of 8 up to 256, not {dqk} and {dv}"
    if dqk != dv and not (version == 3 and 128 < dqk <= 192 and 96 < dv <= 128 and _cuda_major(q.device) == 9):
        return (f"FA{version} needs equal q/k and v head dims here, got {dqk} and {dv} (only FA3 on Hopper "
                "takes q/k in (128, 192] with v in (96, 128])")
    return None


def flash_attention_flash_attn(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """flash-attn's varlen kernel (FA3 or FA2, whichever _flash_attn_varlen found), for the inputs
    _flash_attn_refusal accepts; same contract as flash_attention.

    flash_attn_varlen_func(q [total_q, H, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv],
    cu_seqlens_q, cu_seqlens_k (int32 [n + 1], on q's device), max_seqlen_q, max_seqlen_k (ints),
    softmax_scale=, causal=) -> o [total_q, H, Dv] (FA3 versions that also return the lse: first
    element). Batched inputs go in as n = B sequences of T queries over S keys.
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    varlen = _flash_attn_varlen()[0]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    contig = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        longest = _longest(cu, max_seqlen)
        o = varlen(contig(q), contig(k), contig(v), cu, cu, longest, longest, softmax_scale=scale, causal=causal)
        return o[0] if isinstance(o, tuple) else o
    B, T, H, _ = q.shape
    S = k.shape[1]
    ar = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    q3, k3, v3 = (contig(t.reshape(-1, *t.shape[2:])) for t in (q, k, v))     # [B*T, H, D] / [B*S, Hkv, D]
    o = varlen(q3, k3, v3, ar * T, ar * S, T, S, softmax_scale=scale, causal=causal)
    o = o[0] if isinstance(o, tuple) else o
    return o.view(B, T, H, v.shape[-1])


# ---------------------------------------------------------------- public function

def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Softmax attention, exact, without a [T, S] score matrix in memory on the GPU paths.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv]; with cu_seqlens
    ([n + 1] offsets of packed sequences) q/k/v are [total, heads, dim], and max_seqlen (a Python
    int, at least the longest sequence; an upper bound works) spares the GPU paths a copy of
    cu_seqlens to the host per call. Causal masks align bottom-right when T < S.

    The backend follows KERNELS_BACKEND (see kernels.backend), refined here: under auto, CUDA
    tensors run flash-attn when it is installed and takes the inputs (see the module docstring),
    the Triton kernels otherwise (torch SDPA without Triton), and CPU tensors run the SDPA path
    rather than the twin; KERNELS_BACKEND=triton always runs the Triton kernels and
    KERNELS_BACKEND=torch the twin itself (the spec).
    """
    args = (q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    auto = backend_name() == "auto"
    if auto and _on_cuda(q):
        if _flash_attn_refusal(q, k, v) is None:
            return flash_attention_flash_attn(*args)
        return flash_attention_triton(*args) if HAVE_TRITON else flash_attention_sdpa(*args)
    if use_triton(q):
        return flash_attention_triton(*args)
    return flash_attention_sdpa(*args) if auto else flash_attention_torch(*args)


# ---------------------------------------------------------------- GPU build configurations

SPEC_HEAD_DIMS = ((128, 128), (192, 128), (64, 64))  # Llama/Qwen, MLA, small models


def compile_specs():
    """The three kernels, causal, every configuration of their class, per head-dim pair and dtype."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    specs = []
    for dqk, dv in SPEC_HEAD_DIMS:
        for name, dt in dtypes.items():
            meta = {"CAUSAL": True, "BLOCK_DQK": _pad(dqk), "BLOCK_DV": _pad(dv), "PRECISION": _precision(dt)}
            p = "*" + name
            cs = {k: "constexpr" for k in (*meta, "BLOCK_M", "BLOCK_N")}
            tag = f"{dqk}x{dv}"
            specs += _fwd.compile_specs(f"flash_attention_fwd_{tag}", name, {
                "Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_ot", "stride_oh", "stride_lh", "H", "GROUP", "DQK", "DV")}, **cs}, meta)
            specs += _dkdv.compile_specs(f"flash_attention_bwd_dkdv_{tag}", name, {
                "Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV_": p,
                "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32", "scale": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt",
                                      "stride_dvh", "stride_lh", "HKV", "GROUP", "DQK", "DV")}, **cs}, meta)
            specs += _dq.compile_specs(f"flash_attention_bwd_dq_{tag}", name, {
                "Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p,
                "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32", "scale": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "stride_lh", "H",
                                      "GROUP", "DQK", "DV")}, **cs}, meta)
    return specs
