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

Paths: the Triton kernels (GPU); the torch twin `flash_attention_torch` (explicit fp32 scores and
mask: the spec and the test oracle); `flash_attention_sdpa`, torch's fused scaled_dot_product_attention
per sequence, the fast CPU path, tested equal to the twin.

Layout: jit kernels, host launchers, autograd.Function, the torch twin, the SDPA path, the public
functions, compile_specs().
"""
import torch
import torch.nn.functional as F

from kernels.backend import backend_name, use_triton
from kernels.compile_spec import CompileSpec
from kernels.triton_import import tl, triton

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- jit kernels

@triton.jit
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


@triton.jit
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


@triton.jit
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


# ---------------------------------------------------------------- host launchers

def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _config(dqk: int, dv: int, dtype: torch.dtype) -> dict:
    """Tile sizes: 64 x 64 for 16-bit inputs with padded head dims up to 128, 32 x 32 for wider heads
    and for fp32 (twice the bytes per element), so that the tiles fit in registers and shared memory."""
    wide = max(_pad(dqk), _pad(dv)) > 128 or dtype == torch.float32
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def attn_fwd(q, k, v, cu_q, cu_k, max_q, scale, causal, cfg):
    """q [Nq, H, Dqk], k [Nk, Hkv, Dqk], v [Nk, Hkv, Dv] (last dim contiguous) -> (o [Nq, H, Dv], lse [H, Nq])."""
    Nq, H, Dqk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    o = torch.empty(Nq, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, Nq, dtype=torch.float32, device=q.device)
    nseq = cu_q.numel() - 1
    grid = (nseq * H, triton.cdiv(max(max_q, 1), cfg["BLOCK_M"]))
    _attn_fwd_kernel[grid](q, k, v, o, lse, cu_q, cu_k, scale * LOG2E,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           o.stride(0), o.stride(1), lse.stride(0), H, H // Hkv, Dqk, Dv,
                           CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=_pad(Dqk),
                           BLOCK_DV=_pad(Dv), PRECISION=_precision(q.dtype),
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def attn_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, cfg):
    """Gradients (dq, dk, dv) in the inputs' dtypes, from dO [Nq, H, Dv] and the forward's o and lse."""
    Nq, H, Dqk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    nseq = cu_q.numel() - 1
    delta = (do.float() * o.float()).sum(-1).T.contiguous()  # [H, Nq] rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=_pad(Dqk),
                  BLOCK_DV=_pad(Dv), PRECISION=_precision(q.dtype), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    _attn_bwd_dkdv_kernel[(nseq * Hkv, triton.cdiv(max(max_k, 1), cfg["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, scale * LOG2E, scale, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), Hkv, H // Hkv, Dqk, Dv, **common)
    _attn_bwd_dq_kernel[(nseq * H, triton.cdiv(max(max_q, 1), cfg["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, scale * LOG2E, scale, *strides,
        dq.stride(0), dq.stride(1), lse.stride(0), H, H // Hkv, Dqk, Dv, **common)
    return dq, dk, dv


# ---------------------------------------------------------------- autograd

class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, cfg):
        o, lse = attn_fwd(q, k, v, cu_q, cu_k, max_q, scale, causal, cfg)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, cfg = ctx.args
        dq, dk, dv = attn_bwd(do.contiguous(), q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, cfg)
        return dq, dk, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------- argument checks

def _check(q, k, v, cu_seqlens):
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
    if cu_seqlens is not None:
        cu = cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(f"flash_attention: cu_seqlens must be a 1-D integer tensor [n + 1], got {tuple(cu.shape)} {cu.dtype}")
        c = cu.tolist()
        if c[0] != 0 or c[-1] != q.shape[0] or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"flash_attention: cu_seqlens must rise from 0 to total = {q.shape[0]}; got {c}")


# ---------------------------------------------------------------- public functions

def flash_attention_torch(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """The torch twin (the spec and the CPU path): scores in fp32, explicit mask, one sequence of a
    packed batch at a time. Same contract as flash_attention; autograd differentiates it."""
    _check(q, k, v, cu_seqlens)
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


def flash_attention_triton(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, *, block_m=None, block_n=None):
    """The Triton path; block_m/block_n override the tile sizes (tests use small ones)."""
    _check(q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    cfg = _config(q.shape[-1], v.shape[-1], q.dtype)
    if block_m:
        cfg = dict(cfg, BLOCK_M=block_m, BLOCK_N=block_n or block_m)
    contig = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        max_len = int((cu[1:] - cu[:-1]).max())
        return _FlashAttention.apply(contig(q), contig(k), contig(v), cu, cu, max_len, max_len, scale, causal, cfg)
    B, T, H, _ = q.shape
    S = k.shape[1]
    ar = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    q3, k3, v3 = (contig(t.reshape(-1, *t.shape[2:])) for t in (q, k, v))     # [B*T, H, D] / [B*S, Hkv, D]
    o = _FlashAttention.apply(q3, k3, v3, ar * T, ar * S, T, S, scale, causal, cfg)
    return o.view(B, T, H, v.shape[-1])


def flash_attention_sdpa(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """The fast torch path (CPU, or CUDA without Triton): torch's scaled_dot_product_attention, one
    sequence of a packed batch at a time. Same contract as flash_attention; tested equal to the twin.

    On CPU, SDPA's fused (flash) kernel ran forward + backward of one 256-token sequence (4 heads
    over 2 kv heads of 32) 10x faster than the twin's explicit fp32 softmax, because it never
    builds the [B, H, T, S] scores, mask and probabilities as separate tensors. That kernel wants one head dim for q, k and v and has only a top-left
    causal mask, so: the smaller of Dqk and Dv is zero-padded (zero columns change neither the
    scores nor the kept output columns), T == S uses is_causal, T < S an explicit bottom-right
    mask, and T > S answers the T - S queries that see no key with zeros.
    """
    _check(q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if cu_seqlens is not None:
        # split, not slicing: the backward of one split is one cat, while every slice's backward
        # would write a zero tensor of the whole packed length (quadratic in the documents)
        c = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(c, c[1:])]
        parts = zip(q.split(lengths), k.split(lengths), v.split(lengths))
        return torch.cat([_sdpa(qi[None], ki[None], vi[None], causal, scale)[0] for qi, ki, vi in parts], dim=0)
    return _sdpa(q, k, v, causal, scale)


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
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal and T == S, scale=scale,
                                       enable_gqa=H != Hkv)                      # [B, H, T, D]
    return o.transpose(1, 2)[..., :Dv]                                           # [B, T, H, Dv]


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """Softmax attention, exact, without a [T, S] score matrix in memory on the Triton path.

    q [B, T, H, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv]; with cu_seqlens
    ([n + 1] offsets of packed sequences) q/k/v are [total, heads, dim]. Causal masks align
    bottom-right when T < S. The backend follows KERNELS_BACKEND (see kernels.backend), with one
    refinement: where auto does not pick Triton (CPU tensors), the SDPA path runs rather than the
    twin; KERNELS_BACKEND=torch runs the twin itself (the spec).
    """
    if use_triton(q):
        return flash_attention_triton(q, k, v, causal, softmax_scale, cu_seqlens)
    if backend_name() == "auto":
        return flash_attention_sdpa(q, k, v, causal, softmax_scale, cu_seqlens)
    return flash_attention_torch(q, k, v, causal, softmax_scale, cu_seqlens)


# ---------------------------------------------------------------- GPU build configurations

SPEC_HEAD_DIMS = ((128, 128), (192, 128), (64, 64))  # Llama/Qwen, MLA, small models


def compile_specs():
    """The three kernels, causal, with the launcher's tile sizes, per head-dim pair and dtype."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    specs = []
    for dqk, dv in SPEC_HEAD_DIMS:
        for name, dt in dtypes.items():
            cfg = _config(dqk, dv, dt)
            p = "*" + name
            const = {"CAUSAL": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_DQK": _pad(dqk),
                     "BLOCK_DV": _pad(dv), "PRECISION": _precision(dt)}
            cs = {k: "constexpr" for k in const}
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            tag = f"{dqk}x{dv}"
            specs.append(CompileSpec(f"flash_attention_fwd_{tag}", name, _attn_fwd_kernel, {
                "Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_ot", "stride_oh", "stride_lh", "H", "GROUP", "DQK", "DV")}, **cs},
                const, **opts))
            specs.append(CompileSpec(f"flash_attention_bwd_dkdv_{tag}", name, _attn_bwd_dkdv_kernel, {
                "Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV_": p,
                "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32", "scale": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt",
                                      "stride_dvh", "stride_lh", "HKV", "GROUP", "DQK", "DV")}, **cs},
                const, **opts))
            specs.append(CompileSpec(f"flash_attention_bwd_dq_{tag}", name, _attn_bwd_dq_kernel, {
                "Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p,
                "CU_Q": "*i32", "CU_K": "*i32", "scale_log2": "fp32", "scale": "fp32",
                **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "stride_lh", "H",
                                      "GROUP", "DQK", "DV")}, **cs},
                const, **opts))
    return specs
