"""flash_attention's max_seqlen: given, the GPU paths read nothing back to the host (no copy of
cu_seqlens, so no sync on CUDA), forward and backward, and the results equal the default's (the
longest sequence found from cu_seqlens)."""
import contextlib
import sys
import types

import pytest
import torch

from kernels import attention as fa
from tests.kernels.test_flash_attention import make, run

# every way a tensor's value reaches Python (on CUDA each is a copy to the host and a sync)
HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
_ORIGINAL = {name: getattr(torch.Tensor, name) for name in HOST_READS}


class HostRead(AssertionError):
    pass


def _refuse(name):
    def read(self, *args, **kwargs):
        raise HostRead(f"Tensor.{name} read a tensor's value back to the host")
    return read


@contextlib.contextmanager
def host_reads(allowed: bool):
    """While active, reading a tensor's value into Python raises HostRead (allowed=False) or works."""
    before = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, _ORIGINAL[name] if allowed else _refuse(name))
        yield
    finally:
        for name, fn in before.items():
            setattr(torch.Tensor, name, fn)


PACKED = [0, 10, 11, 33, 40]  # documents of 10, 1, 22 and 7 tokens


def _packed(dtype=torch.float32, seed=0, dv=16):
    q, k, v, do = make((40,), (40,), 4, 2, 24, dv, dtype, seed=seed)
    return q, k, v, do, torch.tensor(PACKED, dtype=torch.int32)


def test_triton_path_with_max_seqlen_reads_nothing_back(poison):
    q, k, v, do, cu = _packed()
    tiles = dict(block_m=16, block_n=16)
    default = run(fa.flash_attention_triton, q, k, v, do, cu_seqlens=cu, **tiles)
    for given in (22, 40):  # the longest document, and an upper bound (more programs, which exit at once)
        with host_reads(allowed=False):  # forward and backward
            got = run(fa.flash_attention_triton, q, k, v, do, cu_seqlens=cu, max_seqlen=given, **tiles)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, default):
            assert torch.equal(a, b), (given, name)


def test_without_max_seqlen_the_triton_path_reads_cu_seqlens_back():
    # the guard does catch what the default path does: checking cu_seqlens and finding its longest sequence
    q, k, v, _, cu = _packed()
    with pytest.raises(HostRead), host_reads(allowed=False):
        fa.flash_attention_triton(q, k, v, cu_seqlens=cu)


def test_flash_attn_path_with_max_seqlen_reads_nothing_back(monkeypatch, rel_err):
    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        calls.append((type(max_q), max_q, max_k, cu_q.dtype))
        with host_reads(allowed=True):  # flash-attn's own (CUDA) code stands outside the check
            return fa.flash_attention_torch(q, k, v, causal, softmax_scale, cu_q)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(fa, "_on_cuda", lambda q: True)
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    fa._flash_attn_varlen.cache_clear()
    try:
        q, k, v, _, cu = _packed(torch.float16, dv=24)
        with host_reads(allowed=False):
            o = fa.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=22)
        assert calls == [(int, 22, 22, torch.int32)]
        assert rel_err(o, fa.flash_attention_torch(q, k, v, cu_seqlens=cu)) <= 1e-2
    finally:
        fa._flash_attn_varlen.cache_clear()


def test_bad_max_seqlen_raises():
    q, k, v, _, cu = _packed()
    with pytest.raises(ValueError, match="max_seqlen must be a Python int"):
        fa.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=41)
    with pytest.raises(ValueError, match="max_seqlen must be a Python int"):
        fa.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=torch.tensor(22))
    with pytest.raises(ValueError, match="max_seqlen goes with cu_seqlens"):
        fa.flash_attention(q[None], k[None], v[None], max_seqlen=40)
