"""Process-level plumbing shared by every loop, no model logic (it works on modules, optimizers and
state dicts):

    runtime.distributed   init/teardown under torchrun (gloo on CPU, nccl on GPU), rank-0 printing
    runtime.metrics       metrics.jsonl writer, progress lines with ETA
    runtime.seeding       seeds, RNG-state capture/restore
    runtime.rundir        run directories (never overwritten), config.json, atomic JSON writes
    runtime.optim         AdamW with decay/no-decay groups, the learning-rate schedule
    runtime.train_step    global gradient-norm clipping, non-finite step skipping, one optimizer step
    runtime.checkpoint    atomic step directories, DCP-sharded model/optimizer state, exact resume
"""
