"""Seeding, and capture/restore of every RNG a run draws from (for exact resume).

Model initialisation must be identical on every rank (FSDP shards each rank's own copy of the
freshly initialised weights), so `seed_everything(seed)` seeds all ranks alike; pass
`distinct_per_rank=True` where ranks must draw differently (e.g. sampling different rollouts).

`capture_rng_state()` returns this process's states (python `random`, numpy's global generator,
torch CPU and every CUDA device); each rank saves its own, and `restore_rng_state` puts them back.
"""
from __future__ import annotations

import random

import numpy as np
import torch

RANK_STRIDE = 1_000_003  # a prime, so seed + rank * stride does not collide for nearby seeds


def seed_for_rank(seed: int, rank: int) -> int:
    return (seed + rank * RANK_STRIDE) % (2**63)


def seed_everything(seed: int, rank: int = 0, distinct_per_rank: bool = False) -> int:
    """Seed python, numpy and torch (CPU and CUDA). Returns the seed actually used."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed {seed!r}: expected a non-negative integer")
    s = seed_for_rank(seed, rank) if distinct_per_rank else seed
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def _numpy_state() -> dict:
    # numpy's state tuple holds an ndarray; as a tensor it loads under torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def capture_rng_state() -> dict:
    """This process's RNG states: plain values and tensors, loadable with torch.load(weights_only=True)."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the states from `capture_rng_state()` (CUDA states only when CUDA is present)."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"RNG state is missing {sorted(missing)}: expected the dict from capture_rng_state()")
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"RNG state holds {len(state['cuda'])} CUDA devices, "
                             f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(state["cuda"])
