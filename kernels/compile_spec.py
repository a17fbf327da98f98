"""CompileSpec: one GPU build of a Triton kernel, as a kernel module lists them in `compile_specs()`.

The kernel modules describe their launch configurations with it and kernels/compile_check.py
builds them; it lives in a file of its own so that neither of the two imports the other for it.
"""
import dataclasses


@dataclasses.dataclass
class CompileSpec:
    """One kernel build: `signature` maps each argument to a Triton type ("*fp16", "i32",
    "fp32", "constexpr"); `constexprs` gives the constexpr values the launcher uses, tile sizes
    included; `config` names the autotune configuration (kernels.tuning.describe)."""
    name: str
    dtype: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    config: str = ""
