"""`triton` and `triton.language`, or inert stand-ins where Triton is not installed.

setup.py installs Triton on Linux only, yet the CPU path (the torch twins) must run on any laptop:
every kernel module imports `triton, tl` from here, so its `@triton.jit` definitions still load
without Triton, and launching one raises a clear error instead. kernels.backend never picks the
Triton path when HAVE_TRITON is False (auto falls back to the twins; KERNELS_BACKEND=triton is an
error). `triton.Config` and `triton.autotune` have stand-ins too, so that kernels.tuning's
configuration lists load (the autotune decorator then returns the refusing kernel unchanged).
"""
try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # Triton ships wheels for Linux only
    HAVE_TRITON = False

    class _MissingKernel:
        """What @triton.jit returns without Triton: keeps the function, refuses to launch."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not installed, so kernel {self.fn.__name__} cannot run; "
                               "use KERNELS_BACKEND=torch (or auto) for the torch path")

    class _Config:
        """triton.Config's fields, for the configuration lists (nothing runs them)."""

        def __init__(self, kwargs, num_warps=4, num_stages=3, **_):
            self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages

    class _TritonStandIn:
        Config = _Config

        @staticmethod
        def jit(fn=None, **_):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def autotune(configs, key, **_):
            return lambda kernel: kernel

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _LanguageStandIn:
        constexpr = object  # only ever used as a parameter annotation

    triton, tl = _TritonStandIn(), _LanguageStandIn()

__all__ = ["triton", "tl", "HAVE_TRITON"]
