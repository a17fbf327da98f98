"""The GRPO loop (R1-Zero and reasoning RL), one function read top to bottom.

    torchrun --nproc_per_node 2 train.py --stage grpo --model DIR --data prompts.jsonl \\
        --reward task,format --group-size 8 --prompts-per-step 16 --lr 1e-4

One step:
 1. rollout: this rank's prompts -> sampler (the policy's own weights, gathered once under FSDP, or
    with --rollout-tp N split over each group of N ranks by tensor parallelism, the group sampling
    its ranks' prompts as one batch: model/tensor_parallel.py; n = group size, shared prefill) -> rewards (verify/, in-process or a worker pool) ->
    group advantages. With --dynamic-sampling, groups whose rewards are all equal (zero advantage,
    no gradient) are dropped and more prompts are sampled until the batch is full (DAPO). The
    sampler's KV cache is released before training.
 2. log-probs: old log-probs are the sampler's when on-policy (mu = 1: the policy has not moved
    since it sampled; the ratio is 1 in value and only its gradient matters), else recomputed
    before the first update; the frozen reference model's when beta > 0 (with LoRA: the policy
    with its adapters switched off, model.lora.adapters_disabled, so no second model is held).
    With --lora-rank, rollouts sample base + adapter: the adapters are merged into the gathered
    weights (or into each whole tensor before the --rollout-tp cut) for the rollout and gone after.
 3. train: mu passes over the batch, each split into --num-minibatches optimizer steps; each
    optimizer step's sequences run in token-budget micro-batches (prompt + completion packed end to
    end, no padding), log-probs through kernels.token_logprobs on the final hidden states (no
    [B, T, V] logits), rl.loss.policy_loss with the step's global token/sequence counts, one
    optimizer update (clip, non-finite guard, lr schedule: runtime/).
 4. metrics (reward per function, accuracy, zero-std groups, lengths, truncation, KL, entropy,
    clip ratios, grad norm, time split), checkpoints, held-out evaluation every --eval-every steps.

Overlong completions (finish_reason "length"): --mask-truncated drops them from the loss (DAPO's
overlong filtering); the soft overlong reward is a reward function (verify.rewards soft_overlong).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from data.datasets import ShardedBatchSampler, fit_global_batch, load_prompts, read_jsonl
from data.tokenizer import load_tokenizer
from evaluation.eval_stage import check_rollout_tp
from evaluation.remote import check_judge_flags, make_run_judges
from evaluation.reward_model import check_reward_model_flags, make_reward_models
from evaluation.evaluate import check_heldout_flags, evaluate_sharded, heldout_task
from kernels import token_logprobs
from model.build import (build_model, build_trained_model, check_length, check_model_flags, export_dtype_of,
                         model_config, save_model_fn)
from model.moe import moe_aux_loss, moe_load_stats, update_moe_biases
from model.lora import adapters_disabled
from model.parallel import gathered
from model.tensor_parallel import TensorParallelRollout
from rl.advantage import group_advantages, group_reward_stats
from rl.distill import check_teacher, distill_advantages, reverse_kl_sums
from rl.loss import VARIANTS, all_reduce_metrics, combine_metrics, policy_loss
from rl.rollout import (RewardScorer, RolloutBatch, encode_prompt, generate_rollouts, rollout_environment,
                        rollout_records, select_for_dynamic_sampling)
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.distributed import all_reduce_floats, print0, subgroup
from runtime.memory import peak_bytes, reset_peak, training_state_sizes
from runtime.metrics import MetricsWriter, Progress
from runtime.trackers import log_table, make_trackers
from runtime.optim import build_optimizer, check_training_flags, lr_schedule
from runtime.rundir import check_rank_multiple, update_run_config, write_json_atomic
from runtime.train_step import NonFiniteGuard, optimizer_step
from sampling.sampler import Sampler, SamplingParams, engine_options
from verify.judge import judge_metrics


# ---- log-probs of completions -----------------------------------------------------------------------

def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float,
                      with_entropy: bool = False):
    """Per-token log-probs (and entropies) of the completions given their prompts.

    The sequences prompt + completion are packed end to end into one row [1, total] whose documents
    attend only to themselves (cu_seqlens, and their longest length, known on the host, as
    max_seqlen); the hidden states at the positions that predict completion tokens go through
    kernels.token_logprobs (temperature-scaled, never [tokens, V]).
    Returns logp [B, Tc] fp32 (0 on padding), entropy [B, Tc] or None, mask [B, Tc] bool.
    """
    device = model.output_weight.device
    B = len(completion_ids)
    Tc = max(1, max(len(c) for c in completion_ids))
    ids, pos, cu, src, targets = [], [], [0], [], []
    for p, c in zip(prompt_ids, completion_ids):
        seq = p + c
        start = len(ids)
        ids += seq
        pos += range(len(seq))
        cu.append(len(ids))
        # position start + len(p) - 1 + t predicts completion token t
        src += [start + len(p) - 1 + t for t in range(len(c))]
        targets += c
    ids_t = torch.tensor([ids], device=device)
    longest = max(b - a for a, b in zip(cu, cu[1:]))  # known here on the host: no layer reads cu_seqlens back
    hidden = model.forward_hidden(ids_t, position_ids=torch.tensor([pos], device=device),
                                  cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device), max_seqlen=longest)
    h = hidden[0, torch.tensor(src, device=device)]  # [N_completion_tokens, D]
    out = token_logprobs(h, model.output_weight, torch.tensor(targets, device=device), temperature=temperature,
                         with_entropy=with_entropy)
    logp_flat, ent_flat = (out if with_entropy else (out, None))
    mask = torch.zeros(B, Tc, dtype=torch.bool, device=device)
    for i, c in enumerate(completion_ids):
        mask[i, :len(c)] = True
    logp = torch.zeros(B, Tc, dtype=torch.float32, device=device).masked_scatter(mask, logp_flat.float())
    entropy = None
    if with_entropy:
        entropy = torch.zeros(B, Tc, dtype=torch.float32, device=device).masked_scatter(mask, ent_flat.float())
    return logp, entropy, mask


def _pad(rows: list[list[float]], Tc: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), Tc, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def token_budget_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into consecutive chunks of at most `budget` tokens (a longer sequence alone)."""
    chunks, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        chunks.append(cur)
    return chunks


def rollout_seed(seed: int, step: int, round_: int, rank: int) -> int:
    """The generate_rollouts seed of one rollout round: distinct for every (step, round, rank) of a run, so
    ranks draw independent samples and a resumed run draws what the uninterrupted one drew."""
    return ((seed * 1_000_003 + step) * 1_009 + round_) * 1_000_003 + rank


# ---- the loop ---------------------------------------------------------------------------------------

def loss_options(args) -> tuple[dict, dict]:
    """(policy_loss options, group_advantages options) from a --variant and the explicit flags."""
    paper = args.variant in VARIANTS   # opd (on-policy distillation, rl/distill.py) keeps the defaults
    loss = dict(VARIANTS[args.variant]["loss"]) if paper else {}
    adv = dict(VARIANTS[args.variant]["advantage"]) if paper else {}
    for flag, key in (("eps_low", "eps_low"), ("eps_high", "eps_high"), ("beta", "beta"), ("kl", "kl"),
                      ("loss_agg", "agg"), ("ratio_level", "ratio_level"), ("dual_clip", "dual_clip")):
        value = getattr(args, flag)
        if value is not None:
            loss[key] = value
    for flag, key in (("scale_rewards", "scale"), ("advantage_estimator", "estimator")):
        value = getattr(args, flag)
        if value is not None:
            adv[key] = value
    loss.setdefault("agg", "token_mean")
    if loss["agg"] == "seq_mean_token_sum_norm":
        loss["max_tokens"] = args.max_new_tokens
    if args.entropy_coef:
        loss["entropy_coef"] = args.entropy_coef
    if args.tis_cap:
        loss["is_cap"] = args.tis_cap
    return loss, adv


DEFAULT_PROMPTS_PER_STEP = 16  # when --prompts-per-step is unset (rounded up to a multiple of the ranks)


def check_flags(args, world_size: int) -> list[str]:
    """The GRPO stage's flags, checked before the run directory is created or moved (ValueError
    naming the flag), so a bad invocation leaves nothing behind and fails before any model loads.
    Unset run-dependent flags get values that fit this run (--warmup-steps, --prompts-per-step;
    the data may shrink a default further, see train_grpo); returns the console lines saying so."""
    from pathlib import Path

    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(args.data is not None, "--stage grpo needs --data (a prompts JSONL/Parquet file)")
    need(Path(args.data).is_file(), f"--data {args.data}: no such file")
    check_model_flags(args)
    notes = check_training_flags(args)
    check_heldout_flags(args)
    notes += check_rank_multiple(args, "prompts_per_step", DEFAULT_PROMPTS_PER_STEP, world_size)
    need(args.group_size >= 2, f"--group-size {args.group_size}: expected >= 2 (advantages compare samples of a prompt)")
    need(args.temperature > 0, f"--temperature {args.temperature}: expected > 0 (the policy's log-probs are taken "
                               f"at the sampling temperature)")
    need(0 < args.top_p <= 1 and args.top_k >= 0, f"--top-p {args.top_p} / --top-k {args.top_k}: expected top-p in "
                                                  f"(0, 1] and top-k >= 0")
    need(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    need(args.mu >= 1, f"--mu {args.mu}: expected >= 1")
    per_rank = args.prompts_per_step // world_size * args.group_size
    need(1 <= args.num_minibatches <= per_rank,
         f"--num-minibatches {args.num_minibatches}: expected between 1 and the {per_rank} sequences each rank "
         f"holds per step (--prompts-per-step / ranks x --group-size)")
    need(args.micro_batch_tokens >= 1, f"--micro-batch-tokens {args.micro_batch_tokens}: expected >= 1")
    need(args.sampler_batch_size >= 1, f"--sampler-batch-size {args.sampler_batch_size}: expected >= 1")
    engine_options(args)
    check_rollout_tp(args, world_size)
    rollout_environment(args)   # --tools, --tool-format, --max-tool-calls, --max-rollout-tokens
    need(args.max_sampling_tries >= 1, f"--max-sampling-tries {args.max_sampling_tries}: expected >= 1")
    need(args.log_rollouts_every >= 0 and args.log_rollouts_n >= 1,
         f"--log-rollouts-every {args.log_rollouts_every} / --log-rollouts-n {args.log_rollouts_n}: expected >= 0 "
         f"(0: never) and >= 1")
    need(args.ref_refresh_every >= 0, f"--ref-refresh-every {args.ref_refresh_every}: expected >= 0 (0: never)")
    need(not (args.ref_refresh_every and (args.lora_rank or args.lora_init)),
         f"--ref-refresh-every {args.ref_refresh_every} with LoRA: a LoRA policy's reference is its frozen base "
         f"(the adapters switched off), which never moves; train every weight to refresh the reference")
    need(args.reward_workers >= 0 and args.reward_timeout_s > 0,
         f"--reward-workers {args.reward_workers} / --reward-timeout-s {args.reward_timeout_s}: expected >= 0 "
         f"(0: score in this process) and > 0")
    need(any(spec.strip() for spec in args.reward.split(",")),
         f"--reward {args.reward!r}: expected comma-separated reward names such as accuracy,format")
    RewardScorer(args.reward, workers=0)  # unknown reward names and bad judge templates fail here
    check_judge_flags(args)
    check_reward_model_flags(args)        # --reward rm:DIR: a score head and a chat template
    check_teacher(args)                   # --teacher / --variant opd / --distill-coef: one tokenizer
    return notes


def train_grpo(args, run, info) -> int:
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    tok = load_tokenizer(args.tokenizer, args.model)
    config = model_config(args, tok)
    check_length(config, args.max_new_tokens + 1, "--max-new-tokens with a prompt", args.model or f"preset {args.preset}")
    # The policy: fp32 master weights, sharded (FSDP2) before they are allocated when there are several
    # ranks or a lower compute precision, activation checkpointing wrapped in first. The reference: the
    # same checkpoint (or seed) built the same way, stored in the compute dtype, never trained.
    model, info, param_dtype, fsdp, compiled = build_trained_model(args, tok, info, device)
    # what rollouts sample with: the gathered model, or each rank's tensor-parallel share (refused
    # here, naming the count, when the heads or experts do not split over --rollout-tp)
    rollout = TensorParallelRollout(model, subgroup(args.rollout_tp), dtype=param_dtype)
    loss_opts, adv_opts = loss_options(args)
    beta = loss_opts.get("beta", 0.0)
    ref_model = None
    lora = getattr(model, "lora", None) is not None
    if beta > 0 and not lora:   # a LoRA policy's reference is its own base: the adapters switched off
        ref_fsdp = None if fsdp is None else {"param_dtype": None, "reduce_dtype": None}
        ref_model = build_model(args, tok, device=device, dtype=param_dtype, fsdp=ref_fsdp, compile=compiled)
        ref_model.requires_grad_(False).eval()
    teacher = None   # on-policy distillation: built like the reference model, from --teacher
    if args.teacher is not None:
        teacher_args = argparse.Namespace(**{**vars(args), "model": args.teacher, "preset": None,
                                             "max_position_embeddings": None, "rope_theta": None, "rope_scaling": None})
        teacher = build_model(teacher_args, tok, device=device, dtype=param_dtype,
                              fsdp=None if fsdp is None else {"param_dtype": None, "reduce_dtype": None},
                              compile=compiled)
        teacher.requires_grad_(False).eval()
    export_dtype = export_dtype_of(args)
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    guard = NonFiniteGuard(max_in_a_row=args.max_nonfinite)

    rows = load_prompts(args.data, args.prompt_column)
    args.prompts_per_step, note = fit_global_batch(
        args.prompts_per_step, len(rows), info.world_size, flag="--prompts-per-step",
        what=f"{args.data} has {len(rows)} prompts", defaulted="prompts_per_step" in (getattr(args, "defaulted", None) or ()))
    if note:
        print0(note)
        update_run_config(run, prompts_per_step=args.prompts_per_step)
    per_rank = args.prompts_per_step // info.world_size
    prompt_sampler = ShardedBatchSampler(len(rows), per_rank, rank=info.rank, world_size=info.world_size,
                                         seed=args.seed)
    judges = make_run_judges(args, device=info.device)   # --reward judge:...: LLM judges (verify/judge.py)
    # --reward rm:DIR: reward models, sharded like the reference model and never trained
    rms = make_reward_models(args, device, fsdp=None if fsdp is None else {"param_dtype": None, "reduce_dtype": None})
    scorer = RewardScorer(args.reward, workers=args.reward_workers, timeout_s=args.reward_timeout_s,
                          judges={**judges, **rms})
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens)
    env, budget = rollout_environment(args)   # tools: multi-turn rollouts of at most `budget` tokens
    longest_prompt = 0  # the sampler is sized on first use from the prompts it sees
    sampler = None

    step = 0
    ckpt = latest_checkpoint(run.path) if run.resumed else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step = state["step"]
        prompt_sampler.load_state_dict(state["sampler"])
        guard.load_state_dict(state["guard"])
        if ref_model is not None and state.get("ref_from_step", 0) != 0:
            print0("note: the reference model restarts from the resumed policy (refreshed references are not saved)")
        print0(f"resumed from {ckpt} at step {step}")
    metrics = MetricsWriter(run.path / "metrics.jsonl", resume_step=step if run.resumed else None,
                            trackers=make_trackers(args, run.path))   # --report-to: wandb, tensorboard
    # --log-rollouts-every: a sample of each K-th step's rollouts, one line each (rl.rollout.rollout_records)
    rollout_log = (MetricsWriter(run.path / "rollouts.jsonl", resume_step=step if run.resumed else None)
                   if args.log_rollouts_every else None)
    progress = Progress(args.max_steps, desc="grpo", start=step, every_s=args.log_every_s)
    eval_rows = read_jsonl(args.eval_data)[:args.eval_problems] if args.eval_data else []
    eval_task = heldout_task(args, eval_rows)
    if eval_rows and args.eval_task is None:
        print0(f"--eval-task {eval_task} (default: the task of {args.eval_data}'s rows)")

    def held_out(at_step) -> dict:
        if not eval_rows:
            return {}
        model.eval()
        out = {}
        for name, n, temp in (("greedy", 1, 0.0), ("sampled", args.eval_samples, 1.0)):
            if n <= 0:
                continue
            r = evaluate_sharded(model, tok, eval_rows, eval_task, info.rank, info.world_size, n=n,
                                 rollout=rollout if args.rollout_tp > 1 else None, env=env,
                                 max_total_tokens=budget if env is not None else None,
                                 temperature=temp, max_new_tokens=args.eval_max_new_tokens,
                                 template=args.chat_template, max_batch_size=args.eval_batch_size, seed=at_step)
            out.update({f"eval/{name}_accuracy": r.accuracy, f"eval/{name}_lenient_accuracy": r.lenient_accuracy,
                        f"eval/{name}_response_length": r.mean_length})
            if r.tool_share is not None:
                out[f"eval/{name}_tool_share"] = r.tool_share
        model.train()
        print0(f"eval at step {at_step}: " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in out.items()
                                                         if "accuracy" in k))
        return out

    def checkpoint(at_step):
        save_checkpoint(run.path, at_step, model=model, optimizer=optimizer, keep_last=args.keep_last,
                        trainer_state={"step": at_step, "sampler": prompt_sampler.state_dict(),
                                       "guard": guard.state_dict()},
                        save_model_fn=save_model_fn(model, tok, export_dtype, base_model=args.model or args.preset))

    first_eval = held_out(step) if (eval_rows and not run.resumed) else {}
    if first_eval:
        metrics.log(step, **first_eval)
        write_json_atomic(run.path / "initial_eval.json", first_eval) if info.rank == 0 else None
    t_start = time.perf_counter()
    last_eval = first_eval
    run_peak = 0.0   # the largest step's memory high-water mark (GiB, the largest rank)
    model.train()
    while step < args.max_steps:
        t0 = time.perf_counter()
        # ---- 1. rollout ----------------------------------------------------------------------------
        # Rounds until every rank holds per_rank groups. Every rank runs every round, because
        # gathering the sharded weights is a collective: a rank that is already full (dynamic sampling
        # refills the others) joins the gather, skips its prompts and samples nothing (under
        # --rollout-tp it still decodes its group's batch, with no prompts of its own).
        batches, kept, tries, dropped, rounds = [], 0, 0, 0, 0
        t_gen = t_rew = 0.0
        reset_peak(device)
        while all_reduce_floats([per_rank - kept], "max")[0] > 0:
            rounds += 1
            if kept >= per_rank:
                next(prompt_sampler)  # prompt positions stay equal on all ranks (the checkpoint holds rank 0's)
                with rollout.weights():
                    if args.rollout_tp > 1:
                        sampler.generate([], [])
                        sampler.release()
                continue
            chunk = [rows[i] for i in next(prompt_sampler)]
            chunk_ids = [encode_prompt(tok, r, args.chat_template) for r in chunk]
            need = max(len(p) for p in chunk_ids)
            tg = time.perf_counter()
            with rollout.weights() as policy:
                if sampler is None or need + budget > sampler.max_seq_len:
                    check_length(config, need + budget, f"a prompt of {need} tokens with "
                                 + (f"--max-rollout-tokens {budget}" if env is not None else
                                    f"--max-new-tokens {args.max_new_tokens}"), args.model or f"preset {args.preset}")
                    longest_prompt = max(longest_prompt, need)
                    sampler = Sampler(policy, max_batch_size=args.sampler_batch_size,
                                      max_seq_len=longest_prompt + budget, tokenizer=tok,
                                      verbose=info.rank == 0 and sampler is None, **engine_options(args))
                part = generate_rollouts(sampler, tok, chunk, group_size=args.group_size, params=params,
                                         template=args.chat_template,
                                         seed=rollout_seed(args.seed, step, tries, info.rank),
                                         prompt_ids=chunk_ids, env=env, max_total_tokens=budget if env else None)
                sampler.release()
            t_gen += time.perf_counter() - tg
            tr = time.perf_counter()
            scorer.score(part)
            t_rew += time.perf_counter() - tr
            tries += 1
            if args.dynamic_sampling:
                part, n_dropped = select_for_dynamic_sampling(part, per_rank - kept,
                                                              last_round=tries >= args.max_sampling_tries)
                dropped += n_dropped
            batches.append(part)
            kept += part.num_groups
        rollout_peak = peak_bytes(device)
        batch = RolloutBatch.concat(batches)
        batch.advantages = group_advantages(batch.rewards, args.group_size, **adv_opts)

        # ---- 2. masks, old and reference log-probs -------------------------------------------------
        N = len(batch)
        Tc = max(1, max(len(c) for c in batch.completion_ids))
        # observation tokens (tools) are not the policy's: no loss, KL or entropy on them, not counted
        sampled = batch.sampled_masks or [[1] * len(c) for c in batch.completion_ids]
        mask_rows = [[float(m) for m in s] if not (args.mask_truncated and f == "length") else [0.0] * len(s)
                     for s, f in zip(sampled, batch.finish_reasons)]
        mask_all = _pad(mask_rows, Tc, device)
        rollout_logp_all = _pad(batch.rollout_logp, Tc, device)
        advantages = batch.advantages.to(device)
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        # micro-batches by token budget; every rank runs the same number (FSDP's collectives)
        minibatches = [list(range(N))[i::args.num_minibatches] for i in range(args.num_minibatches)]
        plans = [[[mb[j] for j in ch] for ch in token_budget_chunks([lengths[i] for i in mb], args.micro_batch_tokens)]
                 for mb in minibatches]
        n_micro = [int(x) for x in all_reduce_floats([len(p) for p in plans], "max")]

        def logps_of(m, idx, entropy=False):
            return sequence_logprobs(m, [batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx],
                                     args.temperature, with_entropy=entropy)

        def no_grad_logps(m) -> torch.Tensor:
            """[N, Tc] log-probs of every completion under m, no gradient. m stays gathered for the pass:
            one all-gather instead of one per micro-batch, and under FSDP2 a no-grad forward reshards even
            the root afterwards, which would leave output_weight sharded for token_logprobs."""
            out = torch.zeros(N, Tc, device=device)
            with torch.no_grad(), gathered(m):
                for plan in plans:
                    for idx in plan:
                        lp, _, _ = logps_of(m, idx)
                        out[idx, :lp.shape[1]] = lp
            return out

        t_logp = time.perf_counter()
        need_old = args.mu > 1 or args.recompute_old_logp
        old_all = no_grad_logps(model) if need_old else rollout_logp_all
        if beta > 0 and lora:
            with adapters_disabled(model):
                ref_all = no_grad_logps(model)
        else:
            ref_all = no_grad_logps(ref_model) if beta > 0 else None
        distill = None
        if teacher is not None:   # per-token advantages: the teacher's log-prob minus the student's (rl/distill.py)
            teacher_all = no_grad_logps(teacher)
            advantages = distill_advantages(teacher_all, old_all, mask_all,
                                            None if args.variant == "opd" else advantages,
                                            coef=1.0 if args.variant == "opd" else args.distill_coef)
            distill = reverse_kl_sums(teacher_all, old_all, mask_all)
        t_logp = time.perf_counter() - t_logp

        # ---- 3. train: mu passes x minibatches (one optimizer step each) x token-budget micro-batches -
        t_train = time.perf_counter()
        step_metrics, grad_norms, skipped = [], [], 0
        lr = lr_schedule(step, max_lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                         min_lr_ratio=args.min_lr_ratio, kind=args.lr_schedule)
        for _ in range(args.mu):
            for mb, plan, count in zip(minibatches, plans, n_micro):
                local_tokens = float(mask_all[mb].sum())
                num_tokens, num_seqs = all_reduce_floats([local_tokens, float(len(mb))])
                parts = []
                for k in range(count):
                    dummy = k >= len(plan)
                    idx = plan[k] if not dummy else [plan[0][0]]
                    logp, ent, m = logps_of(model, idx, entropy=True)
                    Tm = logp.shape[1]
                    msk = mask_all[idx, :Tm] * (0.0 if dummy else 1.0)
                    loss, lm = policy_loss(
                        logp, old_all[idx, :Tm] if need_old else None,
                        advantages[idx, :Tm] if advantages.dim() == 2 else advantages[idx], msk,
                        ref_all[idx, :Tm] if ref_all is not None else None,
                        num_tokens=max(num_tokens, 1.0), num_seqs=max(num_seqs, 1.0), entropy=ent,
                        rollout_logp=rollout_logp_all[idx, :Tm] if args.tis_cap else None,
                        **loss_opts)
                    aux = moe_aux_loss(model)
                    if aux is not None:
                        loss = loss + aux / max(count, 1)
                    (loss * info.world_size).backward()  # FSDP averages over ranks; the counts are global
                    if not dummy:
                        parts.append(lm)
                result = optimizer_step(model, optimizer, max_grad_norm=args.max_grad_norm, guard=guard, lr=lr)
                if not result.skipped:
                    update_moe_biases(model)
                grad_norms.append(result.grad_norm)
                skipped += int(result.skipped)
                if parts:
                    step_metrics.append(combine_metrics(parts))
        t_train = time.perf_counter() - t_train
        step += 1

        # ---- 4. metrics ------------------------------------------------------------------------------
        lm = all_reduce_metrics(combine_metrics(step_metrics)) if step_metrics else {}
        row = _rollout_metrics(batch, args, device)
        row.update({k: float(v) for k, v in lm.items()})
        if args.dynamic_sampling:
            row["sampling/rounds"] = rounds  # the same on every rank
            row["sampling/groups_dropped"] = all_reduce_floats([dropped])[0]
        row.update(lr=lr, grad_norm=sum(grad_norms) / len(grad_norms), skipped_total=guard.skipped_total,
                   skipped=skipped, **{f"time/{k}": v for k, v in (("rollout", t_gen), ("reward", t_rew),
                                                                    ("logprobs", t_logp), ("train", t_train))},
                   step_s=time.perf_counter() - t0, **moe_load_stats(model))
        if distill is not None:   # the sampled reverse KL to the teacher over the trained tokens, all ranks
            kl_sum, teacher_sum, count = all_reduce_floats(distill)
            row.update({"distill/reverse_kl": kl_sum / max(count, 1.0), "distill/teacher_logp": teacher_sum / max(count, 1.0)})
        if judges:   # the judges' requests so far, all ranks together (a failed or unparsable one gave None)
            names = list(judge_metrics(judges))
            row.update(zip(names, all_reduce_floats([judge_metrics(judges)[k] for k in names])))
        # per rank: the weights the rollout sampled with (whole, or this rank's tensor-parallel share), and
        # the rollout phase's memory high-water mark (runtime/memory.py), each the largest over the ranks
        row["memory/rollout_weight_gib"] = all_reduce_floats([rollout.weight_bytes / 2**30], "max")[0]
        if rollout_peak is not None:
            row["memory/rollout_peak_gib"] = all_reduce_floats([rollout_peak / 2**30], "max")[0]
        step_peak = peak_bytes(device)   # since the rollout began: the rollout, log-prob and training phases
        if step_peak is not None:
            row["memory/step_peak_gib"] = all_reduce_floats([step_peak / 2**30], "max")[0]
            run_peak = max(run_peak, row["memory/step_peak_gib"])
        row["tokens_per_s"] = row["tokens"] / row["step_s"] if "tokens" in row else 0.0
        if args.ref_refresh_every and ref_model is not None and step % args.ref_refresh_every == 0:
            ref_model.load_state_dict(model.state_dict())  # R1 refreshed its reference model periodically
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            last_eval = held_out(step)
            row.update(last_eval)
        if row.get("reward/mean") == 0.0 and step > 1 and args.variant != "opd":
            print0(f"warning: step {step}: mean reward is 0; every advantage is 0 and nothing is learned "
                   f"(learning rate too high? format collapsed?)")
        metrics.log(step, **row)
        if rollout_log is not None and step % args.log_rollouts_every == 0:
            table = rollout_records(batch, args.log_rollouts_n)
            for record in table:
                rollout_log.log(step, **record)
            log_table(metrics.trackers, step, "rollouts", table)
        progress.update(1, reward=row.get("reward/mean"), acc=row.get("accuracy"),
                        len=row.get("response_length/mean"), kl=row.get("kl"))
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            checkpoint(step)
    scorer.close()
    if rollout_log is not None:
        rollout_log.close()
    checkpoint(step)
    summary = {**training_state_sizes(model, optimizer), "peak_memory_gib": run_peak or None,
               "stage": "grpo", "steps": step, "wall_s": time.perf_counter() - t_start,
               "initial_eval": first_eval, "final_eval": last_eval, "skipped_steps": guard.skipped_total}
    if info.rank == 0:
        write_json_atomic(run.path / "summary.json", summary)
    metrics.close()
    return 0


def _rollout_metrics(batch: RolloutBatch, args, device) -> dict:
    """Reward, accuracy, group and length statistics of a step's rollouts, over all ranks."""
    r = batch.rewards
    lens = [len(c) for c in batch.completion_ids]
    trunc = [f == "length" for f in batch.finish_reasons]
    groups = group_reward_stats(r, args.group_size)
    acc_name = next((n for n in batch.reward_columns if n.split(":")[0] in ("accuracy", "task", "arithmetic",
                                                                             "countdown", "code")), None)
    acc = [v for v in batch.reward_columns.get(acc_name, []) if v is not None]
    valid = r[~torch.isnan(r)]
    sums = [float(valid.sum()), float((valid ** 2).sum()), float(valid.numel()), float(sum(lens)), float(len(lens)),
            float(sum(trunc)), float(sum(a >= 1.0 for a in acc)), float(len(acc)),
            groups["frac_groups_zero_std"] * batch.num_groups, float(batch.num_groups)]
    for name in batch.reward_columns:
        vals = [v for v in batch.reward_columns[name] if v is not None]
        sums += [float(sum(vals)), float(len(vals))]
    tot = all_reduce_floats(sums)
    mins = all_reduce_floats([min(lens)], "min")
    maxs = all_reduce_floats([max(lens)], "max")
    n = max(tot[2], 1.0)
    mean = tot[0] / n
    out = {"reward/mean": mean, "reward/std": math.sqrt(max(tot[1] / n - mean ** 2, 0.0)),
           "response_length/mean": tot[3] / tot[4], "response_length/min": mins[0], "response_length/max": maxs[0],
           "truncated": tot[5] / tot[4], "frac_groups_zero_std": tot[8] / max(tot[9], 1.0)}
    if acc_name is not None:
        out["accuracy"] = tot[6] / max(tot[7], 1.0)
    for j, name in enumerate(batch.reward_columns):
        s, c = tot[10 + 2 * j], tot[11 + 2 * j]
        out[f"reward/{name}"] = s / c if c else float("nan")
    if batch.tool_stats is not None:
        out.update(tool_metrics(batch.tool_stats, batch.reward_columns.get(acc_name) if acc_name else None))
    return out


def tool_metrics(stats: list[dict], correct: list[float | None] | None) -> dict:
    """Per-step tool metrics over all ranks: calls per rollout, errors and timeouts per call,
    malformed calls, observation tokens per rollout, seconds in tools (summed over rollouts), the
    share of rollouts that called a tool, and of correct answers that called one."""
    used = [st["calls"] > 0 for st in stats]
    right = [c is not None and c >= 1.0 for c in (correct or [None] * len(stats))]
    keys = ("calls", "errors", "timeouts", "malformed", "observation_tokens", "seconds")
    sums = [float(sum(st[k] for st in stats)) for k in keys]
    sums += [float(len(stats)), float(sum(used)), float(sum(right)), float(sum(u and r for u, r in zip(used, right)))]
    tot = all_reduce_floats(sums)
    calls, n = tot[0], max(tot[6], 1.0)
    out = {"tool/calls_per_rollout": calls / n, "tool/errors": tot[1] / max(calls, 1.0),
           "tool/timeouts": tot[2] / max(calls, 1.0), "tool/malformed": tot[3] / max(calls, 1.0),
           "tool/observation_tokens": tot[4] / n, "time/tools": tot[5], "tool/share": tot[7] / n}
    if correct is not None:
        out["tool/share_of_correct"] = tot[9] / tot[8] if tot[8] else 0.0
    return out
