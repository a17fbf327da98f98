"""The generate stage: R1's rejection sampling, written as an SFT data set that survives a crash.

    python train.py --stage generate --model DIR --data prompts.jsonl --gen-n 16 \\
        --reward accuracy,format,language --keep-if accuracy>=1,format>=1,language>=0.95 --max-per-prompt 4

DeepSeek-R1 (section 2.3.3) made its 600k reasoning samples this way: sample several responses per
prompt from the RL checkpoint, keep only the correct ones, and filter out chain-of-thought with
mixed languages and other unreadable output. The result is the SFT data of the next stage and of
distillation. For each prompt of --data (data.datasets.load_prompts: a `prompt` string or
`messages`, plus columns such as `answer` that the rewards read):

  1. sample --gen-n completions; prompt i (0-based, in file order) samples with seed
     --seed * 1_000_003 + i, so its completions do not depend on the prompts before it;
  2. score every completion with each --reward spec (verify.rewards.get_reward, in a
     verify.pool.RewardPool so a hanging check costs at most --reward-timeout-s); every score is
     recorded, None meaning "no signal";
  3. keep, in sample order, the completions that are not identical to an earlier completion of
     the same prompt, meet every --keep-if condition (a None score meets none), and fit under
     --max-per-prompt (0: no cap).

A kept completion becomes one row of <run>/generated.jsonl:

    {"messages": [<the prompt's messages>, {"role": "assistant", "content": completion}],
     "prompt_id": the row's `id` (else its 0-based index), "sample": j (its index among the n),
     "scores": {spec: value}, "num_tokens": ..., "finish_reason": "stop" | "length"}

The completion is kept as generated, minus the special token it stopped at: for an R1-Zero-format
model it holds <think>...</think><answer>...</answer>, so SFT on these rows (data.datasets
.load_conversations reads them) teaches that format.

Crash safety and resume. Prompts are processed in batches of --gen-batch-prompts. After a batch,
its rows are appended to generated.jsonl, flushed and fsynced, and its metrics line is written;
only then progress.json is replaced atomically with {"prompts_done", "rows", "bytes" (the file's
size after that batch), counts, settings}. So after a crash (kill -9 included) progress.json
describes a complete prefix of the file. `--resume` truncates generated.jsonl to that size, which
drops both a half-written last line and the rows of a batch written but not yet recorded, drops
the metrics lines of later steps, and continues with prompt prompts_done. The batch redrawn holds
the same prompts with the same seeds, so its rows come out as before: the finished file equals an
uninterrupted run's. A resume whose settings (data, model, sampling, rewards, filters, batch
size, seed) differ from the run's is refused, naming them, since it would mix two data sets in
one file.

Also written: metrics.jsonl, one line per batch (step = prompts done): samples, kept, duplicate,
filtered, capped, reward/<spec> (the mean over samples that got a value), response_length/mean,
tokens_per_s; summary.json at the end with the run's totals (prompts, rows, samples, keep_rate,
kept, duplicate, filtered, capped, failed/<spec>, tokens: completion tokens of all samples).
Generation runs in one process, or, with --rollout-tp N, in one tensor-parallel group of N ranks
(torchrun --nproc_per_node N): the model is split over them (model/tensor_parallel.py, each rank
reading only its share of the checkpoint), rank 0 does everything above and the other ranks decode
its batches with it. To use more GPUs than one group, split the prompts file and run one job per part.

A remote teacher (--teacher-url URL, evaluation/remote.py) takes the model's place: the prompts'
messages go to the endpoint's /chat/completions, one cached request per sample (seed
(--seed * 1_000_003 + i) * 1000 + j), and everything above applies to its answers; the batch a
crash or an unreachable endpoint interrupted is asked again on --resume, from the cache for what
was answered. --reward judge:... scores with an LLM judge at --judge-url (verify/judge.py), its
answers cached under <run>/judge_cache.
"""
from __future__ import annotations

import json
import operator
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evaluation.eval_stage import completion_text
from runtime.rundir import fill_default

OUTPUT_FILE = "generated.jsonl"
PROGRESS_FILE = "progress.json"
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
        "<": operator.lt}
_CONDITION = re.compile(r"^(?P<name>[^<>=!]+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


# ---- what to keep ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    """One --keep-if condition: score(name) op value; a missing or None score never holds."""
    name: str
    op: str
    value: float

    def holds(self, scores: dict) -> bool:
        score = scores.get(self.name)
        return score is not None and _OPS[self.op](score, self.value)


def parse_rewards(text: str) -> list[str]:
    """--reward "accuracy,format" -> ["accuracy", "format"], each checked with get_reward (ValueError)."""
    from verify.rewards import get_reward
    specs = [part.strip() for part in text.split(",") if part.strip()]
    if not specs:
        raise ValueError(f"--reward {text!r}: expected comma-separated reward names such as accuracy,format")
    if len(set(specs)) != len(specs):
        raise ValueError(f"--reward {text!r}: a reward is named twice")
    from verify.judge import is_judge, load_template
    for spec in specs:
        if is_judge(spec):
            load_template(spec)
        elif not spec.startswith("rm:"):   # reward models: evaluation.reward_model checks their folders
            get_reward(spec)
    return specs


def parse_keep_if(text: str, rewards: list[str]) -> list[Condition]:
    """--keep-if "accuracy>=1,format>=1" -> Conditions on names of `rewards`; "none" (or "") -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    conditions = []
    for part in text.split(","):
        m = _CONDITION.match(part.strip())
        if m is None:
            raise ValueError(f"--keep-if: cannot read {part.strip()!r}; expected NAME OP NUMBER with OP one of "
                             f"{', '.join(_OPS)}, e.g. accuracy>=1 (or 'none' to keep everything)")
        if m["name"] not in rewards:
            raise ValueError(f"--keep-if: {part.strip()!r} names {m['name']!r}, which --reward does not score; "
                             f"scored: {', '.join(rewards)}")
        conditions.append(Condition(m["name"], m["op"], float(m["value"])))
    return conditions


def select(texts: list[str], scores: list[dict], conditions: list[Condition],
           max_per_prompt: int = 0) -> tuple[list[int], Counter]:
    """Indices of one prompt's samples to keep, in sample order, and why the others were dropped.

    A sample identical to an earlier one is a "duplicate"; one failing a condition is "filtered"
    (counted also under "failed/<name>" per failed condition); one past max_per_prompt (0: no cap)
    kept samples is "capped". Counter keys: kept, duplicate, filtered, capped, failed/<name>.
    """
    kept, seen, counts = [], set(), Counter()
    for j, text in enumerate(texts):
        if text in seen:
            counts["duplicate"] += 1
            continue
        seen.add(text)
        failed = [c.name for c in conditions if not c.holds(scores[j])]
        if failed:
            counts["filtered"] += 1
            counts.update(f"failed/{name}" for name in failed)
            continue
        if max_per_prompt and len(kept) >= max_per_prompt:
            counts["capped"] += 1
            continue
        kept.append(j)
    counts["kept"] = len(kept)
    return kept, counts


# ---- prompts ------------------------------------------------------------------------------------

def prompt_messages(row: dict, where: str) -> list[dict]:
    """The conversation a completion answers: the row's `messages` (ending with a user turn), else
    one user message holding `prompt`."""
    if "messages" in row:
        messages = [dict(m) for m in row["messages"]]
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the prompt's messages end with a {messages[-1]['role']!r} turn; "
                             f"a prompt to complete must end with a user turn")
        return messages
    return [{"role": "user", "content": row["prompt"]}]


def render_prompts(tok, conversations: list[list[dict]], template: str | None) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (the assistant turn opened)."""
    from data.chat import render
    source = template if template is not None else tok.chat_template
    if source is None:
        raise ValueError("the tokenizer has no chat template; pass --chat-template ('r1-zero', 'chatml' or Jinja)")
    texts = [render(m, source, add_generation_prompt=True, **tok.special_tokens) for m in conversations]
    return tok.encode_batch(texts)


# ---- one batch ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateConfig:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    rewards: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()
    max_per_prompt: int = 0
    env: object = None                 # an envs.Environment (--tools): multi-turn rollouts
    max_total_tokens: int | None = None  # their budget of model and tool-output tokens
    judges: dict | None = None         # reward spec -> its callable: LLM judges (judge:...), reward models (rm:DIR)


def generate_batch(sampler, tok, pool, rows: list[dict], indices: list[int], prompts: list[list[int]],
                   conversations: list[list[dict]], cfg: GenerateConfig) -> tuple[list[dict], Counter, dict]:
    """Sample, score and select for one batch of prompts (rows[k] is prompt indices[k] of the file).

    Returns (the rows to write, counts as select's plus "samples" and "tokens" (completion tokens of
    all samples), per-reward score lists over all samples). sampler: anything with generate(prompt_ids, [SamplingParams]) -> [[Completion]].
    """
    batch = sample_scored(sampler, tok, pool, rows, indices, prompts, conversations, cfg)
    written, counts = [], Counter()
    if batch.refused:
        counts["teacher_failed"] += batch.refused
    for row, index, conv, comps, ts, js, scores in zip(rows, indices, conversations, batch.outs, batch.texts,
                                                       batch.samples, batch.scores):
        kept, why = select(ts, scores, list(cfg.conditions), cfg.max_per_prompt)
        counts.update(why)
        counts["samples"] += len(ts)
        counts["tokens"] += sum(num_tokens(c) for c in comps)
        for j in kept:
            turns = (trace_messages(tok, comps[j], getattr(cfg.env, "format", None)) if cfg.env is not None
                     else [{"role": "assistant", "content": ts[j]}])
            written.append({"messages": conv + turns,
                            "prompt_id": row.get("id", index), "sample": js[j], "scores": scores[j],
                            "num_tokens": num_tokens(comps[j]), "finish_reason": comps[j].finish_reason})
    return written, counts, batch.scored


@dataclass
class ScoredBatch:
    """A batch's samples, per prompt: completions, their texts, their indices among the n (a teacher's
    refused ones are left out), each sample's {reward spec: score}; and every spec's scores in one
    flat list, and how many samples a teacher refused."""
    outs: list
    texts: list[list[str]]
    samples: list[list[int]]
    scores: list[list[dict]]
    scored: dict
    refused: int


def sample_scored(sampler, tok, pool, rows: list[dict], indices: list[int], prompts: list[list[int]],
                  conversations: list[list[dict]], cfg: GenerateConfig) -> ScoredBatch:
    """Sample cfg.n completions per prompt (prompt i with seed cfg.seed * 1_000_003 + i) and score
    each with every reward of cfg.rewards: the generate and pass-rate stages' shared first half."""
    from sampling.sampler import SamplingParams

    params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed * 1_000_003 + i) for i in indices]
    refused = 0
    if getattr(sampler, "remote", False):   # a teacher endpoint (evaluation/remote.py): it takes the messages
        outs = sampler.generate(conversations, params)
        refused = sum(c is None for comps in outs for c in comps)
        samples = [[j for j, c in enumerate(comps) if c is not None] for comps in outs]   # refused ones dropped
        outs = [[c for c in comps if c is not None] for comps in outs]
        texts = [[c.text for c in comps] for comps in outs]
    else:
        if cfg.env is not None:
            from evaluation.tool_rollout import generate_with_env
            turns = generate_with_env(sampler, tok, prompts, params, cfg.env, rows,
                                      max_total_tokens=cfg.max_total_tokens)
            outs = [[t.completion for t in group] for group in turns]
        else:
            outs = sampler.generate(prompts, params)
        texts = [[completion_text(tok, c) for c in comps] for comps in outs]
        samples = [list(range(len(comps))) for comps in outs]

    # one scoring call for the whole batch: every completion with its row's columns
    flat_rows = [row for row, comps in zip(rows, outs) for _ in comps]
    keys = sorted({key for row in rows for key in row})
    columns = {key: [row.get(key) for row in flat_rows] for key in keys}
    # rewards read the question from `prompt` (language consistency): a messages-only row gives its chat
    columns["prompt"] = [row.get("prompt", row.get("messages")) for row in flat_rows]
    columns["prompts"] = ["\n".join(m["content"] for m in conv if m["role"] == "user")
                          for conv, comps in zip(conversations, outs) for _ in comps]
    ids = [c.token_ids for comps in outs for c in comps]
    columns["completion_ids"] = ids if all(ids) or not ids else None   # a teacher without a tokenizer: none
    judges = cfg.judges or {}
    scored = pool.score({spec: judges.get(spec, spec) for spec in cfg.rewards}, [t for ts in texts for t in ts],
                        **columns)
    from evaluation.reward_model import route   # rows' reward_kind: rule rewards or reward models
    scored = {spec: route(spec, values, flat_rows) for spec, values in scored.items()}

    per_prompt, pos = [], 0
    for ts in texts:
        per_prompt.append([{spec: scored[spec][pos + j] for spec in cfg.rewards} for j in range(len(ts))])
        pos += len(ts)
    return ScoredBatch(outs, texts, samples, per_prompt, scored, refused)


def num_tokens(completion) -> int:
    """Tokens of a completion: a teacher endpoint's own count (evaluation/remote.py), else its ids."""
    return getattr(completion, "num_tokens", None) or len(completion.token_ids)


def trace_messages(tok, completion, fmt=None) -> list[dict]:
    """A multi-turn completion as chat messages: each run of the model's tokens an assistant turn,
    each run of tool output (sampled_mask 0) a tool turn, in the tool format's message form
    (envs.formats: fmt.messages), so that SFT on the trace trains the model's text only
    (data/templates.py renders fenced-format tool turns inline for the r1-zero templates). The last
    assistant turn leaves out the end-of-sequence token it stopped at, as completion_text does."""
    ids, mask = list(completion.token_ids), completion.sampled_mask or [1] * len(completion.token_ids)
    if completion.finish_reason == "stop" and ids and ids[-1] in tok.special_ids and mask[-1]:
        ids, mask = ids[:-1], mask[:-1]
    segments, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            segments.append((bool(mask[start]), tok.decode(ids[start:k])))
            start = k
    if not segments:
        return [{"role": "assistant", "content": ""}]
    if fmt is None:
        from envs.formats import FencedFormat
        fmt = FencedFormat()
    return fmt.messages(segments)


# ---- the output file and its progress record -------------------------------------------------------

class GeneratedFile:
    """generated.jsonl and progress.json of a run directory: append whole batches, resume after a crash.

    On opening, the file is cut back to the size progress.json records (0 without one), so it holds
    exactly the rows of the prompts progress.json calls done; `dropped_bytes` says how much was cut.
    `settings` must equal the recorded ones (ValueError naming the differences).
    """

    def __init__(self, run_dir, settings: dict, filename: str = OUTPUT_FILE):
        from runtime.rundir import write_json_atomic
        self._write_json = write_json_atomic
        self.path = Path(run_dir) / filename
        self.progress_path = Path(run_dir) / PROGRESS_FILE
        fresh = {"prompts_done": 0, "rows": 0, "bytes": 0, "counts": {}, "settings": settings}
        self.state = json.loads(self.progress_path.read_text()) if self.progress_path.exists() else fresh
        changed = sorted(k for k in set(settings) | set(self.state["settings"])
                         if settings.get(k) != self.state["settings"].get(k))
        if changed:
            was = {k: self.state["settings"].get(k) for k in changed}
            raise ValueError(f"{self.progress_path}: this run was made with {was}; resuming it with "
                             f"{ {k: settings.get(k) for k in changed} } would mix two data sets in {self.path.name}. "
                             f"Resume with the run's settings, or start a new run without --resume")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.state["bytes"]:
            raise RuntimeError(f"{self.path} holds {size} bytes but {self.progress_path} records {self.state['bytes']} "
                               f"written and fsynced: the file was changed outside this run")
        self.dropped_bytes = size - self.state["bytes"]
        self.file = open(self.path, "ab")
        self.file.truncate(self.state["bytes"])   # a half-written line, or a batch that was not recorded
        self._pending = (0, 0)                     # rows and bytes written but not yet recorded

    @property
    def prompts_done(self) -> int:
        return self.state["prompts_done"]

    def write_rows(self, rows: list[dict]) -> None:
        """Append a batch's rows and fsync them; they count once `record` has run."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        self.file.write(data)
        self.file.flush()
        os.fsync(self.file.fileno())
        self._pending = (self._pending[0] + len(rows), self._pending[1] + len(data))

    def record(self, prompts_done: int, counts: Counter) -> None:
        """Record the rows written since the last call as the prompts before prompts_done (atomically)."""
        rows, size = self._pending
        total = Counter(self.state["counts"]) + counts
        self.state = {**self.state, "prompts_done": prompts_done, "rows": self.state["rows"] + rows,
                      "bytes": self.state["bytes"] + size, "counts": dict(sorted(total.items()))}
        self._write_json(self.progress_path, self.state)
        self._pending = (0, 0)

    def close(self) -> None:
        self.file.close()


# ---- the stage ------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# rewards whose full marks (1.0) mean "correct" or "well formed": an unset --keep-if asks for
# full marks on each of these that --reward scores
VERIFIABLE = ("accuracy", "format", "think_format", "task", "arithmetic", "countdown", "code")


def default_keep_if(rewards: list[str]) -> str:
    """The --keep-if of a run that gives none: ">= 1" on each verifiable reward scored, else "none"."""
    return ",".join(f"{name}>=1" for name in rewards if name in VERIFIABLE) or "none"


def check_flags(args, world_size: int) -> list[str]:
    """The generate stage's flags, checked before anything is written (ValueError naming the flag).
    An unset --keep-if becomes default_keep_if of --reward; returns the console line saying so."""
    from evaluation.eval_stage import check_rollout_tp, check_sampling_flags
    from evaluation.remote import check_judge_flags, check_teacher_flags
    check_teacher_flags(args)
    if args.teacher_url is not None and world_size > 1:
        raise ValueError(f"--teacher-url: the endpoint samples, so --stage generate runs in one process (it got "
                         f"WORLD_SIZE={world_size})")
    check_rollout_tp(args, world_size)
    if world_size > 1 and args.rollout_tp != world_size:
        raise ValueError(f"--stage generate runs in one process, or in one tensor-parallel group of --rollout-tp "
                         f"ranks (it got WORLD_SIZE={world_size} and --rollout-tp {args.rollout_tp}); split --data "
                         f"and run one job per part")
    if args.data is None or not Path(args.data).is_file():
        raise ValueError(f"--stage generate needs --data, a prompts JSONL/Parquet file; got {args.data!r}")
    check_sampling_flags(args, "gen")
    from evaluation.eval_stage import eval_environment
    eval_environment(args, args.gen_max_new_tokens)   # --tools and its flags
    if args.gen_batch_prompts < 1 or args.max_per_prompt < 0:
        raise ValueError(f"--gen-batch-prompts must be >= 1 and --max-per-prompt >= 0 (0: no cap), got "
                         f"{args.gen_batch_prompts} and {args.max_per_prompt}")
    rewards = parse_rewards(args.reward)
    check_judge_flags(args)
    from evaluation.reward_model import check_reward_model_flags
    check_reward_model_flags(args)
    notes = []
    if args.keep_if is None:
        keep = default_keep_if(rewards)
        notes.append(fill_default(args, "keep_if", keep, "full marks on each verifiable reward of --reward" if keep
                                  != "none" else f"keep every completion: --reward {args.reward} has no verifiable "
                                  f"reward ({', '.join(VERIFIABLE)})"))
    parse_keep_if(args.keep_if, rewards)
    return notes


def _decode_with_group(args, info) -> int:
    """A rank > 0 of the generate stage's tensor-parallel group: it holds its share of the model and
    takes part in every batch rank 0 samples (passing no prompts of its own: sampling/group.py);
    rank 0 alone reads the prompts, scores, and writes."""
    from evaluation.eval_stage import load_model_and_tokenizer
    from runtime.distributed import broadcast_object
    from sampling.sampler import Sampler, engine_options

    start, total = broadcast_object(None)
    model, tok = load_model_and_tokenizer(args, info.device)
    longest = broadcast_object(None)
    sampler = Sampler(model, max_batch_size=args.sampler_batch_size, max_seq_len=longest + args.gen_max_new_tokens,
                      tokenizer=tok, verbose=False, **engine_options(args))
    try:
        for _ in range(start, total, args.gen_batch_prompts):
            sampler.generate([], [])
    finally:
        sampler.release()
    return 0


def prompt_rows(args) -> tuple[list[dict], list[list[dict]]]:
    """--data's prompt rows and each one's chat messages (the generate and pass-rate stages')."""
    from data.datasets import load_prompts
    rows = load_prompts(args.data, args.prompt_column)
    return rows, [prompt_messages(row, f"{args.data} row {i + 1}") for i, row in enumerate(rows)]


def sampling_settings(args, rows: list[dict], rewards: list[str]) -> dict:
    """What a resumed run of the generate or pass-rate stage must share with the run it continues
    (GeneratedFile refuses a resume that changes any of it)."""
    return {"data": str(Path(args.data).resolve()), "num_prompts": len(rows), "model": args.model,
            "preset": args.preset, "tokenizer": args.tokenizer, "chat_template": args.chat_template,
            "gen_n": args.gen_n, "gen_temperature": args.gen_temperature, "gen_top_p": args.gen_top_p,
            "gen_max_new_tokens": args.gen_max_new_tokens, "gen_batch_prompts": args.gen_batch_prompts,
            "reward": rewards, "keep_if": args.keep_if, "seed": args.seed}


def run_generate(args, run, info) -> int:
    """--stage generate: rejection sampling over --data into <run>/generated.jsonl (module docstring)."""
    from evaluation.eval_stage import load_model_and_tokenizer, template_source
    from runtime.distributed import print0
    from runtime.metrics import MetricsWriter, Progress
    from runtime.rundir import write_json_atomic
    from sampling.sampler import Sampler, engine_options
    from verify.pool import RewardPool

    check_flags(args, info.world_size)
    if info.rank != 0:
        return _decode_with_group(args, info)
    rewards = parse_rewards(args.reward)
    from evaluation.eval_stage import eval_environment
    from evaluation.remote import TeacherUnavailable, make_run_judges, make_teacher
    from verify.judge import judge_metrics
    from verify.openai_client import APIError
    env, budget = eval_environment(args, args.gen_max_new_tokens)
    teacher = None
    try:
        judges = make_run_judges(args, cache_dir=run.path / "judge_cache", device=info.device)
        from evaluation.reward_model import make_reward_models
        rms = make_reward_models(args, info.device)
        if args.teacher_url is not None:   # the tokenizer, when given, counts the student's tokens
            from data.tokenizer import load_tokenizer
            tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
            teacher = make_teacher(args, tok, cache_dir=run.path / "teacher_cache")
    except APIError as e:
        print0(f"generate: {e}")
        return 1
    cfg = GenerateConfig(n=args.gen_n, temperature=args.gen_temperature, top_p=args.gen_top_p,
                         max_new_tokens=args.gen_max_new_tokens, seed=args.seed, rewards=tuple(rewards),
                         conditions=tuple(parse_keep_if(args.keep_if, rewards)), max_per_prompt=args.max_per_prompt,
                         env=env, max_total_tokens=budget, judges={**judges, **rms})
    rows, conversations = prompt_rows(args)
    settings = {**sampling_settings(args, rows, rewards), "max_per_prompt": args.max_per_prompt}
    if teacher is not None:   # the endpoint may move between a run and its resume; its model may not
        settings.update(teacher_model=teacher.model)
    if env is not None:   # a run with tools resumes only with the same tools
        settings.update(tools=args.tools, tool_format=args.tool_format, max_tool_calls=args.max_tool_calls,
                        max_rollout_tokens=budget)
    out = GeneratedFile(run.path, settings)
    if out.dropped_bytes:
        print0(f"generate: dropped {out.dropped_bytes} bytes written after the last recorded batch of {out.path}")
    start = out.prompts_done
    if info.world_size > 1:   # the other ranks of the group decode as many batches (_decode_with_group)
        from runtime.distributed import broadcast_object
        broadcast_object((start, len(rows)))
    if start:
        print0(f"generate: resuming at prompt {start}/{len(rows)} ({out.state['rows']} rows kept so far)")

    sampler = metrics = None
    try:
        if teacher is not None:
            sampler, prompts = teacher, [None] * len(rows)   # the endpoint renders the messages itself
        else:
            model, tok = load_model_and_tokenizer(args, info.device)
            prompts = render_prompts(tok, conversations, template_source(args.chat_template))
            if info.world_size > 1:
                from runtime.distributed import broadcast_object
                broadcast_object(max(map(len, prompts)))
            sampler = Sampler(model, max_batch_size=args.sampler_batch_size,
                              max_seq_len=max(map(len, prompts)) + (budget or cfg.max_new_tokens), tokenizer=tok,
                              **engine_options(args))
        metrics = MetricsWriter(run.path / "metrics.jsonl", resume_step=start if run.resumed else None)
        progress = Progress(len(rows), desc="generate", every_s=args.log_every_s, start=start, unit="prompt")
        t0 = time.perf_counter()
        with RewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout_s) as pool:
            for lo in range(start, len(rows), args.gen_batch_prompts):
                hi = min(lo + args.gen_batch_prompts, len(rows))
                tb = time.perf_counter()
                written, counts, scored = generate_batch(sampler, tok, pool, rows[lo:hi], list(range(lo, hi)),
                                                         prompts[lo:hi], conversations[lo:hi], cfg)
                out.write_rows(written)
                seconds = time.perf_counter() - tb
                extra = {"teacher_failed": counts["teacher_failed"]} if teacher is not None else {}
                metrics.log(hi, samples=counts["samples"], kept=counts["kept"], duplicate=counts["duplicate"],
                            filtered=counts["filtered"], capped=counts["capped"], **extra,
                            **{f"reward/{spec}": _mean(scored[spec]) for spec in rewards},
                            **{"response_length/mean": counts["tokens"] / max(counts["samples"], 1),
                               "tokens_per_s": counts["tokens"] / seconds}, **judge_metrics(judges))
                # last: a kill before this line redoes the batch, and a resume drops its metrics line
                out.record(hi, counts)
                progress.update(hi - lo, rows=out.state["rows"], keep_rate=counts["kept"] / max(counts["samples"], 1),
                                batch_s=seconds)
    except (TeacherUnavailable, APIError) as e:   # nothing of the batch was recorded: --resume redoes it
        print0(f"generate: stopped at prompt {out.prompts_done}/{len(rows)}: {e}")
        return 1
    finally:
        out.close()
        if metrics is not None:
            metrics.close()
        if teacher is not None:
            teacher.client.close()
        elif sampler is not None:
            sampler.release()
        for judge in {id(j.client): j for j in judges.values()}.values():
            judge.client.close()
    counts = out.state["counts"]
    summary = {"prompts": len(rows), "rows": out.state["rows"], "samples": counts.get("samples", 0),
               "keep_rate": out.state["rows"] / max(counts.get("samples", 0), 1),
               **{k: v for k, v in counts.items() if k != "samples"}, "wall_s_this_process": time.perf_counter() - t0,
               **judge_metrics(judges)}
    if teacher is not None:
        summary.update({f"teacher/{k}": v for k, v in teacher.client.stats.as_dict().items()}, teacher_model=teacher.model)
    write_json_atomic(run.path / "summary.json", summary)
    print0(f"generate: {summary['rows']} rows from {summary['samples']} samples of {len(rows)} prompts "
           f"(keep rate {summary['keep_rate']:.3f}) in {out.path}")
    return 0
