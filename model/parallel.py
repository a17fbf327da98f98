"""Parallelism applied from outside the model (torchtitan's way): FSDP2 and activation checkpointing.

`apply_fsdp(model)` shards every transformer block with FSDP2's `fully_shard`, then the root
(embeddings, final norm, lm_head and the MTP modules, which share the embedding and head), so each block's parameters are
all-gathered just before its forward and freed after, and gradients are reduce-scattered per
block. Parameters become DTensors sharded on dim 0 over the ranks.

Mixed precision: on GPU the policy is bf16 parameters for compute with fp32 gradient reduction
(the fp32 sharded master weights stay in the optimizer's hands); on CPU everything stays fp32
(gloo has no bf16 reduce worth using, and the CPU recipe is small).

`apply_activation_checkpointing(model)` recomputes each block's activations in the backward
instead of storing them (torch.utils.checkpoint, non-reentrant), wrapping the block's forward in
place so parameter names do not change (checkpoints stay in Hugging Face layout).

`gathered(model)` unshards every FSDP module once and keeps it unsharded for the duration of the
context: generation runs hundreds of forwards per rollout batch, and without it each decode step
would all-gather every layer again.

Expert and tensor parallelism for 671B-class models are later work: MoE dispatch is kept in one
place (model/moe.py) where an all-to-all can slot in.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = list(model.layers)
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        blocks += list(mtp) if isinstance(mtp, nn.ModuleList) else [mtp]
    return blocks


def default_mixed_precision(device_type: str) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(param_dtype, reduce_dtype): bf16 compute with fp32 reductions on GPU, fp32 on CPU."""
    if device_type == "cuda":
        return torch.bfloat16, torch.float32
    return None, None


def apply_fsdp(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard each block, then the root, with FSDP2. Needs torch.distributed to be initialised."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # the main blocks only: an MTP module shares the embedding and output head with the root, and
    # FSDP needs tied parameters in one group, so MTP modules stay in the root's group
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root holds embeddings, final norm and lm_head. It stays unsharded from its forward to its
    # backward (FSDP2's own default for a root): the training loops use the output weight after the
    # forward, in kernels.token_logprobs on the final hidden states, so it must still be gathered then.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model._reshard_after_forward = reshard_after_forward  # restored by gathered()
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every block's activations in the backward pass (names and state dict unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Keep all FSDP parameters unsharded inside the context (one all-gather per module, not per forward).

    A no-op for a model that is not sharded. Memory: the full model's parameters live on every rank
    for the duration, which is what generation needs anyway.
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            # blocks back to their setting; the root stays unsharded between forward and backward
            again = False if m is model else getattr(model, "_reshard_after_forward", True)
            m.set_reshard_after_forward(again, recurse=False)
