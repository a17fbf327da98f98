"""runtime/train_step.py: global gradient norm and clipping, the non-finite guard, optimizer_step."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from runtime.optim import build_optimizer
from runtime.train_step import NonFiniteError, NonFiniteGuard, clip_grad_norm_, optimizer_step

ROOT = Path(__file__).resolve().parents[2]


def two_params():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1, 1))
    a.grad = torch.tensor([3.0, 4.0])   # norm 5
    b.grad = torch.tensor([[12.0]])     # norm 12; together sqrt(25 + 144) = 13
    return a, b


def test_clip_grad_norm_returns_global_norm_and_scales():
    a, b = two_params()
    assert clip_grad_norm_([a, b], max_norm=6.5) == pytest.approx(13.0)
    scale = 6.5 / (13.0 + 1e-6)  # torch's clip coefficient
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) * scale)
    assert torch.allclose(b.grad, torch.tensor([[12.0]]) * scale)
    assert clip_grad_norm_([a, b], max_norm=0) == pytest.approx(6.5, rel=1e-6)  # measured after clipping


def test_clip_grad_norm_measure_only_and_below_threshold():
    a, b = two_params()
    assert clip_grad_norm_([a, b], max_norm=0) == pytest.approx(13.0)
    assert clip_grad_norm_([a, b], max_norm=100.0) == pytest.approx(13.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0]))  # neither call changed anything
    c = nn.Parameter(torch.zeros(3))  # no grad: ignored
    assert clip_grad_norm_([c], max_norm=1.0) == 0.0


def test_clip_grad_norm_leaves_nonfinite_grads_alone():
    a, b = two_params()
    a.grad[0] = float("inf")
    assert clip_grad_norm_([a, b], max_norm=1.0) == math.inf
    assert torch.equal(b.grad, torch.tensor([[12.0]]))


def train_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = build_optimizer(model, lr=0.1)
    loss = model(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    return model, opt, loss


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))


def test_nan_loss_skips_and_leaves_params_unchanged():
    model, opt, loss = train_setup()
    before = snapshot(model)
    guard = NonFiniteGuard(max_in_a_row=3)
    result = optimizer_step(model, opt, loss=loss * float("nan"), max_grad_norm=1.0, guard=guard, lr=0.1)
    assert result.skipped and math.isfinite(result.grad_norm)
    assert same(model, before)
    assert len(opt.state) == 0  # Adam's moments and step count untouched
    assert all(p.grad is None for p in model.parameters())  # the bad step's gradients are dropped
    assert guard.state_dict() == {"skipped_total": 1, "skipped_in_a_row": 1}


def test_inf_grad_skips():
    model, opt, loss = train_setup()
    before = snapshot(model)
    model[0].weight.grad[0, 0] = float("inf")
    guard = NonFiniteGuard()
    result = optimizer_step(model, opt, loss=loss, max_grad_norm=1.0, guard=guard, lr=0.1)
    assert result.skipped and result.grad_norm == math.inf
    assert same(model, before) and len(opt.state) == 0


def test_finite_step_applies_clipped_update_with_lr():
    model, opt, loss = train_setup()
    ref = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ref.load_state_dict(model.state_dict())
    for p, q in zip(ref.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    ref_opt = build_optimizer(ref, lr=0.03)
    ref_opt.step()

    result = optimizer_step(model, opt, loss=loss, max_grad_norm=0.01, guard=NonFiniteGuard(), lr=0.03)
    assert not result.skipped and result.lr == 0.03
    assert result.grad_norm == pytest.approx(float(ref_norm))
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_guard_counts_and_raises_after_n_in_a_row():
    guard = NonFiniteGuard(max_in_a_row=3)
    nan = float("nan")
    assert guard.should_skip(nan, 1.0) and guard.should_skip(1.0, math.inf)
    assert not guard.should_skip(torch.tensor(0.5), 1.0)  # a good step resets the run of skips
    assert guard.state_dict() == {"skipped_total": 2, "skipped_in_a_row": 0}
    assert guard.should_skip(torch.tensor([1.0, nan]), 1.0)
    assert guard.should_skip(nan, 1.0)
    with pytest.raises(NonFiniteError,
                       match=r"3 optimizer steps in a row.*5 skipped in total.*Lower the learning rate"):
        guard.should_skip(None, math.nan)


def test_guard_state_round_trip_and_errors():
    guard = NonFiniteGuard(max_in_a_row=2)
    guard.should_skip(math.nan, 1.0)
    restored = NonFiniteGuard(max_in_a_row=2)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        restored.should_skip(math.nan, 1.0)  # the run of skips continues across a resume
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"skipped_total": 1})
    with pytest.raises(ValueError, match="max_in_a_row=0"):
        NonFiniteGuard(max_in_a_row=0)


@pytest.mark.distributed
def test_fsdp_two_ranks_global_norm_and_collective_skip(tmp_path):
    out = tmp_path / "norm"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "runtime" / "_grad_norm_worker.py"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for rec in recs:
        # the sharded norm is the whole model's: equal to the unsharded reference on every rank
        assert rec["fsdp_norm"] == pytest.approx(rec["plain_norm"], rel=1e-6)
        assert rec["fsdp_norm"] > 0.5 and rec["clipped_norm"] == pytest.approx(0.5, rel=1e-5)
        # only rank 1 saw a NaN loss, yet both ranks skipped and kept their shards
        assert rec["skipped"] and rec["params_unchanged"] and rec["skipped_total"] == 1
    assert recs[0]["fsdp_norm"] == recs[1]["fsdp_norm"]
    # build_optimizer splits FSDP2's DTensor parameters by their global shapes, as for plain ones
    assert recs[0]["dtensor_params"]
    assert recs[0]["groups"] == [[["0.weight", "2.weight"], 0.1], [["0.bias", "2.bias"], 0.0]]
