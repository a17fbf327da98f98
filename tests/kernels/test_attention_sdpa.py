"""flash_attention_sdpa (the fast CPU path) equals the torch twin: outputs and every gradient, on
GQA/MQA, Dqk != Dv (MLA), packed documents, bottom-right causal masks and queries that see no key."""
import pytest
import torch

import kernels
from kernels import attention as fa
from tests.kernels.test_flash_attention import make, run


CASES = {
    # name: (q leading dims, k leading dims, H, Hkv, Dqk, Dv, causal, cu_seqlens)
    "causal_gqa": ((2, 33), (2, 33), 4, 2, 24, 24, True, None),
    "causal_mha_dqk_gt_dv": ((2, 17), (2, 17), 2, 2, 48, 32, True, None),    # MLA-like: 192 vs 128
    "causal_dv_gt_dqk": ((1, 19), (1, 19), 4, 1, 16, 40, True, None),
    "few_queries_bottom_right": ((2, 5), (2, 29), 4, 2, 32, 32, True, None),
    "queries_that_see_no_key": ((1, 9), (1, 4), 2, 1, 16, 24, True, None),
    "not_causal_cross": ((1, 9), (1, 29), 3, 3, 16, 24, False, None),
    "packed_gqa_mla_dims": ((40,), (40,), 4, 2, 48, 32, True, [0, 10, 11, 33, 40]),
    "packed_with_empty_document": ((20,), (20,), 4, 4, 16, 16, True, [0, 7, 7, 20]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_path_equals_the_twin_fp32(case, rel_err):
    lead_q, lead_k, H, Hkv, dqk, dv, causal, cu = CASES[case]
    q, k, v, do = make(lead_q, lead_k, H, Hkv, dqk, dv, torch.float32, seed=len(case))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    for scale in (None, 0.3):
        kw = dict(causal=causal, softmax_scale=scale, cu_seqlens=cu_t)
        fast = run(fa.flash_attention_sdpa, q, k, v, do, **kw)
        twin = run(fa.flash_attention_torch, q, k, v, do, **kw)
        for name, a, b in zip(("o", "dq", "dk", "dv"), fast, twin):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            assert rel_err(a, b) <= 1e-5, f"{case} scale={scale} {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_path_low_precision_close_to_the_twin(dtype, rel_err, tol):
    q, k, v, do = make((40,), (40,), 4, 2, 32, 32, dtype, seed=5)
    cu = torch.tensor([0, 12, 31, 40], dtype=torch.int32)
    fast = run(fa.flash_attention_sdpa, q, k, v, do, cu_seqlens=cu)
    twin = run(fa.flash_attention_torch, q, k, v, do, cu_seqlens=cu)
    for name, a, b in zip(("o", "dq", "dk", "dv"), fast, twin):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tol[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_queries_that_see_no_key_are_zero_without_gradient():
    q, k, v, do = make((1, 7), (1, 3), 2, 2, 16, 16, torch.float32, seed=2)
    o, dq, _, _ = run(fa.flash_attention_sdpa, q, k, v, do)
    assert torch.equal(o[0, :4], torch.zeros_like(o[0, :4]))
    assert torch.equal(dq[0, :4], torch.zeros_like(dq[0, :4]))
    assert o[0, 4:].abs().sum() > 0


def test_auto_on_cpu_runs_the_sdpa_path_and_torch_runs_the_twin(monkeypatch):
    calls = []
    for stem in ("flash_attention_sdpa", "flash_attention_torch"):
        real = getattr(fa, stem)
        monkeypatch.setattr(fa, stem, lambda *a, _s=stem, _r=real, **k: calls.append(_s) or _r(*a, **k))
    q, k, v, _ = make((1, 5), (1, 5), 2, 1, 16, 16, torch.float32, seed=0)
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    kernels.flash_attention(q, k, v)
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    kernels.flash_attention(q, k, v)
    assert calls == ["flash_attention_sdpa", "flash_attention_torch"]


def test_bad_input_raises_like_the_twin():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="dividing"):
        fa.flash_attention_sdpa(q, k, v)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        fa.flash_attention_sdpa(q[0], q[0], q[0], cu_seqlens=torch.tensor([0, 3, 2, 4]))
