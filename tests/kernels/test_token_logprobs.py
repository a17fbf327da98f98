"""token_logprobs: the Triton tile kernels (interpreter) and the chunked torch twin against float64."""
import pytest
import torch

from kernels import logprobs as lp


def reference(hidden, weight, targets, temperature):
    """log_softmax + gather and the entropy, in float64 from the definitions."""
    z = hidden.double() @ weight.double().T / temperature          # [N, V]
    logq = torch.log_softmax(z, dim=-1)
    logp = logq.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    return logp, ent


def run(fn, hidden, weight, targets, g_lp, g_ent, temperature, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, ent = fn(h, w, targets, temperature, True, **kw)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, h.grad, w.grad


def inputs(N, D, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D ** -0.5 * 2).to(dtype)  # logits of a few units
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1                             # the first and last vocabulary column
    g_lp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_lp, g_ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_and_twin_match_float64(dtype, rel_err, tol, poison):
    N, D, V, temp = 37, 48, 1000, 0.7
    hidden, weight, targets, g_lp, g_ent = inputs(N, D, V, dtype, seed=3 + (dtype == torch.float16))
    ref = run(lambda h, w, t, T, e: reference(h, w, t, T), hidden, weight, targets, g_lp, g_ent, temp)
    # 16-token chunks and 300-column blocks: 3 chunks (the last of 5 rows) by 4 blocks (the last of 100)
    tiles = dict(chunk_tokens=16, chunk_vocab=300)
    tri = run(lp.token_logprobs_triton, hidden, weight, targets, g_lp, g_ent, temp, **tiles)
    twin = run(lp.token_logprobs_torch, hidden, weight, targets, g_lp, g_ent, temp, **tiles)
    for name, a, b, r in zip(("logp", "entropy", "d_hidden", "d_weight"), tri, twin, ref):
        assert rel_err(a, r) <= tol[dtype], f"triton {name} vs float64: {rel_err(a, r):.2e}"
        assert rel_err(b, r) <= tol[dtype], f"torch twin {name} vs float64: {rel_err(b, r):.2e}"
        assert rel_err(a, b) <= tol[dtype], f"triton {name} vs twin: {rel_err(a, b):.2e}"
    assert tri[0].dtype == twin[0].dtype == torch.float32
    assert tri[2].dtype == twin[2].dtype == dtype


def test_logp_only_gradient_and_default_tiles(rel_err, tol, poison):
    # with_entropy=False, the default tile (one tile here), leading dims [B, T]
    hidden, weight, targets, g_lp, _ = inputs(2 * 19, 48, 1000, torch.float32, seed=5)
    hidden, targets, g_lp = hidden.view(2, 19, 48), targets.view(2, 19), g_lp.view(2, 19)
    ref_logp, _ = reference(hidden, weight, targets, 1.0)
    for fn in (lp.token_logprobs_triton, lp.token_logprobs_torch):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        logp = fn(h, w, targets)
        assert logp.shape == (2, 19)
        (logp * g_lp).sum().backward()
        h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
        (reference(h64, w64, targets, 1.0)[0] * g_lp).sum().backward()
        assert rel_err(logp, ref_logp) <= tol[torch.float32]
        assert rel_err(h.grad, h64.grad) <= tol[torch.float32]
        assert rel_err(w.grad, w64.grad) <= tol[torch.float32]


def test_bf16_triton_and_twin_match_float64(rel_err, tol):
    # no tl.dot in these kernels (the tiles are torch GEMMs), so bf16 runs right in the interpreter too
    hidden, weight, targets, g_lp, g_ent = inputs(37, 48, 1000, torch.bfloat16, seed=7)
    ref = run(lambda h, w, t, T, e: reference(h, w, t, T), hidden, weight, targets, g_lp, g_ent, 1.0)
    tiles = dict(chunk_tokens=16, chunk_vocab=300)
    tri = run(lp.token_logprobs_triton, hidden, weight, targets, g_lp, g_ent, 1.0, **tiles)
    twin = run(lp.token_logprobs_torch, hidden, weight, targets, g_lp, g_ent, 1.0, **tiles)
    for name, a, b, r in zip(("logp", "entropy", "d_hidden", "d_weight"), tri, twin, ref):
        assert rel_err(a, r) <= tol[torch.bfloat16], f"triton {name}"
        assert rel_err(b, r) <= tol[torch.bfloat16], f"twin {name}"
        assert rel_err(a, b) <= tol[torch.bfloat16], f"triton vs twin {name}"
    assert tri[2].dtype == twin[2].dtype == tri[3].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_fp32_products(dtype):
    # the reference: log-softmax in float64 of the exact product of the (rounded) inputs, which an
    # fp32 GEMM accumulator matches to fp32 rounding; logits rounded to the inputs' dtype (the
    # tile of old) are off by about half a unit in their last place, ~0.03 for a logit of 12 in bf16
    N, D, V = 37, 256, 1000
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D ** -0.5 * 3).to(dtype)    # logits up to ~13
    targets = torch.randint(0, V, (N,), generator=g)
    z = hidden.double() @ weight.double().T                                 # [N, V], exact
    ref_logp, ref_ent = reference(hidden, weight, targets, 1.0)
    rounded = torch.log_softmax((hidden @ weight.T).double(), dim=-1)       # logits in the inputs' dtype
    old_logp = rounded.gather(-1, targets[:, None])[:, 0]
    old_ent = -(rounded.exp() * rounded).sum(-1)
    fp32_rounding = 8 * torch.finfo(torch.float32).eps * (z.abs().max().item() + V ** 0.5)
    for fn in (lp.token_logprobs_triton, lp.token_logprobs_torch):
        logp, ent = fn(hidden, weight, targets, 1.0, True, chunk_tokens=16, chunk_vocab=300)
        assert logp.dtype == ent.dtype == torch.float32
        for name, got, old, ref in (("logp", logp, old_logp, ref_logp), ("entropy", ent, old_ent, ref_ent)):
            err = (got.double() - ref).abs().max().item()
            old_err = (old - ref).abs().max().item()
            assert err <= fp32_rounding, f"{fn.__name__} {name}: {err:.2e} > {fp32_rounding:.2e}"
            assert err * 300 <= old_err, f"{fn.__name__} {name}: {err:.2e} is not far below {old_err:.2e}"


def test_float64_twin_passes_gradcheck():
    # float64 inputs keep float64 tiles and accumulators, so the hand-written backward (recomputed
    # tiles, dz) can be checked against finite differences: 3-token chunks and 7-column blocks over
    # N = 5, V = 17 (partial last chunk and block), temperature 0.7, both outputs
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 16, 3, 7, 7])

    def f(h, w):
        return lp.token_logprobs_torch(h, w, targets, 0.7, True, chunk_tokens=3, chunk_vocab=7)

    assert f(hidden, weight)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_tiles_bound_the_memory():
    # no tensor of [N, V] fp32 logits (or half of one) is ever made, forward or backward, whatever the
    # dtype: the largest are the weight's fp32 gradient accumulator [V, D] and the tiles [C, Vb]
    # (counted in bytes: Triton's interpreter copies the tensors it is given as bytes)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes = max(self.bytes, t.numel() * t.element_size())
            return out

    N, D, V = 37, 16, 1000
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, targets, g_lp, g_ent = inputs(N, D, V, dtype, seed=1)
        for fn in (lp.token_logprobs_torch, lp.token_logprobs_triton):
            with Largest() as largest:
                run(fn, hidden, weight, targets, g_lp, g_ent, 1.0, chunk_tokens=16, chunk_vocab=300)
            assert largest.bytes <= 4 * V * D < 4 * N * V // 2, (fn.__name__, dtype, largest.bytes)


def test_peaked_distribution_entropy_stays_accurate(rel_err):
    # logits of order 100: the entropy is tiny and must not come out as a difference of large numbers
    hidden, weight, targets, _, _ = inputs(37, 48, 1000, torch.float32, seed=9)
    weight = weight * 30
    _, ref_ent = reference(hidden, weight, targets, 1.0)
    for fn in (lp.token_logprobs_triton, lp.token_logprobs_torch):
        _, ent = fn(hidden, weight, targets, 1.0, True, chunk_tokens=16, chunk_vocab=300)
        assert (ent - ref_ent).abs().max().item() < 1e-4


def test_bad_input_raises():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        lp.token_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="targets must have shape"):
        lp.token_logprobs(h, w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight"):
        lp.token_logprobs(h, torch.randn(10, 7), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        lp.token_logprobs(h, w, torch.tensor([0, 1, 2, 3]), temperature=0.0)
