"""A stateful, sandboxed Python session for tool use, and a pool of warm ones.

    from verify.session import PythonSession, SessionPool
    with SessionPool(size=4, memory_mb=512) as pool:
        s = pool.acquire()                   # one per rollout: a pre-started sandbox
        s.run("import math\nr = math.sqrt(2)")          # SessionResult(status="ok", stdout="", ...)
        s.run("r * r")                                  # stdout "2.0000000000000004\n": the last
                                                        # expression's repr, as a notebook shows it
        s.run("1 / 0")                                  # status "error", error = the traceback
        s.run("while True: pass", timeout_s=2.0)        # status "timeout": the process tree is killed
        s.run("r")                                      # restarted=True, NameError: the state is gone
        s.close()                                       # (or pool.release(s)); never reused

One session is one long-lived sandbox process (verify.code's `_Sandbox`: the same supervisor,
isolation layers, cgroups, rlimits, scrubbed environment, private work dir and `destroy()` as
run_tests, in the harness's "session" role), whose worker keeps one module namespace across calls:
variables, imports and functions of earlier calls of the same session are there, those of another
session never are (each session is its own process tree, in its own namespaces when the OS allows).

SessionResult fields: status "ok" | "error" | "timeout"; stdout, what the call wrote to stdout and
stderr (one stream, in order) then the repr of a last expression that is not None, capped at
STDOUT_CAP bytes (the rest is read and discarded, saying how much; output that a thread or process
left running writes between calls is discarded, not shown to the next call); error, the exception's traceback
(the session keeps its state after a plain exception, SystemExit included) or why the sandbox died,
capped at ERROR_CAP characters; seconds, the call's wall time (a cold start included); restarted,
True when the call ran in a fresh process because the previous one died, so earlier state is lost.

Failures. run() never raises for anything the code does:
  * a call past timeout_s (wall) kills the session's whole process tree: status "timeout";
  * the process dying (os._exit, a signal, the kernel's OOM killer, the CPU budget) or breaking the
    reply protocol: status "error" with the cause;
  * either way the next run() is in a fresh process (started at once, so it is warm by then) and
    says restarted=True. A process that died between calls (a thread of an earlier call called
    os._exit) is found dead before the next call, which then runs fresh (restarted=True).

Limits (per session; the names are verify.code's):
  memory   RLIMIT_AS = memory_mb for each process, and with cgroups memory_mb + 64 MB for the whole
           tree (the supervisor's share); an allocation past RLIMIT_AS is a MemoryError, an ordinary
           error that keeps the session; the tree passing the cgroup's limit is an OOM kill, a death.
  processes  MAX_PROCESSES processes and threads at once (pids cgroup, else RLIMIT_NPROC).
  CPU      each call is bounded by its wall timeout (the parent kills the tree). Over the session, a
           budget of cpu_s CPU-seconds per process (RLIMIT_CPU, soft limit a second below the
           hard one: SIGXCPU, then SIGKILL). The kernel's counter cannot be reset by an unprivileged
           process and the parent cannot reach into the sandbox to raise it, so a per-call reset is
           not possible without a restart; the budget is therefore for the process's whole life,
           which makes it the one bound on what a session burns *between* calls (a thread or a
           child spinning in the background while the model generates). A fresh process (after
           a death) gets a fresh budget. The default, 60 s, is a dozen full 5-second calls.
  files    RLIMIT_FSIZE (FILE_SIZE_MB), RLIMIT_NOFILE 256, no core dumps; the work dir is private.

Channel. Commands and replies travel as length-prefixed JSON frames (_sandbox_harness.pack_frame /
Frames) over two pipes; stdout is a third pipe, read while the call runs. The parent reads at most
REPLY_FRAME_CAP bytes per frame and STDOUT_CAP of output (discarding the rest), decodes only JSON
into str fields, and never executes or unpickles what the sandbox sends. The code may tamper with
the in-sandbox loop (forge replies, close its pipes, kill its supervisor where it can): that changes
only its own session's results, or kills it; the limits are the kernel's, not the loop's. A fourth
pipe is the lifeline: when the parent closes the session or dies, the supervisor sees EOF and kills
the worker, and (in a PID namespace) its exit kills everything the session started.

Pool. SessionPool keeps `size` sessions started and waiting for their first command (the
interpreter up, the cage built: the cold start paid ahead), refilled by a background thread.
acquire() is thread-safe; it takes a warm session, or cold-starts one when none is ready. A session
handed out belongs to that rollout until it is closed (or released, which closes it): its process is
never reused for another rollout. The pool's close() kills every session it started, warm or handed
out.

The untrusted code sees the standard library only (python -S), as in run_tests.
"""
from __future__ import annotations

import collections
import os
import select
import signal
import threading
import time
import weakref
from dataclasses import dataclass

from verify._sandbox_harness import Frames, pack_frame
from verify.code import FULL_ISOLATION, STARTUP_GRACE_S, _plan, _Reader, _Sandbox, _warn_once

STDOUT_CAP = 16 << 10           # bytes of a call's output kept in its SessionResult
ERROR_CAP = 16 << 10            # characters of traceback / cause kept (the tail)
REPLY_FRAME_CAP = 1 << 20       # largest reply frame accepted from the sandbox (bytes)
DRAIN_CAP = 4 << 20             # output read (and mostly discarded) after a reply arrives, at most
MAX_CODE_CHARS = 1 << 20        # longest code a call accepts
DEATH_GRACE_S = 1.0             # wait for the supervisor's word on why the worker stopped
DEFAULT_CPU_S = 60.0            # CPU-seconds per process of a session, over its life


@dataclass
class SessionResult:
    status: str                 # "ok" | "error" | "timeout"
    stdout: str = ""            # output of the call, then a last expression's repr; capped
    error: str = ""             # the traceback, or why the sandbox died; capped
    seconds: float = 0.0        # wall time of the call, a cold start included
    restarted: bool = False     # ran in a fresh process: the state of earlier calls is lost


def _cap_error(text: str) -> str:
    if len(text) <= ERROR_CAP:
        return text
    return f"[... {len(text) - ERROR_CAP} characters cut ...]\n" + text[-ERROR_CAP:]


# ---------------------------------------------------------------------------------------------
# One sandbox process of a session
# ---------------------------------------------------------------------------------------------

class _Replies:
    """The reply pipe: frames decoded as they arrive (capped); a broken frame ends the channel."""

    def __init__(self, fd: int, on_message):
        self.fd, self.frames, self.on_message = fd, Frames(REPLY_FRAME_CAP), on_message
        self.eof, self.broken = False, None

    def on_ready(self) -> None:
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
            return
        try:
            messages = self.frames.feed(chunk)
        except (ValueError, RecursionError) as e:
            self.eof, self.broken = True, str(e)[:200]
            return
        for m in messages:
            self.on_message(m)


class _Process:
    """One started sandbox: the supervisor (verify.code._Sandbox, role "session") and the parent's
    ends of its command, reply and lifeline pipes. Not thread-safe: its PythonSession serialises."""

    def __init__(self, plan, memory_mb: int, cpu_s: float):
        self.memory_mb, self.cpu_s = memory_mb, cpu_s
        req_r, req_w = os.pipe()        # parent -> worker: command frames
        rep_r, rep_w = os.pipe()        # worker -> parent: hello and reply frames
        life_r, life_w = os.pipe()      # parent's lifeline: EOF tells the supervisor to end it all
        try:
            # timeout_s = cpu_s: the harness derives RLIMIT_CPU from it; the session role has no
            # deadline of its own (the parent bounds each call).
            self.box = _Sandbox(plan, {"role": "session"},
                                {"requests": req_r, "replies": rep_w, "lifeline": life_r}, cpu_s, memory_mb)
        except BaseException:
            for fd in (req_w, rep_r, life_w):
                os.close(fd)
            raise
        finally:
            for fd in (req_r, rep_w, life_r):
                os.close(fd)
        self.requests, self.lifeline = req_w, life_w
        os.set_blocking(req_w, False)
        self.replies = _Replies(rep_r, self._on_message)
        self.stdout_fd = self.box.proc.stdout.fileno()
        self.hello = False              # the worker is up and waiting for commands
        self.used = False               # a call ran here, so the process holds state
        self.expect = 0                 # id of the call in flight
        self.reply = None
        self.pending = memoryview(b"")  # command bytes not yet taken by the pipe
        self.stopped = None             # why it can serve no more, once seen
        self.destroyed = False
        # The payload (well under a kilobyte) fits the empty pipe: one write, then EOF for the supervisor.
        self.box.stdin.on_ready()
        if not self.box.stdin.eof:
            self.destroy()
            raise OSError("could not hand the session sandbox its payload")
        self.box.proc.stdin.close()

    def _on_message(self, m) -> None:
        if type(m) is dict and m.get("hello") is True:
            self.hello = True
        elif type(m) is dict and m.get("id") == self.expect and self.expect > 0 and self.reply is None:
            self.reply = m                # the first; frames of other ids (stale or forged) are ignored

    def _after_ctl(self) -> None:
        if self.box.ctl.eof or self.box.control("worker_exit") or self.box.control("setup_error"):
            self.stopped = self.stopped or "the sandbox's supervisor exited"

    def pump(self, deadline: float, out: _Reader, until=lambda: False, stop_on_death: bool = True) -> bool:
        """Serve the pipes (command out; replies, output, control and supervisor stderr in) until
        until() holds (True), the deadline passes or the process stops serving (False). Polls at
        least once, so pump(time.monotonic(), ...) reads whatever is already there."""
        sources = {}
        for source, after in ((self.replies, None), (out, None), (self.box.ctl, self._after_ctl),
                              (self.box.stderr, None)):
            if not source.eof:
                sources[source.fd] = (source, after)
        poller = select.poll()
        for fd in sources:
            poller.register(fd, select.POLLIN)
        if self.pending:
            poller.register(self.requests, select.POLLOUT)
        while True:
            if until():
                return True
            if stop_on_death and self.stopped is not None:
                return False
            timeout = deadline - time.monotonic()
            for fd, _ in poller.poll(max(timeout, 0.0) * 1000):
                if fd == self.requests:
                    try:
                        self.pending = self.pending[os.write(fd, self.pending):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:   # the worker is gone; the replies pipe will say so
                        self.pending = memoryview(b"")
                    if not self.pending:
                        poller.unregister(fd)
                    continue
                source, after = sources[fd]
                source.on_ready()
                if source.eof:
                    poller.unregister(fd)
                    if source is self.replies:
                        self.stopped = self.stopped or (
                            f"the session's process broke the reply protocol ({source.broken})" if source.broken
                            else "the session's process closed its reply channel")
                if after is not None:
                    after()
            if timeout <= 0:
                return until()

    def serving(self) -> bool:
        """Whether the process still serves (a non-blocking look at its pipes and its exit)."""
        if self.stopped is None and not self.destroyed:
            self.pump(time.monotonic(), _Reader(self.stdout_fd, 0))
        return self.stopped is None and not self.destroyed and self.box.proc.poll() is None

    def call(self, code: str, deadline: float, out: _Reader) -> str:
        """Send one cell and serve until its reply: "reply", "timeout" or "stopped"."""
        self.used = True
        self.expect += 1
        self.reply = None
        self.pending = memoryview(pack_frame({"id": self.expect, "code": code}))
        if self.pump(deadline, out, lambda: self.reply is not None):
            return "reply"
        return "stopped" if self.stopped is not None else "timeout"

    def drain(self, out: _Reader) -> None:
        """Read the output already in the pipe: everything a cell printed is there when its reply
        arrives (the worker flushes first); DRAIN_CAP bounds it against a background writer."""
        poller = select.poll()
        poller.register(self.stdout_fd, select.POLLIN)
        start = out.size
        while not out.eof and out.size - start < DRAIN_CAP and poller.poll(0):
            out.on_ready()

    def settle(self, out: _Reader) -> None:
        """After the reply channel closed: wait briefly for the supervisor's exit report (the cause)."""
        if self.replies.broken is None:
            self.pump(time.monotonic() + DEATH_GRACE_S, out,
                      lambda: self.box.ctl.eof or self.box.control("worker_exit") is not None, stop_on_death=False)

    def why(self) -> str:
        """The cause of the stop, in words, for the caller's error text."""
        failure = self.box.control("setup_error")
        if failure is not None:
            return f"the session sandbox could not be set up: {failure['setup_error']}"
        exit_msg = self.box.control("worker_exit")
        code = exit_msg.get("worker_exit") if exit_msg is not None else None
        if type(code) is not int:
            reason = self.stopped or "the session's process stopped"
        elif code >= 0:
            reason = f"the session's process exited with status {code} (os._exit, or its channel closed)"
        else:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            if name == "SIGXCPU":
                reason = (f"the session's process was killed by SIGXCPU: it used its CPU budget of "
                          f"{self.cpu_s:g} s (RLIMIT_CPU, over the process's life)")
            elif name == "SIGKILL" and self._oom_kills() > 0:
                reason = (f"a process of the session was killed by the kernel's out-of-memory killer: "
                          f"together they passed the session's memory limit of {self.memory_mb} MB")
            else:
                reason = f"the session's process was killed by {name}"
        stderr = self.box.stderr.text().strip()
        return reason + (f"\nsandbox supervisor: {stderr[-2000:]}" if stderr else "")

    def _oom_kills(self) -> int:
        for path in self.box.cgroups.paths:
            try:
                with open(os.path.join(path, "memory.oom_control")) as f:
                    return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), 0)
            except (OSError, ValueError, IndexError):
                continue
        return 0

    def destroy(self) -> None:
        """Kill and reap the whole tree, remove cgroups and temporary dirs, close the pipes. Idempotent."""
        if self.destroyed:
            return
        self.destroyed = True
        os.close(self.lifeline)
        self.box.destroy()
        os.close(self.requests)
        os.close(self.replies.fd)


def _destroy_slot(slot: list) -> None:
    """The finalizer of a PythonSession (close, garbage collection, interpreter exit)."""
    proc, slot[0] = slot[0], None
    if proc is not None:
        proc.destroy()


# ---------------------------------------------------------------------------------------------
# PythonSession
# ---------------------------------------------------------------------------------------------

class PythonSession:
    """One sandboxed Python process keeping its globals across run() calls (see the module docstring).

    memory_mb: RLIMIT_AS of each process and (with cgroups) the tree's memory, + 64 MB.
    isolation: "auto" (the strongest available), "namespaces", "userns" or "process" (RuntimeError
    when the OS refuses it). cpu_s: the CPU budget of each process over its life (RLIMIT_CPU).
    The process starts at construction; run() waits for it (STARTUP_GRACE_S at most).
    Thread-safe: calls are serialised; close() waits for a call in flight.
    """

    def __init__(self, memory_mb: int = 512, isolation: str = "auto", cpu_s: float = DEFAULT_CPU_S):
        if not (memory_mb > 0 and cpu_s > 0):
            raise ValueError(f"memory_mb and cpu_s must be positive, got {memory_mb}, {cpu_s}")
        self.memory_mb, self.isolation_mode, self.cpu_s = memory_mb, isolation, cpu_s
        self._plan = _plan(isolation)
        self._lock = threading.Lock()
        self._closed = False
        self._lost = False          # a process holding state died: the next call says restarted
        self._slot = [None]         # the current _Process; a list, so the finalizer sees a replacement
        self._finalizer = weakref.finalize(self, _destroy_slot, self._slot)
        self._slot[0] = _Process(self._plan, memory_mb, cpu_s)

    # -- public ------------------------------------------------------------------------------

    def run(self, code: str, timeout_s: float = 5.0) -> SessionResult:
        """Run `code` as the session's next cell; never raises for what the code does.

        timeout_s bounds the wall time of the code (the start of a fresh process is not counted,
        it has its own STARTUP_GRACE_S). ValueError for a non-string code or a non-positive
        timeout, RuntimeError on a closed session.
        """
        if not isinstance(code, str):
            raise ValueError(f"code must be a string, got {type(code).__name__}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        start = time.monotonic()
        if len(code) > MAX_CODE_CHARS:  # refused before it reaches the sandbox; the session is untouched
            return SessionResult("error", error=f"the code has {len(code)} characters, more than the "
                                 f"{MAX_CODE_CHARS} a call accepts")
        with self._lock:
            if self._closed:
                raise RuntimeError("run() on a closed PythonSession")
            proc = self._slot[0]
            restarted = False
            if proc is not None and not proc.serving():      # died between calls
                self._lost |= proc.used
                self._replace(start_new=False)
                proc = None
            if proc is None:
                try:
                    proc = self._slot[0] = _Process(self._plan, self.memory_mb, self.cpu_s)
                except OSError as e:
                    return SessionResult("error", error=f"could not start the session sandbox: {e}",
                                         seconds=time.monotonic() - start)
            restarted, self._lost = self._lost, False
            if not self._await_hello(proc):
                why = proc.why() if proc.stopped else f"it did not start within {STARTUP_GRACE_S} s"
                self._replace(start_new=False)
                return SessionResult("error", error=_cap_error(f"the session sandbox did not start: {why}"),
                                     seconds=time.monotonic() - start, restarted=restarted)
            proc.drain(_Reader(proc.stdout_fd, 0))          # output from between calls is not this call's
            out = _Reader(proc.stdout_fd, STDOUT_CAP)
            outcome = proc.call(code, time.monotonic() + timeout_s, out)
            reply = proc.reply
            if outcome == "reply" and not (type(reply.get("status")) is str and reply["status"] in ("ok", "error")
                                           and type(reply.get("error", "")) is str):
                proc.stopped, outcome = "the session's process sent a malformed reply", "stopped"
            if outcome == "reply":
                proc.drain(out)
                return SessionResult(reply["status"], out.text(),
                                     _cap_error(reply.get("error", "")) if reply["status"] == "error" else "",
                                     time.monotonic() - start, restarted)
            if outcome == "timeout":
                error = (f"the call ran past its time limit of {timeout_s:g} s: the session's processes were "
                         "killed and its state is lost (the next call starts a fresh one)")
                status = "timeout"
            else:
                proc.settle(out)
                error = _cap_error(proc.why() + "\nThe session's state is lost (the next call starts a fresh one).")
                status = "error"
            text = out.text()
            self._lost = True
            self._replace(start_new=True)
            return SessionResult(status, text, error, time.monotonic() - start, restarted)

    @property
    def isolation(self) -> tuple:
        """The isolation layers in place around the current process (verify.code's names)."""
        with self._lock:
            proc = self._slot[0]
            return proc.box.isolation() if proc is not None else ()

    def close(self) -> None:
        """Kill and reap every process of the session, remove its cgroups and temporary dirs.
        Idempotent; also done on garbage collection and at interpreter exit."""
        with self._lock:
            self._closed = True
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _await_hello(self, proc: _Process) -> bool:
        if not proc.hello:
            proc.pump(time.monotonic() + STARTUP_GRACE_S, _Reader(proc.stdout_fd, 0), lambda: proc.hello)
            proc.pump(time.monotonic(), _Reader(proc.stdout_fd, 0))  # the "ready" report is in by now
            missing = tuple(layer for layer in FULL_ISOLATION if layer not in proc.box.isolation())
            if proc.hello and missing:
                _warn_once(missing)
        return proc.hello

    def _replace(self, start_new: bool) -> None:
        """Destroy the current process; with start_new, start the next one now, so that it is warm
        by the next call (a failure to start is left for that call to report)."""
        _destroy_slot(self._slot)
        if start_new:
            try:
                self._slot[0] = _Process(self._plan, self.memory_mb, self.cpu_s)
            except OSError:
                pass

    def _warm_up(self) -> bool:
        """Wait until the process waits for its first command (the pool's refill thread)."""
        with self._lock:
            proc = self._slot[0]
            return not self._closed and proc is not None and self._await_hello(proc)

    def _serving(self) -> bool:
        with self._lock:
            proc = self._slot[0]
            return not self._closed and proc is not None and proc.serving()


# ---------------------------------------------------------------------------------------------
# SessionPool
# ---------------------------------------------------------------------------------------------

class SessionPool:
    """`size` PythonSessions kept started and waiting (see the module docstring).

    acquire() -> a session for one rollout (warm if one is ready, else cold-started); release(s)
    closes it. Counters: `warm_hits`, `cold_starts`. close() (or leaving the `with` block) stops
    the refill thread and kills every session the pool started; idempotent.
    """

    REFILL_BACKOFF_S = (0.5, 30.0)  # wait after a failed start, doubling up to the second figure

    def __init__(self, size: int = 4, memory_mb: int = 512, isolation: str = "auto",
                 cpu_s: float = DEFAULT_CPU_S):
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not (memory_mb > 0 and cpu_s > 0):
            raise ValueError(f"memory_mb and cpu_s must be positive, got {memory_mb}, {cpu_s}")
        _plan(isolation)            # an isolation this OS refuses is a RuntimeError here, not in the thread
        self.size, self.memory_mb, self.isolation_mode, self.cpu_s = size, memory_mb, isolation, cpu_s
        self.warm_hits = self.cold_starts = 0
        self._cond = threading.Condition()
        self._warm: collections.deque[PythonSession] = collections.deque()
        self._given: weakref.WeakSet[PythonSession] = weakref.WeakSet()
        self._closed = False
        self._thread = threading.Thread(target=self._refill, name="SessionPool-refill", daemon=True)
        self._thread.start()

    def _new(self) -> PythonSession:
        return PythonSession(self.memory_mb, self.isolation_mode, self.cpu_s)

    def _refill(self) -> None:
        backoff = self.REFILL_BACKOFF_S[0]
        while True:
            with self._cond:
                while not self._closed and len(self._warm) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            session, ok = None, False
            try:
                session = self._new()
                ok = session._warm_up()
            except (OSError, RuntimeError):
                ok = False
            with self._cond:
                kept = ok and not self._closed
                if kept:
                    self._warm.append(session)
                    backoff = self.REFILL_BACKOFF_S[0]
                elif not ok and not self._closed:  # the OS refused: do not spin
                    self._cond.wait(backoff)
                    backoff = min(2 * backoff, self.REFILL_BACKOFF_S[1])
            if not kept and session is not None:
                session.close()

    def acquire(self) -> PythonSession:
        """A session for one rollout: a warm one when ready, else a cold start. Thread-safe."""
        stale, session = [], None
        with self._cond:
            if self._closed:
                raise RuntimeError("acquire() on a closed SessionPool")
            while self._warm and session is None:
                s = self._warm.popleft()
                if s._serving():
                    session = s
                else:
                    stale.append(s)
        for s in stale:
            s.close()
        warm = session is not None
        if session is None:
            session = self._new()
        with self._cond:
            if self._closed:
                session.close()
                raise RuntimeError("acquire() on a closed SessionPool")
            self._given.add(session)
            if warm:
                self.warm_hits += 1
            else:
                self.cold_starts += 1
            self._cond.notify_all()         # the refill thread tops the pool up, once we are done
        return session

    def release(self, session: PythonSession) -> None:
        """End a rollout's session: it is closed, never handed to another rollout."""
        session.close()
        with self._cond:
            self._given.discard(session)

    def ready(self) -> int:
        """How many warm sessions are waiting now."""
        with self._cond:
            return len(self._warm)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sessions = list(self._warm) + list(self._given)
            self._warm.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        for s in sessions:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
