"""Rollouts: prompts -> chat template -> the sampler (n = group size) -> rewards -> advantages.

    batch = generate_rollouts(sampler, tok, rows, group_size=8, params=..., template="r1-zero")
    score_rollouts(batch, rewards, scorer)          # per-function rewards and their weighted total
    batch.advantages = group_advantages(batch.rewards, batch.group_size, scale="group")

A RolloutBatch holds its completions grouped by prompt (completion k belongs to prompt
k // group_size), with the token ids, the sampler's log-probs of each sampled token (under the
temperature-scaled, untruncated distribution: what the importance ratio compares with), the
finish reasons and the decoded texts; rewards arrive as one column per reward function plus the
weighted total (NaN where every function said None: no signal).

Seeds: prompt i of a generate_rollouts call with `seed` samples with prompt_seed(seed, i), so its group
does not depend on the prompts batched with it. DAPO's dynamic sampling keeps only the groups whose
rewards differ (informative_groups, select_for_dynamic_sampling); the loop samples more prompts to
fill the batch.

Rewards are scored by `RewardScorer`: in-process for cheap checks, or in verify.pool.RewardPool's
long-lived worker processes with per-item timeouts (math verification, code sandbox), so one
pathological completion cannot stall a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data.chat import render
from evaluation.evaluate import problem_text
from evaluation.reward_model import route
from sampling.sampler import SamplingParams


@dataclass
class RolloutBatch:
    group_size: int
    rows: list[dict]  # one data set row per completion (repeated group_size times)
    prompt_ids: list[list[int]]  # per completion
    completion_ids: list[list[int]]
    rollout_logp: list[list[float]]
    finish_reasons: list[str]
    texts: list[str]
    prompts: list[str]  # the problem text (reward functions' `prompts`)
    reward_columns: dict[str, list[float | None]] = field(default_factory=dict)
    rewards: torch.Tensor | None = None  # [N] weighted total, NaN = no signal
    advantages: torch.Tensor | None = None  # [N]
    # multi-turn rollouts (tools): per completion, 1 for the policy's tokens and 0 for observation
    # tokens, which the loss, the KL, the entropy and the token counts leave out; and what the
    # tools did (calls, errors, timeouts, malformed, observation_tokens, seconds). None: no tools.
    sampled_masks: list[list[int]] | None = None
    tool_stats: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    def select_groups(self, groups: list[int]) -> "RolloutBatch":
        """The sub-batch of the given prompt groups (in that order)."""
        idx = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return RolloutBatch(self.group_size, pick(self.rows), pick(self.prompt_ids), pick(self.completion_ids),
                            pick(self.rollout_logp), pick(self.finish_reasons), pick(self.texts), pick(self.prompts),
                            {k: pick(v) for k, v in self.reward_columns.items()},
                            None if self.rewards is None else self.rewards[idx],
                            None if self.advantages is None else self.advantages[idx],
                            None if self.sampled_masks is None else pick(self.sampled_masks),
                            None if self.tool_stats is None else pick(self.tool_stats))

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        first = parts[0]
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        cols = {k: [x for p in parts for x in p.reward_columns[k]] for k in first.reward_columns}
        rewards = None if first.rewards is None else torch.cat([p.rewards for p in parts])
        tools = first.sampled_masks is not None
        return RolloutBatch(first.group_size, cat("rows"), cat("prompt_ids"), cat("completion_ids"),
                            cat("rollout_logp"), cat("finish_reasons"), cat("texts"), cat("prompts"), cols, rewards,
                            sampled_masks=cat("sampled_masks") if tools else None,
                            tool_stats=cat("tool_stats") if tools else None)


def encode_prompt(tok, row: dict, template: str | None) -> list[int]:
    """The rendered prompt's token ids (a chat prompt from `messages` or a user turn from the prompt text)."""
    messages = row.get("messages") or [{"role": "user", "content": problem_text(row)}]
    source = template if template is not None else tok.chat_template
    if source is None:
        raise ValueError("the tokenizer has no chat template; pass --chat-template ('r1-zero', 'chatml' or Jinja)")
    return tok.encode(render(messages, source, add_generation_prompt=True, **tok.special_tokens))


SEED_MODULUS = 2**40  # the sampler seeds sample j with seed * 1_000_003 + j: that must stay below 2**64


def prompt_seed(seed: int, i: int) -> int:
    """The sampling seed of the i-th prompt of a generate_rollouts call with `seed`: (seed * 1_000_003 + i)
    reduced below SEED_MODULUS, so that any non-negative seed (a --seed of 200 at step 10**5 included)
    gives torch a valid 64-bit generator seed."""
    return (seed * 1_000_003 + i) % SEED_MODULUS


def generate_rollouts(sampler, tok, rows: list[dict], *, group_size: int, params: SamplingParams,
                      template: str | None, seed: int, prompt_ids: list[list[int]] | None = None,
                      env=None, max_total_tokens: int | None = None) -> RolloutBatch:
    """group_size completions of each row's prompt, one generate call (shared prefill per prompt).
    prompt_ids: the rows' encoded prompts when the caller has them already (encode_prompt).
    env: an envs.Environment (tools): multi-turn rollouts (evaluation/tool_rollout.py) whose
    observation tokens are in the completions, marked 0 in `sampled_masks`; max_total_tokens bounds
    each completion's model and observation tokens together."""
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tok, r, template) for r in rows]
    per_prompt = [SamplingParams(**{**params.__dict__, "n": group_size, "seed": prompt_seed(seed, i)})
                  for i in range(len(rows))]
    masks = stats = None
    if env is None:
        outs = sampler.generate(prompt_ids, per_prompt)
    else:
        from evaluation.tool_rollout import generate_with_env
        turns = generate_with_env(sampler, tok, prompt_ids, per_prompt, env, rows, max_total_tokens=max_total_tokens)
        outs = [[t.completion for t in group] for group in turns]
        masks = [c.sampled_mask or [1] * len(c.token_ids) for group in outs for c in group]
        stats = [tool_stats(t) for group in turns for t in group]
    flat = [(r, p, c) for r, p, group in zip(rows, prompt_ids, outs) for c in group]
    return RolloutBatch(
        group_size=group_size,
        rows=[r for r, _, _ in flat],
        prompt_ids=[p for _, p, _ in flat],
        completion_ids=[c.token_ids for _, _, c in flat],
        rollout_logp=[c.logprobs for _, _, c in flat],
        finish_reasons=[c.finish_reason for _, _, c in flat],
        texts=[c.text if c.text is not None else tok.decode(c.token_ids) for _, _, c in flat],
        prompts=[problem_text(r) for r, _, _ in flat],
        sampled_masks=masks,
        tool_stats=stats,
    )


def rollout_records(batch: RolloutBatch, n: int) -> list[dict]:
    """The first n completions of a scored batch as rows of rollouts.jsonl (a table people read):
    the problem's id, the sample's index in its group, prompt and completion text, each reward
    function's value, the weighted total, the group advantage, the completion's length in tokens
    and finish reason. The field names are those of the eval stage's samples-<set>.jsonl where the
    two overlap (id, sample, prompt, completion, num_tokens, finish_reason)."""
    out = []
    for i in range(min(n, len(batch))):
        total = float(batch.rewards[i]) if batch.rewards is not None else None
        advantage = float(batch.advantages[i]) if batch.advantages is not None else None
        out.append({"id": batch.rows[i].get("id"), "sample": i % batch.group_size, "prompt": batch.prompts[i],
                    "completion": batch.texts[i],
                    "rewards": {name: values[i] for name, values in batch.reward_columns.items()},
                    "reward": None if total is None or math.isnan(total) else total,
                    "advantage": advantage, "num_tokens": len(batch.completion_ids[i]),
                    "finish_reason": batch.finish_reasons[i]})
    return out


def rollout_environment(args):
    """(the envs.ToolEnvironment of --tools, the rollout's token budget) from the flags, checked
    (ValueError naming the flag); (None, --max-new-tokens) without tools."""
    from evaluation.eval_stage import eval_environment

    env, budget = eval_environment(args, args.max_new_tokens)
    return env, budget if env is not None else args.max_new_tokens


def tool_stats(turn) -> dict:
    """What the tools did in one multi-turn rollout (an evaluation.tool_rollout.TurnCompletion)."""
    ep = turn.episode
    return {"calls": ep.calls, "errors": ep.errors, "timeouts": ep.timeouts, "malformed": ep.malformed,
            "observation_tokens": turn.observation_tokens, "seconds": ep.seconds}


def informative_groups(rewards: torch.Tensor, group_size: int) -> list[int]:
    """The groups (prompt indices) whose valid rewards are not all equal. rewards [num_groups * group_size]
    in group order, NaN = no signal. A group with fewer than two distinct valid rewards has zero advantage
    everywhere (rl.advantage), so it adds nothing to the policy gradient."""
    groups = rewards.view(-1, group_size).tolist()  # [num_groups, G]
    return [g for g, row in enumerate(groups) if len({x for x in row if not math.isnan(x)}) > 1]


def select_for_dynamic_sampling(batch: RolloutBatch, need: int, last_round: bool) -> tuple[RolloutBatch, int]:
    """DAPO's dynamic sampling, one round: (the groups of `batch` to keep, how many were dropped).

    Keeps the first `need` informative groups (informative_groups: rewards not all equal), in batch
    order; the others are dropped and the loop samples more prompts to fill the batch. On the last
    round allowed (last_round), the batch is topped up with dropped groups, in batch order, so that a
    step never trains on fewer than `need` groups when too few are informative. `batch` must be scored.
    """
    if batch.rewards is None:
        raise ValueError("select_for_dynamic_sampling: the batch has no rewards; score it first (RewardScorer)")
    keep = informative_groups(batch.rewards, batch.group_size)[:need]
    if last_round and len(keep) < need:
        rest = [g for g in range(batch.num_groups) if g not in keep]
        keep = sorted(keep + rest[:need - len(keep)])
    return batch.select_groups(keep), batch.num_groups - len(keep)


class RewardScorer:
    """Scores completions with reward specs ("name" or "name:weight"); in-process or in a worker pool.

    `score(batch)` fills batch.reward_columns (one per spec name) and batch.rewards, the weighted sum
    of the functions that gave a value (NaN when all gave None).
    """

    def __init__(self, spec: str, workers: int = 0, timeout_s: float = 30.0, judges: dict | None = None):
        from verify.judge import is_judge, load_template
        from verify.rewards import get_reward

        self.judges = dict(judges or {})   # judge spec -> verify.judge.JudgeReward (they run in this process)
        self.parts = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            name, _, weight = part.rpartition(":")
            if name and _is_number(weight):
                self.parts.append((name, float(weight)))
            else:
                self.parts.append((part, 1.0))
        for name, _ in self.parts:
            if is_judge(name):
                self.judges.get(name) or load_template(name)   # a bad template fails now, naming its file
            elif not name.startswith("rm:"):                   # reward models: checked by their loader
                get_reward(name)  # unknown names fail now, listing the known ones
        self.pool = None
        if workers > 0:
            from verify.pool import RewardPool
            self.pool = RewardPool(num_workers=workers, timeout_s=timeout_s)

    def score(self, batch: RolloutBatch) -> None:
        from verify.rewards import get_reward

        columns = {k: [r.get(k) for r in batch.rows] for k in {k for r in batch.rows for k in r}}
        columns.update(prompts=batch.prompts, completion_ids=batch.completion_ids)
        if batch.tool_stats is not None:   # what the tools did, for the tool rewards (verify.rewards)
            columns.update(tool_calls=[st["calls"] for st in batch.tool_stats],
                           tool_errors=[st["errors"] + st["timeouts"] for st in batch.tool_stats],
                           tool_malformed=[st["malformed"] for st in batch.tool_stats])
        names = [n for n, _ in self.parts]
        missing = [n for n in names if n.startswith(("judge:", "rm:")) and n not in self.judges]
        if missing:
            raise ValueError(f"reward {missing[0]}: a model-backed reward must be built by the stage (a judge "
                             f"needs its endpoint or model, a reward model its weights)")
        fns = {n: self.judges.get(n, n) for n in names}
        if self.pool is not None:
            scored = self.pool.score(fns, batch.texts, **columns)
        else:
            scored = {n: get_reward(fns[n])(batch.texts, **columns) for n in names}
        batch.reward_columns = {n: route(n, list(scored[n]), batch.rows) for n in names}
        total = []
        for i in range(len(batch)):
            cols = batch.reward_columns
            vals = [cols[n][i] * w for n, w in self.parts if cols[n][i] is not None]
            total.append(sum(vals) if vals else math.nan)
        batch.rewards = torch.tensor(total, dtype=torch.float32)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for judge in self.judges.values():
            if hasattr(judge, "client"):
                judge.client.close()


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
