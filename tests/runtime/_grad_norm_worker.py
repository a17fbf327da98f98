"""torchrun worker for tests/runtime/test_train_step.py: the global gradient norm and the
non-finite decision under FSDP2 on 2 ranks (gloo).

    torchrun --standalone --nproc_per_node 2 tests/runtime/_grad_norm_worker.py OUT_PREFIX

Writes OUT_PREFIX.rank{r}.json with:
- fsdp_norm:  clip_grad_norm_ over the FSDP2 model, each rank backpropagating its half of a batch
- plain_norm: the same gradient computed by one unsharded copy on the whole batch (the reference)
- clipped_norm: the global norm after clipping to max_norm=0.5 (measured again, max_norm=0)
- skipped / params_unchanged: a step where only rank 1's loss is NaN (every rank must skip)
- groups: build_optimizer's parameter groups over the DTensor parameters
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.distributed import init_distributed, teardown  # noqa: E402
from runtime.optim import build_optimizer  # noqa: E402
from runtime.train_step import NonFiniteGuard, clip_grad_norm_, optimizer_step  # noqa: E402


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def main() -> None:
    info = init_distributed()
    try:
        record = measure(info.rank, info.world_size)
        with open(f"{sys.argv[1]}.rank{info.rank}.json", "w") as f:
            json.dump(record, f)
    finally:
        # FSDP2's modules hold the process group (and gloo work handles) in reference cycles;
        # collect them while the group is alive, or their destructors run at interpreter exit,
        # after destroy_process_group, and gloo occasionally aborts the process there
        gc.collect()
        teardown()


def measure(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))

    plain = make_model()
    nn.functional.mse_loss(plain(x), y).backward()
    plain_norm = clip_grad_norm_(plain.parameters(), max_norm=0)

    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    # FSDP averages gradients over ranks: mean of the halves' mean losses = the whole batch's mean
    nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
    fsdp_norm = clip_grad_norm_(model.parameters(), max_norm=0.5)
    clipped_norm = clip_grad_norm_(model.parameters(), max_norm=0)

    optimizer = build_optimizer(model, lr=0.1)
    guard = NonFiniteGuard(max_in_a_row=5)
    before = [p.to_local().clone() for p in model.parameters()]
    loss = nn.functional.mse_loss(model(x[rank::world]), y[rank::world])
    loss.backward()
    bad_loss = loss.detach() * (float("nan") if rank == 1 else 1.0)
    result = optimizer_step(model, optimizer, loss=bad_loss, max_grad_norm=1.0, guard=guard, lr=0.1)
    unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))

    return {"fsdp_norm": fsdp_norm, "plain_norm": plain_norm, "clipped_norm": clipped_norm,
            "skipped": result.skipped, "params_unchanged": unchanged, "skipped_total": guard.skipped_total,
            "groups": [[g["param_names"], g["weight_decay"]] for g in optimizer.param_groups],
            "dtensor_params": all(isinstance(p, DTensor) for p in model.parameters())}


if __name__ == "__main__":
    main()
