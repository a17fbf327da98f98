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

Compilation: the kernels' only constexpr is BLOCK_D = next_power_of_2(D); the number of rows N and
the rows per backward program are runtime arguments (not specialised), and the grids follow N, so
a new token count never compiles anything (tests/kernels/test_compile_once.py). On CUDA the number
of warps is autotuned per (D, dtypes) among NORM_CONFIGS; the interpreter runs the first.

Layout: jit kernels, launch configurations, host launchers, autograd.Function, the torch twin, the
public function, compile_specs().
"""
import torch

from kernels.backend import use_triton
from kernels.triton_import import tl, triton
from kernels.tuning import TunedKernel


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


@triton.jit(do_not_specialize=["N", "rows_per_program"])
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, D, rows_per_program,
                         BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
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


# one row per program (fwd) or a range of rows (bwd): only the warps are tuned; 4 warps first (the
# interpreter's), 8 and 16 for the wide rows of real models (D = 4096..8192 is 32..64 fp32 per thread)
NORM_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 16)]
_fwd = TunedKernel(_rms_norm_fwd_kernel, NORM_CONFIGS, key=["D"])
_bwd = TunedKernel(_rms_norm_bwd_kernel, NORM_CONFIGS, key=["D"])


# ---------------------------------------------------------------- host launchers

def _block_d(D: int) -> int:
    """The kernels' one constexpr: a whole row in one block, D padded to a power of two."""
    return triton.next_power_of_2(D)


def _bwd_programs(N: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of the backward, runtime values both: enough programs to fill
    the GPU (4 per SM), few enough that the [programs, D] fp32 partials stay small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    programs = max(1, min(N, 4 * sms))
    rows = triton.cdiv(max(N, 1), programs)
    return triton.cdiv(max(N, 1), rows), rows


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [N, D] (last dim contiguous) -> (y [N, D] in x2's dtype, rstd [N] fp32)."""
    N, D = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(N, dtype=torch.float32, device=x2.device)
    if N > 0:
        _fwd((N,), x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=_block_d(D))
    return y, rstd


def rms_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, D], x [N, D], weight [D], rstd [N]) -> (dx [N, D] in x's dtype, dweight [D] in weight's dtype)."""
    N, D = x2.shape
    dx = torch.empty_like(x2)
    programs, rows = _bwd_programs(N, x2.device)
    partial = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
    _bwd((programs,), dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0), N, D, rows,
         BLOCK_D=_block_d(D))
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
    """Every configuration of both kernels for x in fp32/fp16/bf16 (weight in x's dtype), for
    kernels.compile_check."""
    specs = []
    meta = {"BLOCK_D": _block_d(D)}
    for dt in TRITON_DTYPES.values():
        p = "*" + dt
        specs += _fwd.compile_specs("rms_norm_fwd", dt, {
            "X": p, "W": p, "Y": p, "RSTD": "*fp32", "stride_x": "i32", "stride_y": "i32", "D": "i32", "eps": "fp32",
            "BLOCK_D": "constexpr"}, meta)
        specs += _bwd.compile_specs("rms_norm_bwd", dt, {
            "DY": p, "X": p, "W": p, "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32", "stride_dy": "i32",
            "stride_x": "i32", "stride_dx": "i32", "N": "i32", "D": "i32", "rows_per_program": "i32",
            "BLOCK_D": "constexpr"}, meta)
    return specs
