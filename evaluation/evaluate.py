"""Accuracy of a model on a problem set: the held-out evaluation used by SFT, GRPO and the eval stage.

    result = evaluate(model, tok, problems, "arithmetic", n=4, temperature=1.0)
    result.accuracy, result.lenient_accuracy, result.mean_length

A problem is a row with the prompt (`prompt`, or `problem`/`question` as eval sets have it) and
whatever columns its checker needs (`answer`, `numbers`/`target`, `test`/`entry_point`, ...).
Each prompt is rendered with a chat template (the tokenizer's, a built-in name such as 'r1-zero',
or Jinja source) and an optional instruction appended to the problem text; math sets use DeepSeek's
evaluation instruction, "Please reason step by step, and put your final answer within \\boxed{}."

Two scores per completion:
- strict: the reward spec `reward` gives full marks (>= 1.0). For the synthetic tasks the default
  spec is the product of format and answer: the answer counts only in the R1 format.
- lenient: the answer is right whatever the format (the task checker on the completion, else on
  the last number written in it, for tasks; the math verifier on the last boxed/answer/"the
  answer is" form, for math), so a format-only gain and an answer-only gain show apart.

With n samples per problem, accuracy is the mean over all n x problems (pass@1 estimated from n
samples); greedy evaluation is temperature=0, n=1. `EvalResult.samples` keeps every completion
with its scores for per-sample output, pass@k and maj@k (evaluation.metrics).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.chat import render
from sampling.sampler import Sampler, SamplingParams

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_LAST_INT = re.compile(r"-?\d[\d,]*")


def problem_text(row: dict) -> str:
    for key in ("prompt", "problem", "question"):
        if isinstance(row.get(key), str):
            return row[key]
    raise ValueError(f"problem row has no 'prompt', 'problem' or 'question' string; columns {sorted(row)}")


def prompt_ids(tok, row: dict, template: str | None = None, instruction: str | None = None) -> list[int]:
    """Token ids of the rendered prompt, ending where the model's completion starts."""
    text = problem_text(row)
    if instruction:
        text = f"{text}\n{instruction}"
    source = template if template is not None else tok.chat_template
    if source is None:
        raise ValueError("the tokenizer has no chat template; pass template= ('r1-zero', 'chatml' or Jinja source)")
    rendered = render([{"role": "user", "content": text}], source, add_generation_prompt=True, **tok.special_tokens)
    return tok.encode(rendered)


# ---- held-out evaluation during training (the SFT and GRPO loops' --eval-* flags) ---------------

TASKS = ("arithmetic", "countdown", "math", "code")
_CODE_COLUMNS = ("test", "tests", "test_list", "verification_info")


def infer_task(rows: list[dict]) -> str:
    """How held-out rows are checked when --eval-task is not given: the synthetic tasks' own
    'task' column (data/tasks.py writes it), code for rows that carry tests, else math."""
    first = rows[0] if rows else {}
    if first.get("task") in ("arithmetic", "countdown"):
        return first["task"]
    if any(first.get(c) is not None for c in _CODE_COLUMNS):
        return "code"
    return "math"


def heldout_task(args, rows: list[dict]) -> str:
    """--eval-task, or the task of the rows (infer_task) when the flag was left unset."""
    return args.eval_task if args.eval_task is not None else infer_task(rows)


def check_heldout_flags(args) -> None:
    """--eval-data and the flags of the held-out evaluation a training loop runs (ValueError)."""
    if args.eval_data is None:
        return
    if not Path(args.eval_data).is_file():
        raise ValueError(f"--eval-data {args.eval_data}: no such file")
    for flag in ("eval_problems", "eval_max_new_tokens", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")


# ---- correctness checks -------------------------------------------------------------------------

def _task_check(kind: str, completion: str, row: dict) -> bool:
    from verify.tasks import check_arithmetic, check_countdown
    if kind == "arithmetic":
        return check_arithmetic(completion, row["answer"])
    if kind == "countdown":
        return check_countdown(completion, row["numbers"], row["target"])
    raise ValueError(f"no checker for task {kind!r}")


def lenient_correct(kind: str, completion: str, row: dict) -> bool:
    """Right answer whatever the format (see the module docstring)."""
    if kind in ("arithmetic", "countdown"):
        if _task_check(kind, completion, row):
            return True
        if kind == "arithmetic":  # no tags / box: the last integer written counts
            found = _LAST_INT.findall(completion)
            return bool(found) and found[-1].replace(",", "") == str(row["answer"]).replace(",", "")
        body = completion.split("</think>")[-1]
        return _task_check(kind, f"<answer>{body.strip()}</answer>", row)
    if kind == "math":
        from verify.math import verify
        return verify(completion, str(row["answer"]))
    if kind == "code":
        from verify.rewards import REWARDS
        return (REWARDS["code"]([completion], **{k: [v] for k, v in row.items()})[0] or 0.0) >= 1.0
    raise ValueError(f"unknown problem kind {kind!r}")


def strict_reward(kind: str):
    """The default strict check of a problem kind, as a reward spec/callable (full marks = 1.0)."""
    from verify.rewards import get_reward
    if kind in ("arithmetic", "countdown"):
        task, fmt = get_reward(kind), get_reward("format")

        def strict(completions, **kw):
            a, f = task(completions, **kw), fmt(completions, **kw)
            return [None if x is None else x * y for x, y in zip(a, f)]
        strict.__name__ = f"{kind}_in_format"
        return strict
    if kind == "math":
        return get_reward("accuracy")
    if kind == "code":
        return get_reward("code")
    raise ValueError(f"unknown problem kind {kind!r}")


# ---- evaluation ---------------------------------------------------------------------------------

@dataclass
class EvalResult:
    accuracy: float  # strict, mean over problems x samples
    lenient_accuracy: float
    mean_length: float  # completion tokens
    truncated: float  # share of completions that hit max_new_tokens
    num_problems: int
    n: int
    wall_s: float
    samples: list[dict] = field(default_factory=list)  # per completion: problem index, text, scores
    tool_share: float | None = None  # with tools: the share of completions that called one

    def metrics(self, prefix: str = "eval/") -> dict:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}lenient_accuracy": self.lenient_accuracy,
                f"{prefix}response_length": self.mean_length, f"{prefix}truncated": self.truncated}


def evaluate(model, tok, problems: list[dict], kind: str, *, reward=None, n: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_new_tokens: int = 256, template: str | None = None,
             instruction: str | None = None, seed: int = 0, max_batch_size: int = 64,
             sampler: Sampler | None = None, env=None, max_total_tokens: int | None = None) -> EvalResult:
    """Sample n completions per problem and score them (strict and lenient); see the module docstring.

    kind: 'arithmetic' | 'countdown' | 'math' | 'code'; reward: a strict reward spec or callable
    (default: strict_reward(kind)). A given sampler is used as is (and not released). env: an
    envs.Environment (tools): multi-turn rollouts of at most max_total_tokens after the prompt
    (default twice max_new_tokens); samples then hold `tool_calls` and the result `tool_share`.
    """
    t0 = time.perf_counter()
    if instruction is None and kind == "math":
        instruction = MATH_INSTRUCTION
    prompts = [prompt_ids(tok, row, template, instruction) for row in problems]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             seed=seed * 1_000_003 + i) for i in range(len(prompts))]
    if env is not None and max_total_tokens is None:
        max_total_tokens = 2 * max_new_tokens
    own = sampler is None
    if own:
        max_len = max((len(p) for p in prompts), default=1) + (max_total_tokens if env is not None else max_new_tokens)
        sampler = Sampler(model, max_batch_size=max_batch_size, max_seq_len=max_len, tokenizer=tok, verbose=False)
    calls = None
    try:
        if env is not None:
            from evaluation.tool_rollout import generate_with_env
            turns = generate_with_env(sampler, tok, prompts, params, env, problems, max_total_tokens=max_total_tokens)
            outs = [[t.completion for t in group] for group in turns]
            calls = [[t.episode.calls for t in group] for group in turns]
        else:
            outs = sampler.generate(prompts, params)
    finally:
        if own:
            sampler.release()
    from verify.rewards import get_reward
    strict_fn = get_reward(reward) if reward is not None else strict_reward(kind)
    samples = []
    for i, (row, comps) in enumerate(zip(problems, outs)):
        texts = [c.text if c.text is not None else tok.decode(c.token_ids) for c in comps]
        columns = {k: [v] * len(texts) for k, v in row.items()}
        columns["prompts"] = [problem_text(row)] * len(texts)
        columns["completion_ids"] = [c.token_ids for c in comps]
        strict = strict_fn(texts, **columns)
        for j, (c, text, s) in enumerate(zip(comps, texts, strict)):
            samples.append(dict(problem=i, sample=j, completion=text, num_tokens=len(c.token_ids),
                                finish_reason=c.finish_reason, correct=bool(s is not None and s >= 1.0),
                                lenient=bool(lenient_correct(kind, text, row))))
            if calls is not None:
                samples[-1]["tool_calls"] = calls[i][j]
    total = max(len(samples), 1)
    return EvalResult(
        accuracy=sum(s["correct"] for s in samples) / total,
        lenient_accuracy=sum(s["lenient"] for s in samples) / total,
        mean_length=sum(s["num_tokens"] for s in samples) / total,
        truncated=sum(s["finish_reason"] == "length" for s in samples) / total,
        num_problems=len(problems), n=n, wall_s=time.perf_counter() - t0, samples=samples,
        tool_share=None if calls is None else sum(s["tool_calls"] > 0 for s in samples) / total)


def evaluate_sharded(model, tok, problems: list[dict], kind: str, rank: int = 0, world_size: int = 1,
                     rollout=None, **kwargs) -> EvalResult:
    """evaluate() split across ranks (rank r takes problems r, r + W, ...), totals all-reduced.

    Under FSDP every rank must take part: the weights are gathered once for the whole generation
    (model.parallel.gathered), and each rank samples its own share. Every rank returns the same
    totals; `samples` holds this rank's share only. rollout: a model.tensor_parallel
    TensorParallelRollout of `model`, whose weights() the generation samples with instead (each
    tensor-parallel group samples its ranks' shares together).
    """
    from model.lora import sampling_weights
    from runtime.distributed import all_reduce_floats

    mine = problems[rank::world_size]
    with (rollout.weights() if rollout is not None else sampling_weights(model)) as policy:
        r = evaluate(policy, tok, mine, kind, **kwargs)
    if world_size == 1:
        return r
    k = len(r.samples)
    t = all_reduce_floats([r.accuracy * k, r.lenient_accuracy * k, r.mean_length * k, r.truncated * k, k,
                           (r.tool_share or 0.0) * k])
    total = max(t[4], 1.0)
    return EvalResult(t[0] / total, t[1] / total, t[2] / total, t[3] / total,
                      num_problems=len(problems), n=r.n, wall_s=r.wall_s, samples=r.samples,
                      tool_share=None if r.tool_share is None and not kwargs.get("env") else t[5] / total)
