"""Tools a rollout can call, and what a call gives back.

    tool = get_tool("calculator")
    session = tool.session()              # one per rollout (a stateful tool keeps state in it)
    obs = session.call("12 * (3 + 4)")    # Observation(text="84", status="ok", seconds=...)
    session.close()

A tool call never raises: a malformed, refused, failing or hanging call is an Observation with
status "error" or "timeout" whose text says what went wrong, and the rollout goes on. Observation
text is capped at MAX_OBSERVATION_CHARS (the middle cut, saying how much) and cleaned of what a
tokenizer should not see (NUL and other control characters but newline and tab, invalid UTF-8).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from envs.calculator import CalculatorError, evaluate, format_value

MAX_OBSERVATION_CHARS = 1000
MAX_CALL_CHARS = 4000


@dataclass
class Observation:
    text: str
    status: str = "ok"     # "ok" | "error" | "timeout"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def clean_output(text, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """`text` (str or bytes) as an observation may show it: valid UTF-8, no control characters but
    newline and tab, at most `limit` characters (head and tail kept, the cut said in between)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = "".join(c if c in "\n\t" or (c >= " " and c != "\x7f") else "?" for c in text)
    if len(text) > limit:
        keep = max(0, limit - 40) // 2
        text = f"{text[:keep]}\n... [{len(text) - 2 * keep} characters cut] ...\n{text[len(text) - keep:]}"
    return text


class Session(ABC):
    """One rollout's use of a tool. call() never raises; close() frees what the session holds."""

    @abstractmethod
    def call(self, code: str) -> Observation:
        """Run one call; its observation (status "error" / "timeout" when it failed)."""

    def close(self) -> None:
        """Free what the session holds (a stateless tool holds nothing)."""


class Tool(ABC):
    name: str = ""
    description: str = ""

    @abstractmethod
    def session(self) -> Session:
        """A new session, for one rollout."""


class _CalculatorSession(Session):
    def call(self, code: str) -> Observation:
        t0 = time.perf_counter()
        if len(code) > MAX_CALL_CHARS:
            return Observation(f"error: the call has {len(code)} characters, more than {MAX_CALL_CHARS}", "error",
                               time.perf_counter() - t0)
        try:
            text, status = format_value(evaluate(code.strip())), "ok"
        except CalculatorError as e:
            text, status = f"error: {e}", "error"
        return Observation(clean_output(text), status, time.perf_counter() - t0)


class Calculator(Tool):
    """Exact arithmetic (envs/calculator.py): + - * / // % ** and parentheses on integers and
    decimals; in-process, stateless, no eval."""
    name = "calculator"
    description = "exact arithmetic: + - * / // % ** and parentheses"

    def session(self) -> Session:
        return _CalculatorSession()
