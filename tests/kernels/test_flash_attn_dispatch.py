"""flash_attention under auto on CUDA: flash-attn's varlen kernel when installed and able to take the
inputs, our Triton kernel otherwise.

flash-attn cannot be installed here (it needs CUDA), so a fake one stands in: a module in
sys.modules whose flash_attn_varlen_func is a float64 reference of the varlen contract that also
checks what flash-attn requires of its arguments (3-D [total, heads, dim] with a contiguous last
dim, int32 cu_seqlens on q's device, Python-int max_seqlens covering every sequence, fp16/bf16,
heads dividing, the head dims that version takes) and records every call. The CUDA check is
patched to say yes for CPU tensors; the Triton fallback then runs in the interpreter.
"""
import sys
import types

import pytest
import torch

from kernels import attention as fa
from tests.kernels.test_flash_attention import make, reference_one, run


class FakeVarlen:
    """flash_attn_varlen_func of FA2 (returns o) or FA3 (an older FA3 returns (o, lse))."""

    def __init__(self, version: int):
        self.version, self.calls = version, []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *positional,
                 softmax_scale=None, causal=False, **rest):
        assert not positional, "dropout_p (FA2) / seqused_q (FA3) sit at this position: pass keywords"
        assert q.dim() == k.dim() == v.dim() == 3 and all(t.stride(-1) == 1 for t in (q, k, v))
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
        assert q.shape[1] % k.shape[1] == 0 and k.shape[1] == v.shape[1] and q.shape[2] == k.shape[2]
        dqk, dv = q.shape[2], v.shape[2]
        assert dqk == dv or (self.version == 3 and 128 < dqk <= 192 and 96 < dv <= 128), (dqk, dv)
        for cu, total in ((cu_seqlens_q, q.shape[0]), (cu_seqlens_k, k.shape[0])):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device and cu.is_contiguous()
            assert int(cu[0]) == 0 and int(cu[-1]) == total
        assert type(max_seqlen_q) is int and type(max_seqlen_k) is int
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q >= max(b - a for a, b in zip(cq, cq[1:]))
        assert max_seqlen_k >= max(b - a for a, b in zip(ck, ck[1:]))
        scale = dqk ** -0.5 if softmax_scale is None else softmax_scale
        self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), cu_q=cq, cu_k=ck,
                               max_q=max_seqlen_q, max_k=max_seqlen_k, scale=softmax_scale, causal=causal))
        o = torch.cat([reference_one(q[a:b], k[c:d], v[c:d], causal, scale)
                       for (a, b), (c, d) in zip(zip(cq, cq[1:]), zip(ck, ck[1:]))]).to(q.dtype)
        return (o, None) if self.version == 3 else o


@pytest.fixture
def flash_attn(monkeypatch):
    """install(version) puts a FakeVarlen where that flash-attn version imports from; until then no
    flash-attn imports at all. Tensors count as CUDA tensors (on a Hopper GPU); backend auto."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # None: `import` raises ImportError
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(fa, "_on_cuda", lambda q: True)
    monkeypatch.setattr(fa, "_cuda_major", lambda device: 9)
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    fa._flash_attn_varlen.cache_clear()

    def install(version):
        fake = FakeVarlen(version)
        module = types.ModuleType("flash_attn_interface" if version == 3 else "flash_attn")
        module.flash_attn_varlen_func = fake
        monkeypatch.setitem(sys.modules, module.__name__, module)
        fa._flash_attn_varlen.cache_clear()
        return fake

    yield install
    fa._flash_attn_varlen.cache_clear()


@pytest.fixture
def triton_calls(monkeypatch):
    calls = []
    real = fa.flash_attention_triton
    monkeypatch.setattr(fa, "flash_attention_triton", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


CASES = {
    # name: (q leading dims, k leading dims, H, Hkv, D, causal, cu_seqlens, max_seqlen, expected varlen arguments)
    "packed_gqa": ((40,), (40,), 4, 2, 32, True, [0, 10, 11, 33, 40], None,
                   dict(q=(40, 4, 32), k=(40, 2, 32), cu_q=[0, 10, 11, 33, 40], max_q=22, max_k=22)),
    "packed_max_seqlen_given": ((40,), (40,), 4, 2, 32, True, [0, 10, 11, 33, 40], 30,
                                dict(cu_q=[0, 10, 11, 33, 40], max_q=30, max_k=30)),
    "batched_few_queries_bottom_right": ((2, 5), (2, 29), 2, 1, 16, True, None, None,
                                         dict(q=(10, 2, 16), k=(58, 1, 16), cu_q=[0, 5, 10], cu_k=[0, 29, 58],
                                              max_q=5, max_k=29)),
    "batched_not_causal_mqa": ((1, 9), (1, 13), 3, 1, 24, False, None, None,
                               dict(q=(9, 3, 24), cu_q=[0, 9], cu_k=[0, 13], max_q=9, max_k=13)),
}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_on_cuda_runs_flash_attn_with_its_layout(case, version, flash_attn, triton_calls, rel_err):
    lead_q, lead_k, H, Hkv, D, causal, cu, max_seqlen, expected = CASES[case]
    fake = flash_attn(version)
    q, k, v, do = make(lead_q, lead_k, H, Hkv, D, D, torch.float16, seed=len(case))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64)    # int64 in: flash-attn gets int32
    kw = dict(causal=causal, softmax_scale=0.3, cu_seqlens=cu_t)
    got = run(lambda q, k, v, **kw: fa.flash_attention(q, k, v, max_seqlen=max_seqlen, **kw), q, k, v, do, **kw)
    assert not triton_calls and len(fake.calls) == 1
    call = fake.calls[0]
    assert call["causal"] is causal and call["scale"] == 0.3
    for key, value in expected.items():
        assert call[key] == value, (key, call[key], value)
    # the output and every gradient come back in our layout: equal to the twin's
    twin = run(fa.flash_attention_torch, q, k, v, do, **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, twin):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float16, name
        assert rel_err(a, b) <= 1e-2, f"{name}: {rel_err(a, b):.2e}"


def test_default_scale_and_bf16_reach_flash_attn(flash_attn):
    fake = flash_attn(2)
    q, k, v, _ = make((1, 7), (1, 7), 2, 2, 64, 64, torch.bfloat16, seed=0)
    o = fa.flash_attention(q, k, v)
    assert fake.calls[0]["scale"] == 64 ** -0.5 and o.dtype == torch.bfloat16 and o.shape == (1, 7, 2, 64)


@pytest.mark.parametrize("version,dqk,dv,dtype,major,uses_flash_attn", [
    (2, 32, 32, torch.float32, 9, False),     # fp32: flash-attn takes 16-bit inputs only
    (3, 32, 32, torch.float32, 9, False),
    (2, 192, 128, torch.float16, 9, False),   # MLA: FA2 needs one head dim for q/k and v
    (3, 192, 128, torch.float16, 9, True),    # FA3 on Hopper takes MLA's 192 / 128
    (3, 192, 128, torch.float16, 8, False),   # ... only on Hopper
    (3, 64, 128, torch.float16, 9, False),    # unequal dims outside FA3's (128, 192] x (96, 128]
    (2, 20, 20, torch.float16, 9, False),     # head dims that are not multiples of 8
    (2, 264, 264, torch.float16, 9, False),   # beyond 256
])
def test_shapes_flash_attn_cannot_take_fall_back_to_triton(version, dqk, dv, dtype, major, uses_flash_attn,
                                                            flash_attn, triton_calls, monkeypatch, rel_err):
    fake = flash_attn(version)
    monkeypatch.setattr(fa, "_cuda_major", lambda device: major)
    q, k, v, do = make((9,), (9,), 2, 1, dqk, dv, dtype, seed=dqk + dv)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    why = fa._flash_attn_refusal(q, k, v)
    assert (why is None) == uses_flash_attn, why
    got = run(fa.flash_attention, q, k, v, do, cu_seqlens=cu)
    assert (len(fake.calls), len(triton_calls)) == ((1, 0) if uses_flash_attn else (0, 1))
    twin = run(fa.flash_attention_torch, q, k, v, do, cu_seqlens=cu)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, twin):
        assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 1e-2), name


def test_without_flash_attn_cuda_runs_triton(flash_attn, triton_calls):
    q, k, v, _ = make((1, 6), (1, 6), 2, 2, 32, 32, torch.float16, seed=1)
    assert fa._flash_attn_refusal(q, k, v) == "flash-attn is not installed"
    fa.flash_attention(q, k, v)
    assert len(triton_calls) == 1


def test_fa3_is_preferred_over_fa2(flash_attn):
    fa2, fa3 = flash_attn(2), flash_attn(3)
    q, k, v, _ = make((1, 6), (1, 6), 2, 2, 32, 32, torch.float16, seed=1)
    fa.flash_attention(q, k, v)
    assert (len(fa2.calls), len(fa3.calls)) == (0, 1)


def test_flash_attn_is_imported_only_for_cuda_tensors_and_only_under_auto(flash_attn, triton_calls, monkeypatch):
    fake = flash_attn(2)
    q, k, v, _ = make((1, 6), (1, 6), 2, 2, 32, 32, torch.float16, seed=1)
    monkeypatch.setattr(fa, "_on_cuda", lambda q: False)       # CPU tensors: SDPA, no import attempted
    fa._flash_attn_varlen.cache_clear()
    fa.flash_attention(q, k, v)
    assert fa._flash_attn_varlen.cache_info().currsize == 0 and not fake.calls and not triton_calls
    monkeypatch.setattr(fa, "_on_cuda", lambda q: True)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")            # an explicit backend is obeyed
    fa.flash_attention(q, k, v)
    assert not fake.calls and len(triton_calls) == 1
