"""Run untrusted, model-written Python against tests in a sandbox, and decide the verdict outside it.

    from verify.code import run_tests, HumanEvalTest, CallTest, IOTest, AssertTest
    r = run_tests(code, HumanEvalTest(test=row["test"], entry_point=row["entry_point"],
                                      context=row["prompt"]), timeout_s=5.0, memory_mb=1024)
    r.status in {"pass", "fail", "error", "timeout"}; r.passed, r.total, r.stdout, r.stderr,
    r.message (why it failed), r.isolation (the isolation layers that were in place),
    r.unsupported (the tests need what the sandbox cannot do: no verdict on the program)

Test kinds (plain forms accepted too, see `as_test`):
  HumanEvalTest(test, entry_point, context="")  a program defining check(candidate); the verdict is
      1/1 when check returns, 0/1 otherwise. `context` is trusted code run before it (the
      HumanEval prompt: tests such as HumanEval/32 and /38 call the prompt's helpers).
  CallTest(fn_name, cases)  cases of (args list, expected value): f(*args) must equal the value.
  IOTest(cases)  cases of (stdin, expected stdout): the program runs as __main__ once per case;
      outputs are compared with whitespace normalised (`normalise_output`) and exit status 0.
  AssertTest(asserts, setup="")  assert statements calling the program's functions by name
      (MBPP's test_list: "assert remove_Occ('hello', 'l') == 'heo'"), each one case, run in a
      judge sandbox as HumanEval tests are; `setup` is trusted code run there before them (MBPP's
      test_imports / test_setup_code, e.g. "import math").
      - The program's names are found statically (verify/code_asserts.py): those the asserts and the setup
        read and never bind, less builtins. Each is bound in the judge to a stand-in forwarding
        calls by name to the candidate sandbox; one the program does not define stays unbound, so
        only the asserts using it fail (NameError). A standard-library module name used only as
        `mod.attr` is imported in the judge instead (MBPP/596 calls sys.getsizeof, relying on the
        solution's own `import sys`).
      - A failing assert does not stop the next; at the time limit those not yet run count as failed.
      - A returned value that is not plain data reaches the judge only as its truth value
        (_sandbox_harness.Opaque: MBPP's regex helpers return a re.Match for `assert f(x)`); any
        other use of it fails. So does an argument that is not plain data (a forwarded function
        passed to another, an object the setup made): it cannot be sent.
      - Unsupported (CodeResult.unsupported, status "error", nothing run; verify.rewards.CodeReward
        gives such a row None, no signal, not 0):
        * asserts that call only builtins. A program may not replace a builtin the asserts use
          (`def set(x): return 0` would make `set(f(x)) == set(y)` hold), so MBPP/126, whose
          solution is named `sum`, cannot be judged;
        * asserts or setup that construct objects of a class the program defines (MBPP's
          `Pair(5, 24)` passed to the solution, MBPP/367's `Node` tree built by test_setup_code):
          only built-in values cross the sandbox boundary. The parent parses the program (ast,
          never exec) for module-level class statements and counts a class only in an object
          position: read by the setup, inside the arguments of a call of a forwarded name, or as
          `N.x` / `N(...).x`. A class anywhere else (say, one named like the function under test)
          is the program's choice and an ordinary failure (its objects cannot come back), so on
          rows whose tests hand the program only plain values a failing program cannot turn its
          0 into None by defining a class. (Where the tests compose the program's functions,
          `f(g(x))`, a class `g` is still refused.)

Security design: the verdict never comes from the untrusted process
  * Nothing the candidate can print, write, exit with or hook (atexit, excepthook, settrace,
    builtins, unittest, SkipTest) is read as a result. Each candidate output crosses back as
    tagged JSON of exact built-in types (_sandbox_harness.encode/decode) and is compared by a
    process that never ran candidate code: the parent for call and io tests, a separate *judge*
    sandbox for HumanEval and assert tests. The judge runs only the test program; its `candidate`
    (for assert tests, one stand-in per function name) forwards each call to the candidate sandbox
    over a pipe and gets back plain values, so the test's own `assert candidate(x) == y` runs on
    real ints, lists, ... and an always-equal object or an int subclass with a lying __eq__ is
    reduced to its honest base value (or refused; for assert tests, reduced to its truth value,
    which returning True or False would give as well).
  * The candidate could forge that channel, but gains nothing: expected outputs never enter its
    sandbox (the judge holds the test, the parent holds expected values), so a forged reply passes
    only if it carries the right answers, which is solving the task. A missing reply (early
    os._exit, crash, timeout) is a failure.

Isolation layers (the strongest this OS allows; a one-time warning names missing ones):
  own_session     a new session and process group (start_new_session)
  scrubbed_env    environment built from scratch: PATH, HOME, LANG, LC_ALL, PYTHONHASHSEED=0, TMPDIR
  netns pidns ipcns   `unshare --net --pid --ipc --mount --fork --kill-child`: no network (not even
                  loopback), no view of other processes; when the namespace's first process
                  exits, the kernel kills every process in it (setsid + double fork included)
  minimal_root    a private tmpfs root with read-only /usr and Python prefix, writable only
                  /sandbox (the working directory), /tmp, /dev/shm; gone with the namespace
  uid_nobody, no_new_privs   untrusted code runs as uid/gid 65534, setuid binaries inert
  cgroup_pids, cgroup_memory  a per-run cgroup caps processes (fork bombs) and total memory; every
                  pid left in it is killed and the cgroup removed on return
  rlimits         RLIMIT_AS = memory_mb, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps
Without namespaces (isolation="process" or an OS that refuses them), the working directory is a
fresh host temporary directory removed afterwards, and processes are killed by session.

Output: stdout/stderr are read with a cap (OUTPUT_CAP); the rest is read and discarded, so a
program printing a gigabyte costs the caller no memory. Every process the call started is gone
when it returns. run_tests is safe to call from many threads or processes at once.

The untrusted program sees the standard library only (python -S): no site-packages.
"""
from __future__ import annotations

import ast
import builtins
import functools
import itertools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

from verify._sandbox_harness import NOBODY, decode, encode
from verify.code_asserts import assert_plan, module_classes

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
OUTPUT_CAP = 64 << 10           # bytes of stdout / stderr kept in a CodeResult
CONTROL_CAP = 256 << 20         # bytes of supervisor messages (io case outputs) from one sandbox
REPLY_CAP = 16 << 20            # bytes of call replies accepted from an untrusted candidate
STARTUP_GRACE_S = 3.0           # wall time allowed on top of timeout_s for starting sandboxes
MAX_PROCESSES = 64              # processes (and threads) one sandbox may hold at once
FILE_SIZE_MB = 64               # largest file a sandboxed program may write
NS_FLAGS = ("--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child")
FULL_ISOLATION = ("own_session", "scrubbed_env", "netns", "pidns", "ipcns", "minimal_root",
                  "no_new_privs", "uid_nobody", "cgroup_pids", "cgroup_memory", "rlimits")


# ---------------------------------------------------------------------------------------------
# Test kinds and results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HumanEvalTest:
    """A HumanEval-style test program defining check(candidate), run against `entry_point`."""
    test: str
    entry_point: str
    context: str = ""


@dataclass(frozen=True)
class CallTest:
    """fn_name(*args) must equal expected, for each (args, expected) in cases."""
    fn_name: str
    cases: tuple


@dataclass(frozen=True)
class IOTest:
    """The program run with stdin must print expected_stdout, for each (stdin, expected_stdout)."""
    cases: tuple


@dataclass(frozen=True)
class AssertTest:
    """Assert statements calling the program's functions by name, each one case (MBPP's test_list);
    `setup` is trusted code run before them in the judge (imports, test_setup_code)."""
    asserts: tuple
    setup: str = ""

    def __post_init__(self):
        if isinstance(self.asserts, str) or not isinstance(self.asserts, (list, tuple)):
            raise ValueError(f"assert tests need a list of assert statements, got {type(self.asserts).__name__}")
        object.__setattr__(self, "asserts", tuple(self.asserts))
        if not isinstance(self.setup, str):
            raise ValueError(f"assert test setup must be a string of code, got {type(self.setup).__name__}")
        for where, source in [("setup", self.setup), *((f"assert {i}", a) for i, a in enumerate(self.asserts))]:
            if not isinstance(source, str):
                raise ValueError(f"{where}: expected a string (an assert statement), got {source!r:.80}")
            try:
                ast.parse(source)
            except SyntaxError as e:
                raise ValueError(f"{where}: not Python ({e.msg}, line {e.lineno}): {source!r:.80}") from None


@dataclass
class CodeResult:
    status: str                          # "pass" | "fail" | "error" | "timeout"
    passed: int
    total: int
    stdout: str = ""                     # the candidate's stdout (io tests: the first failing case's)
    stderr: str = ""                     # the candidate's stderr, capped
    message: str = ""                    # why it did not pass: assertion traceback, load error, ...
    isolation: tuple = ()                # the isolation layers that were in place
    cases: list = field(default_factory=list)  # per-case pass flags (call, io and assert tests)
    elapsed_s: float = 0.0
    unsupported: bool = False            # the tests need what the sandbox cannot do (status "error"):
                                         # a property of the row, not a failure of the program


def as_test(tests) -> HumanEvalTest | CallTest | IOTest | AssertTest:
    """Normalise the accepted test forms.

    - a HumanEvalTest, CallTest, IOTest or AssertTest;
    - {"kind": "humaneval", "test": str, "entry_point": str, "context"/"prompt": str (optional)},
      or a HumanEval data row (it has "test" and "entry_point");
    - {"kind": "call", "fn_name": str, "cases": [{"input": [args], "output": value}, ...]};
    - {"kind": "io", "cases": [(stdin, stdout), ...]} or a bare list of (stdin, stdout) pairs;
    - {"kind": "asserts", "asserts": [str, ...], "setup": str (optional)} or a bare list of
      assert statement strings.
    A bare list is read by its first item: a string makes it asserts, anything else io pairs; an
    item of the other kind is a ValueError naming its index.
    """
    if isinstance(tests, (HumanEvalTest, CallTest, IOTest, AssertTest)):
        return tests
    if isinstance(tests, dict):
        kind = tests.get("kind", "humaneval" if "entry_point" in tests else None)
        if kind == "humaneval":
            for key in ("test", "entry_point"):
                if not isinstance(tests.get(key), str):
                    raise ValueError(f"humaneval tests need a string {key!r}; got keys {sorted(tests)}")
            return HumanEvalTest(tests["test"], tests["entry_point"],
                                 tests.get("context", tests.get("prompt", "")) or "")
        if kind == "call":
            if not isinstance(tests.get("fn_name"), str):
                raise ValueError(f"call tests need a string 'fn_name'; got keys {sorted(tests)}")
            cases = []
            for i, c in enumerate(tests.get("cases", [])):
                if not isinstance(c, dict) or not isinstance(c.get("input"), (list, tuple)) or "output" not in c:
                    raise ValueError(f"call test case {i}: expected {{'input': [args], 'output': value}}, got {c!r:.80}")
                cases.append((list(c["input"]), c["output"]))
            return CallTest(tests["fn_name"], tuple(cases))
        if kind == "io":
            return as_test(list(tests.get("cases", [])))
        if kind == "asserts":
            if "asserts" not in tests:
                raise ValueError(f"assert tests need a list 'asserts'; got keys {sorted(tests)}")
            return AssertTest(tests["asserts"], tests.get("setup") or "")
        raise ValueError(f"unknown test kind {kind!r} (expected 'humaneval', 'call', 'io' or 'asserts')")
    if isinstance(tests, (list, tuple)):
        if tests and isinstance(tests[0], str):
            for i, c in enumerate(tests):
                if not isinstance(c, str):
                    raise ValueError(f"assert test {i}: expected an assert statement string (item 0 is one, "
                                     f"so this list is assert tests), got {c!r:.80}")
            return AssertTest(tuple(tests))
        cases = []
        for i, c in enumerate(tests):
            if not (isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(s, str) for s in c)):
                raise ValueError(f"io test case {i}: expected a (stdin, expected_stdout) pair of strings "
                                 f"(a list of io cases, as item 0 is not a string), got {c!r:.80}")
            cases.append((c[0], c[1]))
        return IOTest(tuple(cases))
    raise ValueError(f"tests must be a HumanEvalTest, CallTest, IOTest, AssertTest, dict or list, "
                     f"got {type(tests).__name__}")


def normalise_output(text: str) -> str:
    """Whitespace-insensitive form of program output: words of each line joined by one space,
    blank lines dropped."""
    return "\n".join(" ".join(words) for line in text.splitlines() if (words := line.split()))


def values_equal(got, expected, rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> bool:
    """Strict equality of plain decoded values.

    Types must match at every level (bool is not int, str is not bytes), except that list and
    tuple are interchangeable (expected values usually come from JSON) and an int may match a
    float numerically; floats match within rel_tol/abs_tol, NaN matches NaN.
    """
    tg, te = type(got), type(expected)
    if {tg, te} <= {int, float} and float in (tg, te):
        if math.isnan(got) or math.isnan(expected):
            return math.isnan(got) and math.isnan(expected)
        return math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)
    if tg in (list, tuple) and te in (list, tuple):
        return len(got) == len(expected) and all(values_equal(g, e, rel_tol, abs_tol)
                                                 for g, e in zip(got, expected))
    if tg is not te:
        return False
    if tg is dict:
        return got.keys() == expected.keys() and all(values_equal(got[k], expected[k], rel_tol, abs_tol)
                                                     for k in expected)
    return got == expected


# ---------------------------------------------------------------------------------------------
# What this OS allows (probed once per process)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    prefix: tuple          # argv before python: () or unshare with namespace flags
    namespaces: bool
    drop_privileges: bool  # root (or root of a user namespace) can build the cage and drop to nobody
    cgroup_dirs: tuple     # parent directories for per-run pids / memory cgroups (v1)


def _probe(argv) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10, env={"PATH": "/usr/bin:/bin"}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _own_cgroup_dir(controller: str) -> str | None:
    """A writable directory of the v1 `controller` hierarchy to create run cgroups in, else None."""
    base = f"/sys/fs/cgroup/{controller}"
    if not os.path.isfile(os.path.join(base, "cgroup.procs")):
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(",") and os.path.isdir(base + path):
                base = os.path.normpath(base + path)
    probe = os.path.join(base, f"r1-sandbox-probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return base
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _plan(isolation: str) -> _Plan:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    cgroups = tuple(d for d in (_own_cgroup_dir("pids"), _own_cgroup_dir("memory")) if d) if root else ()
    if isolation in ("auto", "namespaces") and unshare and root and _probe([unshare, *NS_FLAGS, "true"]):
        return _Plan((unshare, *NS_FLAGS), True, True, cgroups)
    userns = (unshare, "--user", "--map-root-user", *NS_FLAGS)
    if isolation in ("auto", "userns") and unshare and _probe([*userns, "true"]):
        return _Plan(userns, True, True, cgroups)
    if isolation not in ("auto", "process"):
        raise RuntimeError(f"isolation={isolation!r} is not available on this machine "
                           f"(root: {root}, unshare: {unshare})")
    # Without a mount namespace, nobody must be able to read the standard library where it is
    # (a Python under /root is not): otherwise the program would run as root, with a warning.
    return _Plan((), False, root and _readable_by_all(os.path.dirname(os.__file__)), cgroups)


def _readable_by_all(path: str) -> bool:
    """Whether any user may list `path` and enter it and every directory above it."""
    path = os.path.realpath(path)
    while True:
        mode = os.stat(path).st_mode
        if not mode & 0o001 or (path == os.path.realpath(os.path.dirname(os.__file__)) and not mode & 0o004):
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


_warned: set = set()
_warn_lock = threading.Lock()


def _warn_once(missing: tuple) -> None:
    with _warn_lock:
        if missing in _warned:
            return
        _warned.add(missing)
    warnings.warn(f"verify.code sandbox runs without {', '.join(missing)}: this OS or user does not "
                  f"allow them (see the verify.code docstring for what each layer guards)", RuntimeWarning,
                  stacklevel=3)


# ---------------------------------------------------------------------------------------------
# One sandboxed process tree
# ---------------------------------------------------------------------------------------------

_run_ids = itertools.count()


class _Cgroups:
    """Per-run v1 cgroups (pids, memory) with limits; `destroy` kills what is left and removes them."""

    def __init__(self, parents: tuple, memory_mb: int):
        self.paths = []
        name = f"r1-sandbox-{os.getpid()}-{next(_run_ids)}-{secrets.token_hex(4)}"
        for parent in parents:
            path = os.path.join(parent, name)
            try:
                os.mkdir(path)
                self.paths.append(path)
                if "/pids" in parent:
                    self._write(path, "pids.max", MAX_PROCESSES)
                else:
                    limit = (memory_mb + 64) << 20  # the workers' memory plus the supervisor's
                    self._write(path, "memory.limit_in_bytes", limit)
                    if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                        self._write(path, "memory.memsw.limit_in_bytes", limit)
            except OSError:
                continue

    @staticmethod
    def _write(path: str, key: str, value) -> None:
        with open(os.path.join(path, key), "w") as f:
            f.write(str(value))

    def destroy(self) -> None:
        for path in self.paths:
            for _ in range(500):
                try:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        pids = [int(p) for p in f.read().split()]
                except OSError:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.002)


def _kill_session(sid: int) -> None:
    """Kill every process whose session id is `sid` (the cleanup when there is no PID namespace)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


class _Reader:
    """An fd read to EOF; keeps the first `cap` bytes, discards the rest."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.chunks, self.size, self.eof = fd, cap, [], 0, False

    def on_ready(self) -> None:
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.eof = True
        elif self.size < self.cap:
            self.chunks.append(chunk[:self.cap - self.size])
        self.size += len(chunk)

    def text(self) -> str:
        data = b"".join(self.chunks)
        more = self.size - len(data)
        return data.decode("utf-8", "replace") + (f"\n[... {more} more bytes discarded]" if more else "")

    def messages(self) -> list:
        """The complete JSON lines read (a malformed line becomes None)."""
        out = []
        for line in b"".join(self.chunks).split(b"\n")[:-1]:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(None)
        return out


class _Writer:
    """Writes `data` to a pipe (a file object, made non-blocking) as it accepts it, then closes it."""

    def __init__(self, file, data: bytes):
        os.set_blocking(file.fileno(), False)
        self.file, self.fd, self.data, self.eof = file, file.fileno(), memoryview(data), False

    def on_ready(self) -> None:
        try:
            self.data = self.data[os.write(self.fd, self.data):]
        except BlockingIOError:
            return
        except BrokenPipeError:
            self.data = self.data[:0]
        if not self.data:
            self.eof = True


class _Sandbox:
    """One supervisor process (see _sandbox_harness) with its payload, pipes and cgroups."""

    def __init__(self, plan: _Plan, payload: dict, worker_fds: dict, timeout_s: float, memory_mb: int):
        self.plan = plan
        self.cgroups = _Cgroups(plan.cgroup_dirs, memory_mb)
        self.tmpdir = None
        if plan.namespaces:
            workdir = "/sandbox"
        else:
            workdir = self.tmpdir = tempfile.mkdtemp(prefix="r1-sandbox-")
            if plan.drop_privileges:
                os.chown(workdir, NOBODY, NOBODY)
        limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout_s) + 1,
                  "RLIMIT_FSIZE": FILE_SIZE_MB << 20, "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0}
        if not any("/pids" in p for p in self.cgroups.paths):
            limits["RLIMIT_NPROC"] = MAX_PROCESSES
        ctl_r, ctl_w = os.pipe()
        payload = dict(payload, fds=dict(worker_fds, ctl=ctl_w), limits=limits, timeout_s=timeout_s,
                       mount_ns=plan.namespaces, workdir=workdir, tmpfs_mb=min(memory_mb, 512),
                       drop_privileges=plan.drop_privileges, cgroups=self.cgroups.paths)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": "/tmp",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [*plan.prefix, os.path.realpath(sys.executable), "-S", "-s", "-B", "-P", HARNESS]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, pass_fds=(ctl_w, *worker_fds.values()),
                                         env=env, cwd="/", start_new_session=True)
        except BaseException:
            os.close(ctl_r)
            self.cgroups.destroy()
            raise
        finally:
            os.close(ctl_w)
        self.ctl = _Reader(ctl_r, CONTROL_CAP)
        self.stdout = _Reader(self.proc.stdout.fileno(), OUTPUT_CAP)
        self.stderr = _Reader(self.proc.stderr.fileno(), OUTPUT_CAP)
        self.stdin = _Writer(self.proc.stdin, json.dumps(payload).encode())

    def sources(self) -> list:
        return [self.stdin, self.ctl, self.stdout, self.stderr]

    def isolation(self) -> tuple:
        layers = ["own_session", "scrubbed_env"]
        if self.plan.namespaces:
            layers += ["netns", "pidns", "ipcns"]
        ready = next((m["ready"] for m in self.ctl.messages() if isinstance(m, dict) and "ready" in m), [])
        return tuple(layers + [str(x) for x in ready] + ["rlimits"])

    def control(self, key: str):
        """The first control message carrying `key` (as a dict), or None."""
        return next((m for m in self.ctl.messages() if isinstance(m, dict) and key in m), None)

    def destroy(self) -> None:
        """Kill the whole process tree, reap it, and remove cgroups and the temporary directory."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not self.plan.namespaces:
            _kill_session(self.proc.pid)
        self.proc.wait()
        self.cgroups.destroy()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        os.close(self.ctl.fd)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _pump(sources: list, deadline: float) -> bool:
    """Serve every source until all reach EOF; False if the deadline came first."""
    sel = selectors.DefaultSelector()
    for s in sources:
        sel.register(s.fd, selectors.EVENT_WRITE if isinstance(s, _Writer) else selectors.EVENT_READ, s)
    try:
        while sel.get_map():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
            for key, _ in sel.select(timeout):
                key.data.on_ready()
                if key.data.eof:
                    sel.unregister(key.fd)
                    if isinstance(key.data, _Writer):
                        key.data.file.close()
        return True
    finally:
        sel.close()


# ---------------------------------------------------------------------------------------------
# run_tests
# ---------------------------------------------------------------------------------------------

def run_tests(code: str, tests, timeout_s: float = 5.0, memory_mb: int = 1024,
              isolation: str = "auto") -> CodeResult:
    """Run untrusted `code` against `tests` in a sandbox (see the module docstring).

    timeout_s bounds the wall and CPU time of the tests (all cases together; cases not reached in
    time count as failed). memory_mb bounds each process's address space and, with cgroups, the
    sandbox's total memory. isolation: "auto" (the strongest available), or "namespaces",
    "userns", "process" to require one (RuntimeError when the OS refuses it).
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a string, got {type(code).__name__}")
    if not (timeout_s > 0 and memory_mb > 0):
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    test = as_test(tests)
    plan = _plan(isolation)
    start = time.monotonic()
    deadline = start + timeout_s + STARTUP_GRACE_S
    if isinstance(test, HumanEvalTest):
        result = _run_humaneval(plan, code, test, timeout_s, memory_mb, deadline)
    elif isinstance(test, AssertTest):
        result = _run_asserts(plan, code, test, timeout_s, memory_mb, deadline)
    elif isinstance(test, CallTest):
        result = _run_calls(plan, code, test, timeout_s, memory_mb, deadline)
    else:
        result = _run_io(plan, code, test, timeout_s, memory_mb, deadline)
    missing = tuple(layer for layer in FULL_ISOLATION if layer not in result.isolation)
    if missing and not result.unsupported:  # an unsupported test starts no sandbox
        _warn_once(missing)
    result.elapsed_s = time.monotonic() - start
    return result


def _setup_failure(box: _Sandbox) -> str | None:
    msg = box.control("setup_error")
    return None if msg is None else f"sandbox set-up failed: {msg['setup_error']}"


def _timed_out(box: _Sandbox, finished: bool) -> bool:
    exit_msg = box.control("worker_exit")
    return not finished or (exit_msg is not None and exit_msg.get("timeout") is True)


def _run_judged(plan, candidate: dict, judge: dict, timeout_s, memory_mb, deadline):
    """A candidate and a judge sandbox joined by request / reply pipes, run to the end.

    Returns (candidate box, judge box, the judge's verdict messages, finished before the deadline).
    """
    j2c_r, j2c_w = os.pipe()            # judge -> candidate: call requests
    c2j_r, c2j_w = os.pipe()            # candidate -> judge: load status, replies
    verdict_r, verdict_w = os.pipe()    # judge -> parent
    boxes = []
    try:
        boxes.append(_Sandbox(plan, candidate, {"requests": j2c_r, "replies": c2j_w}, timeout_s, memory_mb))
        boxes.append(_Sandbox(plan, judge, {"requests": j2c_w, "replies": c2j_r, "verdict": verdict_w},
                              timeout_s, memory_mb))
    except BaseException:
        for box in boxes:
            box.destroy()
        os.close(verdict_r)
        raise
    finally:
        for fd in (j2c_r, j2c_w, c2j_r, c2j_w, verdict_w):
            os.close(fd)
    cand, judge_box = boxes
    verdict = _Reader(verdict_r, REPLY_CAP)
    try:
        finished = _pump([*cand.sources(), *judge_box.sources(), verdict], deadline)
    finally:
        for box in boxes:
            box.destroy()
        os.close(verdict_r)
    return cand, judge_box, verdict.messages(), finished


def _run_humaneval(plan, code, test: HumanEvalTest, timeout_s, memory_mb, deadline) -> CodeResult:
    cand, judge, msgs, finished = _run_judged(
        plan, {"role": "candidate", "code": code, "names": [test.entry_point]},
        {"role": "judge", "test": test.test, "context": test.context, "entry_point": test.entry_point},
        timeout_s, memory_mb, deadline)
    out = dict(stdout=cand.stdout.text(), stderr=cand.stderr.text(), isolation=cand.isolation())
    v = next(iter(msgs), None)
    failure = _setup_failure(cand) or _setup_failure(judge)
    if failure:
        return CodeResult("error", 0, 1, message=failure, **out)
    if _timed_out(cand, finished) or _timed_out(judge, finished):
        return CodeResult("timeout", 0, 1, message=f"time limit of {timeout_s}s exceeded", **out)
    if not isinstance(v, dict) or v.get("verdict") not in ("pass", "fail", "error"):
        return CodeResult("error", 0, 1, message="the judge ended without a verdict: "
                          + judge.stderr.text()[-2000:], **out)
    passed = v["verdict"] == "pass"
    return CodeResult(v["verdict"], int(passed), 1, message=str(v.get("message", "")), **out)


def _run_asserts(plan, code, test: AssertTest, timeout_s, memory_mb, deadline) -> CodeResult:
    total = len(test.asserts)
    p = assert_plan(test.asserts, test.setup)
    unsupported = dict(cases=[False] * total, unsupported=True)
    if not p.names:
        used = f" ({', '.join(p.builtins_used)})" if p.builtins_used else ""
        return CodeResult("error", 0, total, message=(
            f"assert tests call no function the program could define: every name they use is a builtin{used} "
            "or set up by the test, and a program may not replace builtins; such tests are not supported"),
            **unsupported)
    refused = sorted(p.object_names & module_classes(code)) if p.object_names else []
    if refused:
        which = f"class {refused[0]!r}" if len(refused) == 1 else "classes " + ", ".join(map(repr, refused))
        return CodeResult("error", 0, total, message=(
            f"assert tests construct objects of the solution's {which}: objects cannot cross the sandbox "
            "boundary (only built-in values do); such tests are not supported"), **unsupported)
    cand, judge, msgs, finished = _run_judged(
        plan, {"role": "candidate", "code": code, "names": list(p.names), "partial": True, "opaque": True},
        {"role": "assert_judge", "asserts": list(test.asserts), "setup": test.setup, "names": list(p.names),
         "modules": list(p.modules)},
        timeout_s, memory_mb, deadline)
    out = dict(stdout=cand.stdout.text(), stderr=cand.stderr.text(), isolation=cand.isolation())
    failure = _setup_failure(cand) or _setup_failure(judge)
    if failure:
        return CodeResult("error", 0, total, message=failure, cases=[False] * total, **out)
    msgs = [m for m in msgs if isinstance(m, dict)]
    timed_out = _timed_out(cand, finished) or _timed_out(judge, finished)
    # A candidate killed at the deadline reads to the judge as one that "did not start properly":
    # the deadline is the cause, and is reported as such below.
    error = next((m for m in msgs if m.get("verdict") in ("error", "fail")), None)
    if error is not None and not timed_out:
        return CodeResult(error["verdict"], 0, total, message=str(error.get("message", "")),
                          cases=[False] * total, **out)
    runs = {m["case"]: m for m in msgs if type(m.get("case")) is int}
    cases, message = [], ""
    for i, source in enumerate(test.asserts):
        run = runs.get(i, {})
        cases.append(run.get("ok") is True)
        if not cases[-1] and not message:
            why = str(run.get("message", "")) if run else "not run (time limit exceeded or the judge stopped)"
            message = f"assert {i} failed: {source[:300]}\n{why}"
    passed = sum(cases)
    if passed == total:
        status = "pass"
    elif timed_out:
        status, message = "timeout", f"time limit of {timeout_s}s exceeded; {message}"
    elif not any(m.get("done") is True for m in msgs):
        status, message = "error", "the judge ended without a verdict: " + judge.stderr.text()[-2000:]
    else:
        status = "fail"
    return CodeResult(status, passed, total, message=message, cases=cases, **out)


def _run_calls(plan, code, test: CallTest, timeout_s, memory_mb, deadline) -> CodeResult:
    requests = [{"fn": test.fn_name, "args": encode(list(args)), "kwargs": encode({})} for args, _ in test.cases]
    expected = [decode(encode(value)) for _, value in test.cases]
    replies_r, replies_w = os.pipe()
    try:
        box = _Sandbox(plan, {"role": "candidate", "code": code, "names": [test.fn_name],
                              "requests": requests}, {"replies": replies_w}, timeout_s, memory_mb)
    except BaseException:
        os.close(replies_r)
        raise
    finally:
        os.close(replies_w)
    replies = _Reader(replies_r, REPLY_CAP)
    try:
        finished = _pump([*box.sources(), replies], deadline)
    finally:
        box.destroy()
        os.close(replies_r)
    out = dict(stdout=box.stdout.text(), stderr=box.stderr.text(), isolation=box.isolation())
    total = len(test.cases)
    msgs = replies.messages()
    first = msgs[0] if msgs else None
    failure = _setup_failure(box)
    if failure:
        return CodeResult("error", 0, total, message=failure, **out)
    if isinstance(first, dict) and "load_error" in first:
        return CodeResult("error", 0, total, message=f"failed to load: {first['load_error']}"[:4000], **out)
    cases, message = [], ""
    for i, want in enumerate(expected):
        loaded = isinstance(first, dict) and first.get("loaded") is True
        reply = msgs[i + 1] if i + 1 < len(msgs) and loaded else None
        ok = False
        if isinstance(reply, dict) and "ok" in reply:
            try:
                ok = values_equal(decode(reply["ok"]), want)
            except (ValueError, TypeError, RecursionError):
                ok = False
        cases.append(ok)
        if not ok and not message:
            message = f"case {i}: " + (f"expected {want!r:.200}, got {_describe_reply(reply)}")
    passed = sum(cases)
    status = "pass" if passed == total else "timeout" if _timed_out(box, finished) else "fail"
    return CodeResult(status, passed, total, message=message, cases=cases, **out)


def _describe_reply(reply) -> str:
    if reply is None:
        return "no reply (the program exited, crashed or ran out of time)"
    if isinstance(reply, dict) and "ok" in reply:
        try:
            return f"{decode(reply['ok'])!r:.200}"
        except (ValueError, TypeError, RecursionError):
            return "an undecodable value"
    if isinstance(reply, dict) and isinstance(reply.get("raised"), list):
        return "an exception: " + ": ".join(str(s) for s in reply["raised"])[:400]
    return "a malformed reply"


def _run_io(plan, code, test: IOTest, timeout_s, memory_mb, deadline) -> CodeResult:
    box = _Sandbox(plan, {"role": "io", "code": code, "stdins": [stdin for stdin, _ in test.cases]},
                   {}, timeout_s, memory_mb)
    try:
        finished = _pump(box.sources(), deadline)
    finally:
        box.destroy()
    total = len(test.cases)
    failure = _setup_failure(box)
    if failure:
        return CodeResult("error", 0, total, message=failure, stderr=box.stderr.text(), isolation=box.isolation())
    runs = {m["case"]: m for m in box.ctl.messages() if isinstance(m, dict) and isinstance(m.get("case"), int)}
    cases, shown, message, timed_out = [], None, "", not finished
    for i, (_, want) in enumerate(test.cases):
        run = runs.get(i)
        timed_out |= bool(run and run.get("timeout"))
        ok = bool(run) and run.get("exit") == 0 and not run.get("truncated") \
            and normalise_output(str(run.get("stdout", ""))) == normalise_output(want)
        cases.append(ok)
        if not ok and shown is None:
            shown = str(run.get("stdout", "")) if run else ""
            message = (f"case {i}: " + ("not run" if not run else "time limit exceeded" if run.get("timeout")
                       else f"exit status {run.get('exit')}" if run.get("exit") != 0 else "wrong output"))
    passed = sum(cases)
    crashed = bool(runs) and all(r.get("exit") not in (0, None) for r in runs.values())
    status = ("pass" if passed == total else "timeout" if timed_out
              else "error" if crashed and passed == 0 else "fail")
    stdout = shown if shown is not None else (str(runs[total - 1].get("stdout", "")) if total else "")
    return CodeResult(status, passed, total, stdout=stdout[:OUTPUT_CAP], stderr=box.stderr.text(),
                      message=message, isolation=box.isolation(), cases=cases)
