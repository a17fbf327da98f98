"""Process groups under torchrun, and plain single-process runs.

`torchrun --nproc_per_node N train.py` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed()` reads them and joins the group with NCCL when CUDA is present
and gloo otherwise. Without those variables it returns a world of one and creates no group, so
the same code runs as `python train.py`.

The collective timeout bounds how long the surviving ranks wait on a rank that died: short
enough that a crashed job exits instead of hanging, long enough for a slow checkpoint write.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process without a group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group (or describe a single process) and pick this rank's device.

    backend: "gloo" | "nccl" | None (None: nccl when CUDA is available, else gloo).
    timeout_s: collective timeout (default: $R1_DIST_TIMEOUT_S or 600 s).
    Idempotent: calling it again returns the same description.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)

    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}: expected 'gloo' or 'nccl'")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    if timeout_s is None:
        timeout_s = float(os.environ.get("R1_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def teardown() -> None:
    """Leave the process group (a no-op without one). Call it in a `finally` at the top level."""
    if dist.is_available() and dist.is_initialized():
        # Free FSDP's DTensors and pending work objects first: destroying the group while they are
        # still alive lets gloo abort the process at exit now and then (SIGABRT after a clean run).
        import gc
        gc.collect()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (torchrun interleaves ranks' output)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank; returns it (a no-op without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
