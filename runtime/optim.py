"""The optimizer and learning-rate schedule shared by the SFT and GRPO loops.

`build_optimizer` makes AdamW with two parameter groups, the split nanoGPT uses:
- decay: every trainable parameter with 2 or more dimensions -- linear weights, expert weights,
  and the embedding and output matrices. Embeddings decay here, as in nanoGPT and torchtitan
  (which decays every parameter, in one group). nanochat gives its embeddings an AdamW group of
  their own (its other matrices use Muon) with no decay by default; to get that here, pass
  `no_decay_names=("embed", ...)` with the embedding's parameter name.
- no decay: biases, norm gains and every other 1-D (or 0-D) parameter, and any parameter whose
  name contains one of `no_decay_names` (DeepSeek-V3's `e_score_correction_bias` is listed by
  default; in our model it is a buffer, but a port that makes it a parameter must not decay it).
Decay pulls a weight toward zero; for a gain or a bias that is a change of function, not a
regulariser, which is why they are kept out.

The split reads only `p.ndim` and names, so it works the same on plain parameters and on FSDP2's
DTensor parameters (whose `ndim` is the global tensor's).

`lr_schedule` is a pure function of the step: linear warmup, then cosine (or linear, or constant)
decay to `min_lr_ratio * max_lr` at `max_steps`. The loops call `set_lr(optimizer, lr)` before
every optimizer step, so the schedule's whole state is the step counter the loop already saves
in its checkpoint; there is no scheduler object to save or restore.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from runtime.rundir import fill_default

SCHEDULE_KINDS = ("cosine", "linear", "constant")
DEFAULT_WARMUP_STEPS = 10   # at most: an unset --warmup-steps is a tenth of --max-steps, at most this
DEFAULT_NO_DECAY_NAMES = ("e_score_correction_bias",)


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_names: tuple[str, ...] = DEFAULT_NO_DECAY_NAMES) -> list[dict]:
    """Split `model`'s trainable parameters into [decay group, no-decay group] (see module docstring).

    Each group is {"params": [(name, param), ...], "weight_decay": wd}: torch's optimizers keep the
    names as the group's "param_names", so optimizer.state_dict() says which parameter is which and
    a checkpoint loaded into a different model fails naming the parameters. Empty groups are left
    out (a model of only matrices gets one group). Tied parameters appear once.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() already drops duplicates (tied weights)
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not any(tag in name for tag in no_decay_names):
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to optimise")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None,
                    no_decay_names: tuple[str, ...] = DEFAULT_NO_DECAY_NAMES) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, decay split as in the module docstring.

    lr: the initial learning rate of both groups (the loop overwrites it every step via set_lr).
    betas=(0.9, 0.95), weight_decay=0.1: the DeepSeek-V3 / LLaMA pre-training values.
    fused: passed to torch.optim.AdamW (None lets torch choose: foreach on CUDA, a loop on CPU).
    """
    if lr < 0:
        raise ValueError(f"lr={lr}: expected a non-negative learning rate")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: expected >= 0")
    groups = param_groups(model, weight_decay, no_decay_names)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def lr_schedule(step: int, *, max_lr: float, warmup_steps: int, max_steps: int,
                min_lr_ratio: float = 0.1, kind: str = "cosine") -> float:
    """The learning rate for optimizer step `step` (0-based: the first update uses step=0).

    warmup (step < warmup_steps): max_lr * (step + 1) / warmup_steps -- linear, starting at
        max_lr / warmup_steps rather than 0 so the first update is not wasted, reaching max_lr at
        the last warmup step (nanoGPT's convention).
    decay (warmup_steps <= step <= max_steps), with progress = (step - warmup_steps) /
        (max_steps - warmup_steps) and min_lr = min_lr_ratio * max_lr:
        cosine:   min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2
        linear:   max_lr - (max_lr - min_lr) * progress
        constant: max_lr
    after max_steps: min_lr (max_lr for "constant").
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind {kind!r}: expected one of {SCHEDULE_KINDS}")
    if step < 0:
        raise ValueError(f"step={step}: expected >= 0")
    if warmup_steps < 0 or max_steps < warmup_steps:
        raise ValueError(f"warmup_steps={warmup_steps}, max_steps={max_steps}: "
                         "expected 0 <= warmup_steps <= max_steps")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio}: expected a value in [0, 1]")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return max_lr
    min_lr = min_lr_ratio * max_lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    if kind == "linear":
        return max_lr - (max_lr - min_lr) * progress
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (groups differ only in weight decay)."""
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"learning rate {lr}: expected a finite value >= 0")
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_training_flags(args) -> list[str]:
    """The optimisation and cadence flags both training loops read (--max-steps, --warmup-steps,
    --lr, --min-lr-ratio, --weight-decay, --max-grad-norm, --max-nonfinite, --save-every,
    --keep-last, --eval-every, --report-to): ValueError naming the flag and what was expected. An unset
    --warmup-steps becomes a tenth of --max-steps, at most DEFAULT_WARMUP_STEPS (a default fits
    any run); returns the console lines of the values so chosen."""
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    notes = []
    need(args.max_steps >= 0, f"--max-steps {args.max_steps}: expected >= 0")
    if args.warmup_steps is None:
        notes.append(fill_default(args, "warmup_steps", min(DEFAULT_WARMUP_STEPS, args.max_steps // 10),
                                  f"a tenth of --max-steps {args.max_steps}, at most {DEFAULT_WARMUP_STEPS}"))
    need(0 <= args.warmup_steps <= args.max_steps,
         f"--warmup-steps {args.warmup_steps}: expected between 0 and --max-steps ({args.max_steps})")
    need(args.lr > 0 and math.isfinite(args.lr), f"--lr {args.lr}: expected a positive number")
    need(0.0 <= args.min_lr_ratio <= 1.0, f"--min-lr-ratio {args.min_lr_ratio}: expected a value in [0, 1]")
    need(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: expected >= 0")
    need(args.max_grad_norm >= 0, f"--max-grad-norm {args.max_grad_norm}: expected >= 0 (0: no clipping)")
    need(args.max_nonfinite >= 1, f"--max-nonfinite {args.max_nonfinite}: expected >= 1")
    need(args.save_every >= 0, f"--save-every {args.save_every}: expected >= 0 (0: only at the end)")
    need(args.keep_last >= 1, f"--keep-last {args.keep_last}: expected >= 1")
    need(args.eval_every >= 0, f"--eval-every {args.eval_every}: expected >= 0 (0: only at the end)")
    from runtime.trackers import parse_report_to
    parse_report_to(getattr(args, "report_to", "none"))   # known names, their packages installed
    return notes

