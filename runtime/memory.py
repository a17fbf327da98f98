"""The peak memory of a phase of a run (a rollout, say), per rank: reset, run the phase, read.

    reset_peak(device); ...; peak = peak_bytes(device)

On CUDA it is the caching allocator's high-water mark of allocated tensor bytes
(torch.cuda.max_memory_allocated, reset by reset_peak_memory_stats). On the CPU it is the process's
resident high-water mark, VmHWM in /proc/self/status, reset to the current resident size by writing
5 to /proc/self/clear_refs (Linux): it counts everything the process holds (the interpreter, the
sharded weights and optimizer state, what the allocator keeps of freed memory), so compare two runs
of the same job side by side rather than reading it as the phase's own tensors. None where neither
is available.
"""
from __future__ import annotations

import torch


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark for `device` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int | None:
    """The high-water mark since the last reset_peak: CUDA tensor bytes, or the CPU process's
    resident bytes; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def resident_bytes() -> int | None:
    """The process's resident memory now (VmRSS), None where /proc cannot be read."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def training_state_sizes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a training run holds besides activations, all ranks together: trainable and total
    parameters (global counts: a sharded parameter counts once) and the optimizer state's bytes
    (summed over the ranks' shards). Collective: every rank calls it."""
    from runtime.distributed import all_reduce_floats

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    local = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                t = t.to_local() if hasattr(t, "to_local") else t
                local += t.numel() * t.element_size()
    return {"trainable_params": trainable, "params": total,
            "optimizer_state_bytes": int(all_reduce_floats([float(local)])[0])}
