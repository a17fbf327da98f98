"""Triton kernels, each with a plain-torch twin (the spec, the CPU path and the test oracle).

Public functions (autograd-aware; the backend is chosen per call by KERNELS_BACKEND=auto|triton|torch,
see kernels.backend: auto runs Triton on CUDA tensors and the torch twin on CPU tensors, except
flash_attention, which runs its SDPA path there):

    token_logprobs(hidden[N, D], weight[V, D], targets[N], temperature=1.0, with_entropy=False)
        -> logp[N] fp32 (, entropy[N] fp32); never holds [N, V] logits; fp32 logits
        tiles whatever the inputs' dtype                                        kernels/logprobs.py
    flash_attention(q[B, T, H, Dqk], k[B, S, Hkv, Dqk], v[B, S, Hkv, Dv], causal=True, softmax_scale=None,
                    cu_seqlens=None, max_seqlen=None) -> o[B, T, H, Dv]; packed [total, heads, dim]
        with cu_seqlens (max_seqlen: the longest, a host int, spares a device sync per call);
        causal mask aligned bottom-right when T < S; on CUDA under auto, flash-attn's varlen
        kernel when installed and able to take the shapes                      kernels/attention.py
    grpo_token_loss(log_ratio, advantages, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=None, beta=0.0,
                    logp=None, ref_logp=None, kl_estimator="k3", is_weight=None)
        -> GRPOTokenLoss(loss, clipped_low, clipped_high, clipped_dual, kl), per token  kernels/grpo_loss.py
    rms_norm(x[..., D], weight[D], eps=1e-6) -> y[..., D]                         kernels/norm.py
    paged_decode_attention(q[B, H, Dqk], k_pages[M, P, Hkv, Dqk], v_pages[M, P, Hkv, Dv] | None,
                           block_tables[B, W], seq_lens[B], softmax_scale=None, v_dim=None)
        -> o[B, H, Dv]: one query per row over its KV-cache pages read in place, split over long
        contexts (v_pages None: MLA's latent pages, values their first v_dim channels)
                                                                         kernels/paged_attention.py

Each module holds, in order: jit kernels, launch configurations (kernels.tuning: a short autotune
list per kernel for Hopper, used on CUDA; the first of it under the interpreter), host launchers,
the autograd.Function, the torch twin (`<name>_torch`), the Triton entry point (`<name>_triton`),
the public function, and `compile_specs()`, every launch configuration, which
`python -m kernels.compile_check` builds for a GPU target without a GPU (sm_90 by default).
Constexprs come from shape classes only (widths, head dims, dtypes, flags), never from token
counts, so a kernel compiles once per shape class (tests/kernels/test_compile_once.py).
`python -m kernels.bench [name]` times the twins against Triton (and flash-attn / Liger when
installed on a GPU). kernels.triton_import lets the package load, and the torch twins run, where
Triton is not installed. This package imports only torch and triton (and, on CUDA, flash-attn when
installed).
"""
from kernels.attention import flash_attention
from kernels.grpo_loss import GRPOTokenLoss, grpo_token_loss
from kernels.logprobs import token_logprobs
from kernels.norm import rms_norm
from kernels.paged_attention import paged_decode_attention

__all__ = ["token_logprobs", "flash_attention", "grpo_token_loss", "GRPOTokenLoss", "rms_norm", "paged_decode_attention"]
