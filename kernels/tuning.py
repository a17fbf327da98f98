"""Launch configurations of the Triton kernels: a few autotuned ones on CUDA, one fixed one elsewhere.

Every kernel module wraps each of its @triton.jit kernels in a TunedKernel, with a short list of
triton.Config (tile sizes, num_warps, num_stages) written for Hopper (sm_90: 227 KiB of shared
memory per block, 64K 32-bit registers per SM). How a launch picks its configuration:

- CUDA tensors: triton.autotune. The first launch of each tuning key times every configuration
  that applies (`prune` drops those meant for another shape class) and keeps the fastest for the
  rest of the process. The key is the shape class only: head dims, model width, flags, and the
  dtype of every tensor argument (autotune adds those), never a token count, so a training run
  tunes once per kernel and shape class, not once per batch.
- anything else (Triton's CPU interpreter in the tests): the first applicable configuration,
  always. Timing means nothing there and every configuration would cost seconds, so the first one
  of each list is the one the interpreter tests check (and the one the kernels used before they
  were tuned).
- an explicit `config=` (tests that want small tiles): that configuration, no tuning.

Compiling once per shape class: a kernel's constexprs come only from the shape class (BLOCK_D from
the model width, head-dim paddings, flags, tile sizes) and token counts are runtime arguments. Triton
also specialises plain integer arguments on their value (== 1, divisible by 16), so a count or a
stride that follows the number of tokens is listed in the kernel's `do_not_specialize`;
tests/kernels/test_compile_once.py checks with Triton's own specialisation that launches over many
token counts share one compilation key.

kernels.compile_check builds every configuration of every kernel for sm_90 (`compile_specs`).
"""
import inspect

import torch

from kernels.compile_spec import CompileSpec
from kernels.triton_import import triton


def _on_cuda(args) -> bool:
    return next((a.is_cuda for a in args if isinstance(a, torch.Tensor)), False)


def describe(config) -> str:
    """A configuration as one short string, e.g. "BLOCK_M=64 BLOCK_N=64 w4 s2"."""
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return (tiles + " " if tiles else "") + f"w{config.num_warps} s{config.num_stages}"


class TunedKernel:
    """A @triton.jit kernel `fn` and its launch configurations.

    configs: triton.Config list, the fixed (interpreter) configuration first; key: the argument
    names whose values form the tuning key; prune(configs, named_args, **meta) -> the configs that
    apply to a launch with constexpr meta-parameters `meta` (its shape class); restore_value: the
    arguments the kernel updates in place, which autotune saves and restores around each timing run.
    """

    def __init__(self, fn, configs, key, prune=None, restore_value=None):
        assert configs, "a TunedKernel needs at least one configuration"
        self.fn = fn
        self.configs = list(configs)
        self.prune = prune
        self.arg_names = list(inspect.signature(fn.fn).parameters)
        self.tuned = triton.autotune(self.configs, key=list(key),
                                     prune_configs_by={"early_config_prune": prune} if prune else None,
                                     restore_value=restore_value)(fn)

    def candidates(self, meta: dict) -> list:
        """The configurations that apply to a launch with these constexpr meta-parameters."""
        if self.prune is None:
            return list(self.configs)
        kept = list(self.prune(self.configs, {}, **meta))
        assert kept, f"{self.fn.__name__}: no configuration for {meta}"
        return kept

    def __call__(self, grid, *args, config=None, **meta):
        """Launch over `grid`: a tuple, or a function of the launch's meta-parameters (the tile sizes
        included) returning one. Autotuned on CUDA tensors unless `config` is given; otherwise
        `config`, or the first candidate."""
        if config is None and _on_cuda(args):
            return self.tuned[grid](*args, **meta)
        config = config or self.candidates(meta)[0]
        meta = {**meta, **config.kwargs}
        return self.fn[grid(meta) if callable(grid) else grid](
            *args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

    def compile_specs(self, name: str, dtype: str, signature: dict, meta: dict) -> list[CompileSpec]:
        """One CompileSpec per candidate configuration, for kernels.compile_check: `signature` maps
        every argument to its Triton type, `meta` gives the launcher's constexprs."""
        return [CompileSpec(name, dtype, self.fn, signature, {**meta, **c.kwargs}, num_warps=c.num_warps,
                            num_stages=c.num_stages, config=describe(c))
                for c in self.candidates(meta)]
