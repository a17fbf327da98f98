"""Each Triton kernel compiles once per shape class, not once per token count; launch configurations.

The interpreter compiles nothing, so the count is taken the way a GPU run would take it: every
launch is recorded (kernels.tuning.TunedKernel.__call__), and Triton's own binder for an sm_90
target (the code JITFunction.run uses to key its cache of compiled kernels) gives the compilation
key of each launch's arguments, constexprs and options. A launch over a new number of tokens must
land on a key already compiled, and on an autotune key already tuned.
"""
import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import attention as fa
from kernels import grpo_loss as gl
from kernels import logprobs as lp
from kernels import norm as rn
from kernels import tuning

SM90 = make_backend(GPUTarget("cuda", 90, 32))


def compile_key(kernel: tuning.TunedKernel, args, meta, config) -> str:
    """The key of Triton's cache of compiled kernels for this launch on sm_90 (specialisation of every
    argument: dtype, divisibility by 16, == 1; the constexprs; num_warps and num_stages)."""
    fn = kernel.fn
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn, **fn.kwargs)  # the interpreter's wrapper
    binder = create_function_from_signature(jit.signature, jit.params, SM90)
    _, specialization, options = binder(*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                        num_stages=config.num_stages)
    return repr((specialization, sorted(options.items())))


def tuning_key(kernel: tuning.TunedKernel, args, meta) -> tuple:
    """What triton.autotune keys its choice on: the `key` arguments' values and every tensor's dtype."""
    named = {**dict(zip(kernel.arg_names, args)), **meta}
    return tuple(named[k] for k in kernel.tuned.keys) + tuple(
        str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor))


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, compile key, tuning key, config) of every TunedKernel launch, which still runs."""
    seen = []
    real = tuning.TunedKernel.__call__

    def record(self, grid, *args, config=None, **meta):
        used = config or self.candidates(meta)[0]
        seen.append((self.fn.__name__, compile_key(self, args, meta, used), tuning_key(self, args, meta), used))
        return real(self, grid, *args, config=config, **meta)

    monkeypatch.setattr(tuning.TunedKernel, "__call__", record)
    return seen


def keys_by_kernel(seen) -> dict:
    """kernel name -> (the set of compile keys, the set of tuning keys) of the recorded launches."""
    out = {}
    for name, ck, tk, _ in seen:
        cks, tks = out.setdefault(name, (set(), set()))
        cks.add(ck)
        tks.add(tk)
    return out


def test_rms_norm_compiles_once_for_every_token_count(launches):
    D = 48
    w = torch.randn(D)
    per_n = {}
    for N in (1, 2, 7, 16, 17, 33, 100, 257):
        launches.clear()
        x = torch.randn(N, D, requires_grad=True)
        rn.rms_norm_triton(x, w).sum().backward()
        per_n[N] = keys_by_kernel(launches)
        assert set(per_n[N]) == {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"}
    for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
        compile_keys = set().union(*(per_n[N][kernel][0] for N in per_n))
        tuning_keys = set().union(*(per_n[N][kernel][1] for N in per_n))
        assert len(compile_keys) == 1, f"{kernel}: {len(compile_keys)} compilations over {sorted(per_n)} rows"
        assert len(tuning_keys) == 1, f"{kernel}: tuned {len(tuning_keys)} times"


def test_rms_norm_constexprs_follow_the_width_only():
    # the launchers' one constexpr, and the backward's runtime split of rows over programs
    assert rn._block_d(48) == rn._block_d(64) == 64 and rn._block_d(4096) == 4096
    for N in (1, 5, 8, 9, 1000):
        programs, rows = rn._bwd_programs(N, torch.device("cpu"))
        assert programs * rows >= N > (programs - 1) * rows  # every row once, no empty program


def test_grpo_loss_compiles_once_for_every_token_count(launches):
    per_n = []
    for B, T in ((1, 1), (2, 3), (4, 16), (3, 37), (8, 129)):
        launches.clear()
        lr = (torch.randn(B, T) * 0.3).requires_grad_(True)
        logp = (-torch.rand(B, T)).requires_grad_(True)
        out = gl.grpo_token_loss_triton(lr, torch.randn(B), torch.ones(B, T), dual_clip=3.0, beta=0.1, logp=logp,
                                        ref_logp=logp.detach() + 0.1, is_weight=torch.rand(B, T))
        out.loss.sum().backward()
        per_n.append(keys_by_kernel(launches))
    for kernel in ("_grpo_fwd_kernel", "_grpo_bwd_kernel"):
        assert len(set().union(*(k[kernel][0] for k in per_n))) == 1, kernel
        assert len(set().union(*(k[kernel][1] for k in per_n))) == 1, kernel


def test_token_logprobs_compiles_the_same_few_kernels_for_every_token_count(launches):
    # 300-column vocabulary blocks over V = 1000: a full block and the last one of 100 columns are two
    # tuning keys (the block width Vb), and at most two compilations (Vb is specialised on its
    # divisibility by 16: here neither is), whatever the token count
    D, V = 16, 1000
    weight = torch.randn(V, D) * 0.3
    per_n = []
    for N in (1, 3, 16, 17, 40):
        launches.clear()
        h = torch.randn(N, D, requires_grad=True)
        logp, ent = lp.token_logprobs_triton(h, weight, torch.randint(0, V, (N,)), 1.0, True, chunk_tokens=16,
                                             chunk_vocab=300)
        (logp.sum() + ent.sum()).backward()
        per_n.append(keys_by_kernel(launches))
    for kernel in ("_lse_tile_kernel", "_dz_tile_kernel"):
        compile_keys = [k[kernel][0] for k in per_n]
        assert all(keys == compile_keys[0] for keys in compile_keys), kernel
        assert len(compile_keys[0]) == 1, kernel
        assert len(set().union(*(k[kernel][1] for k in per_n))) == 2, kernel  # tuned once per block width


def test_flash_attention_compiles_once_for_every_batch(launches):
    g = torch.Generator().manual_seed(0)
    H, Hkv, D = 2, 1, 16
    per_batch = []
    batches = [dict(cu=[0, 5]), dict(cu=[0, 3, 17, 18]), dict(cu=[0, 16, 32]), dict(cu=[0, 1, 40, 41, 60]),
               dict(B=2, T=9), dict(B=1, T=32)]
    for b in batches:
        launches.clear()
        if "cu" in b:
            total = b["cu"][-1]
            shape_q, shape_k, cu = (total, H, D), (total, Hkv, D), torch.tensor(b["cu"], dtype=torch.int32)
        else:
            shape_q, shape_k, cu = (b["B"], b["T"], H, D), (b["B"], b["T"], Hkv, D), None
        q = torch.randn(shape_q, generator=g).requires_grad_(True)
        k = torch.randn(shape_k, generator=g).requires_grad_(True)
        v = torch.randn(shape_k, generator=g).requires_grad_(True)
        fa.flash_attention_triton(q, k, v, cu_seqlens=cu).sum().backward()
        per_batch.append(keys_by_kernel(launches))
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        assert len(set().union(*(k[kernel][0] for k in per_batch))) == 1, kernel
        assert len(set().union(*(k[kernel][1] for k in per_batch))) == 1, kernel


def test_interpreter_runs_the_first_configuration_of_each_list(launches):
    x = torch.randn(5, 48, requires_grad=True)
    rn.rms_norm_triton(x, torch.randn(48)).sum().backward()
    q = torch.randn(9, 2, 192)
    fa.flash_attention_triton(q, q[:, :1], torch.randn(9, 1, 128), cu_seqlens=torch.tensor([0, 9]))
    fa.flash_attention_triton(q.half()[:, :, :64], q.half()[:, :1, :64], q.half()[:, :1, :64],
                              cu_seqlens=torch.tensor([0, 9]))
    used = {name: config for name, _, _, config in launches}
    assert used["_rms_norm_fwd_kernel"] is rn.NORM_CONFIGS[0] and used["_rms_norm_bwd_kernel"] is rn.NORM_CONFIGS[0]
    configs = [c for name, _, _, c in launches if name == "_attn_fwd_kernel"]
    assert configs == [fa.ATTN_CONFIGS[(True, True)][0], fa.ATTN_CONFIGS[(False, False)][0]]
    assert (configs[1].kwargs["BLOCK_M"], configs[1].kwargs["BLOCK_N"]) == (64, 64)  # the pre-tuning tiles


def test_cuda_launches_go_through_autotune_with_the_grid_of_each_configuration(monkeypatch):
    # forced onto the CUDA branch: the autotuner gets the shape-class constexprs only (a tuned one
    # passed as well is an error in triton.autotune) and a grid that follows each configuration's tiles
    got = {}

    class Autotuner:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: got.setdefault(self.name, (grid, args, meta))

    for kernel in (fa._fwd, fa._dkdv, fa._dq):
        monkeypatch.setattr(kernel, "tuned", Autotuner(kernel.fn.__name__))
    monkeypatch.setattr(tuning, "_on_cuda", lambda args: True)
    cu = torch.tensor([0, 70, 75], dtype=torch.int32)
    q, k, v = torch.randn(75, 4, 128).half(), torch.randn(75, 2, 128).half(), torch.randn(75, 2, 128).half()
    o, lse = fa.attn_fwd(q, k, v, cu, cu, 70, 0.1, True)
    fa.attn_bwd(torch.randn_like(o), q, k, v, o, lse, cu, cu, 70, 70, 0.1, True)
    assert set(got) == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    for name, (grid, args, meta) in got.items():
        assert not {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} & set(meta), name
        kernel = {"_attn_fwd_kernel": fa._fwd, "_attn_bwd_dkdv_kernel": fa._dkdv, "_attn_bwd_dq_kernel": fa._dq}[name]
        candidates = kernel.candidates(meta)
        assert candidates == fa.ATTN_CONFIGS[(False, False)] and len(candidates) >= 2
        for c in candidates:
            rows, blocks = grid({**meta, **c.kwargs})
            tile = c.kwargs["BLOCK_N"] if name == "_attn_bwd_dkdv_kernel" else c.kwargs["BLOCK_M"]
            heads = 2 if name == "_attn_bwd_dkdv_kernel" else 4
            assert (rows, blocks) == (2 * heads, -(-70 // tile)), (name, c.kwargs)


def test_timing_runs_of_in_place_kernels_leave_no_trace():
    # autotune runs a kernel once per configuration before the real launch; the log-sum-exp pass
    # updates its state in place, and the dz pass may overwrite its own input, so both have their
    # in-place arguments restored around each timing run (Autotuner's hooks, from restore_value)
    C, Vb, V = 6, 50, 50
    g = torch.Generator().manual_seed(0)
    z = torch.randn(C, Vb, generator=g) * 3
    targets = torch.randint(0, V, (C,), generator=g)

    def fresh():
        return [torch.full((C,), float("-inf")), torch.zeros(C), torch.zeros(C), torch.zeros(C)]

    def lse_args(state):
        return (z, z.stride(0), targets, *state, 0, Vb, 0, 1.0)

    def timed_then_real(kernel, args, meta, restore):
        nargs = dict(zip(kernel.arg_names, args))
        for c in kernel.configs:   # what Autotuner._bench does around each timing run
            if restore:
                kernel.tuned.pre_hook(nargs)
            kernel((C,), *args, config=c, **meta)
            if restore:
                kernel.tuned.post_hook(nargs, exception=None)
        kernel((C,), *args, **meta)

    once = fresh()
    lp._lse((C,), *lse_args(once))
    tuned, untuned = fresh(), fresh()
    timed_then_real(lp._lse, lse_args(tuned), {}, restore=True)
    timed_then_real(lp._lse, lse_args(untuned), {}, restore=False)
    assert all(torch.equal(a, b) for a, b in zip(once, tuned))
    assert not torch.equal(once[1], untuned[1])  # without the restore the state would be folded in 5 times

    lse, ez = torch.logsumexp(z, 1), torch.zeros(C)
    g_lp = torch.randn(C, generator=g)

    def dz_args(tile):  # fp32 inputs: dz is written over the logits tile itself
        return (tile, tile.stride(0), tile, tile.stride(0), targets, lse, ez, g_lp, g_lp, 0, Vb, 0, 1.0)

    once, tuned, untuned = z.clone(), z.clone(), z.clone()
    lp._dz((C,), *dz_args(once), HAS_GENT=False)
    timed_then_real(lp._dz, dz_args(tuned), {"HAS_GENT": False}, restore=True)
    timed_then_real(lp._dz, dz_args(untuned), {"HAS_GENT": False}, restore=False)
    assert torch.equal(once, tuned) and not torch.equal(once, untuned)
