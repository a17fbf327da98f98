"""Process groups under torchrun, and plain single-process runs.

`torchrun --nproc_per_node N train.py` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed()` reads them and joins the group with NCCL when CUDA is present
and gloo otherwise. Without those variables it returns a world of one and creates no group, so
the same code runs as `python train.py`.

Every collective of the project goes through the helpers here (a test scans the package for any
other): `all_reduce` and `all_reduce_floats` move their tensors to the device the group's backend
needs (NCCL reduces only CUDA tensors; a metric or a count built on the CPU travels there and
back), and `all_gather_object`, `broadcast_object` and `barrier` run on a gloo *side group*
created at init beside the main group.

Two timeouts. The main group's (--dist-timeout-s, default DEFAULT_TIMEOUT_S) bounds how long the
surviving ranks wait on a rank that died inside a collective of the training step: short enough
that a crashed job exits instead of hanging (NCCL's watchdog aborts the process when it passes).
Work that only rank 0 does (moving run directories, publishing and fsyncing a checkpoint, writing
the Hugging Face export of a large model) can take far longer, so the other ranks wait for it on
the side group, whose timeout is WAIT_TIMEOUT_S (or the main one, if longer) and which no
watchdog watches: `barrier()` and the object collectives use it, never the main group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0       # the main group's collectives (--dist-timeout-s, $R1_DIST_TIMEOUT_S)
WAIT_TIMEOUT_S = 4 * 3600.0     # the side group's: rank-0-only work the others wait for ($R1_WAIT_TIMEOUT_S)

_side_group = None              # the gloo group of barrier() and the object collectives


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
    timeout_s: the main group's collective timeout (default: $R1_DIST_TIMEOUT_S or 600 s).
    Also creates the gloo side group (timeout: $R1_WAIT_TIMEOUT_S or WAIT_TIMEOUT_S, at least
    timeout_s). Idempotent: calling it again returns the same description.
    """
    global _side_group
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
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout-s {timeout_s}: expected a positive number of seconds")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    if _side_group is None:
        wait_s = max(float(os.environ.get("R1_WAIT_TIMEOUT_S", WAIT_TIMEOUT_S)), timeout_s)
        _side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def ensure_process_group(info: DistInfo) -> DistInfo:
    """`info`, with a process group behind it: a one-process run gets a group of one rank (an
    in-process store, the device's backend), which FSDP2 needs to apply its mixed-precision policy
    on a one-rank mesh, so that `python train.py` on one GPU computes as a torchrun job does."""
    global _side_group
    if dist.is_initialized():
        return info if info.backend is not None else DistInfo(info.rank, info.world_size, info.local_rank,
                                                              info.device, dist.get_backend())
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("R1_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    kwargs = {"device_id": info.device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                            **kwargs)
    _side_group = dist.new_group(backend="gloo")
    return DistInfo(rank=0, world_size=1, local_rank=info.local_rank, device=info.device, backend=backend)


def teardown() -> None:
    """Leave the process group (a no-op without one). Call it in a `finally` at the top level."""
    global _side_group
    _side_group = None
    _subgroups.clear()
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


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (torchrun interleaves ranks' output)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ---- collectives: the only place the project calls them ----------------------------------------

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "prod": "PRODUCT"}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def side_group():
    """The gloo group for object collectives and waits (None without a process group). A group
    joined by someone else's init_process_group (a test, a notebook) gets its side group here."""
    global _side_group
    if _side_group is None and _initialized():
        wait_s = float(os.environ.get("R1_WAIT_TIMEOUT_S", WAIT_TIMEOUT_S))
        _side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    return _side_group


def group_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective of `group` (default: the main group):
    the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the ranks of `group` in place and return it (a no-op without a process
    group). op: "sum" | "max" | "min" | "prod". The tensor may live on any device: when it is not
    where the backend reduces (a CPU tensor under NCCL), it travels there and back."""
    if op not in _OPS:
        raise ValueError(f"all_reduce op {op!r}: expected one of {', '.join(_OPS)}")
    if not _initialized():
        return tensor
    device = group_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_floats(values: list[float], op: str = "sum", group=None) -> list[float]:
    """all_reduce of a list of Python numbers (as float64), e.g. counts and sums of a step's metrics."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), op, group).tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True if `flag` is True on any rank of `group` (itself without a process group)."""
    return all_reduce_floats([1.0 if flag else 0.0], "max", group)[0] > 0


def all_gather_object(obj, group: "Subgroup | None" = None) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] without a process group).
    Runs on the gloo side group: objects are pickled on the CPU, whatever the main backend.
    group: a Subgroup (the ranks of one block only, on its own gloo group)."""
    if not _initialized() or (group is not None and group.size == 1):
        return [obj]
    side = side_group() if group is None else group.side
    out: list = [None] * dist.get_world_size(side)
    dist.all_gather_object(out, obj, group=side)
    return out


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a process group). On the side group, so
    ranks may wait here for rank-0-only work (a checkpoint's publication, a large HF export) far
    longer than the main group's timeout, and no NCCL watchdog fires meanwhile."""
    if _initialized():
        dist.barrier(group=side_group())


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank; returns it (a no-op without a group).
    Runs on the side group, so the other ranks may wait as long as `src` takes to produce it."""
    if not _initialized():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=side_group())
    return box[0]


# ---- subgroups: contiguous blocks of ranks (tensor-parallel groups) -----------------------------

@dataclass(frozen=True)
class Subgroup:
    """One block of `size` consecutive ranks: this rank's tensor-parallel group, say, with W / size
    such blocks side by side (data parallel around them). `rank` is this rank's place in the block,
    `index` the block's place among the blocks; `group` runs tensor collectives (the main backend),
    `side` object collectives (gloo). A block of one rank has no groups (None): its collectives are
    the identity."""

    ranks: tuple[int, ...]
    rank: int
    index: int
    group: object = None
    side: object = None

    @property
    def size(self) -> int:
        return len(self.ranks)


_subgroups: dict[int, Subgroup] = {}


def subgroup(size: int) -> Subgroup:
    """This rank's block of `size` consecutive ranks (block g holds ranks g·size .. g·size + size - 1).
    Every rank must call it with the same size (creating the groups is a collective of all ranks);
    later calls return the same object. ValueError when `size` does not divide the world size."""
    world, rank = get_world_size(), get_rank()
    if size < 1 or world % size:
        raise ValueError(f"a group of {size} ranks does not divide the {world} ranks of this run")
    if size in _subgroups:
        return _subgroups[size]
    index = rank // size
    if size == 1:
        sub = Subgroup((rank,), 0, index)
    else:
        mine = None
        for g in range(world // size):   # every rank creates every group, in the same order
            ranks = list(range(g * size, (g + 1) * size))
            main = dist.new_group(ranks)
            side = dist.new_group(ranks, backend="gloo")
            if g == index:
                mine = Subgroup(tuple(ranks), rank - g * size, g, main, side)
        sub = mine
    _subgroups[size] = sub
    return sub


def group_all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """The sum of `tensor` over `group`'s ranks, as a new tensor (the identity for group None).
    Functional (torch.distributed._functional_collectives), so it also traces under torch.compile;
    the tensor must be on the group's device (the model's, in a forward)."""
    if group is None:
        return tensor
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))


def group_all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `tensor` [n, ...] of `group`, stacked in rank order: [size, n, ...] (a new
    dim 0 of 1 for group None). Functional, like group_all_reduce."""
    if group is None:
        return tensor[None]
    import torch.distributed._functional_collectives as funcol
    size = dist.get_world_size(group)
    out = funcol.wait_tensor(funcol.all_gather_single(tensor.contiguous(), 0, group))
    return out.view(size, *tensor.shape)
