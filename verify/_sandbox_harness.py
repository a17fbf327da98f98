"""The program that runs inside the code sandbox, and the wire format it shares with verify.code.

verify.code starts this file as `python -S -s -B -P _sandbox_harness.py` (behind `unshare` when the
OS allows), writes one JSON payload to its stdin and closes it. The process is the sandbox's
*supervisor*: it runs as root (or as root of a user namespace) only long enough to build the cage,
then drops to an unprivileged user, and never runs untrusted code itself. Untrusted code runs in
*workers* it forks.

Set-up, in order (each step that succeeds is named in the `ready` message's layer list):
  cgroups      join the pids and memory cgroups the parent created (before anything else forks)
  minimal root a fresh tmpfs holding read-only binds of /usr, the Python prefix and a few /etc and
               /dev files, a new /proc, and writable /tmp, /dev/shm and /sandbox (the working
               directory); then chroot into it. The project, the data, /root, /home, the host's
               /tmp are not there at all, so they can be neither read nor written.
  unprivileged setgroups([]), setgid/setuid to nobody (65534) with no_new_privs (setuid binaries
               gain nothing), or, in a user namespace where only root is mapped, all capabilities
               dropped instead. The supervisor is made non-dumpable, so a worker (same uid) can
               neither ptrace it nor open its /proc/1/fd.
  rlimits      set in each worker: RLIMIT_AS (memory_mb), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE,
               RLIMIT_CORE=0, and RLIMIT_NPROC when no pids cgroup caps processes.
Network and PID isolation come from `unshare --net --pid` around this process (verify.code).

Roles (payload["role"]):
  candidate  one worker: exec the untrusted code, send {"loaded": true, "missing": [names]} or
             {"load_error": "..."} on the replies fd, then answer each request line
             {"fn": name, "args": ..., "kwargs": ...} read from the requests fd with
             {"ok": <encoded value>} or {"raised": [type name, message]} (or, with
             payload["opaque"], {"opaque": [type name, truth]} for a value that is not plain data),
             until the requests fd reaches EOF. payload["names"] are the functions it serves: all
             must exist (HumanEval and call tests: the entry point), or with payload["partial"]
             (assert tests) at least one, the rest being reported missing. Requests come live
             from a judge sandbox (HumanEval and assert tests), or from a memfd the supervisor
             fills from payload["requests"] (call tests).
  judge      one worker that never sees the untrusted code: exec the trusted context (the HumanEval
             prompt, for helpers such as `poly` or `encode_cyclic`) and the test program, then run
             check(candidate) where `candidate` forwards each call to the candidate sandbox and
             decodes the reply into plain built-in values. Its verdict line goes to the parent.
  assert_judge  the judge of assert tests (MBPP's test_list), also without the untrusted code:
             each of payload["names"] the candidate defines is bound to a function forwarding calls
             by that name, payload["modules"] are imported, the trusted setup runs, then every
             assert runs on its own; one verdict line per assert {"case": i, "ok": bool,
             "message": str}, then {"done": true} (or one {"verdict": "error", ...} instead).
  io         one worker per stdin/stdout case: the program runs as __main__ with the case's input
             on stdin (a memfd); the supervisor captures its stdout (capped) and reports it.
  session    one long-lived worker, a REPL for verify.session.PythonSession: it reads command
             frames {"id": n, "code": str} from the requests fd and runs each cell in one module
             namespace kept across commands (a fresh `__main__`), then answers on the replies fd
             with {"id": n, "status": "ok" | "error", "error": traceback text}; it first sends
             {"hello": true} once it is ready. Frames are length-prefixed JSON (pack_frame /
             Frames). Like a notebook, a cell whose last statement is an expression prints the
             repr of its value when it is not None. The worker's stdout and stderr are both the
             sandbox's stdout pipe, which the parent reads (capped) per call. The supervisor reaps
             orphans while it waits, and kills the worker's group when the lifeline fd reaches
             EOF (the parent closed the session or died), so no session outlives its parent.

Messages to the parent on the ctl fd, one JSON object per line: {"ready": [layers]},
{"setup_error": str}, {"case": i, "stdout": str, "exit": int, "timeout": bool, "truncated": bool}
(io), {"worker_exit": int, "timeout": bool} (other roles; a session worker killed because the
lifeline closed reports null).

Wire codec: values cross process boundaries only as tagged JSON built from exact built-in types
(encode/decode below). Whatever untrusted code sends, the receiver rebuilds plain None, bool, int,
float, complex, str, bytes, list, tuple, dict, set and frozenset, so no user-defined __eq__ ever
runs where a verdict is decided. The one exception, for assert tests only: a returned value that
is not plain data (MBPP's regex helpers return a re.Match for `assert f(x)`) crosses as an
`Opaque`, its type name and truth value, which `assert f(x)` / `assert not f(x)` can judge and
nothing else can (it equals only itself), so it tells the judge no more than returning
True/False would.
"""
import builtins
import fcntl
import io
import json
import os
import resource
import select
import signal
import struct
import sys
import time

NOBODY = 65534
MAX_DEPTH = 100                 # nesting depth of an encoded value
LINE_CAP = 64 << 20             # longest message line (or session command frame) accepted (bytes)
CASE_OUTPUT_CAP = 8 << 20       # stdout kept per io case (bytes); more marks the case truncated
TRACEBACK_CAP = 16 << 10        # characters of a session cell's traceback sent back (the tail)


# ---------------------------------------------------------------------------------------------
# Wire codec
# ---------------------------------------------------------------------------------------------

class Unserialisable(Exception):
    """A value that is not made of built-in data types (or nests deeper than MAX_DEPTH)."""


def encode(x, depth: int = 0):
    """A JSON-able tagged tree for a value made of built-in data types.

    None/True/False/str map to themselves; int -> ["i", hex], float -> ["f", float.hex],
    complex -> ["c", [real, imag as float.hex]], bytes -> ["b", hex], list/tuple/set/frozenset ->
    ["l"|"t"|"s"|"fs", [items]], dict -> ["d", [[key, value], ...]]. Subclasses of these types are
    reduced to their base value through the base type's own C methods (int.__int__, dict.copy,
    complex.real, ...), so an overridden __eq__, __iter__ or __class__ plays no part; anything
    else raises Unserialisable.
    """
    if depth > MAX_DEPTH:
        raise Unserialisable(f"value nests deeper than {MAX_DEPTH} levels")
    t = type(x)
    if x is None or t is bool:
        return x
    if issubclass(t, str):
        return str.__str__(x)
    if issubclass(t, int):
        return ["i", hex(int.__int__(x))]
    if issubclass(t, float):
        return ["f", float.hex(float.__float__(x))]
    if issubclass(t, complex):  # the base type's own descriptors: a subclass's .real plays no part
        return ["c", [float.hex(complex.real.__get__(x)), float.hex(complex.imag.__get__(x))]]
    if issubclass(t, (bytes, bytearray)):
        return ["b", bytes(memoryview(x)).hex()]
    if issubclass(t, list):
        return ["l", [encode(v, depth + 1) for v in list.copy(x)]]
    if issubclass(t, tuple):
        return ["t", [encode(v, depth + 1) for v in tuple.__getitem__(x, slice(None))]]
    if issubclass(t, dict):
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.copy(x).items()]]
    if issubclass(t, frozenset):
        return ["fs", [encode(v, depth + 1) for v in frozenset.copy(x)]]
    if issubclass(t, set):
        return ["s", [encode(v, depth + 1) for v in set.copy(x)]]
    raise Unserialisable(f"a value of type {t.__name__} is not plain data")


_SEQUENCES = {"l": list, "t": tuple, "s": set, "fs": frozenset}


def decode(t):
    """The inverse of encode; raises ValueError on anything encode cannot have produced."""
    if t is None or type(t) in (bool, str):
        return t
    if type(t) is not list or len(t) != 2 or type(t[0]) is not str:
        raise ValueError(f"malformed encoded value {str(t)[:80]!r}")
    tag, v = t
    if tag == "i" and type(v) is str:
        return int(v, 16)
    if tag == "f" and type(v) is str:
        return float.fromhex(v)
    if tag == "c" and type(v) is list and len(v) == 2 and all(type(part) is str for part in v):
        return complex(float.fromhex(v[0]), float.fromhex(v[1]))
    if tag == "b" and type(v) is str:
        return bytes.fromhex(v)
    if tag in _SEQUENCES and type(v) is list:
        return _SEQUENCES[tag](decode(item) for item in v)
    if tag == "d" and type(v) is list:
        out = {}
        for pair in v:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed encoded dict item")
            out[decode(pair[0])] = decode(pair[1])
        return out
    raise ValueError(f"unknown tag {tag!r} in encoded value")


def send(fd: int, obj) -> None:
    """Write one JSON line to fd (all of it, even if the pipe takes it in pieces)."""
    data = memoryview((json.dumps(obj, separators=(",", ":")) + "\n").encode())
    while data:
        data = data[os.write(fd, data):]


class LineReader:
    """Newline-delimited messages from a raw fd; a line longer than `cap` bytes raises ValueError."""

    def __init__(self, fd: int, cap: int = LINE_CAP):
        self.fd, self.cap, self.buf, self.eof = fd, cap, b"", False

    def readline(self) -> bytes | None:
        """The next line without its newline, or None at EOF (a partial last line is dropped)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1:]
                return line
            if self.eof or len(self.buf) > self.cap:
                if len(self.buf) > self.cap:
                    raise ValueError(f"message longer than {self.cap} bytes")
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.eof = True
            self.buf += chunk


FRAME_HEADER = struct.Struct("!I")   # a session frame: 4-byte big-endian length, then UTF-8 JSON


def pack_frame(obj) -> bytes:
    """One session frame holding obj as JSON."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    return FRAME_HEADER.pack(len(data)) + data


class Frames:
    """Session frames from a byte stream fed in pieces.

    feed() returns the messages completed so far. A header announcing more than `cap` bytes raises
    ValueError as soon as it is read, so the buffer never holds more than one frame of at most
    `cap` bytes plus the piece being fed; malformed JSON raises ValueError too (a very deep nesting
    RecursionError). The receiver must treat either as the end of the channel.
    """

    def __init__(self, cap: int):
        self.cap, self.buf = cap, bytearray()

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while len(self.buf) >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self.buf)
            if n > self.cap:
                raise ValueError(f"a frame of {n} bytes, more than the {self.cap} accepted")
            end = FRAME_HEADER.size + n
            if len(self.buf) < end:
                break
            out.append(json.loads(bytes(self.buf[FRAME_HEADER.size:end])))
            del self.buf[:end]
        return out


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------------------------------
# Set-up (runs as root, before any worker exists)
# ---------------------------------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
ETC_FILES = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "localtime")
DEV_FILES = ("null", "zero", "full", "random", "urandom")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {source} on {target}")


def bind(source: str, target: str, writable: bool = False) -> None:
    """Bind-mount source on target (created as an empty file or directory), read-only unless writable."""
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if writable else MS_RDONLY)
    mount(None, target, None, flags)


def build_root(new_root: str, workdir: str, size_mb: int) -> None:
    """Mount a minimal filesystem at new_root and chroot into it (see the module docstring)."""
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=0755")
    prefixes = {os.path.realpath(p): p for p in (sys.base_prefix, sys.base_exec_prefix)}
    bound = []
    for path in SYSTEM_DIRS + tuple(sorted(prefixes.values())):
        if not os.path.lexists(path) or any(path == b or path.startswith(b + "/") for b in bound):
            continue
        if os.path.islink(path):
            os.symlink(os.readlink(path), new_root + path)
        else:
            bind(os.path.realpath(path), new_root + path)
            bound.append(path)
    os.makedirs(new_root + "/etc", mode=0o755)
    for name in ETC_FILES:
        src = "/etc/" + name
        if os.path.islink(src):
            os.symlink(os.readlink(src), new_root + src)
        elif os.path.isfile(src):
            bind(src, new_root + src)
    os.makedirs(new_root + "/dev", mode=0o755)
    for name in DEV_FILES:
        if os.path.exists("/dev/" + name):
            bind("/dev/" + name, new_root + "/dev/" + name, writable=True)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{new_root}/dev/{name}")
    os.symlink("/proc/self/fd", new_root + "/dev/fd")
    os.makedirs(new_root + "/proc", mode=0o555)
    mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for d in ("/tmp", "/dev/shm", "/var/tmp"):
        os.makedirs(new_root + d, mode=0o755, exist_ok=True)
        os.chmod(new_root + d, 0o1777)
    os.makedirs(new_root + workdir, mode=0o700)
    try:
        os.chown(new_root + workdir, NOBODY, NOBODY)
    except OSError:  # a user namespace maps no uid 65534; the workers will run as its root instead
        pass
    os.chroot(new_root)
    os.chdir(workdir)


def drop_privileges(layers: list) -> None:
    """Become nobody (or, in a user namespace, keep uid 0 but lose every capability)."""
    _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    layers.append("no_new_privs")
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers.append("uid_nobody")
    except OSError:
        # A user namespace maps only our own uid: no other uid to become. Clear every capability
        # set instead (capset v3: header {version, pid}, two {effective, permitted, inheritable}).
        import ctypes
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        _check(libc().capset(header, data), "capset(0)")
        layers.append("no_capabilities")
    _check(libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE, 0)")


def set_limits(limits: dict) -> None:
    """Resource limits for a worker (inherited by anything it forks)."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def setup(payload: dict) -> list:
    """Build the cage as payload asks; returns the names of the layers that are in place."""
    layers = []
    for path in payload.get("cgroups", []):
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")
        layers.append("cgroup_" + ("pids" if "/pids/" in path else "memory"))
    if payload.get("mount_ns"):
        build_root("/tmp", payload["workdir"], payload["tmpfs_mb"])
        layers.append("minimal_root")
    else:
        os.chdir(payload["workdir"])
    if payload.get("drop_privileges"):
        drop_privileges(layers)
    return layers


# ---------------------------------------------------------------------------------------------
# Roles (run in workers)
# ---------------------------------------------------------------------------------------------

def describe_exception(e: BaseException) -> list:
    return [type(e).__name__, str(e)[:2000]]


def serve_calls(code: str, names: list, requests_fd: int, replies_fd: int, partial: bool = False,
                opaque: bool = False) -> None:
    """The candidate worker: load the untrusted code, then answer call requests until EOF.

    Every one of `names` must be defined, or with `partial` at least one (the others are reported
    in the "missing" list, and the judge leaves them unbound). With `opaque`, a result that is not
    plain data is sent as its type name and truth value instead of raising Unserialisable.
    """
    g = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(code, "<candidate>", "exec"), g)
    except BaseException as e:  # SystemExit, SkipTest, ...
        send(replies_fd, {"load_error": "{}: {}".format(*describe_exception(e))})
        return
    fns = {name: g[name] for name in names if name in g}
    missing = [name for name in names if name not in fns]
    if missing and (not partial or not fns):
        send(replies_fd, {"load_error": "the program does not define " + ", ".join(map(repr, missing))})
        return
    send(replies_fd, {"loaded": True, "missing": missing})
    reader = LineReader(requests_fd)
    while (line := reader.readline()) is not None:
        request = json.loads(line)
        try:
            value = fns[request["fn"]](*decode(request["args"]), **decode(request["kwargs"]))
            try:
                reply = {"ok": encode(value)}
            except Unserialisable:
                if not opaque:
                    raise
                reply = {"opaque": [type(value).__name__, bool(value)]}
        except BaseException as e:
            reply = {"raised": describe_exception(e)}
        send(replies_fd, reply)


class CandidateGone(BaseException):
    """The candidate sandbox stopped answering (exited, crashed or sent garbage)."""


class CandidateRaised(Exception):
    """The candidate raised an exception that is not a built-in one."""


class Opaque:
    """A candidate's value that is not plain data, as the judge of assert tests sees it: a type name
    and a truth value. It equals only itself and supports nothing else."""
    __slots__ = ("type_name", "truth")

    def __init__(self, type_name: str, truth: bool):
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name} object of the candidate>"


class Remote:
    """The judge's end of the pipes to the candidate sandbox: calls go out by function name, and
    only plain decoded values (or built-in exceptions rebuilt from a name and a message, or with
    `opaque` an Opaque) come back."""

    def __init__(self, requests_fd: int, replies_fd: int, opaque: bool = False):
        self.requests_fd, self.reader, self.opaque = requests_fd, LineReader(replies_fd), opaque

    def receive(self) -> dict:
        try:
            line = self.reader.readline()
            msg = None if line is None else json.loads(line)
        except ValueError as e:
            raise CandidateGone(f"unreadable reply from the candidate: {e}") from None
        if type(msg) is not dict:
            raise CandidateGone("the candidate exited or closed its channel" if msg is None
                                else "malformed reply from the candidate")
        return msg

    def call(self, name: str, args: tuple, kwargs: dict):
        try:
            send(self.requests_fd, {"fn": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        except OSError as e:  # the candidate is gone and its end of the pipe closed
            raise CandidateGone(f"the candidate exited or closed its channel ({e})") from None
        reply = self.receive()
        if "ok" in reply:
            try:
                return decode(reply["ok"])
            except (ValueError, TypeError) as e:
                raise CandidateGone(f"undecodable value from the candidate: {e}") from None
        value = reply.get("opaque")
        if self.opaque and type(value) is list and len(value) == 2 and type(value[0]) is str \
                and type(value[1]) is bool:
            return Opaque(value[0][:100], value[1])
        raised = reply.get("raised")
        if type(raised) is list and len(raised) == 2 and all(type(s) is str for s in raised):
            cls = getattr(builtins, raised[0], None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(raised[1])
            raise CandidateRaised(f"{raised[0]}: {raised[1]}")
        raise CandidateGone("malformed reply from the candidate")

    def function(self, name: str):
        """A stand-in for the candidate's function `name` that forwards every call."""
        def forward(*args, **kwargs):
            return self.call(name, args, kwargs)
        forward.__name__ = forward.__qualname__ = name
        return forward

    def wait_loaded(self, verdict_fd: int) -> dict | None:
        """The candidate's load message, or None after sending the error verdict when it failed."""
        try:
            first = self.receive()
        except CandidateGone as e:
            first = {"gone": str(e)}
        if "load_error" in first:
            send(verdict_fd, {"verdict": "error", "message": f"candidate failed to load: {first['load_error']}"[:4000]})
            return None
        if first.get("loaded") is not True:
            send(verdict_fd, {"verdict": "fail", "message": "the candidate did not start properly: "
                              + str(first.get("gone", "no load message"))[:2000]})
            return None
        return first


def judge(payload: dict, requests_fd: int, replies_fd: int, verdict_fd: int) -> None:
    """The judge worker: run check(candidate) with calls forwarded to the candidate sandbox."""
    remote = Remote(requests_fd, replies_fd)
    if remote.wait_loaded(verdict_fd) is None:
        return
    candidate = remote.function(payload["entry_point"])
    g = {"__name__": "__judge__", "__builtins__": builtins}
    try:
        import random
        random.seed(payload.get("seed", 0))  # unseeded tests (HumanEval/53) become reproducible
        exec(compile(payload.get("context", ""), "<context>", "exec"), g)
        g[payload["entry_point"]] = candidate
        exec(compile(payload["test"], "<test>", "exec"), g)
        check = g["check"]
    except BaseException as e:
        send(verdict_fd, {"verdict": "error", "message": "test program failed to load: {}: {}".format(*describe_exception(e))})
        return
    try:
        check(candidate)
    except BaseException as e:
        import traceback
        tb = traceback.format_exception(type(e), e, e.__traceback__, limit=-3)
        send(verdict_fd, {"verdict": "fail", "message": "".join(tb)[-4000:]})
        return
    send(verdict_fd, {"verdict": "pass"})


def judge_asserts(payload: dict, requests_fd: int, replies_fd: int, verdict_fd: int) -> None:
    """The assert judge: bind forwarding stand-ins, run the setup, then each assert on its own.

    A failing, raising or hanging-up assert is one failed case and the next one still runs (after
    the candidate is gone, its calls fail at once). compile(optimize=0) keeps asserts even
    under -O.
    """
    import random
    import traceback
    remote = Remote(requests_fd, replies_fd, opaque=True)
    first = remote.wait_loaded(verdict_fd)
    if first is None:
        return
    reported = first.get("missing")
    missing = {m for m in reported if type(m) is str} if type(reported) is list else set()
    g = {"__name__": "__judge__", "__builtins__": builtins}
    for name in payload["names"]:
        if name not in missing:  # a missing one stays unbound: the asserts using it hit NameError
            g[name] = remote.function(name)
    try:
        random.seed(payload.get("seed", 0))
        for module in payload["modules"]:
            g[module] = __import__(module)
        exec(compile(payload["setup"], "<setup>", "exec", optimize=0), g)
    except BaseException as e:
        send(verdict_fd, {"verdict": "error", "message": "test setup failed: {}: {}".format(*describe_exception(e))})
        return
    for i, source in enumerate(payload["asserts"]):
        try:
            exec(compile(source, f"<assert {i}>", "exec", optimize=0), g)
            send(verdict_fd, {"case": i, "ok": True})
        except BaseException as e:  # AssertionError, the candidate's exception, CandidateGone, ...
            message = "".join(traceback.format_exception_only(type(e), e)).strip()
            send(verdict_fd, {"case": i, "ok": False, "message": message[-2000:]})
    send(verdict_fd, {"done": True})


def run_main(code: str) -> None:
    """An io worker: the program as __main__ on fresh stdio objects over fds 0/1/2."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace")
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    finally:
        sys.stdout.flush()


def format_error(e: BaseException, cap: int = TRACEBACK_CAP) -> str:
    """The traceback of an exception raised by a cell, without the harness's own frames; the last
    `cap` characters (where the exception itself is) when it is longer."""
    import traceback
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(e), e, tb))
    if len(text) > cap:
        text = f"[... {len(text) - cap} characters of traceback cut ...]\n" + text[-cap:]
    return text


def run_cell(source: str, g: dict, name: str) -> dict:
    """Run one session cell in the namespace g, notebook style; the reply's status and error.

    The last statement, when it is an expression, is evaluated on its own and the repr of a value
    that is not None printed (as a REPL shows it). The source is registered with linecache under
    `name`, so tracebacks show the lines of this cell and of functions defined in earlier ones.
    Every exception, SystemExit and KeyboardInterrupt included, is the cell's error: the session
    goes on with its state as the cell left it.
    """
    import ast
    import linecache
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    try:
        tree = ast.parse(source, name, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, name, "exec"), g)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), name, "eval"), g)
            if value is not None:
                print(repr(value))
        return {"status": "ok"}
    except BaseException as e:
        try:
            return {"status": "error", "error": format_error(e)}
        except BaseException:  # formatting failed too (a MemoryError, a raising __str__)
            return {"status": "error", "error": f"{type(e).__name__} (its traceback could not be formatted)"}


def serve_session(requests_fd: int, replies_fd: int) -> None:
    """The session worker: run each command frame as a cell in one namespace, reply, until EOF.

    Cells run in a fresh module registered as `__main__` (so pickling, dataclasses and
    `if __name__ == "__main__"` behave as in a script), with sys.stdout and sys.stderr one stream
    over fd 1, in the order written, flushed before each reply so the parent has all of a cell's
    output in the pipe when its reply arrives. The soft CPU limit is set a second below the hard
    one, so a spent budget ends the worker with SIGXCPU (a clear cause) before the hard SIGKILL.
    """
    import ast, linecache, traceback, types  # noqa: F401  (loaded before the hello: a warm first call)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY and hard > 1:
        resource.setrlimit(resource.RLIMIT_CPU, (hard - 1, hard))
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = out
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    frames = Frames(LINE_CAP)
    pending = []
    write_all(replies_fd, pack_frame({"hello": True}))
    while True:
        while not pending:
            chunk = os.read(requests_fd, 1 << 20)
            if not chunk:
                return
            pending += frames.feed(chunk)
        command = pending.pop(0)
        reply = run_cell(command["code"], module.__dict__, f"<cell {command['id']}>")
        for stream in {id(s): s for s in (out, sys.stdout, sys.stderr)}.values():
            try:
                stream.flush()
            except BaseException:  # the cell replaced or closed a stream: its own output is lost
                pass
        write_all(replies_fd, pack_frame(dict(reply, id=command["id"])))


# ---------------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------------

def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("input", 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def spawn(target, limits: dict, fd_map: dict) -> int:
    """Fork a worker: its fds are exactly fd_map (child fd -> our fd) plus 0-2; it runs target()."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setpgid(0, 0)
        libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the worker's own /proc/self stays readable
        # Move every source above the targets first, so no dup2 clobbers a source still to come.
        high = {child_fd: fcntl.fcntl(our_fd, fcntl.F_DUPFD, 64) for child_fd, our_fd in fd_map.items()}
        for child_fd, tmp_fd in high.items():
            os.dup2(tmp_fd, child_fd)
        keep = sorted(set(fd_map) | {0, 1, 2})
        for lo, hi in zip(keep, keep[1:] + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
            os.closerange(lo + 1, hi)
        set_limits(limits)
        target()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def wait(pid: int, deadline: float, out_fd: int | None = None, cap: int = 0):
    """Wait for a worker until the deadline, reading out_fd (capped) meanwhile.

    Returns (exit status or None if killed at the deadline, captured bytes, truncated). A worker
    still running at the deadline is killed with its process group.
    """
    pidfd = os.pidfd_open(pid)
    chunks, size, truncated, exited = [], 0, False, False
    watch = [pidfd] + ([out_fd] if out_fd is not None else [])
    while watch:
        timeout = deadline - time.monotonic()
        if exited:  # drain what the worker left in the pipe, briefly: a grandchild may hold it open
            timeout = min(timeout, 0.05)
        ready = select.select(watch, [], [], max(timeout, 0))[0] if timeout > 0 else []
        if not ready:
            break
        if pidfd in ready:
            exited = True
            watch.remove(pidfd)
        if out_fd in ready:
            chunk = os.read(out_fd, 1 << 20)
            if not chunk:
                watch.remove(out_fd)
            elif size < cap:
                chunks.append(chunk[:cap - size])
                truncated |= size + len(chunk) > cap
                size += len(chunk)
            else:
                truncated = True
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = os.waitpid(pid, 0)[1]
    os.close(pidfd)
    return (os.waitstatus_to_exitcode(status) if exited else None), b"".join(chunks), truncated


def supervise_session(pid: int, lifeline: int):
    """Wait for the session worker, reaping orphans meanwhile; the worker's exit status, or None
    when the lifeline reached EOF first and the worker's group was killed.

    As the first process of a PID namespace the supervisor inherits every orphan (a setsid'd
    double fork, a daemon left by a cell); unreaped, their zombies would hold pids of the session's
    cgroup cap for as long as the session lives. SIGCHLD wakes the loop through a wakeup fd. The
    handler is installed after the fork, so the worker never inherits it; a child that exited
    before is still found by the waitpid that precedes every select.
    """
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        while True:
            try:
                child, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                child = 0
            if child == 0:
                break
            if child == pid:
                try:
                    os.killpg(pid, signal.SIGKILL)  # what the worker started in its own group
                except ProcessLookupError:
                    pass
                return os.waitstatus_to_exitcode(status)
        ready = select.select([lifeline, wake_r], [], [])[0]
        if lifeline in ready:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None
        while True:
            try:
                if not os.read(wake_r, 4096):
                    break
            except BlockingIOError:
                break


def main() -> None:
    payload = json.loads(sys.stdin.buffer.read())
    ctl = payload["fds"]["ctl"]
    try:
        layers = setup(payload)
    except BaseException as e:
        send(ctl, {"setup_error": "{}: {}".format(*describe_exception(e))})
        os._exit(3)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    send(ctl, {"ready": layers})
    fds, limits, role = payload["fds"], payload["limits"], payload["role"]
    deadline = time.monotonic() + payload["timeout_s"]

    if role == "session":  # no deadline: the parent bounds each call and ends the session
        fd_map = {2: 1, 3: fds["requests"], 4: fds["replies"]}
        pid = spawn(lambda: serve_session(3, 4), limits, fd_map)
        for fd in set(fd_map.values()) - {1}:
            os.close(fd)
        code = supervise_session(pid, fds["lifeline"])
        send(ctl, {"worker_exit": code, "timeout": False})
    elif role == "io":
        for i, stdin in enumerate(payload["stdins"]):
            out_r, out_w = os.pipe()
            in_fd = memfd_with(stdin.encode())
            pid = spawn(lambda: run_main(payload["code"]), limits, {0: in_fd, 1: out_w})
            os.close(out_w)
            os.close(in_fd)
            code, out, truncated = wait(pid, deadline, out_r, CASE_OUTPUT_CAP)
            os.close(out_r)
            send(ctl, {"case": i, "stdout": out.decode("utf-8", "replace"), "exit": code,
                       "timeout": code is None, "truncated": truncated})
            if code is None:
                break
    else:
        if role == "candidate":
            requests = fds.get("requests")
            if requests is None:  # call tests: every request is known up front
                lines = "".join(json.dumps(r) + "\n" for r in payload["requests"])
                requests = memfd_with(lines.encode())
            target = lambda: serve_calls(payload["code"], payload["names"], 3, 4, payload.get("partial", False),
                                         payload.get("opaque", False))
            fd_map = {3: requests, 4: fds["replies"]}
        else:
            role_fn = judge_asserts if role == "assert_judge" else judge
            target = lambda: role_fn(payload, 3, 4, 5)
            fd_map = {3: fds["requests"], 4: fds["replies"], 5: fds["verdict"]}
        pid = spawn(target, limits, fd_map)
        for fd in set(fd_map.values()):
            os.close(fd)
        code, _, _ = wait(pid, deadline)
        send(ctl, {"worker_exit": code, "timeout": code is None})
    os._exit(0)


if __name__ == "__main__":
    main()
