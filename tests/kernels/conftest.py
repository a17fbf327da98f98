"""Shared fixtures of the kernel tests: relative error, NaN-poisoned allocations."""
import pytest
import torch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor, in float64 (0 when both are all zero)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), "non-finite values (a NaN-poisoned output not overwritten?)"
    denom = b.norm().item()
    num = (a - b).norm().item()
    return num if denom == 0 else num / denom


@pytest.fixture
def rel_err():
    return _rel_err


# per-dtype tolerance on the relative error of a whole tensor
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture
def tol():
    return TOL


@pytest.fixture
def poison(monkeypatch):
    """While active, torch.empty/empty_like hand out float tensors full of NaN (int tensors full of
    a huge value), so any output element a kernel fails to write shows up in the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield
