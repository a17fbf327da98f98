"""train.py with faults injected, for the SFT loop tests (one process or under torchrun).

    python tests/sft/_sft_worker.py [--kill-at-save STEP --kill-point hf|rename]
                                    [--fail-rank R --fail-at-call N] [--shard-report DIR]
                                    train.py <train.py flags>

(The literal word train.py separates the two sets of flags; torchrun would swallow a leading "--".)

--kill-at-save makes rank 0 SIGKILL itself in the middle of the checkpoint save of STEP: right
after its HF folder is written, the model and optimizer state already on disk but no COMPLETE
marker ("hf"), or just before the finished directory is renamed into place ("rename").
--fail-rank makes rank R raise at its N-th micro-batch forward (1-based), as a crashing rank does.
--shard-report DIR makes every rank write DIR/rank{r}.json right after the loop has sharded its model
with model.parallel.apply_fsdp (as model.build calls it): {"world_size", "sharded", "all_dtensor", "local_numel",
"global_numel", "fsdp_modules", "gathered_equal"}, the last saying that model.parallel.gathered()
gives every parameter back whole, equal to the weights before sharding.
--slow-publish S makes rank 0 sleep S seconds before publishing each checkpoint.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sft.loop  # noqa: E402
import train  # noqa: E402


def _kill_during_save(step: int, point: str) -> None:
    name = f"step-{step:08d}"
    if os.environ.get("RANK", "0") != "0":
        return
    if point == "hf":
        real_fn = sft.loop.save_model_fn

        def save_model_fn(model, tok, dtype=None, **kwargs):
            save = real_fn(model, tok, dtype, **kwargs)

            def save_then_die(path):
                save(path)
                if Path(path).parent.name.startswith(f".tmp-{name}-"):
                    os.kill(os.getpid(), signal.SIGKILL)
            return save_then_die
        sft.loop.save_model_fn = save_model_fn
    else:
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if Path(dst).name == name:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst, *a, **k)
        os.rename = rename


def _fail_rank(rank: int, at_call: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    real, calls = sft.loop.batch_loss_sum, [0]

    def batch_loss_sum(model, batch):
        calls[0] += 1
        if calls[0] == at_call:
            raise RuntimeError(f"injected failure of rank {rank} at micro-batch {at_call}")
        return real(model, batch)
    sft.loop.batch_loss_sum = batch_loss_sum


def _report_sharding(out: Path) -> None:
    import json

    import torch
    from torch.distributed.tensor import DTensor

    from model.parallel import _fsdp_modules, gathered, is_sharded
    from runtime.distributed import get_rank, get_world_size

    import model.parallel

    real = model.parallel.apply_fsdp

    def apply_fsdp(model, **kwargs):
        whole = {n: p.detach().clone() for n, p in model.named_parameters()}
        real(model, **kwargs)
        params = dict(model.named_parameters())
        with gathered(model):
            gathered_equal = all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, whole[n])
                                 for n, p in model.named_parameters())
        report = {"world_size": get_world_size(), "sharded": is_sharded(model),
                  "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
                  "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                     for p in params.values()),
                  "global_numel": sum(p.numel() for p in params.values()),
                  "fsdp_modules": len(_fsdp_modules(model)), "gathered_equal": gathered_equal}
        (out / f"rank{get_rank()}.json").write_text(json.dumps(report))
        return model
    model.parallel.apply_fsdp = apply_fsdp   # model.build imports it when it builds


def _slow_publish(seconds: float) -> None:
    """Rank 0 takes `seconds` longer to publish each checkpoint (a slow file system's fsyncs, a large
    HF export): the other ranks wait for it, on the gloo side group, past the collectives' timeout."""
    import time

    import runtime.checkpoint

    real = runtime.checkpoint._publish

    def publish(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    runtime.checkpoint._publish = publish


def main() -> int:
    argv = sys.argv[1:]
    if "train.py" not in argv:
        raise SystemExit("_sft_worker.py: expected the word train.py before the train.py flags")
    cut = argv.index("train.py")
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-at-save", type=int, default=-1)
    ap.add_argument("--kill-point", choices=["hf", "rename"], default="hf")
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-at-call", type=int, default=1)
    ap.add_argument("--shard-report", type=Path, default=None)
    ap.add_argument("--slow-publish", type=float, default=0.0)
    own = ap.parse_args(argv[:cut])
    if own.slow_publish:
        _slow_publish(own.slow_publish)
    if own.shard_report is not None:
        _report_sharding(own.shard_report)
    if own.kill_at_save >= 0:
        _kill_during_save(own.kill_at_save, own.kill_point)
    if own.fail_rank >= 0:
        _fail_rank(own.fail_rank, own.fail_at_call)
    return train.main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
