"""A tiny training run built from the shared runtime pieces, for the checkpoint tests.

It exercises everything exact resume depends on: AdamW with two parameter groups and a warmup +
cosine schedule, gradient clipping and the non-finite guard, dropout (torch RNG), input noise
(numpy RNG), a random scale (python RNG) and a shuffling sampler whose position is trainer state.

    python tests/runtime/_ckpt_worker.py --run-dir R --steps 10 --save-every 3 --out w.pt
        [--stop-at STEP] [--resume | --resume-from DIR] [--kill-at STEP --kill-point hf|rename] [--fsdp]

--fsdp (under torchrun) shards the model with FSDP2's fully_shard; each rank then trains on its
half of every batch. --kill-at makes the process SIGKILL itself in the middle of the save of that
step: after writing the HF folder (kill-point "hf") or just before the final rename ("rename").
At the end rank 0 writes the full fp32 weights to --out.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.checkpoint import (  # noqa: E402
    is_checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from runtime.distributed import get_rank, get_world_size, init_distributed, teardown  # noqa: E402
from runtime.optim import build_optimizer, lr_schedule  # noqa: E402
from runtime.seeding import seed_everything  # noqa: E402
from runtime.train_step import NonFiniteGuard, optimizer_step  # noqa: E402

N_EXAMPLES, D_IN, D_HIDDEN, D_OUT, BATCH = 64, 8, 32, 4, 8


class TinyNet(nn.Module):
    """Two Linear layers with dropout and a norm-like 1-D gain between them."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HIDDEN)
        self.gain = nn.Parameter(torch.ones(D_HIDDEN))
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x):  # x [B, D_IN] -> [B, D_OUT]
        h = torch.nn.functional.gelu(self.fc1(x))
        h = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.gain  # RMS norm
        return self.fc2(self.drop(h))


class ShuffleSampler:
    """Batches of indices from a fresh permutation every epoch; state = (epoch, position)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos = 0, 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        idx = perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def full_state_dict(model: nn.Module, fsdp: bool) -> dict:
    """The whole model's weights on rank 0 (collective under FSDP; other ranks get {})."""
    if not fsdp:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=10, help="length of the run (the schedule's max_steps)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step (default: --steps)")
    ap.add_argument("--save-every", type=int, default=0, help="0: never save")
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="resume from latest_checkpoint(run_dir)")
    ap.add_argument("--resume-from", default=None, help="resume from this checkpoint directory")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-point", choices=["hf", "rename"], default="hf")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    init_distributed()
    try:
        weights = run_training(**{k: v for k, v in vars(args).items() if k != "out"})
        if get_rank() == 0:
            torch.save(weights, args.out)
    finally:
        # FSDP2's modules hold the process group (and gloo work handles) in reference cycles;
        # collect them while the group is alive, or their destructors run at interpreter exit,
        # after destroy_process_group, and gloo occasionally aborts the process there
        gc.collect()
        teardown()


def run_training(run_dir, steps=10, stop_at=None, save_every=0, keep_last=3, resume=False, resume_from=None,
                 kill_at=-1, kill_point="hf", fsdp=False) -> dict:
    """Train (or resume and continue) the tiny run; returns the full weights on rank 0 ({} elsewhere)."""
    rank, world = get_rank(), get_world_size()
    seed_everything(0)  # the same initial weights on every rank
    data_gen = torch.Generator().manual_seed(1234)
    X = torch.randn(N_EXAMPLES, D_IN, generator=data_gen)
    Y = torch.randn(N_EXAMPLES, D_OUT, generator=data_gen)

    model = TinyNet()
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.fc1)
        fully_shard(model)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sampler = ShuffleSampler(N_EXAMPLES, BATCH, seed=7)
    guard = NonFiniteGuard(max_in_a_row=3)
    step, examples_seen = 0, 0

    resume_path = Path(resume_from) if resume_from else (latest_checkpoint(run_dir) if resume else None)
    if resume and resume_path is None:
        raise SystemExit(f"--resume: no complete checkpoint under {run_dir}")
    if resume_path is not None:
        state = load_checkpoint(resume_path, model=model, optimizer=optimizer)
        step, examples_seen = state["step"], state["examples_seen"]
        sampler.load_state_dict(state["sampler"])
        guard.load_state_dict(state["guard"])
        print(f"resumed from {resume_path.name} at step {step}", flush=True)

    def save_model_fn(hf_dir: Path) -> None:
        """Stands in for the model package's save_pretrained: config + bf16 weights, written by rank 0."""
        weights = full_state_dict(model, fsdp)
        if rank == 0:
            hf_dir.mkdir(parents=True, exist_ok=True)
            (hf_dir / "config.json").write_text('{"model_type": "tiny"}\n')
            torch.save({k: v.to(torch.bfloat16) for k, v in weights.items()}, hf_dir / "weights.pt")
        if step == kill_at and kill_point == "hf":
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_at >= 0 and kill_point == "rename":
        real_rename = os.rename

        def rename_then_die(src, dst):
            if Path(dst).name == f"step-{kill_at:08d}":
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        os.rename = rename_then_die

    last = steps if stop_at is None else stop_at
    while step < last:
        idx = sampler.next_batch()[rank::world]  # this rank's share of the global batch
        x, y = X[idx], Y[idx]
        x = x + torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(x.shape)).astype(np.float32))
        scale = 1.0 + 0.1 * random.random()
        loss = torch.nn.functional.mse_loss(model(x) * scale, y)
        loss.backward()
        lr = lr_schedule(step, max_lr=1e-2, warmup_steps=3, max_steps=steps, min_lr_ratio=0.1)
        optimizer_step(model, optimizer, loss=loss, max_grad_norm=1.0, guard=guard, lr=lr)
        step += 1
        examples_seen += BATCH
        if save_every > 0 and is_checkpoint_step(step, every=save_every, last_step=steps):
            save_checkpoint(run_dir, step, model=model, optimizer=optimizer, keep_last=keep_last,
                            trainer_state={"examples_seen": examples_seen, "sampler": sampler.state_dict(),
                                           "guard": guard.state_dict()},
                            save_model_fn=save_model_fn)
    return full_state_dict(model, fsdp)


if __name__ == "__main__":
    main()
