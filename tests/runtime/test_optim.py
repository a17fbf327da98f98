"""runtime/optim.py: AdamW parameter groups, the learning-rate schedule, set_lr."""
import math

import pytest
import torch
from torch import nn

from runtime.optim import build_optimizer, lr_schedule, param_groups, set_lr


class Small(nn.Module):
    """An embedding, a linear with bias, a norm gain, a frozen matrix, a tied head and a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm_weight = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("e_score_correction_bias", torch.zeros(4))


def group_names(opt):
    return [(g["param_names"], g["weight_decay"]) for g in opt.param_groups]


def test_groups_split_matrices_from_vectors():
    opt = build_optimizer(Small(), lr=1e-3, weight_decay=0.1)
    # matrices (embedding included, the tied head counted once) decay; bias and gain do not;
    # the frozen matrix and the buffer are not optimised at all. Order: named_parameters()'s
    # (a module's own parameters before its submodules')
    assert group_names(opt) == [(["embed.weight", "proj.weight"], 0.1), (["norm_weight", "proj.bias"], 0.0)]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-3


def test_no_decay_names_override_the_shape_rule():
    class WithBiasMatrix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 3))
            self.e_score_correction_bias = nn.Parameter(torch.zeros(2, 3))  # 2-D, but named as never-decay

    groups = param_groups(WithBiasMatrix(), weight_decay=0.1)
    assert [[n for n, _ in g["params"]] for g in groups] == [["w"], ["e_score_correction_bias"]]
    groups = param_groups(Small(), weight_decay=0.1, no_decay_names=("embed",))
    assert [[n for n, _ in g["params"]] for g in groups] == [["proj.weight"],
                                                             ["norm_weight", "embed.weight", "proj.bias"]]


def test_single_group_when_no_vectors_and_errors():
    opt = build_optimizer(nn.Linear(3, 3, bias=False), lr=1e-3)
    assert group_names(opt) == [(["weight"], 0.1)]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        build_optimizer(frozen, lr=1e-3)
    with pytest.raises(ValueError, match="lr=-1"):
        build_optimizer(nn.Linear(2, 2), lr=-1)


def test_decay_applies_only_to_the_decay_group():
    # zero gradients: AdamW's update is then only the decoupled decay p -= lr * wd * p
    m = Small()
    opt = build_optimizer(m, lr=0.5, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.embed.weight, before["embed.weight"] * 0.95)
    assert torch.allclose(m.proj.weight, before["proj.weight"] * 0.95)
    assert torch.equal(m.proj.bias, before["proj.bias"])
    assert torch.equal(m.norm_weight, before["norm_weight"])


KW = dict(max_lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.25), (1, 0.5), (3, 1.0),   # warmup: (step + 1) / 4
    (4, 1.0),                         # decay starts at max_lr
    (9, 0.55),                        # halfway: 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    (14, 0.1), (50, 0.1),             # min_lr at and after max_steps
])
def test_cosine_schedule_values(step, expected):
    assert lr_schedule(step, **KW) == pytest.approx(expected, abs=1e-12)


def test_cosine_quarter_and_realistic_values():
    # progress 1/4: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.45 * 1.70710678 = 0.86819805
    assert lr_schedule(6, max_lr=1.0, warmup_steps=4, max_steps=12) == pytest.approx(0.8681980515, abs=1e-9)
    assert lr_schedule(49, max_lr=3e-4, warmup_steps=100, max_steps=1000) == pytest.approx(1.5e-4)
    # no warmup: the first step already uses max_lr
    assert lr_schedule(0, max_lr=2e-3, warmup_steps=0, max_steps=10) == pytest.approx(2e-3)


def test_linear_and_constant_schedules():
    assert lr_schedule(9, **KW, kind="linear") == pytest.approx(0.55)      # 1 - 0.9 * 0.5
    assert lr_schedule(6, **KW, kind="linear") == pytest.approx(0.82)      # 1 - 0.9 * 0.2
    assert lr_schedule(14, **KW, kind="linear") == pytest.approx(0.1)
    assert lr_schedule(1, **KW, kind="constant") == pytest.approx(0.5)     # warmup still applies
    assert lr_schedule(100, **KW, kind="constant") == 1.0


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind 'step'"):
        lr_schedule(0, **KW, kind="step")
    with pytest.raises(ValueError, match="warmup_steps=20, max_steps=10"):
        lr_schedule(0, max_lr=1.0, warmup_steps=20, max_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio=1.5"):
        lr_schedule(0, max_lr=1.0, warmup_steps=0, max_steps=10, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="step=-1"):
        lr_schedule(-1, **KW)


def test_set_lr_sets_every_group():
    opt = build_optimizer(Small(), lr=1e-3)
    set_lr(opt, 2.5e-4)
    assert [g["lr"] for g in opt.param_groups] == [2.5e-4, 2.5e-4]
    with pytest.raises(ValueError, match="nan"):
        set_lr(opt, math.nan)
