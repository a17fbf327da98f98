"""Parallel reward scoring in long-lived worker processes, with a per-item timeout.

Why a pool: verifying one math answer can hang (sympy on "10^{10^{10}}"), a code reward runs a
sandbox, and importing sympy costs about a second. So rewards run in a few worker processes that
are started once (and pre-import verify.math), each item gets a deadline, and a worker that
misses it is killed (SIGKILL to its process group) and replaced while the other workers carry on:
one pathological completion costs at most `timeout_s`, never the batch.

    with RewardPool(num_workers=2, timeout_s=10.0) as pool:
        scores = pool.score(["accuracy", "format"], completions, answer=golds, prompts=prompts)
        # {"accuracy": [1.0, 0.0, ...], "format": [...]}: one list per reward, in input order

Work units. Each reward is split into units that a worker scores with one call of the reward:
- a per-completion reward: one unit per completion, with that completion's row of every column;
- a group-wise reward (attribute `groupwise = True`, e.g. `length`, whose value depends on the
  other completions of the same prompt): one unit per prompt group (completions with equal
  `prompts`, else equal `prompt` column, entries; see verify.rewards.prompt_groups), so the
  reward sees whole groups exactly as in serial scoring.
Scores therefore equal serial scoring `get_reward(spec)(completions, **columns)`, in order.

Failures, all counted in `pool.stats`:
- timeout (the unit ran past timeout_s): the worker is killed and replaced; each completion of
  the unit gets the reward's `timeout_reward` attribute (0.0 for the correctness checks
  accuracy / code / arithmetic / countdown: "not verified"; None, no signal, otherwise).
- crash (the worker died mid-unit: a segfault, the kernel's OOM killer): as a timeout.
- error (the reward raised, e.g. a missing column): the batch's in-flight units finish, then
  `score` raises RewardError with the worker's traceback. The pool stays usable.

Cost: each unit is one pickled message and one pipe round trip, about 50 microseconds on a 2-core
CPU (measured: 3072 units of format/tag_count/arithmetic in 164 ms, against 4 ms scoring them in
the parent). So the pool is for rewards that can be slow or hang (math, code); a regex reward alone
is cheaper in-process, and mixing both in one `score` call is fine.

Processes: the `spawn` context (the trainer may hold threads and CUDA state, which fork would
copy), one duplex pipe per worker, each worker in its own process group so that killing it also
kills processes the reward started (a sandbox that moves its children into another session must
clean them up itself). `close()` (or leaving the `with` block) stops every worker; workers are
daemonic and exit on their own when the parent's pipe closes, so none outlives the parent.
Rewards that wait on the network rather than the CPU (verify.judge's LLM judges, marked
`in_parent = True`) are not sent to workers: score() calls them in a thread of the parent while the
workers run the other rewards' units, and an error they raise is a RewardError as above.
Rewards given as strings are resolved in the worker with verify.rewards.get_reward (REWARDS
names, "name:weight,..." sums, "package.module:function"); callables are pickled, so they must be
module-level functions or instances of importable classes (the factories' dataclasses are), and
not from the entry script: workers start without re-running the parent's __main__ (which in a
trainer imports torch), see _main_module_hidden.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from verify.rewards import get_reward, prompt_groups, reward_name


class RewardError(RuntimeError):
    """A reward raised inside a worker; the message holds the reward's name and the worker's traceback."""


@dataclass
class PoolStats:
    """Counters over the pool's life: units/items scored, items that timed out or whose worker crashed,
    workers replaced, reward errors; timeouts per reward name."""
    units: int = 0
    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    errors: int = 0
    timeouts_by_reward: Counter = field(default_factory=Counter)


# ----------------------------------------------------------------------------- the worker side

def _worker_main(conn, preload: tuple[str, ...]) -> None:
    """Loop: receive (unit id, pickled (reward spec, completions, columns)), send (unit id, "ok", scores)
    or (unit id, "error", traceback). Exits on None or when the parent's end of the pipe closes."""
    os.setpgrp()                                   # kill(-pgid) then reaches what the reward starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    for module in preload:
        try:
            importlib.import_module(module)        # warm-up only: rewards import what they need
        except ModuleNotFoundError:
            pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        unit_id, blob = message
        try:
            spec, completions, columns = pickle.loads(blob)   # here, so a failure is reported for its unit
            values = get_reward(spec)(completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward returned {len(values)} values for {len(completions)} completions")
            conn.send((unit_id, "ok", [None if v is None else float(v) for v in values]))
        except Exception:
            conn.send((unit_id, "error", traceback.format_exc()))


# ----------------------------------------------------------------------------- the parent side

@contextmanager
def _main_module_hidden():
    """While starting a worker, show multiprocessing an empty __main__ module.

    spawn (and forkserver) children re-run the parent's entry script as __mp_main__, so that
    functions defined there can be unpickled. Rewards never live there (score() refuses them), and
    a trainer's entry script imports torch and the model code: every worker would pay seconds and
    hundreds of MB for nothing. With an empty __main__ there is nothing to re-run.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class _Worker:
    """A worker process, the parent's end of its pipe, and the unit it is scoring (if any)."""

    def __init__(self, ctx, preload: tuple[str, ...]):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, preload), daemon=True,
                                   name="reward-worker")
        with _main_module_hidden():
            self.process.start()
        child_conn.close()
        self.started = time.monotonic()
        self.ready = False
        self.unit: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        """SIGKILL the worker's process group (the worker alone if it has not made its group yet)."""
        # Only while the worker is unreaped: a reaped pid may already belong to someone else.
        if self.process.exitcode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """`num_workers` long-lived reward processes with a per-unit timeout of `timeout_s` seconds.

    One `score` call at a time (a pool belongs to one trainer loop; it is not thread-safe).

    preload: modules each worker imports before it reports ready (so the first item does not pay
    for importing sympy inside its deadline); missing modules are skipped. start_timeout_s bounds
    how long a (re)started worker may take to become ready (RuntimeError past it).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, preload=("verify.math",),
                 start_timeout_s: float = 120.0, context: str = "spawn"):
        if num_workers < 1:
            raise ValueError(f"RewardPool needs num_workers >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool needs timeout_s > 0, got {timeout_s}")
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"RewardPool context must be 'spawn' or 'forkserver' (not fork: the parent may "
                             f"hold threads and CUDA), got {context!r}")
        self.num_workers, self.timeout_s, self.start_timeout_s = num_workers, timeout_s, start_timeout_s
        self.preload = tuple(preload)
        self.stats = PoolStats()
        self._ctx = mp.get_context(context)
        self._workers = [_Worker(self._ctx, self.preload) for _ in range(num_workers)]
        self._closed = False

    # -- lifecycle

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (ask, wait up to 1 s, then SIGKILL); idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.process.join(timeout=1.0)
            w.kill()
        self._workers = []

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self._workers]

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.preload)
        self.stats.restarts += 1

    # -- scoring

    def score(self, rewards, completions: list[str], **columns) -> dict[str, list[float | None]]:
        """Score `completions` with each reward; returns {name: scores in input order}.

        rewards: a spec or callable, a list of them (named by verify.rewards.reward_name), or a
        dict {name: spec or callable}. columns: the data set columns plus `prompts` /
        `completion_ids`, each one value per completion.
        """
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        named = self._named_rewards(rewards)
        n = len(completions)
        for key, values in columns.items():
            if values is not None and len(values) != n:
                raise ValueError(f"RewardPool.score: column `{key}` has {len(values)} values for {n} completions")
        columns = {k: list(v) for k, v in columns.items() if v is not None}

        # rewards that wait on the network (LLM judges: `in_parent = True`) run here, in a thread of
        # their own beside the workers' units: they hold no CPU and bring their own concurrency
        parent = {name: spec for name, spec in named.items() if getattr(spec, "in_parent", False)}
        # (reward name, spec, completion indices), one per work unit
        units = []
        for name, spec in named.items():
            if name in parent:
                continue
            fn = get_reward(spec)   # resolves names here too: unknown ones fail before any work
            if not isinstance(spec, str):
                if "__main__" in (getattr(spec, "__module__", None), type(spec).__module__):
                    raise ValueError(f"RewardPool.score: reward {name!r} is defined in the __main__ script, which "
                                     f"workers do not import; define it in an importable module")
                try:
                    pickle.dumps(spec)
                except (pickle.PicklingError, AttributeError, TypeError) as e:
                    raise ValueError(f"RewardPool.score: reward {name!r} cannot be sent to a worker ({e}); give a "
                                     f"REWARDS name, a 'package.module:function' string, a module-level function "
                                     f"or an instance of an importable class") from None
            groups = prompt_groups(n, columns) if getattr(fn, "groupwise", False) else [[i] for i in range(n)]
            units += [(name, spec, idx) for idx in groups if idx]
        results = {name: [None] * n for name in named}
        failed: list[BaseException] = []

        def score_in_parent():
            for name, fn in parent.items():
                try:
                    results[name] = list(fn(completions, **columns))
                except Exception:
                    failed.append(RewardError(f"reward {name!r} raised:\n{traceback.format_exc()}"))

        thread = threading.Thread(target=score_in_parent, name="rewards-in-parent", daemon=True) if parent else None
        if thread is not None:
            thread.start()
        try:
            self._run(units, completions, columns, results)
            if thread is not None:
                thread.join()
            if failed:
                self.stats.errors += len(failed)
                raise failed[0]
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a worker that failed to start): a busy worker would answer
            # a unit of this batch during the next one, so replace every busy worker.
            for w in list(self._workers):
                if w.unit is not None:
                    self._replace(w)
            raise
        return results

    @staticmethod
    def _named_rewards(rewards) -> dict:
        if isinstance(rewards, dict):
            return dict(rewards)
        if isinstance(rewards, str) or callable(rewards):
            rewards = [rewards]
        named = {}
        for spec in rewards:
            name = reward_name(spec)
            if name in named:
                raise ValueError(f"RewardPool.score: reward {name!r} given twice")
            named[name] = spec
        return named

    def _run(self, units, completions, columns, results) -> None:
        """Dispatch units to idle ready workers, collect results, enforce deadlines, replace dead workers."""
        pending = deque(range(len(units)))
        errors: list[str] = []

        def settle(unit_id: int, values: list) -> None:
            name, _, idx = units[unit_id]
            for i, v in zip(idx, values):
                results[name][i] = v
            self.stats.units += 1
            self.stats.items += len(idx)

        def fail(unit_id: int, timed_out: bool) -> None:
            """A timeout or a crash: every completion of the unit gets the reward's timeout value."""
            name, spec, idx = units[unit_id]
            if timed_out:
                self.stats.timeouts += len(idx)
                self.stats.timeouts_by_reward[name] += len(idx)
            else:
                self.stats.crashes += len(idx)
            settle(unit_id, [getattr(get_reward(spec), "timeout_reward", None)] * len(idx))

        while True:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.unit is None and pending and not errors:
                    unit_id = pending.popleft()
                    name, spec, idx = units[unit_id]
                    blob = pickle.dumps((spec, [completions[i] for i in idx],
                                         {k: [v[i] for i in idx] for k, v in columns.items()}))
                    w.conn.send((unit_id, blob))
                    w.unit, w.deadline = unit_id, now + self.timeout_s
            busy = [w for w in self._workers if w.unit is not None]
            if not busy and (not pending or errors):
                break

            # Sleep until a message arrives or the nearest deadline (a unit's, or a start-up's) passes.
            deadlines = [w.deadline if w.ready else w.started + self.start_timeout_s for w in self._workers
                         if w.unit is not None or not w.ready]
            for conn in wait([w.conn for w in self._workers], max(0.0, min(deadlines) - now) if deadlines else None):
                w = next(w for w in self._workers if w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):   # the worker died
                    if not w.ready:
                        raise RuntimeError(f"reward worker {w.process.pid} exited (code {w.process.exitcode}) "
                                           f"while starting; can it import verify.pool and the preload modules?")
                    if w.unit is not None:
                        fail(w.unit, timed_out=False)
                    self._replace(w)
                    continue
                if message[0] == "ready":
                    w.ready = True
                    continue
                unit_id, status, payload = message
                assert unit_id == w.unit, f"worker {w.process.pid} answered unit {unit_id}, expected {w.unit}"
                w.unit = None
                if status == "ok":
                    settle(unit_id, payload)
                else:
                    self.stats.errors += 1
                    errors.append(f"reward {units[unit_id][0]!r} raised in a worker:\n{payload}")

            now = time.monotonic()
            for w in list(self._workers):
                if w.unit is not None and now >= w.deadline:
                    fail(w.unit, timed_out=True)
                    self._replace(w)
                elif not w.ready and now >= w.started + self.start_timeout_s:
                    raise RuntimeError(f"reward worker {w.process.pid} did not start within {self.start_timeout_s} s")
        if errors:
            raise RewardError(errors[0] + (f"\n({len(errors) - 1} more errors)" if len(errors) > 1 else ""))
