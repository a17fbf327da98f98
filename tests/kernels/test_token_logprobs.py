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


def test_bf16_twin_matches_float64(rel_err, tol):
    hidden, weight, targets, g_lp, g_ent = inputs(37, 48, 1000, torch.bfloat16, seed=7)
    ref = run(lambda h, w, t, T, e: reference(h, w, t, T), hidden, weight, targets, g_lp, g_ent, 1.0)
    twin = run(lp.token_logprobs_torch, hidden, weight, targets, g_lp, g_ent, 1.0, chunk_tokens=16, chunk_vocab=300)
    for name, a, r in zip(("logp", "entropy", "d_hidden", "d_weight"), twin, ref):
        assert rel_err(a, r) <= tol[torch.bfloat16], name


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
