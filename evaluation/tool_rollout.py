"""Multi-turn rollouts on the rollout engine: model text and environment replies (tool results)
interleaved in one sequence, which keeps its KV cache across the turns.

    outs = generate_with_env(sampler, tok, prompts, params, env, rows, max_total_tokens=1024)
    outs[i][j] -> TurnCompletion(completion, episode)
    # completion.token_ids: model and observation tokens in order; completion.sampled_mask: 1 for the
    # model's, 0 for the environment's (their log-probs are 0.0: they are not the policy's)

How it runs (no second decode loop: sampling/engine.py's pause / extend):
- every sample is added with the environment's stop strings and pause=True, and a budget of
  max_total_tokens after the prompt (model and observation tokens together; max_new_tokens still
  counts the model's alone);
- a sample that pauses at a stop string is handed to env.respond (in a thread pool: the replies
  of a batch run in parallel, and the other samples keep decoding meanwhile) with the text the
  model wrote since its last pause;
- the reply's text is tokenised and appended with Engine.extend: it is prefilled into the sample's
  own cache and the sample decodes on (the history is not prefilled again). No reply text: the
  sample resumes as it was. A reply that ends the episode, a reply longer than the budget left,
  or a sample whose budget is spent finishes it ("stop" when the environment ended it, "length"
  for a budget);
- a sample that stops at an end-of-sequence token finishes there.

Every episode is closed when its rollout ends, however it ends (an exception included).
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from envs.base import Environment, Episode, Reply


@dataclass
class TurnCompletion:
    completion: object            # sampling.types.Completion (finish_reason set by the rollout)
    episode: Episode
    observation_tokens: int = 0

    @property
    def model_tokens(self) -> int:
        return len(self.completion.token_ids) - self.observation_tokens


def _respond(env: Environment, episode: Episode, text: str) -> Reply:
    try:
        return env.respond(episode, text)
    except Exception as e:   # an environment bug costs only this rollout: it ends with the error said
        return Reply(f"error: the environment failed: {type(e).__name__}: {e}"[:500], done=True, status="error")


def generate_with_env(sampler, tok, prompts: list[list[int]], params: list, env: Environment, rows: list[dict],
                      max_total_tokens: int | None = None, workers: int = 8) -> list[list[TurnCompletion]]:
    """n multi-turn rollouts of each prompt (module docstring); rows[i] is prompt i's data set row
    (env.start reads it)."""
    if getattr(sampler, "group", None) is not None and sampler.group.size > 1:
        raise ValueError("multi-turn rollouts with a tensor-parallel sampler (--rollout-tp > 1 with --tools) are "
                         "not supported: sample them with --rollout-tp 1")
    if len(params) != len(prompts) or len(rows) != len(prompts):
        raise ValueError(f"generate_with_env: {len(prompts)} prompts, {len(params)} SamplingParams, {len(rows)} rows")
    results: list[list[TurnCompletion | None]] = [[None] * sp.n for sp in params]
    episodes: dict[int, Episode] = {}
    where: dict[int, tuple[int, int]] = {}
    since: dict[int, int] = {}           # seq -> index in its tokens where the current model turn began
    observed: dict[int, int] = {}        # seq -> observation tokens appended
    pending = {}                         # seq -> future of env.respond
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="env")

    def done(seq: int, completion, reason: str | None = None) -> None:
        i, j = where[seq]
        if reason is not None:
            completion = dataclasses.replace(completion, finish_reason=reason)
        env.close(episodes[seq])
        results[i][j] = TurnCompletion(completion, episodes.pop(seq), observed.pop(seq, 0))

    with sampler.driving() as engine:
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                sp = dataclasses.replace(sp, stop=list(dict.fromkeys([*(sp.stop or []), *env.stop])))
                for j, seq in enumerate(engine.add(p, sp, pause=True, max_total=max_total_tokens)):
                    where[seq], since[seq], observed[seq] = (i, j), 0, 0
                    episodes[seq] = env.start(rows[i])
            while engine.has_work() or pending:
                if engine.has_work():
                    events = engine.step()
                else:
                    wait(list(pending.values()), return_when=FIRST_COMPLETED)
                    events = []
                for ev in events:
                    if ev.kind == "finished":
                        done(ev.seq, ev.completion)
                        engine.pop(ev.seq)
                    elif ev.kind == "paused":
                        if engine.info(ev.seq).at_stop_token:   # an end-of-sequence token: the rollout ends
                            done(ev.seq, engine.finish(ev.seq))
                            engine.pop(ev.seq)
                            continue
                        text = tok.decode(ev.completion.token_ids[since[ev.seq]:])
                        pending[ev.seq] = pool.submit(_respond, env, episodes[ev.seq], text)
                for seq in [s for s, f in pending.items() if f.done()]:
                    reply = pending.pop(seq).result()
                    state = engine.info(seq)
                    obs = None
                    if reply.text is not None and not reply.done:
                        obs = tok.encode(reply.text) or tok.encode(" ")
                    if reply.done:
                        done(seq, engine.finish(seq), "length" if reply.status == "budget" else "stop")
                        engine.pop(seq)
                    elif state.can_sample < 1 or (obs is not None and len(obs) + 1 > state.room):
                        done(seq, engine.finish(seq), "length")   # no room to sample on, or for the observation
                        engine.pop(seq)
                    elif obs is None:
                        since[seq] = state.tokens
                        engine.resume(seq)
                    else:
                        engine.extend(seq, obs)
                        observed[seq] += len(obs)
                        since[seq] = state.tokens + len(obs)
        except BaseException:
            for seq in list(engine.seqs):
                if seq in where:
                    engine.abort(seq)
            for ep in episodes.values():
                env.close(ep)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results
