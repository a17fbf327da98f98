"""RMSNorm, fused forward and backward.

    y = x / sqrt(mean(x**2, dim=-1) + eps) * weight          (Zhang & Sennrich, 2019)

Contract (both paths): x [..., D] of fp32/fp16/bf16, weight [D] (any float dtype), eps > 0;
y has x's shape and dtype. The arithmetic is done in fp32 and rounded once at the end, so the
low-precision result is the fp32 result rounded (Hugging Face's Llama/Qwen RMSNorm rounds the
normalised x to x's dtype before the weight multiply; the two differ by one rounding).

Backward, with xhat = x * rstd, rstd = 1 / sqrt(mean(x**2) + eps), g = dy * weight:
    dx = rstd * (g - xhat * mean(g * xhat, dim=-1))
    dweight = sum over rows of dy * xhat
The Triton backward gives each program a contiguous range of rows and writes one fp32 partial
dweight per program; the partials are summed on the host (deterministic, no atomics).

Layout: jit kernels, host launchers, autograd.Function, the torch twin, the public function.
"""
import torch

from kernels.backend import use_triton
from kernels.compile_spec import CompileSpec
from kernels.triton_import import tl, triton


# ---------------------------------------------------------------- jit kernels

@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, D,
                         ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        if row < N:
            x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
            dw += dy * xhat
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=ok)


# ---------------------------------------------------------------- host launchers

def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [N, D] (last dim contiguous) -> (y [N, D] in x2's dtype, rstd [N] fp32)."""
    N, D = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(N, dtype=torch.float32, device=x2.device)
    if N > 0:
        BLOCK_D = _block_d(D)
        _rms_norm_fwd_kernel[(N,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps,
                                   BLOCK_D=BLOCK_D, num_warps=min(max(BLOCK_D // 256, 1), 16))
    return y, rstd


def rms_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, D], x [N, D], weight [D], rstd [N]) -> (dx [N, D] in x's dtype, dweight [D] in weight's dtype)."""
    N, D = x2.shape
    dx = torch.empty_like(x2)
    # enough programs to fill a GPU, few enough that the [programs, D] partials stay small
    programs = max(1, min(N, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                          if x2.is_cuda else 8))
    rows_per_program = triton.cdiv(max(N, 1), programs)
    programs = triton.cdiv(max(N, 1), rows_per_program)
    partial = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
    BLOCK_D = _block_d(D)
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0),
                                      dx.stride(0), N, D, ROWS_PER_PROGRAM=rows_per_program,
                                      BLOCK_D=BLOCK_D, num_warps=min(max(BLOCK_D // 256, 1), 16))
    return dx, partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------- autograd

class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = rms_norm_fwd(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = rms_norm_bwd(dy2, x2, weight.contiguous(), rstd)
        return dx.view(dy.shape), dw, None


# ---------------------------------------------------------------- public functions

def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [D] with D = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps}")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The plain-torch twin (the spec and the CPU path); autograd differentiates it."""
    _check(x, weight, eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    return (xf * rstd * weight.float()).to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The fused Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, weight, eps)
    return _RMSNormTriton.apply(x, weight, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x [..., D] with weight [D]; the backend follows KERNELS_BACKEND (see kernels.backend)."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


# ---------------------------------------------------------------- GPU build configurations

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs(D: int = 4096):
    """The launches above for x in fp32/fp16/bf16 (weight in x's dtype), for kernels.compile_check."""
    BLOCK_D = _block_d(D)
    warps = min(max(BLOCK_D // 256, 1), 16)
    specs = []
    for dt in TRITON_DTYPES.values():
        p = "*" + dt
        specs.append(CompileSpec("rms_norm_fwd", dt, _rms_norm_fwd_kernel,
                                 {"X": p, "W": p, "Y": p, "RSTD": "*fp32", "stride_x": "i32", "stride_y": "i32",
                                  "D": "i32", "eps": "fp32", "BLOCK_D": "constexpr"},
                                 {"BLOCK_D": BLOCK_D}, num_warps=warps))
        specs.append(CompileSpec("rms_norm_bwd", dt, _rms_norm_bwd_kernel,
                                 {"DY": p, "X": p, "W": p, "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32",
                                  "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "N": "i32", "D": "i32",
                                  "ROWS_PER_PROGRAM": "constexpr", "BLOCK_D": "constexpr"},
                                 {"ROWS_PER_PROGRAM": 16, "BLOCK_D": BLOCK_D}, num_warps=warps))
    return specs
