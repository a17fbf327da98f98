"""rms_norm: the Triton kernel (in Triton's interpreter) and the torch twin against a float64 reference."""
import pytest
import torch

from kernels import norm as rn


def reference(x, w, eps):
    """RMSNorm in float64 from its definition."""
    x64, w64 = x.double(), w.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w64


def run(fn, x, w, dy, eps):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 48), (3, 5, 100)])
def test_matches_twin_and_float64(shape, dtype, rel_err, tol, poison):
    g = torch.Generator().manual_seed(sum(shape) * 10 + (dtype == torch.float16))
    D, eps = shape[-1], 1e-6
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = run(reference, x, w, dy, eps)
    tri = run(rn.rms_norm_triton, x, w, dy, eps)
    twin = run(rn.rms_norm_torch, x, w, dy, eps)
    for name, a, b, r in zip(("y", "dx", "dw"), tri, twin, ref):
        assert a.dtype == b.dtype == (x.dtype if name != "dw" else w.dtype), name
        assert rel_err(a, r) <= tol[dtype], f"triton {name} vs float64"
        assert rel_err(b, r) <= tol[dtype], f"torch twin {name} vs float64"
        assert rel_err(a, b) <= tol[dtype], f"triton {name} vs twin"


def test_bf16_twin_matches_float64(rel_err, tol):
    x = torch.randn(37, 48).bfloat16()
    w = torch.randn(48).bfloat16()
    dy = torch.randn(37, 48, dtype=torch.float64)
    for name, a, r in zip(("y", "dx", "dw"), run(rn.rms_norm_torch, x, w, dy, 1e-5), run(reference, x, w, dy, 1e-5)):
        assert rel_err(a, r) <= tol[torch.bfloat16], name


def test_strided_input_and_fp32_weight_with_fp16_x(rel_err, tol):
    # a non-contiguous x (a slice of a wider tensor) and a weight kept in fp32 while x is fp16
    base = torch.randn(37, 96).half()
    x = base[:, 10:58]
    w = torch.randn(48)
    dy = torch.randn(37, 48, dtype=torch.float64)
    for name, a, r in zip(("y", "dx", "dw"), run(rn.rms_norm_triton, x, w, dy, 1e-6), run(reference, x, w, dy, 1e-6)):
        assert rel_err(a, r) <= tol[torch.float16], name


def test_bad_input_raises():
    with pytest.raises(ValueError, match="weight must be"):
        rn.rms_norm(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(ValueError, match="eps"):
        rn.rms_norm(torch.randn(4, 8), torch.randn(8), eps=0.0)
