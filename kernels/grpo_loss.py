"""The per-token GRPO objective: the one place its formula lives. Aggregation over tokens and
sequences (token-mean, sequence-mean, a fixed normaliser) is the caller's (rl/), not this file's.

With r = exp(log_ratio) (log_ratio = logp - old_logp per token, or a sequence-level log-ratio
broadcast over the sequence's tokens, as in GSPO), A the advantage, m the mask and w the
importance-sampling weight (e.g. a truncated pi_old / pi_rollout correction):

    pg   = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)      PPO clip, two-sided (DAPO's clip-higher)
    pg   = min(pg, -dual_clip * A)   where A < 0                    dual clip (Ye et al., 2020), optional
    kl   = k1: logp - ref_logp                                      estimators of KL(pi || pi_ref)
           k2: (logp - ref_logp)**2 / 2                             (Schulman, "Approximating KL divergence")
           k3: exp(ref_logp - logp) - (ref_logp - logp) - 1         (DeepSeekMath's GRPO uses k3)
    loss = m * (w * pg + beta * kl)

Departures and conventions:
- log_ratio is clamped to [-20, 20] before exp (no gradient outside), so that a stale token
  cannot produce inf * 0 = NaN; within the clamp nothing changes.
- w multiplies the policy-gradient term only, not the KL term; it carries no gradient.
- advantages and the KL inputs carry no gradient through the policy term; the KL term is
  differentiated with respect to logp (ref_logp is a constant).
- The clip indicators say which branch is binding, masked by m != 0: clipped_high (A > 0,
  r > 1 + eps_high), clipped_low (A < 0, r < 1 - eps_low), clipped_dual (A < 0, r > dual_clip).
  In these tokens the policy term's gradient is zero.

Gradient of the policy term with respect to log_ratio: -w * m * A * r where no indicator is set
(and the clamp is not active), 0 elsewhere.

Kernels: one pass over the tokens each, BLOCK tokens per program, the count n a runtime argument
(not specialised) and the grid cdiv(n, BLOCK), so a new token count compiles nothing. On CUDA,
BLOCK and num_warps are autotuned per flag combination and dtypes among GRPO_CONFIGS; the
interpreter runs the first.

Layout: jit kernels (forward, backward), launch configurations, autograd.Function, the torch twin,
the public functions, compile_specs().
"""
from typing import NamedTuple

import torch

from kernels.backend import use_triton
from kernels.triton_import import tl, triton
from kernels.tuning import TunedKernel

LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}


class GRPOTokenLoss(NamedTuple):
    """Per-token outputs, all of log_ratio's shape, fp32. Only `loss` carries gradient."""
    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped_dual: torch.Tensor
    kl: torch.Tensor


# ---------------------------------------------------------------- jit kernels

@triton.jit
def _policy_terms(lr, adv, eps_low, eps_high, dual_clip, HAS_DUAL: tl.constexpr):
    """(pg, r, clipped_low, clipped_high, clipped_dual, in_clamp) of one block of tokens."""
    in_clamp = (lr >= -20.0) & (lr <= 20.0)
    r = tl.exp(tl.minimum(tl.maximum(lr, -20.0), 20.0))
    clipped_high = (adv > 0) & (r > 1.0 + eps_high)
    clipped_low = (adv < 0) & (r < 1.0 - eps_low)
    r_clip = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
    pg = -tl.minimum(r * adv, r_clip * adv)
    clipped_dual = tl.zeros_like(lr) != 0
    if HAS_DUAL:
        clipped_dual = (adv < 0) & (r > dual_clip)
        pg = tl.where(clipped_dual, -dual_clip * adv, pg)
    return pg, r, clipped_low, clipped_high, clipped_dual, in_clamp


@triton.jit(do_not_specialize=["n"])
def _grpo_fwd_kernel(LR, ADV, MASK, W, LOGP, REF, LOSS, CLO, CHI, CDU, KL, n, eps_low, eps_high, dual_clip, beta,
                     HAS_DUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lr = tl.load(LR + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(ADV + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(MASK + offs, mask=ok, other=0.0).to(tl.float32)
    pg, r, c_lo, c_hi, c_du, in_clamp = _policy_terms(lr, adv, eps_low, eps_high, dual_clip, HAS_DUAL)
    if HAS_W:
        pg = pg * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    live = m != 0
    kl = tl.zeros_like(lr)
    if HAS_KL:
        logp = tl.load(LOGP + offs, mask=ok, other=0.0).to(tl.float32)
        ref = tl.load(REF + offs, mask=ok, other=0.0).to(tl.float32)
        delta = ref - logp
        if KL_KIND == 1:
            kl = -delta
        elif KL_KIND == 2:
            kl = 0.5 * delta * delta
        else:
            kl = tl.exp(delta) - delta - 1.0
        tl.store(LOSS + offs, m * (pg + beta * kl), mask=ok)
    else:
        tl.store(LOSS + offs, m * pg, mask=ok)
    tl.store(CLO + offs, (c_lo & live).to(tl.float32), mask=ok)
    tl.store(CHI + offs, (c_hi & live).to(tl.float32), mask=ok)
    tl.store(CDU + offs, (c_du & live).to(tl.float32), mask=ok)
    tl.store(KL + offs, tl.where(live, kl, 0.0), mask=ok)


@triton.jit(do_not_specialize=["n"])
def _grpo_bwd_kernel(G, LR, ADV, MASK, W, LOGP, REF, D_LR, D_LOGP, n, eps_low, eps_high, dual_clip, beta,
                     HAS_DUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(MASK + offs, mask=ok, other=0.0).to(tl.float32)
    lr = tl.load(LR + offs, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(ADV + offs, mask=ok, other=0.0).to(tl.float32)
    pg, r, c_lo, c_hi, c_du, in_clamp = _policy_terms(lr, adv, eps_low, eps_high, dual_clip, HAS_DUAL)
    active = in_clamp & ~(c_lo | c_hi | c_du)
    d_lr = tl.where(active, -g * adv * r, 0.0)
    if HAS_W:
        d_lr = d_lr * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(D_LR + offs, d_lr.to(D_LR.dtype.element_ty), mask=ok)
    if HAS_KL:
        logp = tl.load(LOGP + offs, mask=ok, other=0.0).to(tl.float32)
        ref = tl.load(REF + offs, mask=ok, other=0.0).to(tl.float32)
        delta = ref - logp
        if KL_KIND == 1:
            dkl = tl.full(delta.shape, 1.0, tl.float32)
        elif KL_KIND == 2:
            dkl = -delta
        else:
            dkl = 1.0 - tl.exp(delta)
        tl.store(D_LOGP + offs, (g * beta * dkl).to(D_LOGP.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launch configurations

# memory-bound elementwise passes: tokens per program and warps; 1024 x 4 warps first (the interpreter's)
GRPO_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in ((1024, 4), (512, 4), (2048, 8),
                                                                                      (4096, 8))]
_FLAGS = ["HAS_DUAL", "HAS_W", "HAS_KL", "KL_KIND"]
_fwd = TunedKernel(_grpo_fwd_kernel, GRPO_CONFIGS, key=_FLAGS)
_bwd = TunedKernel(_grpo_bwd_kernel, GRPO_CONFIGS, key=_FLAGS)


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


# ---------------------------------------------------------------- autograd

class _GRPOTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_ratio, logp, adv, mask, w, ref, eps_low, eps_high, dual_clip, beta, kl_kind):
        n = log_ratio.numel()
        outs = [torch.empty(log_ratio.shape, dtype=torch.float32, device=log_ratio.device) for _ in range(5)]
        loss, c_lo, c_hi, c_du, kl = outs
        has_kl = logp is not None
        dummy = log_ratio
        if n:
            _fwd(_grid(n), log_ratio, adv, mask, w if w is not None else dummy, logp if has_kl else dummy,
                 ref if has_kl else dummy, loss, c_lo, c_hi, c_du, kl, n, eps_low, eps_high,
                 dual_clip if dual_clip is not None else 0.0, beta,
                 HAS_DUAL=dual_clip is not None, HAS_W=w is not None, HAS_KL=has_kl, KL_KIND=kl_kind)
        ctx.save_for_backward(log_ratio, logp, adv, mask, w, ref)
        ctx.args = (eps_low, eps_high, dual_clip, beta, kl_kind)
        ctx.mark_non_differentiable(c_lo, c_hi, c_du, kl)
        return loss, c_lo, c_hi, c_du, kl

    @staticmethod
    def backward(ctx, g, *_):
        log_ratio, logp, adv, mask, w, ref = ctx.saved_tensors
        eps_low, eps_high, dual_clip, beta, kl_kind = ctx.args
        n = log_ratio.numel()
        has_kl = logp is not None
        d_lr = torch.empty_like(log_ratio)
        d_logp = torch.empty_like(logp) if has_kl else None
        if n:
            _bwd(_grid(n), g.contiguous(), log_ratio, adv, mask, w if w is not None else log_ratio,
                 logp if has_kl else log_ratio, ref if has_kl else log_ratio, d_lr, d_logp if has_kl else d_lr, n,
                 eps_low, eps_high, dual_clip if dual_clip is not None else 0.0, beta,
                 HAS_DUAL=dual_clip is not None, HAS_W=w is not None, HAS_KL=has_kl, KL_KIND=kl_kind)
        return d_lr, d_logp, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------- argument checks

def _expand(name, t, shape):
    """t of `shape` or of a prefix of it (e.g. per-sequence [B] for [B, T]), expanded to `shape`."""
    if t.shape == shape:
        return t
    if t.dim() <= len(shape) and tuple(shape[:t.dim()]) == tuple(t.shape):
        return t.reshape(tuple(t.shape) + (1,) * (len(shape) - t.dim())).expand(shape)
    raise ValueError(f"grpo_token_loss: {name} has shape {tuple(t.shape)}; expected log_ratio's shape "
                     f"{tuple(shape)} or a prefix of it")


def _prepare(log_ratio, advantages, mask, eps_low, eps_high, dual_clip, beta, logp, ref_logp, kl_estimator,
             is_weight):
    shape = log_ratio.shape
    if mask.shape != shape:
        raise ValueError(f"grpo_token_loss: mask has shape {tuple(mask.shape)}, log_ratio {tuple(shape)}; "
                         "they must match")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"grpo_token_loss: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1 + eps_high:
        raise ValueError(f"grpo_token_loss: dual_clip must exceed 1 + eps_high = {1 + eps_high}, got {dual_clip}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"grpo_token_loss: kl_estimator={kl_estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if (logp is None) != (ref_logp is None):
        raise ValueError("grpo_token_loss: logp and ref_logp go together (both or neither)")
    if beta != 0 and logp is None:
        raise ValueError(f"grpo_token_loss: beta={beta} needs logp and ref_logp for the KL term")
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if t is not None and t.shape != shape:
            raise ValueError(f"grpo_token_loss: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    adv = _expand("advantages", advantages, shape)
    w = None if is_weight is None else _expand("is_weight", is_weight, shape)
    return adv, w


# ---------------------------------------------------------------- public functions

def grpo_token_loss_torch(log_ratio, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None, beta=0.0,
                          logp=None, ref_logp=None, kl_estimator="k3", is_weight=None) -> GRPOTokenLoss:
    """The torch twin (the spec; autograd differentiates it). Arguments as grpo_token_loss."""
    adv, w = _prepare(log_ratio, advantages, mask, eps_low, eps_high, dual_clip, beta, logp, ref_logp,
                      kl_estimator, is_weight)
    adv = adv.detach().float()
    m = mask.float()
    live = m != 0
    r = torch.exp(log_ratio.float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg = -torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
    clipped_high = (adv > 0) & (r > 1 + eps_high)
    clipped_low = (adv < 0) & (r < 1 - eps_low)
    clipped_dual = torch.zeros_like(clipped_low)
    if dual_clip is not None:
        clipped_dual = (adv < 0) & (r > dual_clip)
        pg = torch.where(clipped_dual, -dual_clip * adv, pg)
    if w is not None:
        pg = pg * w.detach().float()
    kl = torch.zeros_like(pg)
    if logp is not None:
        delta = ref_logp.detach().float() - logp.float()
        kl = {"k1": lambda: -delta, "k2": lambda: 0.5 * delta ** 2,
              "k3": lambda: torch.exp(delta) - delta - 1}[kl_estimator]()
        pg = pg + beta * kl
    return GRPOTokenLoss(m * pg, (clipped_low & live).float(), (clipped_high & live).float(),
                         (clipped_dual & live).float(), torch.where(live, kl.detach(), 0.0))


def grpo_token_loss_triton(log_ratio, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None, beta=0.0,
                           logp=None, ref_logp=None, kl_estimator="k3", is_weight=None) -> GRPOTokenLoss:
    """Fused forward and backward kernels (one pass over the tokens each). Arguments as grpo_token_loss."""
    adv, w = _prepare(log_ratio, advantages, mask, eps_low, eps_high, dual_clip, beta, logp, ref_logp,
                      kl_estimator, is_weight)
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    m = mask if mask.dtype != torch.bool else mask.to(torch.uint8)
    out = _GRPOTriton.apply(flat(log_ratio), flat(logp), flat(adv.detach()), flat(m), flat(None if w is None else w.detach()),
                            flat(None if ref_logp is None else ref_logp.detach()), float(eps_low), float(eps_high),
                            None if dual_clip is None else float(dual_clip), float(beta), KL_ESTIMATORS[kl_estimator])
    return GRPOTokenLoss(*(t.view(log_ratio.shape) for t in out))


def grpo_token_loss(log_ratio, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None, beta=0.0,
                    logp=None, ref_logp=None, kl_estimator="k3", is_weight=None) -> GRPOTokenLoss:
    """Per-token GRPO loss and clip indicators (formula in the module docstring).

    log_ratio [*S] (differentiable), advantages [*S] or a prefix of S (per-sequence [B] for [B, T]),
    mask [*S] (bool or float weights); eps_low, eps_high: the clip range; dual_clip: c > 1 + eps_high
    or None; beta, logp [*S] (differentiable), ref_logp [*S], kl_estimator in k1/k2/k3: the KL term;
    is_weight [*S] or a prefix: importance-sampling weight of the policy term. Returns GRPOTokenLoss,
    all [*S] fp32. The backend follows KERNELS_BACKEND (see kernels.backend).
    """
    fn = grpo_token_loss_triton if use_triton(log_ratio) else grpo_token_loss_torch
    return fn(log_ratio, advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
              logp=logp, ref_logp=ref_logp, kl_estimator=kl_estimator, is_weight=is_weight)


# ---------------------------------------------------------------- GPU build configurations

def compile_specs():
    """Forward and backward with every option on (dual clip, IS weight, k3 KL), log-ratio in fp32/fp16/bf16,
    every configuration."""
    specs = []
    flags = {"HAS_DUAL": True, "HAS_W": True, "HAS_KL": True, "KL_KIND": 3}
    scalars = {"n": "i32", "eps_low": "fp32", "eps_high": "fp32", "dual_clip": "fp32", "beta": "fp32",
               **{k: "constexpr" for k in (*flags, "BLOCK")}}
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        specs += _fwd.compile_specs("grpo_token_loss_fwd", dt, {
            "LR": p, "ADV": "*fp32", "MASK": "*fp32", "W": "*fp32", "LOGP": p, "REF": p, "LOSS": "*fp32",
            "CLO": "*fp32", "CHI": "*fp32", "CDU": "*fp32", "KL": "*fp32", **scalars}, flags)
        specs += _bwd.compile_specs("grpo_token_loss_bwd", dt, {
            "G": "*fp32", "LR": p, "ADV": "*fp32", "MASK": "*fp32", "W": "*fp32", "LOGP": p, "REF": p, "D_LR": p,
            "D_LOGP": p, **scalars}, flags)
    return specs
