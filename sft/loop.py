"""The supervised loop: pretraining the tiny base, cold-start SFT and distillation, one function.

    torchrun --nproc_per_node 2 train.py --stage sft --preset tiny --data convs.jsonl --out runs/sft

`train_sft(args, run, info)` reads top to bottom: tokenizer and model, documents, sharding, then
for each optimizer step: this rank's documents -> micro-batches -> forward/backward -> one
update -> metrics -> checkpoint, and a held-out evaluation every --eval-every steps.

Loss normalisation. The loss of a step is the mean negative log-likelihood per target token over
the whole step: all micro-batches of all ranks. Each micro-batch's summed token loss is divided by
the step's global target count (all-reduced before the first forward), so the accumulated
gradient is that of the step's mean, whatever the split into micro-batches or ranks (FSDP
reduce-scatters by sum here: we scale by world size to undo its averaging). The logged `loss` is
the same quantity.

Log-probabilities go through kernels.token_logprobs on the final hidden states, restricted to
positions that have a target: the [tokens, vocab] logits never exist at once.

Bad steps and bad flags. A step whose loss or gradient norm is not finite on any rank is skipped
(no update; counted in `skipped_total`, logged, said on the console); --max-nonfinite of them in a
row stop the run with exit status 3 and no further checkpoint. A checkpoint is written only when
every weight is finite. `check_flags` rejects inconsistent flags before train.py creates the run
directory, so a bad invocation leaves nothing behind.

The machinery shared with GRPO (optimizer, schedule, clipping and non-finite skipping,
checkpoints) is runtime/'s and model/parallel.py's; this file holds only what is SFT's own.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from data.datasets import ShardedBatchSampler, fit_global_batch, read_jsonl
from kernels import token_logprobs
from data.tokenizer import load_tokenizer
from model.build import build_trained_model, check_length, check_model_flags, export_dtype_of, model_config, save_model_fn
from model.moe import moe_aux_loss, moe_load_stats, update_moe_biases
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.distributed import all_gather_object, all_reduce_floats, print0
from runtime.memory import peak_bytes, training_state_sizes
from runtime.metrics import MetricsWriter, Progress
from runtime.trackers import make_trackers
from runtime.optim import build_optimizer, check_training_flags, lr_schedule
from runtime.rundir import check_rank_multiple, update_run_config, write_json_atomic
from runtime.train_step import NonFiniteError, NonFiniteGuard, optimizer_step
from evaluation.evaluate import check_heldout_flags, evaluate_sharded, heldout_task
from sft.data import load_documents
from sft.packing import IGNORE, Batch, fit_lengths, pack, pad_batch


def micro_batches(docs, micro_batch_size: int, seq_len: int, packing: bool, pad_id: int) -> list[Batch]:
    """This rank's documents of one step as micro-batches of at most micro_batch_size documents each."""
    out = []
    for i in range(0, len(docs), micro_batch_size):
        chunk = docs[i:i + micro_batch_size]
        out.append(pack(chunk, seq_len, pad_id) if packing else pad_batch(chunk, pad_id))
    return out


def batch_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of the token NLLs of the batch's targets, the model's extra losses or None).

    Packed rows are laid end to end as one sequence, without their padding tails, whose documents
    attend only to themselves (cu_seqlens, with the batch's longest document as max_seqlen, a host
    int); padded rows run as a batch.
    """
    if batch.cu_seqlens is not None:
        ids, pos, targets, cu_seqlens = batch.documents_only()                     # [1, N], [1, N], [N]
        hidden = model.forward_hidden(ids, position_ids=pos, cu_seqlens=cu_seqlens,
                                      max_seqlen=batch.max_seqlen)                 # [1, N, D]
    else:
        hidden = model.forward_hidden(batch.input_ids, position_ids=batch.position_ids)  # [B, L, D]
        targets = batch.targets.reshape(-1)
    keep = targets != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # [N_targets, D]
    logp = token_logprobs(h, model.output_weight, targets[keep])
    return -logp.sum(), None


DEFAULT_BATCH_SIZE = 32  # sequences per step when --batch-size is unset (rounded up to a multiple of the ranks)


def check_flags(args, world_size: int) -> list[str]:
    """Raise ValueError naming the flag for any inconsistency that would otherwise surface mid-run;
    called by the stage runner (recipes/stages.py) before the run directory is created or moved.
    Reads nothing but the flags and the existence of the files they name. Unset run-dependent
    flags get values that fit this run (--warmup-steps, --batch-size; the data may shrink a
    default batch further, see train_sft); returns the console lines of the values chosen."""
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(getattr(args, "rollout_tp", 1) == 1, f"--rollout-tp {getattr(args, 'rollout_tp', 1)}: tensor-parallel "
         f"sampling applies to the grpo, eval and generate stages; --stage {args.stage} samples only for its "
         f"held-out evaluation, with the whole model")
    need(args.data is not None, f"--stage {args.stage} needs --data (a JSONL/Parquet file)")
    need(Path(args.data).is_file(), f"--data {args.data}: no such file")
    check_model_flags(args)
    notes = check_training_flags(args)
    notes += check_rank_multiple(args, "batch_size", DEFAULT_BATCH_SIZE, world_size)
    need(args.micro_batch_size >= 1, f"--micro-batch-size {args.micro_batch_size}: expected >= 1")
    need(args.seq_len >= 2, f"--seq-len {args.seq_len}: expected >= 2 (a token and its target)")
    check_heldout_flags(args)
    return notes


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity on any rank (collective when sharded:
    every rank checks its own shards, and the verdicts are combined)."""
    local = [name for name, p in model.named_parameters()
             if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
    return sorted({n for names in all_gather_object(local) for n in names})


def train_sft(args, run, info) -> int:
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    stage = args.stage
    tok = load_tokenizer(args.tokenizer, args.model)

    # data first: documents, over-long policy, the longest against the model's length (before any
    # weight is loaded), this rank's share of each step
    docs = load_documents(args.data, tok, stage, template=args.chat_template)
    docs, report = fit_lengths(docs, args.seq_len, args.overlong)
    print0(f"data {args.data}: {report.kept} documents kept, {report.dropped} dropped and {report.truncated} "
           f"truncated for being longer than --seq-len {args.seq_len}, {report.empty} without any target token")
    check_flags(args, info.world_size)
    if docs:
        check_length(model_config(args, tok), max(len(d.ids) for d in docs), f"the longest document of {args.data}",
                     args.model or f"preset {args.preset}")

    # the model: sharded (FSDP2) before its weights are allocated when there are several ranks or a
    # lower compute precision; activation checkpointing wrapped in first
    model, info, _, _, _ = build_trained_model(args, tok, info, device)
    args.batch_size, note = fit_global_batch(args.batch_size, len(docs), info.world_size, flag="--batch-size",
                                             what=f"{args.data} has {len(docs)} documents that fit",
                                             defaulted="batch_size" in (getattr(args, "defaulted", None) or ()))
    if note:
        print0(note)
        update_run_config(run, batch_size=args.batch_size)
    sampler = ShardedBatchSampler(len(docs), args.batch_size // info.world_size, rank=info.rank,
                                  world_size=info.world_size, seed=args.seed)

    export_dtype = export_dtype_of(args)   # the HF folders of checkpoints: the source checkpoint's dtype
    # the optimizer over the (possibly sharded) fp32 master weights
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    guard = NonFiniteGuard(max_in_a_row=args.max_nonfinite)

    step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(run.path) if run.resumed else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, tokens_seen = state["step"], state["tokens_seen"]
        sampler.load_state_dict(state["sampler"])
        guard.load_state_dict(state["guard"])
        print0(f"resumed from {ckpt} at step {step}")
    metrics = MetricsWriter(run.path / "metrics.jsonl", resume_step=step if run.resumed else None,
                            trackers=make_trackers(args, run.path))   # --report-to: wandb, tensorboard
    progress = Progress(args.max_steps, desc=stage, start=step, every_s=args.log_every_s)
    pad_id = tok.pad_id if tok.pad_id is not None else 0

    eval_rows = read_jsonl(args.eval_data)[:args.eval_problems] if args.eval_data else []
    eval_task = heldout_task(args, eval_rows)
    if eval_rows and args.eval_task is None:
        print0(f"--eval-task {eval_task} (default: the task of {args.eval_data}'s rows)")

    def held_out(at_step):
        """Greedy accuracy on the held-out problems (strict and lenient), logged at `at_step`."""
        if not eval_rows:
            return {}
        model.eval()
        r = evaluate_sharded(model, tok, eval_rows, eval_task, info.rank, info.world_size, n=1,
                             temperature=0.0, max_new_tokens=args.eval_max_new_tokens,
                             template=args.chat_template, max_batch_size=args.eval_batch_size)
        model.train()
        print0(f"eval at step {at_step}: greedy accuracy {r.accuracy:.3f} (lenient {r.lenient_accuracy:.3f}) on "
               f"{r.num_problems} problems, mean length {r.mean_length:.1f} tokens, {r.wall_s:.1f}s")
        return {"greedy_accuracy": r.accuracy, "greedy_lenient_accuracy": r.lenient_accuracy,
                "eval_response_length": r.mean_length}

    def checkpoint(at_step):
        bad = nonfinite_parameters(model)
        if bad:  # never publish weights that cannot be resumed from; the last good checkpoint stays
            raise NonFiniteError(f"step {at_step}: parameters {', '.join(bad[:5])} hold non-finite values; "
                                 f"checkpoint not written")
        save_checkpoint(run.path, at_step, model=model, optimizer=optimizer, keep_last=args.keep_last,
                        trainer_state={"step": at_step, "tokens_seen": tokens_seen,
                                       "sampler": sampler.state_dict(), "guard": guard.state_dict()},
                        save_model_fn=save_model_fn(model, tok, export_dtype, base_model=args.model or args.preset))

    def finish(at_step, stopped: str | None = None) -> int:
        """Write summary.json (rank 0) and close the metrics; exit status 0, or 3 for a stopped run."""
        sizes = training_state_sizes(model, optimizer)   # trainable parameters, optimizer bytes (all ranks)
        peak = peak_bytes(device)
        sizes["peak_memory_gib"] = all_reduce_floats([peak / 2**30], "max")[0] if peak is not None else None
        summary = {**final_eval, **sizes, "stage": stage, "steps": at_step,
                   "final_loss": step_loss if args.max_steps else None, "tokens_seen": tokens_seen,
                   "wall_s": time.perf_counter() - t_start, "skipped_steps": guard.skipped_total,
                   "documents": report.kept, "dropped_overlong": report.dropped,
                   "truncated_overlong": report.truncated, **({"stopped": stopped} if stopped else {})}
        if info.rank == 0:
            write_json_atomic(run.path / "summary.json", summary)
        metrics.close()
        return 0 if stopped is None else 3

    model.train()
    t_start = time.perf_counter()
    final_eval, step_loss = {}, float("nan")
    while step < args.max_steps:
        t0 = time.perf_counter()
        step_docs = [docs[i] for i in next(sampler)]
        mbs = micro_batches(step_docs, args.micro_batch_size, args.seq_len, not args.no_packing, pad_id)
        local_targets = sum(b.num_targets for b in mbs)
        global_targets, = all_reduce_floats([local_targets])
        loss_sum = 0.0
        for i, mb in enumerate(mbs):
            if args.no_sync_accumulation and hasattr(model, "set_requires_gradient_sync"):
                # FSDP: unsharded gradients accumulate, one reduce-scatter on the last micro-batch.
                # By default every micro-batch reduce-scatters, so only sharded gradients are kept.
                model.set_requires_gradient_sync(i == len(mbs) - 1)
            nll, extra = batch_loss_sum(model, mb.to(device))
            loss = nll / global_targets * info.world_size  # FSDP averages gradients over ranks
            aux = moe_aux_loss(model)
            if aux is not None:
                loss = loss + aux / len(mbs)
            loss.backward()
            loss_sum += float(nll.detach())
        if not mbs:  # a rank without documents this step still joins the collectives
            raise RuntimeError(f"rank {info.rank} got no documents at step {step}")
        step_loss = all_reduce_floats([loss_sum])[0] / max(global_targets, 1)
        lr = lr_schedule(step, max_lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                         min_lr_ratio=args.min_lr_ratio)
        try:
            result = optimizer_step(model, optimizer, max_grad_norm=args.max_grad_norm, guard=guard, lr=lr,
                                    loss=step_loss)
        except NonFiniteError as e:  # --max-nonfinite skips in a row: stop, keep the last good checkpoint
            metrics.log(step + 1, loss=step_loss, lr=lr, skipped=1, skipped_total=guard.skipped_total)
            print0(f"{stage}: stopped at step {step + 1}: {e}")
            return finish(step, stopped=str(e))
        if result.skipped:
            print0(f"{stage} step {step + 1}: non-finite loss ({step_loss}) or gradient norm ({result.grad_norm}); "
                   f"update skipped ({guard.skipped_in_a_row} in a row, {guard.skipped_total} in the run, "
                   f"--max-nonfinite {args.max_nonfinite})")
        else:
            update_moe_biases(model)
        step += 1
        step_tokens = all_reduce_floats([sum(len(d.ids) for d in step_docs)])[0]  # documents' tokens, no padding
        tokens_seen += int(step_tokens)
        dt = time.perf_counter() - t0
        row = {"loss": step_loss, "lr": lr, "grad_norm": result.grad_norm,
               "skipped": int(result.skipped), "skipped_total": guard.skipped_total,
               "target_tokens": int(global_targets), "tokens_per_s": step_tokens / dt, "step_s": dt,
               **moe_load_stats(model)}
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            final_eval = held_out(step)
            row.update(final_eval)
        metrics.log(step, **row)
        progress.update(1, loss=step_loss, lr=lr, grad_norm=result.grad_norm, tok_s=step_tokens / dt)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            checkpoint(step)
    checkpoint(step)
    return finish(step)
