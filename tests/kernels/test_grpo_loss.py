"""grpo_token_loss: the fused Triton kernels (interpreter) and the torch twin against a float64 reference."""
import pytest
import torch

from kernels import grpo_loss as gl


def reference(log_ratio, adv, mask, eps_low, eps_high, dual_clip, beta, logp, ref_logp, kl, w):
    """The objective written out element by element in float64 (a plain loop, no shared code)."""
    flags = {k: torch.zeros(log_ratio.shape, dtype=torch.float64) for k in ("low", "high", "dual", "kl")}
    losses = []
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in log_ratio.shape]):
        idx = tuple(idx.tolist())
        lr = log_ratio[idx]
        a = float(adv[idx[:adv.dim()]])
        r = torch.exp(lr.clamp(-20, 20))
        surr = torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
        pg = -surr
        if dual_clip is not None and a < 0:
            pg = torch.minimum(pg, torch.tensor(-dual_clip * a, dtype=torch.float64))
        if w is not None:
            pg = pg * float(w[idx[:w.dim()]])
        k = torch.zeros((), dtype=torch.float64)
        if logp is not None:
            d = float(ref_logp[idx]) - logp[idx]
            k = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl]
            pg = pg + beta * k
        live = float(mask[idx]) != 0
        losses.append((idx, pg * float(mask[idx])))
        rv = float(r.detach())
        flags["high"][idx] = float(live and a > 0 and rv > 1 + eps_high)
        flags["low"][idx] = float(live and a < 0 and rv < 1 - eps_low)
        flags["dual"][idx] = float(live and dual_clip is not None and a < 0 and rv > dual_clip)
        flags["kl"][idx] = float(torch.as_tensor(k).detach()) if live else 0.0
    out_loss = torch.stack([l for _, l in losses]).reshape(log_ratio.shape)
    return out_loss, flags


def make(dtype, seed, B=5, T=37):
    g = torch.Generator().manual_seed(seed)
    log_ratio = (torch.randn(B, T, generator=g) * 0.6)
    log_ratio[0, :4] = torch.tensor([25.0, -25.0, 0.0, 1.5])        # beyond the clamp, ratio 1, dual-clip zone
    adv = torch.randn(B, generator=g)
    adv[:3] = torch.tensor([1.0, 0.0, -1.0])                        # positive, zero and negative advantages
    log_ratio[0, 4], log_ratio[2, 0] = 0.9, -0.9                     # a high clip and a low clip
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, 4] = mask[2, 0] = True
    logp = -torch.rand(B, T, generator=g) * 3
    ref_logp = logp + torch.randn(B, T, generator=g) * 0.3
    w = torch.rand(B, T, generator=g) * 2
    return log_ratio.to(dtype), adv, mask, logp.to(dtype), ref_logp.to(dtype), w


CASES = [
    dict(eps_low=0.2, eps_high=0.28, dual_clip=None, beta=0.0, kl=None, w=False),
    dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0, beta=0.04, kl="k3", w=True),
    dict(eps_low=0.1, eps_high=0.3, dual_clip=None, beta=0.1, kl="k1", w=False),
    dict(eps_low=0.2, eps_high=0.2, dual_clip=2.0, beta=0.5, kl="k2", w=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_and_twin_match_float64(case, dtype, rel_err, tol, poison):
    c = CASES[case]
    log_ratio, adv, mask, logp, ref_logp, w = make(dtype, seed=case * 2 + (dtype == torch.float16))
    use_kl = c["kl"] is not None
    g_out = torch.randn(log_ratio.shape, dtype=torch.float64)

    lr64 = log_ratio.double().requires_grad_(True)
    lp64 = logp.double().requires_grad_(True)
    ref_loss, ref_flags = reference(lr64, adv.double(), mask, c["eps_low"], c["eps_high"], c["dual_clip"], c["beta"],
                                    lp64 if use_kl else None, ref_logp.double(), c["kl"], w.double() if c["w"] else None)
    (ref_loss * g_out).sum().backward()

    for fn in (gl.grpo_token_loss_triton, gl.grpo_token_loss_torch):
        lr = log_ratio.clone().requires_grad_(True)
        lp = logp.clone().requires_grad_(True)
        out = fn(lr, adv, mask, eps_low=c["eps_low"], eps_high=c["eps_high"], dual_clip=c["dual_clip"],
                 beta=c["beta"], logp=lp if use_kl else None, ref_logp=ref_logp if use_kl else None,
                 kl_estimator=c["kl"] or "k3", is_weight=w if c["w"] else None)
        (out.loss * g_out.float()).sum().backward()
        name = fn.__name__
        assert out.loss.dtype == torch.float32
        assert rel_err(out.loss, ref_loss) <= tol[dtype], f"{name} loss"
        assert rel_err(lr.grad, lr64.grad) <= tol[dtype], f"{name} d log_ratio"
        if use_kl:
            assert rel_err(lp.grad, lp64.grad) <= tol[dtype], f"{name} d logp"
        else:
            assert lp.grad is None
        assert torch.equal(out.clipped_low.double(), ref_flags["low"]), name
        assert torch.equal(out.clipped_high.double(), ref_flags["high"]), name
        assert torch.equal(out.clipped_dual.double(), ref_flags["dual"]), name
        assert rel_err(out.kl, ref_flags["kl"]) <= tol[dtype], f"{name} kl"
    assert ref_flags["high"].sum() > 0 and ref_flags["low"].sum() > 0       # both clip sides exercised


def test_on_policy_first_step_gradient_is_minus_advantage():
    # log_ratio = 0 (r = 1) is where every GRPO run starts: loss = -A, gradient -A per masked token
    lr = torch.zeros(3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(3, 4)
    mask[2, 3] = 0
    for fn in (gl.grpo_token_loss_triton, gl.grpo_token_loss_torch):
        lr.grad = None
        out = fn(lr, adv, mask)
        out.loss.sum().backward()
        expect = -adv[:, None].expand(3, 4) * mask
        assert torch.equal(out.loss, expect) and torch.equal(lr.grad, expect)
        assert out.clipped_low.sum() == out.clipped_high.sum() == 0


def test_bf16_twin_matches_float64(rel_err):
    log_ratio, adv, mask, logp, ref_logp, w = make(torch.bfloat16, seed=11)
    ref_loss, _ = reference(log_ratio.double(), adv.double(), mask, 0.2, 0.2, 3.0, 0.1, logp.double(),
                            ref_logp.double(), "k3", w.double())
    out = gl.grpo_token_loss_torch(log_ratio, adv, mask, dual_clip=3.0, beta=0.1, logp=logp, ref_logp=ref_logp,
                                   is_weight=w)
    assert rel_err(out.loss, ref_loss) <= 3e-2


def test_bad_input_raises():
    lr, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="advantages has shape"):
        gl.grpo_token_loss(lr, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask"):
        gl.grpo_token_loss(lr, adv, torch.ones(3, 2))
    with pytest.raises(ValueError, match="beta=0.1 needs logp"):
        gl.grpo_token_loss(lr, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        gl.grpo_token_loss(lr, adv, mask, dual_clip=1.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        gl.grpo_token_loss(lr, adv, mask, kl_estimator="k4", logp=lr, ref_logp=lr)
