"""The python tool: model-written code run in verify's sandbox, one stateful session per rollout.

    tool = PythonTool(pool_size=4, timeout_s=5.0)
    s = tool.session()                 # a warm sandbox from the pool (verify.session.SessionPool)
    s.call("x = 6 * 7\nx")             # Observation("42\n")
    s.call("print(x + 1)")             # Observation("43\n"): the rollout's earlier calls are there
    s.close()                          # the sandbox is killed; it never serves another rollout

A call's observation is what the code printed (stdout and stderr, in order) and the repr of a last
expression, as a notebook cell shows it; a raised exception adds its traceback (status "error", the
session keeps its state); a call past timeout_s is killed with its whole process tree (status
"timeout") and the next call runs in a fresh sandbox, which the observation says (the earlier state
is gone). Every limit is the sandbox's (verify/session.py: memory, processes, CPU, files, no
network); the text is capped and cleaned (envs.tools.clean_output). The pool of warm sandboxes is
started on first use and closed with the tool (or at exit).
"""
from __future__ import annotations

import atexit
import threading
import time

from envs.tools import MAX_CALL_CHARS, Observation, Session, Tool, clean_output


class _PythonSession(Session):
    def __init__(self, sandbox, timeout_s: float):
        self.sandbox, self.timeout_s = sandbox, timeout_s

    def call(self, code: str) -> Observation:
        t0 = time.perf_counter()
        if len(code) > MAX_CALL_CHARS:
            return Observation(f"error: the call has {len(code)} characters, more than {MAX_CALL_CHARS}", "error",
                               time.perf_counter() - t0)
        r = self.sandbox.run(code, timeout_s=self.timeout_s)
        parts = []
        if r.restarted:
            parts.append("(a fresh session: the state of earlier calls is gone)\n")
        parts.append(r.stdout)
        if r.status == "timeout":
            parts.append(f"timeout: the call ran past {self.timeout_s:g} s and was stopped\n")
        elif r.status == "error":
            parts.append(r.error if r.error.endswith("\n") else r.error + "\n")
        return Observation(clean_output("".join(parts)), r.status, time.perf_counter() - t0)

    def close(self) -> None:
        self.sandbox.close()


class PythonTool(Tool):
    """Python in the sandbox, stateful within a rollout (module docstring)."""
    name = "python"
    description = "Python 3 in a sandbox; state persists across one rollout's calls; print() or end with an expression"

    def __init__(self, pool_size: int = 4, timeout_s: float = 5.0, memory_mb: int = 512):
        if pool_size < 0 or not timeout_s > 0 or memory_mb < 64:
            raise ValueError(f"PythonTool: pool_size >= 0, timeout_s > 0 and memory_mb >= 64, got {pool_size}, "
                             f"{timeout_s}, {memory_mb}")
        self.pool_size, self.timeout_s, self.memory_mb = pool_size, timeout_s, memory_mb
        self._pool = None
        self._lock = threading.Lock()

    def _sessions(self):
        with self._lock:
            if self._pool is None:
                from verify.session import SessionPool
                self._pool = SessionPool(size=self.pool_size, memory_mb=self.memory_mb)
                atexit.register(self.close)
            return self._pool

    def session(self) -> Session:
        return _PythonSession(self._sessions().acquire(), self.timeout_s)

    def close(self) -> None:
        """Kill every sandbox the tool started (warm or handed out). Idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
