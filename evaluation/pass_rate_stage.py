"""--stage pass-rate: each prompt's pass rate under a model, and the prompts inside a band.

    python train.py --stage pass-rate --model DIR --data prompts.jsonl --gen-n 8 --reward accuracy \\
        --pass-rate-min 0.1 --pass-rate-max 0.9 --out runs/pass-rate

Open-R1's filtering of RL prompts: a prompt the model always solves, or never does, gives GRPO
groups of equal rewards and no gradient, so it is dropped before training. For each prompt of
--data (in file order, prompt i sampled with seed --seed * 1_000_003 + i, as the generate stage
samples) the model draws --gen-n completions, each is scored with every --reward, and a sample
passes when it meets --keep-if (default: full marks on each verifiable reward, as the generate
stage keeps). Written in the run directory:

  pass_rates.jsonl  every prompt row, unchanged with all its columns, plus pass_rate (passes / n),
                    passes, samples and mean_scores {spec: mean over the samples that got a value}
  kept.jsonl        the rows (the same, with those columns) whose pass_rate lies in
                    [--pass-rate-min, --pass-rate-max], in file order: the RL prompts to train on
  summary.json      prompts, kept, the pass-rate histogram (tenths) and the band

Resumable after a crash (kill -9 included), as the generate stage is: pass_rates.jsonl grows by
whole batches of --gen-batch-prompts, fsynced, and progress.json records each batch after it, so
`--resume` cuts the file back to the last recorded batch and redraws the next one with the same
seeds: the finished files equal an uninterrupted run's. kept.jsonl is written at the end from
pass_rates.jsonl. One process (or one --rollout-tp group: the model split over its ranks).
"""
from __future__ import annotations

import json
import time
from collections import Counter

OUTPUT_FILE = "pass_rates.jsonl"
KEPT_FILE = "kept.jsonl"


def check_flags(args, world_size: int) -> list[str]:
    from evaluation.generate_stage import check_flags as check_generate

    if getattr(args, "teacher_url", None) is not None:
        raise ValueError("--stage pass-rate measures a local model (--model or --preset), not --teacher-url")
    if getattr(args, "tools", None):
        raise ValueError("--stage pass-rate samples single turns; --tools is for the grpo, eval and generate stages")
    if not 0.0 <= args.pass_rate_min <= args.pass_rate_max <= 1.0:
        raise ValueError(f"--pass-rate-min {args.pass_rate_min} / --pass-rate-max {args.pass_rate_max}: expected "
                         f"0 <= min <= max <= 1")
    notes = check_generate(args, world_size)
    if world_size > 1 and args.rollout_tp != world_size:
        raise ValueError(f"--stage pass-rate runs in one process or one --rollout-tp group (WORLD_SIZE={world_size})")
    return notes


def pass_record(row: dict, scores: list[dict], conditions) -> dict:
    """The row with its pass rate: passes / samples, a sample passing when it meets every condition."""
    passes = sum(all(c.holds(s) for c in conditions) for s in scores)
    specs = list(scores[0]) if scores else []
    means = {}
    for spec in specs:
        values = [s[spec] for s in scores if s.get(spec) is not None]
        means[spec] = sum(values) / len(values) if values else None
    return {**row, "pass_rate": passes / len(scores) if scores else 0.0, "passes": passes, "samples": len(scores),
            "mean_scores": means}


def run_pass_rate(args, run, info) -> int:
    from data.datasets import read_jsonl
    from evaluation.eval_stage import load_model_and_tokenizer, template_source
    from evaluation.generate_stage import (GenerateConfig, GeneratedFile, _decode_with_group, parse_keep_if,
                                           parse_rewards, prompt_rows, render_prompts, sample_scored,
                                           sampling_settings)
    from runtime.distributed import print0
    from runtime.metrics import MetricsWriter, Progress
    from runtime.rundir import write_json_atomic
    from sampling.sampler import Sampler, engine_options
    from verify.pool import RewardPool

    check_flags(args, info.world_size)
    if info.rank != 0:
        return _decode_with_group(args, info)
    rewards = parse_rewards(args.reward)
    conditions = tuple(parse_keep_if(args.keep_if, rewards))
    cfg = GenerateConfig(n=args.gen_n, temperature=args.gen_temperature, top_p=args.gen_top_p,
                         max_new_tokens=args.gen_max_new_tokens, seed=args.seed, rewards=tuple(rewards),
                         conditions=conditions, max_per_prompt=0, env=None, max_total_tokens=None, judges={})
    rows, conversations = prompt_rows(args)
    out = GeneratedFile(run.path, sampling_settings(args, rows, rewards), filename=OUTPUT_FILE)
    start = out.prompts_done
    if info.world_size > 1:   # the group's other ranks decode as many batches with rank 0 (_decode_with_group)
        from runtime.distributed import broadcast_object
        broadcast_object((start, len(rows)))
    model, tok = load_model_and_tokenizer(args, info.device)
    prompts = render_prompts(tok, conversations, template_source(args.chat_template))
    if info.world_size > 1:
        broadcast_object(max(map(len, prompts)))
    if start:
        print0(f"pass-rate: resuming at prompt {start}/{len(rows)}")
    sampler = Sampler(model, max_batch_size=args.sampler_batch_size,
                      max_seq_len=max(map(len, prompts)) + cfg.max_new_tokens, tokenizer=tok, **engine_options(args))
    metrics = MetricsWriter(run.path / "metrics.jsonl", resume_step=start if run.resumed else None)
    progress = Progress(len(rows), desc="pass-rate", every_s=args.log_every_s, start=start, unit="prompt")
    try:
        with RewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout_s) as pool:
            for lo in range(start, len(rows), args.gen_batch_prompts):
                hi = min(lo + args.gen_batch_prompts, len(rows))
                tb = time.perf_counter()
                batch = sample_scored(sampler, tok, pool, rows[lo:hi], list(range(lo, hi)), prompts[lo:hi],
                                      conversations[lo:hi], cfg)
                records = [pass_record(row, scores, conditions) for row, scores in zip(rows[lo:hi], batch.scores)]
                out.write_rows(records)
                in_band = sum(args.pass_rate_min <= r["pass_rate"] <= args.pass_rate_max for r in records)
                metrics.log(hi, prompts=hi - lo, in_band=in_band,
                            pass_rate=sum(r["pass_rate"] for r in records) / len(records),
                            batch_s=time.perf_counter() - tb)
                out.record(hi, Counter(prompts=hi - lo, in_band=in_band))
                progress.update(hi - lo, in_band=out.state["counts"].get("in_band", 0))
    finally:
        out.close()
        metrics.close()
        sampler.release()
    every = read_jsonl(out.path)
    kept = [r for r in every if args.pass_rate_min <= r["pass_rate"] <= args.pass_rate_max]
    tmp = run.path / f".{KEPT_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    tmp.replace(run.path / KEPT_FILE)
    histogram = Counter(min(int(r["pass_rate"] * 10), 9) for r in every)
    summary = {"prompts": len(every), "kept": len(kept), "band": [args.pass_rate_min, args.pass_rate_max],
               "gen_n": args.gen_n, "mean_pass_rate": sum(r["pass_rate"] for r in every) / max(len(every), 1),
               "histogram": {f"{k / 10:.1f}-{(k + 1) / 10:.1f}": histogram.get(k, 0) for k in range(10)}}
    write_json_atomic(run.path / "summary.json", summary)
    print0(f"pass-rate: {len(kept)} of {len(every)} prompts with a pass rate in [{args.pass_rate_min}, "
           f"{args.pass_rate_max}] -> {run.path / KEPT_FILE}")
    return 0
