"""KERNELS_BACKEND dispatch: auto = Triton on CUDA tensors, torch twin on CPU tensors."""
import pytest
import torch

import kernels
from kernels import backend


def test_auto_picks_torch_on_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    assert backend.use_triton(torch.zeros(1)) is False
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    assert backend.use_triton(torch.zeros(1)) is False


def test_explicit_choices(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    assert backend.use_triton(torch.zeros(1)) is True
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert backend.use_triton(torch.zeros(1)) is False


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backend.use_triton(torch.zeros(1))


def test_public_rms_norm_follows_the_variable(monkeypatch):
    calls = []
    real = kernels.norm._RMSNormTriton.apply
    monkeypatch.setattr(kernels.norm._RMSNormTriton, "apply",
                        lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(5, 16), torch.randn(16)
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    y_auto = kernels.rms_norm(x, w)
    assert calls == []
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    y_triton = kernels.rms_norm(x, w)
    assert calls == [1]
    torch.testing.assert_close(y_auto, y_triton, rtol=1e-5, atol=1e-6)
