"""The environment interface of multi-turn rollouts, and the tool-calling environment.

A rollout alternates model text and environment replies. The sampler pauses a sequence at one of
the environment's stop strings; the environment reads what the model wrote since its last reply
and answers:

    env = ToolEnvironment(["calculator"], FencedFormat(), max_calls=4)
    episode = env.start(row)                     # one per rollout (its tool sessions, its counters)
    reply = env.respond(episode, model_text)     # Reply(text, done)
    # reply.text: appended to the rollout as tokens (not the policy's: masked out of the loss);
    # reply.text None and not done: no call there, the model goes on; done: the rollout ends
    env.close(episode)                           # always, when the rollout ends

respond() never raises for anything the model wrote: a malformed or failing call is answered with
an error observation. The driver (evaluation/tool_rollout.py) runs respond() of a batch's paused
rollouts in parallel threads, so one slow tool holds up only its own rollout.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from envs.formats import FencedFormat, ToolFormat
from envs.registry import get_tool
from envs.tools import Observation, Session, clean_output


@dataclass
class Reply:
    text: str | None           # what the rollout reads next (None: nothing; the model goes on)
    done: bool = False         # the rollout ends here (finish reason "stop")
    status: str = "ok"         # the call's: "ok" | "error" | "timeout" | "none" (no call) | "budget"


@dataclass
class Episode:
    """One rollout's state: its row, its open sessions and what it has done."""
    row: dict
    sessions: dict[str, Session] = field(default_factory=dict)
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    malformed: int = 0
    seconds: float = 0.0
    turns: list = field(default_factory=list)   # (tool, status) of each call


class Environment(ABC):
    """What a multi-turn rollout talks to (module docstring)."""

    stop: list[str] = []

    @abstractmethod
    def start(self, row: dict) -> Episode:
        """A new episode for one rollout of `row`."""

    @abstractmethod
    def respond(self, episode: Episode, text: str) -> Reply:
        """The reply to the model's text since the last reply (it ended at a stop string)."""

    def close(self, episode: Episode) -> None:
        for s in episode.sessions.values():
            s.close()
        episode.sessions.clear()


class ToolEnvironment(Environment):
    """Tool calls in the format's syntax, answered by the named tools; at most max_calls per rollout
    (a call beyond them is answered "budget" and ends the rollout: finish reason "length")."""

    def __init__(self, tools: list[str], fmt: ToolFormat | None = None, max_calls: int = 4):
        if not tools:
            raise ValueError("ToolEnvironment: no tools")
        if max_calls < 1:
            raise ValueError(f"--max-tool-calls {max_calls}: expected >= 1")
        self.tools = {name: get_tool(name) for name in tools}
        self.format = fmt or FencedFormat()
        self.max_calls = max_calls
        self.stop = list(self.format.stop)

    def start(self, row: dict) -> Episode:
        return Episode(row)

    def respond(self, episode: Episode, text: str) -> Reply:
        call = self.format.parse(text, list(self.tools))
        if call is None:
            return Reply(None, status="none")
        if episode.calls >= self.max_calls:
            return Reply(None, done=True, status="budget")
        episode.calls += 1
        t0 = time.perf_counter()
        if call.error is not None:
            obs = Observation(clean_output(f"error: {call.error}"), "error")
            episode.malformed += 1
        else:
            session = episode.sessions.get(call.tool)
            if session is None:
                session = episode.sessions[call.tool] = self.tools[call.tool].session()
            obs = session.call(call.code)
        episode.seconds += time.perf_counter() - t0
        episode.errors += obs.status == "error"
        episode.timeouts += obs.status == "timeout"
        episode.turns.append((call.tool, obs.status))
        return Reply(self.format.render(obs), status=obs.status)
