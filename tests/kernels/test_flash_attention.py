"""flash_attention: the Triton kernels (interpreter) and the torch twin against a float64 reference."""
import pytest
import torch

from kernels import attention as fa


def reference_one(q, k, v, causal, scale):
    """One sequence, float64, head by head: q [T, H, Dqk], k [S, Hkv, Dqk], v [S, Hkv, Dv] -> [T, H, Dv]."""
    T, H, _ = q.shape
    S, Hkv, _ = k.shape
    out = []
    for h in range(H):
        kv = h // (H // Hkv)
        s = q[:, h].double() @ k[:, kv].double().T * scale                # [T, S]
        if causal:
            allowed = torch.tensor([[j <= i + S - T for j in range(S)] for i in range(T)])
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)                       # rows with no key: zeros
        out.append(p @ v[:, kv].double())
    return torch.stack(out, dim=1)


def reference(q, k, v, causal, scale, cu_seqlens):
    if cu_seqlens is None:
        return torch.stack([reference_one(q[b], k[b], v[b], causal, scale) for b in range(q.shape[0])])
    c = cu_seqlens.tolist()
    return torch.cat([reference_one(q[a:b], k[a:b], v[a:b], causal, scale) for a, b in zip(c, c[1:])])


def run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do.to(o.dtype))
    return o, q.grad, k.grad, v.grad


def make(lead_q, lead_k, H, Hkv, dqk, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead_q, H, dqk, generator=g).to(dtype)
    k = torch.randn(*lead_k, Hkv, dqk, generator=g).to(dtype)
    v = torch.randn(*lead_k, Hkv, dv, generator=g).to(dtype)
    do = torch.randn(*lead_q, H, dv, generator=g, dtype=torch.float64)
    return q, k, v, do


CASES = {
    # name: (q leading dims, k leading dims, H, Hkv, Dqk, Dv, causal, cu_seqlens)
    "causal_gqa": ((2, 33), (2, 33), 4, 2, 24, 40, True, None),
    "few_queries_bottom_right": ((2, 5), (2, 29), 2, 1, 32, 32, True, None),
    "packed_3_docs_mqa": ((33,), (33,), 4, 1, 48, 32, True, [0, 10, 11, 33]),
    "not_causal_cross": ((1, 9), (1, 29), 3, 3, 16, 24, False, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_and_twin_match_float64(case, dtype, rel_err, tol, poison):
    lead_q, lead_k, H, Hkv, dqk, dv, causal, cu = CASES[case]
    q, k, v, do = make(lead_q, lead_k, H, Hkv, dqk, dv, dtype, seed=len(case) * 3 + (dtype == torch.float16))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    scale = 0.3
    kw = dict(causal=causal, softmax_scale=scale, cu_seqlens=cu_t)
    ref = run(lambda q, k, v, **kw: reference(q, k, v, kw["causal"], kw["softmax_scale"], kw["cu_seqlens"]),
              q, k, v, do, **kw)
    # 16 x 16 tiles: several query and key blocks, partial last blocks, blocks straddling the diagonal
    tri = run(fa.flash_attention_triton, q, k, v, do, block_m=16, block_n=16, **kw)
    twin = run(fa.flash_attention_torch, q, k, v, do, **kw)
    for name, a, b, r in zip(("o", "dq", "dk", "dv"), tri, twin, ref):
        assert a.dtype == b.dtype == dtype
        assert rel_err(a, r) <= tol[dtype], f"triton {name} vs float64: {rel_err(a, r):.2e}"
        assert rel_err(b, r) <= tol[dtype], f"torch twin {name} vs float64: {rel_err(b, r):.2e}"
        assert rel_err(a, b) <= tol[dtype], f"triton {name} vs twin: {rel_err(a, b):.2e}"


def test_mla_head_dims_default_tiles(rel_err, tol, poison):
    # DeepSeek-V3's MLA: qk head dim 192 (128 nope + 64 rope), v head dim 128; the launcher's own tiles
    q, k, v, do = make((1, 37), (1, 37), 2, 2, 192, 128, torch.float32, seed=1)
    ref = run(lambda q, k, v: reference(q, k, v, True, 192 ** -0.5, None), q, k, v, do)
    tri = run(fa.flash_attention_triton, q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), tri, ref):
        assert rel_err(a, r) <= tol[torch.float32], name


def test_queries_that_see_no_key_give_zero(rel_err, poison):
    # 7 queries over 3 keys, causal bottom-right: the first 4 queries see nothing
    q, k, v, do = make((1, 7), (1, 3), 2, 2, 16, 16, torch.float32, seed=2)
    for fn in (fa.flash_attention_triton, fa.flash_attention_torch):
        o, dq, dk, dv = run(fn, q, k, v, do)
        assert torch.equal(o[0, :4], torch.zeros_like(o[0, :4])) and torch.equal(dq[0, :4], torch.zeros_like(dq[0, :4]))
        ref = run(lambda q, k, v: reference(q, k, v, True, 16 ** -0.5, None), q, k, v, do)
        for a, r in zip((o, dq, dk, dv), ref):
            assert rel_err(a, r) <= 1e-5


def test_bf16_twin_matches_float64(rel_err, tol):
    q, k, v, do = make((2, 33), (2, 33), 4, 2, 24, 40, torch.bfloat16, seed=3)
    ref = run(lambda q, k, v: reference(q, k, v, True, 24 ** -0.5, None), q, k, v, do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), run(fa.flash_attention_torch, q, k, v, do), ref):
        assert rel_err(a, r) <= tol[torch.bfloat16], name


def test_bad_input_raises():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="dividing"):
        fa.flash_attention(q, k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        fa.flash_attention(q, torch.randn(1, 4, 3, 4), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        fa.flash_attention(q[0], q[0], q[0], cu_seqlens=torch.tensor([0, 3, 2, 4]))
    with pytest.raises(ValueError, match=r"\[total, heads, dim\]"):
        fa.flash_attention(q, q, q, cu_seqlens=torch.tensor([0, 4]))
