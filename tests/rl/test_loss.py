"""rl.loss.policy_loss: every variant against hand-computed numbers, gradients against a naive
loop-by-loop implementation, micro-batch and 2-rank (torchrun, gloo) gradient equality.

Run as a script (`torchrun --nproc_per_node 2 tests/rl/test_loss.py OUT`) it is the worker of the
2-rank test.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl.advantage import group_advantages
from rl.loss import AGGREGATIONS, VARIANTS, all_reduce_metrics, combine_metrics, policy_loss

LN = math.log
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the hand-worked example
#
# B = 2 sequences, T = 3 positions; the last token of sequence 1 is padding. Advantages +1 and -1.
# old_logp is arbitrary; logp = old_logp + log(r) with the ratios r below, so that exp gives round numbers.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])
OLD = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])


def example(ratios):
    """(logp leaf with grad, old_logp) for per-token ratios [[r00, r01, r02], [r10, r11, r12]]."""
    logp = (OLD.double() + torch.tensor(ratios, dtype=torch.float64).log()).float().requires_grad_(True)
    return logp, OLD.clone()


# With eps = 0.2 both sides, per-token -min(r A, clip(r, 0.8, 1.2) A):
#   seq 0 (A = +1): r = 1.1 -> -1.1;  r = 1.5 -> -1.2 (clipped high);  r = 0.7 -> -0.7        row sum -3.0
#   seq 1 (A = -1): r = 0.7 -> +0.8 (clipped low);  r = 1.1 -> +1.1;  padding                  row sum +1.9
# token sum -1.1 over 5 tokens.
BASE = [[1.1, 1.5, 0.7], [0.7, 1.1, 2.0]]


def check(value, expected, tol=1e-6):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= tol, f"{value} != {expected}"


@pytest.mark.parametrize("agg, opts, expected", [
    ("token_mean", {}, -1.1 / 5),                                     # DAPO: sum / tokens
    ("token_mean", {"num_tokens": 10}, -1.1 / 10),                    # the step's token count given
    ("seq_mean_token_mean", {}, (-3.0 / 3 + 1.9 / 2) / 2),            # GRPO: mean over sequences of token means
    ("seq_mean_token_mean", {"num_seqs": 4}, (-3.0 / 3 + 1.9 / 2) / 4),
    ("seq_mean_token_sum_norm", {"max_tokens": 4}, -1.1 / (2 * 4)),   # Dr. GRPO: sum / (B * max_tokens)
    ("seq_mean_token_sum_norm", {"max_tokens": 4, "num_seqs": 4}, -1.1 / (4 * 4)),
    ("bnpo", {}, -1.1 / 5),
    ("bnpo", {"num_tokens": 10, "num_seqs": 4}, -1.1 / 5),            # bnpo: always this call's count
])
def test_aggregations_by_hand(agg, opts, expected):
    logp, old = example(BASE)
    loss, metrics = policy_loss(logp, old, ADV, MASK, agg=agg, **opts)
    check(loss, expected)
    check(metrics["loss"], expected)
    check(metrics["pg_loss"], expected)


def test_metrics_by_hand():
    logp, old = example(BASE)
    _, mt = policy_loss(logp, old, ADV, MASK)
    check(mt["tokens"], 5)
    check(mt["clip_ratio/high"], 1 / 5)              # r = 1.5 with A > 0
    check(mt["clip_ratio/low"], 1 / 5)               # r = 0.7 with A < 0
    check(mt["clip_ratio/dual"], 0)
    check(mt["clip_ratio"], 2 / 5)
    check(mt["ratio/mean"], (1.1 + 1.5 + 0.7 + 0.7 + 1.1) / 5)  # the padded r = 2.0 is not counted
    check(mt["ratio/min"], 0.7)
    check(mt["ratio/max"], 1.5)
    assert "kl" not in mt and "entropy" not in mt and "is_weight/mean" not in mt
    for name, v in mt.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, name
        assert v.dtype == torch.float32, name


@pytest.mark.parametrize("eps_high, expected, high", [
    (0.28, (-1.1 - 1.28 - 0.7 + 0.8 + 1.1) / 5, 1 / 5),   # DAPO clip-higher: r = 1.5 clipped at 1.28
    (0.6, (-1.1 - 1.5 - 0.7 + 0.8 + 1.1) / 5, 0.0),       # 1.5 < 1.6: nothing clipped high
])
def test_clip_higher_by_hand(eps_high, expected, high):
    logp, old = example(BASE)
    loss, mt = policy_loss(logp, old, ADV, MASK, eps_low=0.2, eps_high=eps_high)
    check(loss, expected)
    check(mt["clip_ratio/high"], high)
    check(mt["clip_ratio/low"], 1 / 5)                     # the low side still at 0.8


def test_dual_clip_by_hand():
    # seq 1 (A = -1) now has r = 4.0: PPO's loss max(r, clip(r)) = 4.0; dual clip with c = 3 caps it at -c A = 3
    logp, old = example([[1.1, 1.5, 0.7], [0.7, 4.0, 2.0]])
    loss, mt = policy_loss(logp, old, ADV, MASK)
    check(loss, (-3.0 + 0.8 + 4.0) / 5)
    loss, mt = policy_loss(logp, old, ADV, MASK, dual_clip=3.0)
    check(loss, (-3.0 + 0.8 + 3.0) / 5)
    check(mt["clip_ratio/dual"], 1 / 5)
    check(mt["clip_ratio"], 3 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[1, 1] == 0                                  # the dual-clipped token passes no gradient


# delta = ref_logp - logp per token: ln 2, 0, ln 1/2 in seq 0; ln 2, 0 (and padding) in seq 1.
#   k1 = -delta:                 -ln2, 0, ln2 | -ln2, 0                        sum -ln2
#   k2 = delta^2 / 2:            ln2^2/2 on the three tokens with delta != 0   sum 1.5 ln2^2
#   k3 = e^delta - delta - 1:    1 - ln2, 0, ln2 - 1/2 | 1 - ln2, 0            sum 1.5 - ln2
DELTA = [[LN(2), 0.0, LN(0.5)], [LN(2), 0.0, 7.0]]
KL_SUMS = {"k1": -LN(2), "k2": 1.5 * LN(2) ** 2, "k3": 1.5 - LN(2)}


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_kl_estimators_by_hand(kl):
    logp, old = example(BASE)
    ref = logp.detach() + torch.tensor(DELTA)
    loss, mt = policy_loss(logp, old, ADV, MASK, ref, beta=0.1, kl=kl)
    check(loss, -1.1 / 5 + 0.1 * KL_SUMS[kl] / 5)
    check(mt["kl"], KL_SUMS[kl] / 5)
    check(mt["pg_loss"], -1.1 / 5)
    # beta = 0 with ref_logp: the KL is reported but not in the loss
    loss0, mt0 = policy_loss(logp, old, ADV, MASK, ref, beta=0.0, kl=kl)
    check(loss0, -1.1 / 5)
    check(mt0["kl"], KL_SUMS[kl] / 5)


def test_deepseekmath_grpo_by_hand():
    # seq_mean_token_mean with k3, beta = 0.04: the KL is averaged per sequence like the policy term
    #   KL: seq 0 (1 - ln2 + ln2 - 1/2) / 3 = 1/6;  seq 1 (1 - ln2) / 2
    logp, old = example(BASE)
    ref = logp.detach() + torch.tensor(DELTA)
    loss, _ = policy_loss(logp, old, ADV, MASK, ref, **VARIANTS["grpo"]["loss"])
    check(loss, (-3.0 / 3 + 1.9 / 2) / 2 + 0.04 * (1 / 6 + (1 - LN(2)) / 2) / 2)


# GSPO: token ratios 2, 1/2, 1 (geometric mean s_0 = 1) and 0.81, 1 (s_1 = 0.9); the padding's 5.0 is ignored.
GSPO_RATIOS = [[2.0, 0.5, 1.0], [0.81, 1.0, 5.0]]


def test_gspo_sequence_ratio_by_hand():
    logp, old = example(GSPO_RATIOS)
    # eps 0.2: s_0 = 1 with A = +1 -> -1 per token;  s_1 = 0.9 in [0.8, 1.2] with A = -1 -> +0.9 per token
    loss, mt = policy_loss(logp, old, ADV, MASK, ratio_level="sequence", agg="seq_mean_token_mean")
    check(loss, (-1.0 + 0.9) / 2)
    check(mt["ratio/mean"], (3 * 1.0 + 2 * 0.9) / 5)
    check(mt["ratio/min"], 0.9)
    check(mt["ratio/max"], 1.0)
    check(mt["clip_ratio"], 0.0)
    # GSPO's own ranges 3e-4 / 4e-4: s_1 = 0.9 < 1 - 3e-4 with A < 0 -> clipped to 0.9997, both its tokens
    loss, mt = policy_loss(logp, old, ADV, MASK, **VARIANTS["gspo"]["loss"])
    check(loss, (-1.0 + 0.9997) / 2)
    check(mt["clip_ratio/low"], 2 / 5)
    # the same data with token ratios: seq 0: -1.2 (2 clipped), -0.5, -1 -> mean -0.9;  seq 1: 0.81, 1 -> 0.905
    loss, _ = policy_loss(logp, old, ADV, MASK, agg="seq_mean_token_mean")
    check(loss, (-0.9 + 0.905) / 2)


def test_entropy_bonus_by_hand():
    logp, old = example(BASE)
    ent = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 9.0]], requires_grad=True)  # 9.0 is padding
    loss, mt = policy_loss(logp, old, ADV, MASK, entropy=ent, entropy_coef=0.01)
    check(loss, -1.1 / 5 - 0.01 * 8.0 / 5)                  # token mean of the entropy: 8 / 5
    check(mt["entropy"], 1.6)
    check(mt["pg_loss"], -1.1 / 5)
    (g,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g, -0.01 / 5 * MASK.float())
    loss, _ = policy_loss(logp, old, ADV, MASK, entropy=ent, entropy_coef=0.01, agg="seq_mean_token_mean")
    check(loss, (-3.0 / 3 + 1.9 / 2) / 2 - 0.01 * (6.0 / 3 + 2.0 / 2) / 2)
    loss, mt = policy_loss(logp, old, ADV, MASK, entropy=ent)  # coef 0: reported only
    check(loss, -1.1 / 5)
    check(mt["entropy"], 1.6)


# TIS: the sampler's log-probs give w = exp(old_logp - rollout_logp) = 1.5, 3, 0.5 | 1, 4; capped at 2: 1.5, 2, 0.5 | 1, 2
#   weighted: -1.1 * 1.5, -1.2 * 2, -0.7 * 0.5 | 0.8 * 1, 1.1 * 2 = -1.65 - 2.4 - 0.35 + 0.8 + 2.2 = -1.4
W_ROLLOUT = [[1.5, 3.0, 0.5], [1.0, 4.0, 1.0]]


def test_truncated_importance_sampling_by_hand():
    logp, old = example(BASE)
    rollout = old - torch.tensor(W_ROLLOUT).log()
    loss, mt = policy_loss(logp, old, ADV, MASK, rollout_logp=rollout, is_cap=2.0)
    check(loss, -1.4 / 5)
    check(mt["is_weight/mean"], (1.5 + 2 + 0.5 + 1 + 2) / 5)
    check(mt["pg_loss"], -1.4 / 5)
    loss, _ = policy_loss(logp, old, ADV, MASK, rollout_logp=rollout)      # uncapped
    check(loss, (-1.65 - 3.6 - 0.35 + 0.8 + 4.4) / 5)
    # a ready weight per sequence: 2 and 0.5: -6.0 + 0.95
    loss, _ = policy_loss(logp, old, ADV, MASK, is_weight=torch.tensor([2.0, 0.5]))
    check(loss, (-6.0 + 0.95) / 5)
    loss, _ = policy_loss(logp, old, ADV, MASK, is_weight=torch.tensor([2.0, 0.5]), is_cap=1.0)
    check(loss, (-3.0 + 0.95) / 5)
    # the KL term is not weighted
    ref = logp.detach() + torch.tensor(DELTA)
    loss, _ = policy_loss(logp, old, ADV, MASK, ref, beta=0.1, rollout_logp=rollout, is_cap=2.0)
    check(loss, -1.4 / 5 + 0.1 * KL_SUMS["k3"] / 5)


def test_on_policy_first_step():
    # old_logp = None: one update per batch, r = 1 everywhere; loss = -mean A over tokens, gradient -A / N per token
    logp, _ = example(BASE)
    loss, mt = policy_loss(logp, None, ADV, MASK)
    check(loss, (-3 + 2) / 5)
    check(mt["ratio/mean"], 1.0)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -ADV[:, None] * MASK / 5)


def test_padding_may_hold_inf():
    logp, old = example(BASE)
    ref = logp.detach() + torch.tensor(DELTA)
    rollout = old - torch.tensor(W_ROLLOUT).log()
    ent = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 9.0]])
    clean = {}
    for name, opts in (("token", {}), ("sequence", {"ratio_level": "sequence"})):
        kwargs = dict(beta=0.1, rollout_logp=rollout, is_cap=2.0, entropy=ent, entropy_coef=0.01, **opts)
        loss, _ = policy_loss(logp, old, ADV, MASK, ref, **kwargs)
        (g,) = torch.autograd.grad(loss, logp)
        clean[name] = (loss, g)
        bad_logp = logp.detach().clone()
        bad_logp[1, 2] = -math.inf
        bad_logp.requires_grad_(True)
        poisoned = {t: x.clone() for t, x in (("old", old), ("ref", ref), ("rollout", rollout), ("ent", ent))}
        for x in poisoned.values():
            x[1, 2] = -math.inf
        kwargs.update(rollout_logp=poisoned["rollout"], entropy=poisoned["ent"])
        loss2, _ = policy_loss(bad_logp, poisoned["old"], ADV, MASK, poisoned["ref"], **kwargs)
        (g2,) = torch.autograd.grad(loss2, bad_logp)
        assert torch.equal(loss2, loss) and torch.equal(g2, g), name


def test_empty_mask():
    logp, old = example(BASE)
    loss, mt = policy_loss(logp, old, ADV, torch.zeros(2, 3, dtype=torch.bool), agg="seq_mean_token_mean")
    assert float(loss.detach()) == 0 and float(mt["tokens"]) == 0 and float(mt["clip_ratio"]) == 0
    assert float(mt["ratio/min"]) == math.inf and float(mt["ratio/max"]) == -math.inf


def test_float_mask_equals_bool_mask():
    logp, old = example(BASE)
    for agg in AGGREGATIONS:
        a, ma = policy_loss(logp, old, ADV, MASK, agg=agg, max_tokens=4)
        b, mb = policy_loss(logp, old, ADV, MASK.float(), agg=agg, max_tokens=4)
        assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma), agg


# ---------------------------------------------------------------- gradients against a naive implementation

def naive_policy_loss(logp, old_logp, adv, mask, ref_logp=None, *, eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3",
                      agg="token_mean", max_tokens=None, ratio_level="token", num_tokens=None, num_seqs=None,
                      dual_clip=None, entropy=None, entropy_coef=0.0, is_weight=None, rollout_logp=None,
                      is_cap=None):
    """The objective written out token by token in float64 (0/1 masks), from the papers' formulas."""
    B, T = logp.shape
    tokens = [[t for t in range(T) if mask[b, t]] for b in range(B)]
    count = sum(len(ts) for ts in tokens)

    def aggregate(rows):  # rows[b]: list of per-token scalars of sequence b
        total = sum(sum(row) for row in rows)
        seqs = B if num_seqs is None else num_seqs
        if agg == "token_mean":
            return total / (num_tokens if num_tokens is not None else max(count, 1))
        if agg == "bnpo":
            return total / max(count, 1)
        if agg == "seq_mean_token_mean":
            return sum(sum(row) / max(len(row), 1) for row in rows) / seqs
        assert agg == "seq_mean_token_sum_norm"
        return total / (seqs * max_tokens)

    pg_rows, kl_rows, ent_rows = [], [], []
    for b in range(B):
        a = float(adv[b])
        if ratio_level == "sequence" and tokens[b]:
            log_s = sum(logp[b, t] - old_logp[b, t] for t in tokens[b]) / len(tokens[b])
        pg_row, kl_row, ent_row = [], [], []
        for t in tokens[b]:
            if ratio_level == "token":
                r = torch.exp(logp[b, t] - old_logp[b, t])
            else:  # GSPO-token: s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]
                r = torch.exp(log_s.detach()) * torch.exp(logp[b, t] - logp[b, t].detach())
            term = -torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
            if dual_clip is not None and a < 0:
                term = torch.minimum(term, torch.tensor(-dual_clip * a, dtype=term.dtype))
            w = 1.0
            if is_weight is not None:
                w = float(is_weight[b, t] if is_weight.dim() == 2 else is_weight[b])
            elif rollout_logp is not None:
                w = math.exp(float(old_logp[b, t]) - float(rollout_logp[b, t]))
            if is_cap is not None:
                w = min(w, is_cap)
            pg_row.append(w * term)
            if ref_logp is not None:
                d = float(ref_logp[b, t]) - logp[b, t]
                kl_row.append({"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl])
            if entropy is not None:
                ent_row.append(entropy[b, t])
        pg_rows.append(pg_row)
        kl_rows.append(kl_row)
        ent_rows.append(ent_row)
    loss = aggregate(pg_rows)
    if ref_logp is not None:
        loss = loss + beta * aggregate(kl_rows)
    if entropy is not None:
        loss = loss - entropy_coef * aggregate(ent_rows)
    return loss


def random_batch(seed, B=6, T=9):
    """Inputs that reach every branch: clipped high/low, dual-clip zone, an empty sequence, padding."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.4
    adv = torch.randn(B, generator=g)
    adv[:3] = torch.tensor([1.2, -0.8, -1.5])
    logp[1, 0] = old[1, 0] + 1.5                                     # r = 4.5 with A < 0: dual clip zone
    lengths = torch.tensor([9, 7, 4, 1, 6, 0])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]               # [B, T]; the last sequence is empty
    ref = logp + torch.randn(B, T, generator=g) * 0.3
    rollout = old + torch.randn(B, T, generator=g) * 0.5
    ent = torch.rand(B, T, generator=g) * 2
    is_w = torch.rand(B, T, generator=g) * 2
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, rollout=rollout, ent=ent, is_w=is_w)


GRAD_CASES = {
    "token_mean": dict(agg="token_mean"),
    "token_mean_global_count": dict(agg="token_mean", num_tokens=50),
    "seq_mean_token_mean": dict(agg="seq_mean_token_mean"),
    "seq_mean_token_mean_global_count": dict(agg="seq_mean_token_mean", num_seqs=11),
    "seq_mean_token_sum_norm": dict(agg="seq_mean_token_sum_norm", max_tokens=12),
    "bnpo": dict(agg="bnpo"),
    "clip_higher": dict(eps_low=0.2, eps_high=0.28),
    "dual_clip": dict(dual_clip=3.0),
    "kl_k1": dict(beta=0.1, kl="k1", ref=True),
    "kl_k2": dict(beta=0.1, kl="k2", ref=True),
    "kl_k3": dict(beta=0.04, kl="k3", ref=True, agg="seq_mean_token_mean"),
    "gspo": dict(ratio_level="sequence", agg="seq_mean_token_mean", eps_low=0.05, eps_high=0.08),
    "gspo_token_mean": dict(ratio_level="sequence", agg="token_mean", eps_low=0.05, eps_high=0.08),
    "entropy": dict(entropy_coef=0.01, ent=True),
    "tis": dict(rollout=True, is_cap=2.0),
    "is_weight_per_token": dict(is_w=True),
    "all_at_once": dict(agg="seq_mean_token_sum_norm", max_tokens=10, dual_clip=2.5, beta=0.05, kl="k3", ref=True,
                        ent=True, entropy_coef=0.02, rollout=True, is_cap=1.5, eps_high=0.28),
}


def call_args(batch, case):
    """(positional ref_logp, keyword options) of a GRAD_CASES entry, with its tensors filled in."""
    opts = {k: v for k, v in case.items() if k not in ("ref", "ent", "rollout", "is_w")}
    if case.get("ent"):
        opts["entropy"] = batch["ent_leaf"]
    if case.get("rollout"):
        opts["rollout_logp"] = batch["rollout"]
    if case.get("is_w"):
        opts["is_weight"] = batch["is_w"]
    return (batch["ref"] if case.get("ref") else None), opts


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradient_matches_naive(name, backend, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    batch = random_batch(seed=3)
    case = GRAD_CASES[name]
    logp = batch["logp"].clone().requires_grad_(True)
    batch["ent_leaf"] = batch["ent"].clone().requires_grad_(True)
    ref, opts = call_args(batch, case)
    loss, metrics = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], ref, **opts)
    wrt = [logp] + ([batch["ent_leaf"]] if case.get("ent") else [])
    grads = torch.autograd.grad(loss, wrt)

    logp64 = batch["logp"].double().requires_grad_(True)
    batch["ent_leaf"] = batch["ent"].double().requires_grad_(True)
    ref, opts = call_args(batch, case)
    loss64 = naive_policy_loss(logp64, batch["old"].double(), batch["adv"].double(), batch["mask"],
                               None if ref is None else ref.double(), **opts)
    wrt64 = [logp64] + ([batch["ent_leaf"]] if case.get("ent") else [])
    grads64 = torch.autograd.grad(loss64, wrt64)

    assert abs(float(loss.detach()) - float(loss64.detach())) <= 1e-5 * max(1.0, abs(float(loss64.detach()))), name
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6)
    assert float(metrics["tokens"]) == 9 + 7 + 4 + 1 + 6


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_bf16_inputs_match_float32(ratio_level):
    """Log-probs straight from a bf16 model: the loss is fp32 and close to the fp32 one, gradients are bf16."""
    batch = random_batch(seed=7)
    opts = dict(ratio_level=ratio_level, beta=0.05, dual_clip=3.0, rollout_logp=batch["rollout"], is_cap=2.0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        logp = batch["logp"].to(dtype).requires_grad_(True)
        loss, _ = policy_loss(logp, batch["old"].to(dtype), batch["adv"], batch["mask"], batch["ref"].to(dtype),
                              **opts)
        (g,) = torch.autograd.grad(loss, logp)
        assert loss.dtype == torch.float32 and g.dtype == dtype
        results.append((loss.detach(), g.float()))
    (l32, g32), (l16, g16) = results
    assert abs(float(l16 - l32)) <= 3e-2 * max(abs(float(l32)), 1e-2)
    assert float((g16 - g32).norm() / g32.norm()) <= 3e-2


def test_random_batch_reaches_every_branch():
    batch = random_batch(seed=3)
    _, mt = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], dual_clip=3.0)
    assert float(mt["clip_ratio/low"]) > 0 and float(mt["clip_ratio/high"]) > 0 and float(mt["clip_ratio/dual"]) > 0
    _, mt = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], **GRAD_CASES["gspo"])
    assert 0 < float(mt["clip_ratio"]) < 1                           # some whole sequences clipped, not all
    w = torch.exp(batch["old"] - batch["rollout"])[batch["mask"]]
    assert (w > 2.0).any() and (w < 2.0).any()                        # the TIS cap binds on some tokens


def test_gspo_equals_the_sequence_level_objective():
    """GSPO's eq.: J = (1/B) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t (logp - old)), differentiated
    directly, equals the GSPO-token form with seq_mean_token_mean in value and gradient."""
    batch = random_batch(seed=5)
    eps_low, eps_high = 0.05, 0.08
    logp64 = batch["logp"].double().requires_grad_(True)
    terms = []
    for b in range(logp64.shape[0]):
        ts = batch["mask"][b]
        if not ts.any():
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        s = torch.exp((logp64[b][ts] - batch["old"][b][ts].double()).mean())
        a = float(batch["adv"][b])
        terms.append(-torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    loss64 = torch.stack(terms).mean()
    (g64,) = torch.autograd.grad(loss64, logp64)

    logp = batch["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], ratio_level="sequence",
                          agg="seq_mean_token_mean", eps_low=eps_low, eps_high=eps_high)
    (g,) = torch.autograd.grad(loss, logp)
    assert abs(float(loss.detach()) - float(loss64.detach())) <= 1e-6
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6)
    assert (g64 == 0).any() and (g64 != 0).any()                     # clipped sequences and live ones


# ---------------------------------------------------------------- micro-batches and ranks

def make_problem(seed=0, B=8, T=7, D=5, V=11):
    """A tiny shared-parameter policy (logits = x @ W) so that gradients from different sequences add up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    W = torch.randn(D, V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 2, 5, 1, 6, 3, 7, 4])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]              # uneven lengths: per-micro-batch counts differ
    with torch.no_grad():
        logp, _ = model_logp(W, x, targets)
    old = logp + torch.randn(B, T, generator=g) * 0.3
    ref = logp + torch.randn(B, T, generator=g) * 0.2
    rollout = old + torch.randn(B, T, generator=g) * 0.3
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    adv = group_advantages(rewards, group_size=4)
    return dict(x=x, W=W, targets=targets, mask=mask, old=old, ref=ref, rollout=rollout, adv=adv)


def model_logp(W, x, targets):
    """logp [B, T] of the targets and the entropy [B, T] of the softmax over V."""
    logits = x @ W                                                   # [B, T, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets[..., None]).squeeze(-1)      # [B, T]
    entropy = -(logprobs.exp() * logprobs).sum(-1)                  # [B, T]
    return logp, entropy


SPLIT_CASES = {
    "token_mean": dict(agg="token_mean"),
    "seq_mean_token_mean": dict(agg="seq_mean_token_mean"),
    "seq_mean_token_sum_norm": dict(agg="seq_mean_token_sum_norm", max_tokens=7),
    "gspo": dict(agg="seq_mean_token_mean", ratio_level="sequence", eps_low=0.05, eps_high=0.08),
    "everything": dict(agg="token_mean", beta=0.05, dual_clip=3.0, entropy_coef=0.01, is_cap=2.0, eps_high=0.28),
    # on-policy distillation: per-token advantages, the teacher's log-prob minus the student's (rl/distill.py)
    "opd": dict(agg="token_mean", per_token=True),
    "grpo_plus_distill": dict(agg="seq_mean_token_mean", per_token=True, with_sequence_advantages=True),
}


def grad_of_part(p, rows, opts, num_tokens=None, num_seqs=None):
    """dL/dW of the loss over sequences `rows`, with the step's counts given (None: the part's own)."""
    W = p["W"].clone().requires_grad_(True)
    logp, entropy = model_logp(W, p["x"][rows], p["targets"][rows])
    opts = dict(opts)
    adv = p["adv"][rows]
    if opts.pop("per_token", False):
        from rl.distill import distill_advantages
        seq = adv if opts.pop("with_sequence_advantages", False) else None
        adv = distill_advantages(p["ref"][rows], p["old"][rows], p["mask"][rows], seq, coef=0.5 if seq is not None else 1.0)
    extra = {}
    if opts.get("beta"):
        extra["ref_logp"] = p["ref"][rows]
    if opts.get("is_cap"):
        extra["rollout_logp"] = p["rollout"][rows]
    if opts.get("entropy_coef"):
        extra["entropy"] = entropy
    loss, metrics = policy_loss(logp, p["old"][rows], adv, p["mask"][rows], num_tokens=num_tokens,
                                num_seqs=num_seqs, **opts, **extra)
    (g,) = torch.autograd.grad(loss, W)
    return g, loss.detach(), metrics


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_four_micro_batches_equal_one(name):
    p = make_problem()
    opts = SPLIT_CASES[name]
    B = p["mask"].shape[0]
    g_full, loss_full, _ = grad_of_part(p, slice(0, B), opts)
    n_tok, n_seq = p["mask"].sum(), B
    parts = [grad_of_part(p, slice(k, k + 2), opts, num_tokens=n_tok, num_seqs=n_seq) for k in range(0, B, 2)]
    torch.testing.assert_close(sum(g for g, _, _ in parts), g_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(sum(loss for _, loss, _ in parts), loss_full, rtol=0, atol=1e-6)
    # the metrics of the four calls combine into those of the one call
    full = grad_of_part(p, slice(0, B), opts, num_tokens=n_tok, num_seqs=n_seq)[2]
    combined = combine_metrics([m for _, _, m in parts])
    assert set(combined) == set(full)
    for k in full:
        torch.testing.assert_close(combined[k], full[k], rtol=0, atol=1e-6, msg=k)
    assert 0 < float(full["clip_ratio"]) < 1 and float(full["ratio/min"]) < 1 < float(full["ratio/max"])


def test_bnpo_is_per_micro_batch():
    p = make_problem()
    B = p["mask"].shape[0]
    g_bnpo, loss_bnpo, _ = grad_of_part(p, slice(0, B), dict(agg="bnpo"))
    g_tok, loss_tok, _ = grad_of_part(p, slice(0, B), dict(agg="token_mean"))
    assert torch.equal(g_bnpo, g_tok) and torch.equal(loss_bnpo, loss_tok)      # one micro-batch: the same
    parts = [grad_of_part(p, slice(k, k + 2), dict(agg="bnpo"), num_tokens=p["mask"].sum()) for k in range(0, B, 2)]
    # four micro-batches: each divided by its own count (num_tokens ignored), so the sum is not the token mean
    local = [float(p["mask"][k:k + 2].sum()) for k in range(0, B, 2)]
    assert len(set(local)) > 1
    per_part_sums = [loss * n for (_, loss, _), n in zip(parts, local)]
    torch.testing.assert_close(sum(per_part_sums) / sum(local), loss_tok, rtol=0, atol=1e-6)
    assert abs(float(sum(loss for _, loss, _ in parts)) - float(loss_tok)) > 1e-3


def distributed_worker(out: str) -> None:
    """One of 2 ranks: half of the sequences each, the step's counts all-reduced, gradients summed."""
    import torch.distributed as dist

    from runtime.distributed import init_distributed, teardown
    info = init_distributed(backend="gloo")
    try:
        p = make_problem()
        B = p["mask"].shape[0]
        half = B // info.world_size
        rows = slice(info.rank * half, (info.rank + 1) * half)
        results = {}
        for name, opts in SPLIT_CASES.items():
            n_tok = p["mask"][rows].sum().float()
            n_seq = torch.tensor(float(half))
            dist.all_reduce(n_tok)
            dist.all_reduce(n_seq)
            g, _, metrics = grad_of_part(p, rows, opts, num_tokens=n_tok, num_seqs=n_seq)
            dist.all_reduce(g)                                       # SUM: each rank's loss is its share
            results[name] = g
            results[name + "/metrics"] = all_reduce_metrics(metrics)
        if info.rank == 0:
            torch.save(results, out)
    finally:
        teardown()


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "KERNELS_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    p = make_problem()
    B = p["mask"].shape[0]
    assert set(got) == set(SPLIT_CASES) | {name + "/metrics" for name in SPLIT_CASES}
    for name, opts in SPLIT_CASES.items():
        g_full, _, metrics = grad_of_part(p, slice(0, B), opts)
        torch.testing.assert_close(got[name], g_full, rtol=0, atol=1e-6, msg=name)
        assert set(got[name + "/metrics"]) == set(metrics)
        for k, v in metrics.items():
            torch.testing.assert_close(got[name + "/metrics"][k], v, rtol=0, atol=1e-6, msg=f"{name} {k}")


# ---------------------------------------------------------------- presets and errors

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_run_and_start_at_minus_mean_advantage(variant):
    """Every paper preset is accepted by both functions; on-policy (r = 1, ref = policy) every variant's
    loss is -(1/B) sum_i A_i times its normaliser's view of the lengths: with equal lengths T, -mean(A)
    for the means and -mean(A) * T / max_tokens for Dr. GRPO."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, **VARIANTS[variant]["advantage"])
    T = 5
    logp = torch.full((8, T), -1.3, requires_grad=True)
    mask = torch.ones(8, T, dtype=torch.bool)
    opts = dict(VARIANTS[variant]["loss"])
    if opts["agg"] == "seq_mean_token_sum_norm":
        opts["max_tokens"] = 10
    loss, mt = policy_loss(logp, None, adv, mask, logp.detach(), **opts)
    scale = T / 10 if opts["agg"] == "seq_mean_token_sum_norm" else 1.0
    check(loss, -float(adv.mean()) * scale)
    check(mt["kl"], 0.0)


def test_combine_metrics_by_hand():
    t = torch.tensor
    parts = [{"loss": t(0.5), "tokens": t(2.0), "kl": t(0.1), "ratio/min": t(0.9), "ratio/max": t(1.1)},
             {"loss": t(-0.2), "tokens": t(6.0), "kl": t(0.3), "ratio/min": t(0.7), "ratio/max": t(1.05)},
             {"loss": t(0.0), "tokens": t(0.0), "kl": t(0.0), "ratio/min": t(math.inf), "ratio/max": t(-math.inf)}]
    out = combine_metrics(parts)
    check(out["loss"], 0.3)
    check(out["tokens"], 8)
    check(out["kl"], (2 * 0.1 + 6 * 0.3) / 8)                # token-weighted; the empty call weighs nothing
    check(out["ratio/min"], 0.7)
    check(out["ratio/max"], 1.1)
    assert all_reduce_metrics(parts[0]) == parts[0]          # no process group: unchanged
    with pytest.raises(ValueError, match="part 1 has keys"):
        combine_metrics([parts[0], {"loss": t(0.0), "tokens": t(1.0)}])


def test_bad_input_raises():
    logp, old = example(BASE)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); expected one per sequence"):
        policy_loss(logp, old, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 4\).*or one per token, \[B, T\] = \(2, 3\)"):
        policy_loss(logp, old, torch.zeros(2, 4), MASK)
    policy_loss(logp, old, torch.zeros(2, 3), MASK)   # one per token (on-policy distillation) is fine
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\)"):
        policy_loss(logp, old, ADV, MASK.T)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 4\)"):
        policy_loss(logp, torch.zeros(2, 4), ADV, MASK)
    with pytest.raises(ValueError, match=r"ref_logp has shape"):
        policy_loss(logp, old, ADV, MASK, torch.zeros(2))
    with pytest.raises(ValueError, match=r"logp must be a float tensor \[B, T\]"):
        policy_loss(logp[0], old[0], ADV, MASK[0])
    with pytest.raises(ValueError, match=r"is_weight has shape \(3,\)"):
        policy_loss(logp, old, ADV, MASK, is_weight=torch.ones(3))
    with pytest.raises(ValueError, match="agg='mean'; expected one of token_mean, seq_mean_token_mean, "
                                         "seq_mean_token_sum_norm, bnpo"):
        policy_loss(logp, old, ADV, MASK, agg="mean")
    with pytest.raises(ValueError, match="kl='k4'; expected one of k1, k2, k3"):
        policy_loss(logp, old, ADV, MASK, kl="k4")
    with pytest.raises(ValueError, match="ratio_level='group'; expected one of token, sequence"):
        policy_loss(logp, old, ADV, MASK, ratio_level="group")
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logp"):
        policy_loss(logp, old, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="needs max_tokens"):
        policy_loss(logp, old, ADV, MASK, agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="num_tokens must be a positive number"):
        policy_loss(logp, old, ADV, MASK, num_tokens=0)
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs entropy"):
        policy_loss(logp, old, ADV, MASK, entropy_coef=0.01)
    with pytest.raises(ValueError, match="is_weight or rollout_logp, not both"):
        policy_loss(logp, old, ADV, MASK, is_weight=ADV, rollout_logp=old)
    with pytest.raises(ValueError, match="is_cap needs rollout_logp"):
        policy_loss(logp, old, ADV, MASK, is_cap=2.0)
    with pytest.raises(ValueError, match="dual_clip must exceed"):
        policy_loss(logp, old, ADV, MASK, dual_clip=1.1)


if __name__ == "__main__":
    distributed_worker(sys.argv[1])
