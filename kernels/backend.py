"""Which implementation a public kernel function runs, chosen per call from KERNELS_BACKEND.

    KERNELS_BACKEND=auto    (default) Triton on CUDA tensors, the torch twin on CPU tensors,
                            whatever TRITON_INTERPRET says: model code on CPU never crawls through
                            Triton's interpreter unless asked to. (flash_attention refines this:
                            on CUDA it runs flash-attn's varlen kernel when that is installed
                            and takes the shapes, and where auto does not pick Triton it runs
                            flash_attention_sdpa, torch's fused SDPA per document, tested equal
                            to the twin.)
    KERNELS_BACKEND=triton  always Triton; CPU tensors then need TRITON_INTERPRET=1 (Triton's CPU
                            interpreter, what the kernel tests use).
    KERNELS_BACKEND=torch   always the plain-torch twin (the spec), on any device.

Without Triton installed (it ships for Linux only), auto always picks the torch twins.

The variable is read on every call, so a test or a benchmark can switch it with monkeypatch or
os.environ without re-importing anything.
"""
import os

import torch

from kernels.triton_import import HAVE_TRITON

BACKENDS = ("auto", "triton", "torch")


def backend_name() -> str:
    """The value of KERNELS_BACKEND (default "auto"), checked against BACKENDS."""
    name = os.environ.get("KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable KERNELS_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def use_triton(x: torch.Tensor) -> bool:
    """True when the call with leading tensor `x` should run the Triton kernel, False for the torch twin."""
    name = backend_name()
    if name == "torch":
        return False
    if name == "auto":
        return x.is_cuda and HAVE_TRITON
    if not HAVE_TRITON:
        raise ValueError("KERNELS_BACKEND=triton but Triton is not installed (it ships for Linux); "
                         "use KERNELS_BACKEND=auto or torch")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"KERNELS_BACKEND=triton got a tensor on {x.device}: Triton runs on CUDA tensors, or on CPU "
            "tensors only under TRITON_INTERPRET=1 (set before triton is imported); use "
            "KERNELS_BACKEND=auto or torch for the CPU path")
    return True
