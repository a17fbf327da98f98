"""One optimizer update, shared by the SFT and GRPO loops: clip, check, set lr, step, zero grads.

    loss.backward()                          # (after all micro-batches of the step)
    result = optimizer_step(model, optimizer, loss=loss, max_grad_norm=1.0, guard=guard,
                            lr=lr_schedule(step, ...))
    # result.grad_norm: the global L2 norm before clipping; result.skipped: True if not applied

Non-finite steps. A NaN/inf loss or gradient norm on any rank means this update would write
NaN into the weights (and, through Adam's moments, into every later update). `NonFiniteGuard`
turns such a step into a no-op: the gradients are dropped and the optimizer is not stepped, so
weights and Adam moments stay as they were. One bad batch is survivable; a run that keeps
producing them is diverging, so after `max_in_a_row` consecutive skips the guard raises
`NonFiniteError` instead of silently training on nothing. The decision is all-reduced, so every
rank skips together (ranks that disagreed would leave FSDP's shards out of step).

The skipped step still counts as a step of the loop (its data is consumed and the schedule
moves on); only the optimizer's own step counter stays behind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from runtime.distributed import any_rank
from runtime.optim import set_lr


class NonFiniteError(RuntimeError):
    """Raised after `max_in_a_row` consecutive optimizer steps were skipped for non-finite values."""


def _global_l2_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all `grads` as a 0-d plain float32 tensor, the same on every rank.

    Plain tensors contribute their local norm (they are whole on each rank). DTensor gradients
    (FSDP2 shards) are grouped by device mesh and placements; torch's get_total_norm over one
    group returns a DTensor with a pending reduction, and `full_tensor()` completes it across the
    mesh -- one collective per group rather than one per parameter. The groups' norms are then
    combined as the norm of norms, as torch.nn.utils.clip_grad_norm_ does.
    """
    plain = [g for g in grads if not isinstance(g, DTensor)]
    by_layout: dict[tuple, list[DTensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            by_layout.setdefault((g.device_mesh, g.placements), []).append(g)
    norms = []
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0))
    for group in by_layout.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    norms = [n.float().to(norms[0].device) for n in norms]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of `params` in place so their global L2 norm is at most `max_norm`.

    Returns the total norm *before* clipping, as a Python float (a host sync), identical on every
    rank: under FSDP2 the norm covers the whole model, not this rank's shards. Parameters without
    a gradient are ignored. max_norm <= 0 computes the norm without clipping. A non-finite norm is
    returned as is and the gradients are left untouched (the guard drops them).
    Collective under FSDP2 (every rank must call it).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = _global_l2_norm([p.grad for p in params])
    total_f = float(total)
    if max_norm > 0 and math.isfinite(total_f):
        # the scale torch.nn.utils.clip_grad_norm_ uses: min(1, max_norm / (norm + 1e-6))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total_f


def _is_finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        if isinstance(x, DTensor):
            x = x.full_tensor()
        return bool(torch.isfinite(x.detach()).all())
    return math.isfinite(float(x))


class NonFiniteGuard:
    """Counts and skips optimizer steps whose loss or gradient norm is not finite (module docstring).

    max_in_a_row: raise NonFiniteError when this many consecutive steps were skipped (>= 1).
    Counters: `skipped_total` (over the whole run, kept across resume through state_dict) and
    `skipped_in_a_row` (reset by the next finite step).
    """

    def __init__(self, max_in_a_row: int = 10):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row={max_in_a_row}: expected >= 1")
        self.max_in_a_row = max_in_a_row
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    def should_skip(self, loss, grad_norm: float) -> bool:
        """True if this step must be skipped: `loss` (a tensor or number, or None when there is
        none to check) or `grad_norm` is non-finite on any rank. Collective under distributed:
        every rank must call it. Updates the counters and raises NonFiniteError on the
        `max_in_a_row`-th consecutive skip."""
        bad = not math.isfinite(grad_norm) or (loss is not None and not _is_finite(loss))
        if not any_rank(bad):
            self.skipped_in_a_row = 0
            return False
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"({self.skipped_total} skipped in total) and were skipped; the run is diverging. "
                f"Lower the learning rate, check the data of the last steps, or resume from an earlier checkpoint.")
        return True

    def state_dict(self) -> dict:
        """JSON-able counters, for the checkpoint's trainer state."""
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        missing = {"skipped_total", "skipped_in_a_row"} - set(state)
        if missing:
            raise ValueError(f"non-finite guard state is missing {sorted(missing)}: "
                             f"expected the dict of NonFiniteGuard.state_dict()")
        self.skipped_total = int(state["skipped_total"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])


@dataclass(frozen=True)
class StepResult:
    grad_norm: float  # global L2 norm of the gradients before clipping (inf/nan when skipped for it)
    skipped: bool     # True when the update was not applied (non-finite loss or gradient norm)
    lr: float         # the learning rate set for this step


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float,
                   guard: NonFiniteGuard, lr: float, loss=None) -> StepResult:
    """Apply one update from the gradients accumulated in `model`: clip -> check -> set lr ->
    step -> zero grads (set to None). Collective under distributed.

    max_grad_norm: clip the global gradient norm to this (<= 0: measure only).
    loss: this rank's loss for the step (tensor or float), checked by the guard with the norm.
    Skipped steps drop the gradients and leave weights and optimizer state untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm_(params, max_grad_norm)
    skipped = guard.should_skip(loss, grad_norm)
    if not skipped:
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr)
