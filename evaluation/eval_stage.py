"""The eval stage: pass@1, maj@k and pass@k of a model on benchmark and user eval sets.

    python train.py --stage eval --model DIR --eval-sets math500,aime24,gsm8k,humaneval --eval-n 16
    python train.py --stage eval --preset tiny --tokenizer TOK --eval-sets mine.jsonl --eval-limit 20

Protocol (DeepSeek-R1 report, "Evaluation Setup"): n samples per problem at temperature 0.6 and
top-p 0.95 (--eval-n, --eval-temperature, --eval-top-p); pass@1 is the mean correctness over all n
samples of all problems; maj@k is the majority vote over the extracted answers of the first k
samples (the report's cons@64 is maj@64); pass@k is the unbiased estimator of Chen et al. 2021.
Math problems get DeepSeek's instruction "Please reason step by step, and put your final answer
within \\boxed{}." after the problem text; prompts go through the chat template (--chat-template,
default the tokenizer's). The formulas are evaluation/metrics.py's.

Sets: benchmark names (math500, aime24, gsm8k, humaneval: files in the shared data directory, see
data.datasets.load_eval_set) and users' JSONL/Parquet files, comma-separated in --eval-sets. A row's
`kind` picks its check: "math" (verify.math: the gold `answer` against the last \\boxed{} /
<answer> / "the answer is" form), "code" (the row's tests in verify.code's sandbox), or a synthetic
task name with a reward in verify.rewards (arithmetic, countdown).

Code problems (HumanEval): the program that runs is built from the completion by `program_of`:
  1. the code is the last ```python (or ```py) block of the completion, else the whole completion;
  2. when the code defines the entry point at top level (`def name(`), the program is the prompt,
     then the code: the prompt supplies its imports and helper functions (HumanEval/32 and /38
     call them), and the completion's definition replaces the prompt's stub;
  3. otherwise the completion continues the prompt's function body, as in the HumanEval paper:
     the program is prompt + code.
  A prompt that is not Python source (a user's natural-language task) is not prepended: the code
  alone is the program. maj@k needs answers to compare, so code problems report none.

Scoring runs in a verify.pool.RewardPool (--reward-workers processes, --reward-timeout-s per item):
a completion whose check hangs (sympy on a monstrous expression, a program that loops) costs at
most the timeout and counts as wrong, and the vote grouping of each problem runs there too
(AnswerClasses). Timeouts are counted in eval.json.

Outputs in the run directory:
  eval.json               {set: {num_problems, n, kinds, pass@1, pass@k: {k: ...}, maj@k: {k: ...} or
                           null, mean_length (completion tokens), truncated (share that hit
                           --eval-max-new-tokens), wall_s, scoring_timeouts}}; rewritten after each set
  samples-<set>.jsonl     one row per sample: id, sample, prompt, completion, answer (math: the extracted
                           answer or null; code: the program run), score (the check's value),
                           correct, num_tokens, finish_reason
  summary.json            the same figures flattened: "<set>/pass@1", "<set>/maj@16", ...
  eval.md                 one markdown table across the sets (results_table; printed at the end too)
With torchrun, each rank samples and scores every world_size-th problem; rank 0 gathers and writes.

This module imports torch (and the sampler and model) only inside the functions that need them,
so a reward worker that unpickles AnswerClasses imports it cheaply.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from data.chat import template_source  # noqa: F401  (the stages' --chat-template reader, re-exported)
from evaluation.metrics import group_answers, maj_at_k, pass_at_k
from verify.math import extract_answer
from verify.rewards import extract_code

CORRECTNESS_REWARD = {"math": "accuracy", "code": "code"}  # other kinds: the reward of that name


# ---- chat template, model and completions (shared with the generate stage) ----------------------

def load_model_and_tokenizer(args, device):
    """The tokenizer (--tokenizer, else the --model folder's) and the model (--model or --preset) in
    eval mode: bf16 on GPU, fp32 on CPU. With --rollout-tp N, this rank's tensor-parallel share of
    it (model/tensor_parallel.py; only that share is read from the checkpoint), which samples
    together with the other ranks of its group."""
    import torch

    from data.tokenizer import load_tokenizer
    from model.build import build_sampling_model, build_tensor_parallel_model

    tok = load_tokenizer(args.tokenizer, args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tp_size = getattr(args, "rollout_tp", 1)
    if tp_size > 1:
        from runtime.distributed import subgroup
        model = build_tensor_parallel_model(args, tok, subgroup(tp_size), device=device, dtype=dtype)
    else:
        model = build_sampling_model(args, tok, device=device, dtype=dtype)   # --lora-init folded in
    return model.eval(), tok


def completion_text(tok, completion) -> str:
    """The completion's text without the special token it stopped at (EOS, <|im_end|>): that token
    is the template's business, and a code completion must not end in it."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and ids and ids[-1] in tok.special_ids:
        ids = ids[:-1]
    return tok.decode(ids)


# ---- code programs ------------------------------------------------------------------------------

def _is_python(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def program_of(completion: str, row: dict) -> str:
    """The program run for a code problem's completion (rules in the module docstring)."""
    code = extract_code(completion)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not _is_python(prompt):
        return code
    entry = row.get("entry_point")
    if entry and re.search(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return f"{prompt.rstrip()}\n\n\n{code}"
    return prompt + code


# ---- majority-vote classes, computed in a reward worker ------------------------------------------

@dataclass(frozen=True)
class AnswerClasses:
    """Equivalence classes of one problem's extracted answers, for maj@k; run by the RewardPool.

    Used as a group-wise reward (the pool hands it all samples of one problem, in sample order):
    the "completions" are the extracted answers ("" for none), and each value is the sample index
    of the first member of the answer's class under verify.math.is_equivalent (evaluation.metrics
    .group_answers), or None for no answer. So "0.5" and "\\frac{1}{2}" get the same value. Running
    it in the pool bounds the O(n x classes) sympy comparisons by the pool's timeout (then no sample
    votes: maj@k counts the problem wrong).
    """
    groupwise: ClassVar[bool] = True
    timeout_reward: ClassVar[float | None] = None

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        from verify.math import is_equivalent
        out: list[float | None] = [None] * len(completions)
        for group in group_answers([a if a else None for a in completions], is_equivalent):
            for i in group:
                out[i] = float(group[0])
        return out


# ---- one set: sample, score, measure --------------------------------------------------------------

def _kind_of(row: dict, where: str) -> str:
    from verify.rewards import REWARDS
    kind = row.get("kind", "math")
    if kind not in CORRECTNESS_REWARD and kind not in REWARDS:
        raise ValueError(f"{where}: problem {row.get('id')!r} has kind {kind!r}; expected 'math', 'code' or a "
                         f"task reward name ({', '.join(sorted(REWARDS))})")
    return kind


def eval_prompts(tok, rows: list[dict], template: str | None) -> list[list[int]]:
    """Prompt token ids, rendered as evaluation.evaluate renders them (math rows get MATH_INSTRUCTION)."""
    from evaluation.evaluate import MATH_INSTRUCTION, prompt_ids
    return [prompt_ids(tok, row, template, MATH_INSTRUCTION if row.get("kind", "math") == "math" else None)
            for row in rows]


def sample_completions(sampler, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                       max_new_tokens: int, seed: int, indices: list[int], tools=None) -> tuple[list[list], list | None]:
    """(n Completions per prompt, the tool calls of each or None). The problem at index i of its set
    (indices[k] for prompts[k]) samples with seed seed * 1_000_003 + i, as evaluate() does, so a
    sharded run draws what one process would. tools: (an envs.Environment, the rows, the rollout's
    token budget) for multi-turn rollouts with tools (evaluation/tool_rollout.py)."""
    from sampling.sampler import SamplingParams

    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             seed=seed * 1_000_003 + i) for i in indices]
    if tools is not None:
        from evaluation.tool_rollout import generate_with_env
        env, rows, budget = tools
        turns = generate_with_env(sampler, sampler.tokenizer, prompts, params, env, rows, max_total_tokens=budget)
        outs = [[t.completion for t in group] for group in turns]
        calls = [[t.episode.calls for t in group] for group in turns]
    else:
        outs, calls = sampler.generate(prompts, params), None
    if len(outs) != len(prompts) or any(len(o) != n for o in outs):
        raise RuntimeError(f"the sampler returned {[len(o) for o in outs]} completions for {len(prompts)} "
                           f"prompts x n={n}")
    return outs, calls


def score_samples(pool, rows: list[dict], texts: list[list[str]], where: str) -> list[dict]:
    """Score every sample in the pool; one record per (problem, sample), in problem then sample order.

    Each record: id, sample, kind, completion, answer (math: extracted; code: the program), score
    (the check's value; None when it gave no signal), correct (score >= 1.0), and vote (the sample
    index of its answer's class representative, AnswerClasses; None for code and for no answer).
    """
    records, rows_of = [], []
    for row, samples in zip(rows, texts):
        kind = _kind_of(row, where)
        for j, text in enumerate(samples):
            answer = program_of(text, row) if kind == "code" else extract_answer(text)
            records.append(dict(id=row["id"], sample=j, kind=kind, completion=text, answer=answer, score=None,
                                correct=False, vote=None))
            rows_of.append(row)
    for kind in sorted({r["kind"] for r in records}):
        mine = [i for i, r in enumerate(records) if r["kind"] == kind]
        keys = sorted({key for i in mine for key in rows_of[i]})
        columns = {key: [rows_of[i].get(key) for i in mine] for key in keys}
        columns["prompts"] = [rows_of[i]["problem"] for i in mine]
        # code runs the built program; the other checks read the completion
        inputs = [records[i]["answer" if kind == "code" else "completion"] for i in mine]
        reward = CORRECTNESS_REWARD.get(kind, kind)
        for i, s in zip(mine, pool.score({reward: reward}, inputs, **columns)[reward]):
            records[i]["score"], records[i]["correct"] = s, s is not None and s >= 1.0
        if kind != "code":
            answers = [records[i]["answer"] or "" for i in mine]
            votes = pool.score({"votes": AnswerClasses()}, answers, prompts=[records[i]["id"] for i in mine])
            for i, v in zip(mine, votes["votes"]):
                records[i]["vote"] = None if v is None else int(v)
    return records


def set_metrics(records: list[dict], n: int, ks: list[int]) -> dict:
    """pass@1, pass@k and maj@k of a set from its sample records (n per problem id, in sample order).

    maj@k is None when the set holds a code problem (no answers to vote with).
    """
    problems: dict[str, list[dict]] = {}
    for r in records:
        problems.setdefault(r["id"], []).append(r)
    assert all(len(p) == n for p in problems.values()), f"expected {n} samples per problem"
    flags = [[r["correct"] for r in p] for p in problems.values()]
    num = max(len(problems), 1)
    out = {"pass@1": sum(map(sum, flags)) / max(n * len(problems), 1),
           "pass@k": {str(k): sum(pass_at_k(n, sum(f), k) for f in flags) / num for k in ks},
           "maj@k": None}
    if all(r["kind"] != "code" for r in records):
        votes = [[r["vote"] for r in p] for p in problems.values()]
        same_class = lambda a, b: a == b  # noqa: E731  (votes are already class representatives)
        out["maj@k"] = {str(k): sum(maj_at_k(v, f, k, same_class) for v, f in zip(votes, flags)) / num for k in ks}
    return out


def parse_ks(text: str | None, n: int) -> list[int]:
    """--eval-k "1,4,16" -> [1, 4, 16] (each in 1..n); empty or None -> [1, n]."""
    if not text:
        return sorted({1, n})
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--eval-k {text!r}: expected comma-separated integers such as 1,4,16") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if bad or not ks:
        raise ValueError(f"--eval-k {text!r}: every k must be in 1..--eval-n ({n}), got {bad or ks}")
    return ks


def sample_and_score(rows: list[dict], tok, pool, *, n: int, sampler=None, model=None, max_batch_size: int = 64,
                     temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 4096,
                     template: str | None = None, seed: int = 0, indices: list[int] | None = None,
                     where: str = "eval set", engine: dict | None = None, env=None,
                     max_total_tokens: int | None = None) -> list[dict]:
    """Per-sample records of rows: score_samples' fields + num_tokens, finish_reason.

    sampler: anything with generate(prompt_ids, [SamplingParams]) -> [[Completion]] (a scripted
    stand-in in tests); None builds a Sampler for `model` sized to these prompts and frees its
    cache afterwards. pool: a verify.pool.RewardPool. indices: the rows' positions in their set
    (default 0..len-1; they pick the seeds). `where` names the set in errors. engine: more Sampler
    keyword arguments (sampling.engine_options of the flags: the cache budget, the read interval).
    env: an envs.Environment (--tools): multi-turn rollouts of at most max_total_tokens after the
    prompt; each record then has `tool_calls`.
    """
    group = getattr(sampler, "group", None) if sampler is not None else getattr(model, "tp", None)
    if not rows and (group is None or group.size == 1):   # a rank whose share of a small set is empty
        return []                                          # (a tensor-parallel rank samples with its group)
    prompts = eval_prompts(tok, rows, template)
    own = sampler is None
    if own:
        from sampling.sampler import Sampler
        sampler = Sampler(model, max_batch_size=max_batch_size,
                          max_seq_len=max(map(len, prompts), default=1) + (max_total_tokens or max_new_tokens),
                          tokenizer=tok, verbose=False, **(engine or {}))
    try:
        outs, calls = sample_completions(sampler, prompts, n=n, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_new_tokens, seed=seed,
                                         indices=list(range(len(rows))) if indices is None else indices,
                                         tools=(env, rows, max_total_tokens) if env is not None else None)
    finally:
        if own:
            sampler.release()
    records = score_samples(pool, rows, [[completion_text(tok, c) for c in comps] for comps in outs], where)
    from evaluation.evaluate import problem_text
    texts = [problem_text(row) for row, comps in zip(rows, outs) for _ in comps]   # what the prompt was made of
    for r, c, text in zip(records, [c for comps in outs for c in comps], texts):
        r.update(prompt=text, num_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                 token_ids=list(c.token_ids), logprobs=list(c.logprobs))
    if calls is not None:
        for r, c, k in zip(records, [c for comps in outs for c in comps], [k for ks in calls for k in ks]):
            r.update(tool_calls=k, sampled_mask=c.sampled_mask or [1] * len(c.token_ids))
    return records


def summarise(records: list[dict], n: int, ks: list[int]) -> dict:
    """A set's entry of eval.json (without wall_s and scoring_timeouts, which the caller measures)."""
    total = max(len(records), 1)
    out = {"num_problems": len({r["id"] for r in records}), "n": n, "kinds": sorted({r["kind"] for r in records}),
           **set_metrics(records, n, ks),
           "mean_length": sum(r["num_tokens"] for r in records) / total,
           "truncated": sum(r["finish_reason"] == "length" for r in records) / total}
    if records and "tool_calls" in records[0]:   # --tools: how often the samples called one
        used = [r["tool_calls"] > 0 for r in records]
        right = [r["correct"] for r in records]
        out.update(tool_share=sum(used) / total, tool_calls_per_sample=sum(r["tool_calls"] for r in records) / total,
                   tool_share_of_correct=sum(u and c for u, c in zip(used, right)) / max(sum(right), 1))
    return out


# ---- the stage ------------------------------------------------------------------------------------

def set_label(name: str) -> str:
    """The name a set's figures and samples file go by: a benchmark name as is, a file by its stem."""
    from data.datasets import EVAL_SETS
    label = name if name in EVAL_SETS else Path(name).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "set"


def _gather(records: list[dict], info) -> list[dict]:
    """Every rank's records (rank r holds problems r, r + W, ...) in problem order, on every rank."""
    if info.world_size == 1:
        return records
    from runtime.distributed import all_gather_object
    shards = all_gather_object(records)
    per_problem = []
    for shard in shards:   # records are grouped by problem, n per problem, in order
        groups: dict[str, list[dict]] = {}
        for r in shard:
            groups.setdefault(r["id"], []).append(r)
        per_problem.append(list(groups.values()))
    ordered = []
    for i in range(max(len(p) for p in per_problem)):
        for p in per_problem:
            if i < len(p):
                ordered += p[i]
    return ordered


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def check_sampling_flags(args, prefix: str) -> None:
    """ValueError for a bad --model/--preset choice or bad --<prefix>-n/-temperature/-top-p/-max-new-tokens,
    --reward-workers, --reward-timeout-s (shared by the eval and generate stages)."""
    if getattr(args, "teacher_url", None) is not None:
        pass   # the generate stage samples from an endpoint (evaluation/remote.py checks its flags)
    elif (args.model is None) == (args.preset is None):
        raise ValueError("give exactly one of --model DIR and --preset NAME (with --tokenizer DIR)")
    elif args.model is None and args.tokenizer is None:
        raise ValueError("--preset needs --tokenizer DIR (a fresh model has no tokenizer of its own)")
    from model.build import check_lora_targets
    check_lora_targets(args, sampling=True)   # --lora-init: sample base + adapter
    n, temperature, top_p, max_new = (getattr(args, f"{prefix}_{k}") for k in ("n", "temperature", "top_p",
                                                                            "max_new_tokens"))
    flag = f"--{prefix}"
    if n < 1 or max_new < 1:
        raise ValueError(f"{flag}-n and {flag}-max-new-tokens must be >= 1, got {n} and {max_new}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{flag}-temperature must be >= 0 and {flag}-top-p in (0, 1], got {temperature} and {top_p}")
    from sampling.sampler import engine_options
    engine_options(args)
    if args.reward_workers < 1 or not args.reward_timeout_s > 0:
        raise ValueError(f"--reward-workers must be >= 1 and --reward-timeout-s > 0, got {args.reward_workers} "
                         f"and {args.reward_timeout_s}")


def eval_environment(args, max_new_tokens: int):
    """(the envs.ToolEnvironment of --tools, the rollout budget: --max-rollout-tokens, default twice
    max_new_tokens) or (None, None) without tools; ValueError naming a bad flag. Evaluation with the
    tools a model was trained with scores it the way it was trained."""
    from envs import ToolEnvironment, get_format, parse_tools

    names = parse_tools(getattr(args, "tools", None))
    fmt = get_format(getattr(args, "tool_format", "fenced"))
    calls, total = getattr(args, "max_tool_calls", 4), getattr(args, "max_rollout_tokens", None)
    if calls < 1:
        raise ValueError(f"--max-tool-calls {calls}: expected >= 1")
    if total is not None and total < max_new_tokens:
        raise ValueError(f"--max-rollout-tokens {total}: expected at least the max new tokens ({max_new_tokens}); it "
                         f"counts the model's tokens and the tools' outputs together")
    if not names:
        return None, None
    if getattr(args, "rollout_tp", 1) > 1:
        raise ValueError(f"--tools with --rollout-tp {args.rollout_tp}: multi-turn rollouts sample with the whole "
                         f"model (--rollout-tp 1)")
    return ToolEnvironment(names, fmt, max_calls=calls), total if total is not None else 2 * max_new_tokens


def check_rollout_tp(args, world_size: int) -> None:
    """--rollout-tp N: at least 1, and a divisor of the world size (W / N groups sample side by side)."""
    n = getattr(args, "rollout_tp", 1)
    if n < 1 or world_size % n:
        raise ValueError(f"--rollout-tp {n}: expected a divisor of the {world_size} rank(s) of this run "
                         f"(torchrun --nproc_per_node)")


def set_names(text: str) -> list[str]:
    """--eval-sets "math500,mine.jsonl" -> its names, each a benchmark name or an existing file; the
    groups all-math, all-code and all stand for their benchmarks (data.datasets.EVAL_GROUPS)."""
    from data.datasets import EVAL_GROUPS, EVAL_SETS
    names = []
    for s in (s.strip() for s in text.split(",")):
        for name in EVAL_GROUPS.get(s, (s,) if s else ()):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"--eval-sets {text!r}: expected benchmark names or files, comma-separated")
    for name in names:
        if name not in EVAL_SETS and not Path(name).is_file():
            raise ValueError(f"--eval-sets: {name!r} is neither a benchmark ({', '.join(EVAL_SETS)}), a group "
                             f"({', '.join(EVAL_GROUPS)}) nor a file")
    return names


def check_flags(args, world_size: int) -> None:
    """The eval stage's flags, checked before anything is written (ValueError naming the flag)."""
    check_sampling_flags(args, "eval")
    check_rollout_tp(args, world_size)
    eval_environment(args, args.eval_max_new_tokens)
    if args.eval_limit < 0:
        raise ValueError(f"--eval-limit must be >= 0 (0: every problem), got {args.eval_limit}")
    parse_ks(args.eval_k, args.eval_n)
    set_names(args.eval_sets)


def run_eval(args, run, info) -> int:
    """--stage eval: every set of --eval-sets; writes eval.json, samples-<set>.jsonl, summary.json."""
    from runtime.distributed import print0
    from runtime.rundir import write_json_atomic
    from data.datasets import load_eval_set
    from verify.pool import RewardPool

    check_flags(args, info.world_size)
    ks, names = parse_ks(args.eval_k, args.eval_n), set_names(args.eval_sets)
    sets = {}
    for name in names:   # every set is read (and checked) before the model is loaded
        label = set_label(name)
        if label in sets:
            raise ValueError(f"--eval-sets: two sets are both named {label!r}; rename one of the files")
        rows = load_eval_set(name)
        sets[label] = rows[:args.eval_limit] if args.eval_limit else rows

    from model.tensor_parallel import weight_bytes
    from sampling.sampler import engine_options
    model, tok = load_model_and_tokenizer(args, info.device)
    held = weight_bytes(model)   # the weights this rank holds while it samples
    env, budget = eval_environment(args, args.eval_max_new_tokens)
    template = template_source(args.chat_template)
    results, summary = {}, {}
    with RewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout_s) as pool:
        for label, rows in sets.items():
            t0 = time.perf_counter()
            failed = pool.stats.timeouts + pool.stats.crashes
            indices = list(range(info.rank, len(rows), info.world_size))
            records = sample_and_score([rows[i] for i in indices], tok, pool, n=args.eval_n, model=model,
                                       max_batch_size=args.sampler_batch_size, temperature=args.eval_temperature,
                                       top_p=args.eval_top_p, max_new_tokens=args.eval_max_new_tokens,
                                       template=template, seed=args.seed, indices=indices, where=label,
                                       engine=engine_options(args), env=env, max_total_tokens=budget)
            records = _gather(records, info)
            if info.rank != 0:
                continue
            entry = summarise(records, args.eval_n, ks)
            entry["scoring_timeouts"] = pool.stats.timeouts + pool.stats.crashes - failed  # rank 0's
            entry["wall_s"] = time.perf_counter() - t0
            entry["rollout_tp"] = args.rollout_tp
            entry["weight_bytes_per_rank"] = held
            results[label] = entry
            keys = ("id", "sample", "prompt", "completion", "answer", "score", "correct", "num_tokens",
                    "finish_reason") + \
                (("tool_calls",) if env is not None else ()) + \
                (("token_ids", "logprobs") + (("sampled_mask",) if env is not None else ())
                 if args.eval_save_logprobs else ())
            _write_jsonl(run.path / f"samples-{label}.jsonl", [{k: r[k] for k in keys} for r in records])
            write_json_atomic(run.path / "eval.json", results)
            summary.update({f"{label}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
            summary.update({f"{label}/pass@{k}": v for k, v in entry["pass@k"].items()})
            summary.update({f"{label}/maj@{k}": v for k, v in (entry["maj@k"] or {}).items()})
            maj = entry["maj@k"] and entry["maj@k"][str(ks[-1])]
            print0(f"eval {label}: {entry['num_problems']} problems x {args.eval_n} | pass@1 {entry['pass@1']:.4f}"
                   + (f" | maj@{ks[-1]} {maj:.4f}" if entry["maj@k"] else "")
                   + f" | pass@{ks[-1]} {entry['pass@k'][str(ks[-1])]:.4f} | mean length "
                   f"{entry['mean_length']:.1f} tokens | {entry['wall_s']:.1f} s")
    if info.rank == 0:
        write_json_atomic(run.path / "summary.json", summary)
        table = results_table(results)
        (run.path / "eval.md").write_text(table + "\n")
        print0(table)
        print0(f"eval: wrote {run.path / 'eval.json'}, eval.md (the table) and samples-<set>.jsonl")
    return 0


def results_table(results: dict) -> str:
    """One markdown table across the sets of an eval.json: a row per set, with its problems, samples,
    pass@1 over the n samples, each maj@k and pass@k for k > 1, and the mean completion length."""
    ks = sorted({int(k) for e in results.values() for k in e["pass@k"]})
    majs = sorted({int(k) for e in results.values() for k in (e["maj@k"] or {}) if int(k) > 1})
    head = ["set", "problems", "n", "pass@1"] + [f"maj@{k}" for k in majs] + [f"pass@{k}" for k in ks if k > 1] \
        + ["mean length"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in results.items():
        cells = [label, str(e["num_problems"]), str(e["n"]), f"{e['pass@1']:.4f}"]
        cells += [f"{(e['maj@k'] or {}).get(str(k)):.4f}" if (e["maj@k"] or {}).get(str(k)) is not None else "-"
                  for k in majs]
        cells += [f"{e['pass@k'][str(k)]:.4f}" if str(k) in e["pass@k"] else "-" for k in ks if k > 1]
        cells.append(f"{e['mean_length']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
