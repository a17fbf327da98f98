"""Parallelism applied from outside the model (torchtitan's way): FSDP2 and activation checkpointing.

`apply_fsdp(model)` shards every transformer block with FSDP2's `fully_shard`, then the root
(embeddings, final norm, lm_head and the MTP modules, which share the embedding and head), so each block's parameters are
all-gathered just before its forward and freed after, and gradients are reduce-scattered per
block. Parameters become DTensors sharded on dim 0 over the ranks.

Mixed precision (FSDP2's MixedPrecisionPolicy, `--param-dtype`): the sharded master weights and
the optimizer stay fp32, each block's parameters are all-gathered in `param_dtype` (bf16 by default
on GPU, fp32 on CPU) for compute, and gradients are reduced in `reduce_dtype` (fp32). The MoE
router is the exception the model's design asks for: each Router gets a `fully_shard` group of its
own with an fp32 policy, so its weight is gathered in fp32 and its logits, scores and top-K are
computed in fp32 (Router.forward casts its input up) whatever the blocks compute in. RMSNorm
statistics, softmax, log-probs and losses are fp32 in the kernels themselves. The same policy runs
on gloo (the 2-rank CPU tests exercise it, on tiny shapes: this CPU's bf16 matmuls are slow) and on
a one-process run (a one-rank mesh, runtime.distributed.ensure_process_group).

`apply_activation_checkpointing(model)` recomputes each block's activations in the backward
instead of storing them (torch.utils.checkpoint, non-reentrant), wrapping the block's forward in
place so parameter names do not change (checkpoints stay in Hugging Face layout).

`apply_compile(model)` compiles each block's forward with torch.compile, the block being the unit
(torchtitan's way), in place as well; the order is activation checkpointing, compile, FSDP2.

`gathered(model)` unshards every FSDP module once and keeps it unsharded for the duration of the
context: generation runs hundreds of forwards per rollout batch, and without it each decode step
would all-gather every layer again.

Tensor parallelism for sampling (each rank of a group holding a share of the model, cut from
these FSDP shards for the duration of a rollout) is model/tensor_parallel.py. Expert parallelism
for training 671B-class models is later work: MoE dispatch is kept in one place (model/moe.py)
where an all-to-all can slot in.
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


def training_fsdp(param_dtype: torch.dtype, world_size: int) -> dict | None:
    """apply_fsdp's keyword arguments for a model being trained: sharded over several ranks, and on
    one rank too when the parameters compute in a lower precision than their fp32 master weights
    (the policy is FSDP2's, so one process computes as a torchrun job does). None: a plain fp32
    module in one process, as the CPU recipe runs."""
    if world_size == 1 and param_dtype == torch.float32:
        return None
    return {"param_dtype": None if param_dtype == torch.float32 else param_dtype, "reduce_dtype": torch.float32}


def _routers(model: nn.Module) -> list[nn.Module]:
    from model.moe import Router

    return [m for m in model.modules() if isinstance(m, Router)]


def apply_fsdp(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard each block, then the root, with FSDP2. Needs torch.distributed to be initialised."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # The routers first, each its own group in fp32 (the module docstring): a group gathers its
    # parameters in one dtype, so the router cannot share its block's bf16 group.
    router_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for router in _routers(model):
        fully_shard(router, mesh=mesh, mp_policy=router_mp, reshard_after_forward=reshard_after_forward)
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


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block's forward (torchtitan's unit: names, the state dict, FSDP2's hooks and
    activation checkpointing stay as they are, since only the function the module calls is
    compiled, not the module). Apply after activation checkpointing (the recompute is then the
    compiled block too) and before FSDP. A call with a KV-cache step (the sampler's prefill and
    decode) runs eagerly: decode shapes change every step and the cache is updated in place, so
    compiling them would only recompile; training forwards and backwards and the no-grad log-prob
    passes over packed sequences run compiled. dynamic=True: packed micro-batches change their
    token count every step, so the block compiles once for symbolic sizes instead of once per size."""
    import inspect

    for block in _blocks(model):
        eager = block.forward
        compiled = torch.compile(eager, dynamic=True)
        signature = inspect.signature(type(block).forward)   # the block's own (AC's wrapper takes *args)

        def forward(*args, _eager=eager, _compiled=compiled, _signature=signature, **kwargs):
            step = _signature.bind(None, *args, **kwargs).arguments.get("step")
            return (_eager if step is not None else _compiled)(*args, **kwargs)

        block.forward = forward
    return model


def decode_view(model: nn.Module, reuse: nn.Module | None = None) -> nn.Module:
    """The model as plain modules over its current parameters: for an FSDP2 model inside
    `gathered(model)`, a module tree of the model's own class (built on the meta device, so it
    allocates nothing) whose parameters and buffers are the gathered, unsharded tensors, with no
    FSDP hooks and no compile or checkpoint wrappers on its blocks: the sampler's decode step runs
    thousands of small forwards, each of which would otherwise pass every module's hooks. Use it
    only inside the context (the tensors are freed when it exits). A model that is not sharded is
    returned as it is. `reuse`, a view made before, gets the current tensors instead of a new tree
    being built: the same module object every rollout, so a compiled decode step keyed on it
    (sampling/engine.py) is not traced again."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not _fsdp_modules(model):
        return model
    cls = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    if reuse is not None and type(reuse) is cls and reuse is not model:
        view = reuse
    else:
        with torch.device("meta"):
            view = cls(model.config)
    for name, module in view.named_modules():
        src = model.get_submodule(name)
        for kind in ("_parameters", "_buffers"):
            for key in list(getattr(module, kind)):
                t = getattr(src, key)
                if isinstance(t, DTensor):
                    raise RuntimeError(f"decode_view: {name}.{key} is still sharded; call it inside "
                                       f"model.parallel.gathered(model)")
                getattr(module, kind)[key] = t
    if hasattr(model, "rope"):
        view.rope = model.rope
    return view.train(model.training)


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
