"""PythonSession and SessionPool: state lives exactly as long as one session's process, REPL-style
output, errors and timeouts have their own status, and every attack of test_code.py run inside a
session costs only that session: nothing it started outlives it, and a bystander session keeps its
state throughout.

Leftover processes are checked three ways: marker processes (a `sleep` whose argv carries a random
marker) are gone, every pid of the session's process tree seen before close() is gone after it, and
the session's cgroups are removed.
"""
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.verify.test_code import processes_with
from verify.code import _plan
from verify.session import STDOUT_CAP, PythonSession, SessionPool

ROOT = Path(__file__).resolve().parents[2]


def appears(marker: str, count: int = 1) -> bool:
    """Whether `count` marker processes show up within 2 s: a child resumes its parent (vfork) or
    is counted (fork) before its exec has set the argv that /proc shows."""
    for _ in range(100):
        if len(processes_with(marker)) >= count:
            return True
        time.sleep(0.02)
    return False


def descendants(pid: int) -> set[int]:
    """Pids of every live process below pid (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """A live process (a zombie awaiting its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tree_of(session: PythonSession) -> tuple[set[int], list[str]]:
    """The host pids of a session's process tree (root included) and its cgroup directories."""
    proc = session._slot[0]
    root = proc.box.proc.pid
    return descendants(root) | {root}, list(proc.box.cgroups.paths)


def assert_gone(pids: set[int], cgroups: list[str]) -> None:
    time.sleep(0.05)
    assert [p for p in pids if alive(p)] == []
    assert [c for c in cgroups if os.path.exists(c)] == []


def sleeper(marker: str, detach: bool = False) -> str:
    """Code that leaves `sleep 60` running with the marker as its argv[0] (GNU sleep would refuse it
    as a further argument); with detach, from a setsid'd double fork."""
    if detach:
        return ("import os\n"
                "if os.fork() == 0:\n"
                "    os.setsid()\n"
                "    if os.fork() == 0:\n"
                f"        os.execv('/bin/sleep', [{marker!r}, '60'])\n"
                "    os._exit(0)\n"
                "os.wait()\n")
    return f"import subprocess\n_p = subprocess.Popen([{marker!r}, '60'], executable='/bin/sleep')\n"


@pytest.fixture(scope="module")
def bystander():
    """A session that holds state while the attacks run in others; checked by `assert_bystander_fine`."""
    s = PythonSession()
    assert s.run("secret = 'kept'\ncounter = 0").status == "ok"
    yield s
    s.close()


def assert_bystander_fine(s: PythonSession) -> None:
    r = s.run("counter += 1\nsecret")
    assert (r.status, r.stdout, r.restarted) == ("ok", "'kept'\n", False), r


# ---------------------------------------------------------------------------------------------
# State and output
# ---------------------------------------------------------------------------------------------

def test_state_persists_within_a_session_and_not_across_sessions():
    with PythonSession() as a, PythonSession() as b:
        assert a.run("import math\nx = 41\ndef f(y):\n    return y + 1\n").status == "ok"
        assert b.run("x = 'other'").status == "ok"
        r = a.run("print(f(x), math.floor(2.5))")
        assert (r.status, r.stdout, r.restarted) == ("ok", "42 2\n", False)
        assert b.run("x").stdout == "'other'\n"
        r = b.run("f(1)")
        assert r.status == "error" and "NameError: name 'f' is not defined" in r.error
        # A script-like __main__: pickling a function defined in a cell works.
        r = a.run("import pickle, sys\nprint(__name__, sys.modules['__main__'].f is f)\npickle.loads(pickle.dumps(f))(1)")
        assert r.stdout == "__main__ True\n2\n", r
        # Files in the work dir persist between calls too.
        assert a.run("open('notes.txt', 'w').write('hi')").status == "ok"
        assert a.run("open('notes.txt').read()").stdout == "'hi'\n"
        assert "netns" in a.isolation and "uid_nobody" in a.isolation


def test_last_expression_repr_is_appended_like_a_notebook():
    with PythonSession() as s:
        cases = {
            "x = 6\nx * 7": "42\n",
            "print('a')\n'b'": "a\n'b'\n",
            "[1, 2][0]; {'k': (1, 2.5)}": "{'k': (1, 2.5)}\n",
            "print('only print')": "only print\n",       # the value of print(...) is None: not shown
            "None": "",
            "y = 3": "",
            "def g():\n    return 5\ng()": "5\n",
            "import sys\nprint('out')\nprint('err', file=sys.stderr)\n'end'": "out\nerr\n'end'\n",
            "": "",
        }
        for code, want in cases.items():
            r = s.run(code)
            assert (r.status, r.stdout) == ("ok", want), (code, r)


def test_errors_return_tracebacks_and_the_session_keeps_its_state():
    with PythonSession() as s:
        assert s.run("x = [1, 2]\ndef inv(v):\n    return 1 / v\n").status == "ok"
        r = s.run("print('partial')\ninv(0)")
        assert r.status == "error" and r.stdout == "partial\n" and not r.restarted
        lines = r.error.splitlines()
        assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: division by zero"
        assert "return 1 / v" in r.error and '"<cell 1>", line 3, in inv' in r.error
        assert "_sandbox_harness" not in r.error            # the harness's own frames are left out
        r = s.run("def broken(:\n    pass")
        assert r.status == "error" and "SyntaxError" in r.error
        for code in ("import sys\nsys.exit(3)", "raise KeyboardInterrupt", "raise MemoryError('fake')"):
            r = s.run(code)
            assert r.status == "error" and r.error.splitlines()[-1].split(":")[0] in (
                "SystemExit", "KeyboardInterrupt", "MemoryError"), (code, r)
        r = s.run("x.append(3)\nx")
        assert (r.status, r.stdout, r.restarted) == ("ok", "[1, 2, 3]\n", False)
        with pytest.raises(ValueError, match="code must be a string"):
            s.run(b"x")
        with pytest.raises(ValueError, match="timeout_s"):
            s.run("x", timeout_s=0)
        r = s.run("#" * (2 << 20))
        assert r.status == "error" and "more than the" in r.error and not r.restarted
        assert s.run("x").stdout == "[1, 2, 3]\n"


def test_timeout_kills_the_process_tree_and_the_next_call_restarts():
    marker = "session-timeout-" + secrets.token_hex(6)
    with PythonSession() as s:
        assert s.run("x = 1\n" + sleeper(marker)).status == "ok"
        assert appears(marker)
        pids, cgroups = tree_of(s)
        start = time.monotonic()
        r = s.run("print('spinning', flush=True)\nwhile True: pass", timeout_s=1.0)
        assert r.status == "timeout" and "time limit of 1 s" in r.error and r.stdout == "spinning\n"
        assert 1.0 <= r.seconds < 3.0 and time.monotonic() - start < 3.0
        assert_gone(pids, cgroups)
        assert processes_with(marker) == []
        r = s.run("x")
        assert r.status == "error" and r.restarted and "NameError" in r.error
        r = s.run("x = 2\nx")
        assert (r.status, r.stdout, r.restarted) == ("ok", "2\n", False)
        # A sleeping call is killed at its wall limit just the same (it uses no CPU).
        assert s.run("import time\ntime.sleep(30)", timeout_s=0.5).status == "timeout"
        assert s.run("x").restarted


def test_cpu_budget_covers_the_process_life():
    with PythonSession(cpu_s=1) as s:
        r = s.run("while True: pass", timeout_s=20.0)
        assert r.status == "error" and "SIGXCPU" in r.error and "CPU budget of 1 s" in r.error, r
        assert r.seconds < 5.0
        assert s.run("1 + 1").restarted


# ---------------------------------------------------------------------------------------------
# Attacks (the list of test_code.py, inside a session)
# ---------------------------------------------------------------------------------------------

def test_crashes_cost_only_their_own_session(bystander):
    fds = len(os.listdir("/proc/self/fd"))
    with PythonSession() as s:
        for code, cause in [("import os\nos._exit(3)", "exited with status 3"),
                            ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
                            ("import os\nos.close(4)", "exited with status 1"),  # its reply fails
                            ("import os\nos.write(4, b'\\xff\\xff\\xff\\xff')\nimport time\ntime.sleep(1)",
                             "broke the reply protocol")]:
            assert s.run("state = 1").status == "ok"
            pids, cgroups = tree_of(s)
            r = s.run(code)
            assert r.status == "error" and cause in r.error and "state is lost" in r.error, (code, r)
            assert_gone(pids, cgroups)
            r = s.run("state")
            assert r.restarted and "NameError" in r.error, (code, r)
            assert_bystander_fine(bystander)
    assert len(os.listdir("/proc/self/fd")) == fds          # the dead processes' pipes are closed too


def test_a_process_that_dies_between_calls_is_replaced_before_the_next():
    with PythonSession() as s:
        r = s.run("x = 1\nimport os, threading, time\n"
                  "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0)), daemon=True).start()")
        assert r.status == "ok"
        time.sleep(0.6)
        r = s.run("print('fresh')")
        assert (r.status, r.stdout, r.restarted) == ("ok", "fresh\n", True)


def test_memory_bombs_fail_without_hurting_anyone_else(bystander):
    with PythonSession(memory_mb=256) as s:
        assert s.run("x = 'still here'").status == "ok"
        r = s.run("hog = [bytearray(50 << 20) for _ in range(100)]")
        assert r.status == "error" and "MemoryError" in r.error and not r.restarted
        assert s.run("x").stdout == "'still here'\n"       # RLIMIT_AS: an ordinary, survivable error
        if "cgroup_memory" in s.isolation:
            # Four processes of 200 MB each pass the tree's 256 + 64 MB: the OOM killer stops some.
            r = s.run("import os, time\npids = []\n"
                      "for _ in range(4):\n"
                      "    pid = os.fork()\n"
                      "    if pid == 0:\n"
                      "        b = bytearray(200 << 20)\n"
                      "        for j in range(0, len(b), 4096): b[j] = 1\n"
                      "        time.sleep(0.5)\n"
                      "        os._exit(0)\n"
                      "    pids.append(pid)\n"
                      "[os.waitpid(p, 0)[1] for p in pids]", timeout_s=20.0)
            if r.status == "ok":
                assert "9" in r.stdout, r                    # a child died of SIGKILL (status 9)
            else:
                assert r.status == "error" and "out-of-memory" in r.error, r
    assert_bystander_fine(bystander)


def test_fork_bomb_is_capped_and_leaves_nothing_behind(bystander):
    marker = "session-forkbomb-" + secrets.token_hex(6)
    code = ("import os\n"
            "made = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            f"            os.execv('/bin/sleep', [{marker!r}, '30'])\n"
            "        made += 1\n"
            "    except OSError:\n"
            "        break\n"
            "made")
    s = PythonSession()
    r = s.run(code, timeout_s=10.0)
    made = int(r.stdout)
    assert r.status == "ok" and 0 < made < 64
    assert appears(marker, made) and len(processes_with(marker)) == made
    assert s.run("made").stdout == f"{made}\n"              # the session still answers at its cap
    assert_bystander_fine(bystander)
    pids, cgroups = tree_of(s)
    s.close()
    assert_gone(pids, cgroups)
    assert processes_with(marker) == []


def test_writes_outside_the_work_dir_do_not_reach_the_host(tmp_path, bystander):
    name = "session-outside-" + secrets.token_hex(6)
    targets = [f"/tmp/{name}", f"/dev/shm/{name}", f"/var/tmp/{name}", str(tmp_path / name),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
    code = ("import os\n"
            f"for path in {targets!r}:\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('escaped')\n"
            "    except OSError:\n"
            "        pass\n"
            "open('inside.txt', 'w').write('ok')\n"
            "print(os.getcwd(), os.listdir('.'), os.path.exists(" + repr(__file__) + "))\n")
    with PythonSession() as s:
        r = s.run(code)
        assert (r.status, r.stdout) == ("ok", "/sandbox ['inside.txt'] False\n"), r
    for path in targets:
        assert not os.path.exists(path), path
    assert_bystander_fine(bystander)


def test_killing_the_parent_and_setsid_double_fork_leave_the_caller_healthy(bystander):
    marker = "session-sleeper-" + secrets.token_hex(6)
    code = ("import os, signal\n"
            f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            + sleeper(marker, detach=True) + "x = 'alive'")
    s = PythonSession()
    r = s.run(code)
    assert r.status == "ok", r                               # the attack cannot even stop itself
    assert s.run("x").stdout == "'alive'\n"
    assert appears(marker)
    assert_bystander_fine(bystander)
    pids, cgroups = tree_of(s)
    s.close()
    assert_gone(pids, cgroups)
    assert processes_with(marker) == []


def test_huge_output_is_capped_in_the_caller(bystander):
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    before = rss_mb()
    with PythonSession() as s:
        r = s.run("import sys\nblock = 'x' * (1 << 20)\n"
                  "for _ in range(256):\n    sys.stdout.write(block)\n    sys.stderr.write(block)\n"
                  "'tail'", timeout_s=30.0)
        assert r.status == "ok" and len(r.stdout) < STDOUT_CAP + 100 and "more bytes discarded" in r.stdout, r.status
        r = s.run("'y' * (64 << 20)", timeout_s=30.0)          # a huge last-expression repr
        assert r.status == "ok" and r.stdout.startswith("'yyy") and len(r.stdout) < STDOUT_CAP + 100
        r = s.run("raise ValueError('z' * (8 << 20))")           # a huge traceback
        assert r.status == "error" and len(r.error) < 20_000 and r.error.endswith("zzz\n")
        assert s.run("print('small')").stdout == "small\n"
    assert rss_mb() - before < 100
    assert_bystander_fine(bystander)


def test_forged_replies_only_change_the_forger_s_own_results(bystander):
    with PythonSession() as s:
        # Forge the reply of call 1 before the real one: the session takes it (its own output is
        # what it lies about), and the stale real reply does not leak into the next call.
        r = s.run("import os, json\nd = json.dumps({'id': 1, 'status': 'ok'}).encode()\n"
                  "os.write(4, len(d).to_bytes(4, 'big') + d)\nraise ValueError('hidden')")
        assert r.status == "ok"
        r = s.run("print('next')")
        assert (r.status, r.stdout) == ("ok", "next\n")
    assert_bystander_fine(bystander)


# ---------------------------------------------------------------------------------------------
# Clean-up
# ---------------------------------------------------------------------------------------------

def test_close_is_idempotent_and_garbage_collection_cleans_up():
    marker = "session-close-" + secrets.token_hex(6)
    s = PythonSession()
    assert s.run(sleeper(marker)).status == "ok" and appears(marker)
    pids, cgroups = tree_of(s)
    s.close()
    s.close()
    assert s.closed and processes_with(marker) == []
    assert_gone(pids, cgroups)
    with pytest.raises(RuntimeError, match="closed"):
        s.run("1")
    s = PythonSession()
    assert s.run(sleeper(marker)).status == "ok" and appears(marker)
    pids, cgroups = tree_of(s)
    del s
    assert_gone(pids, cgroups)
    assert processes_with(marker) == []


def test_a_session_does_not_outlive_its_parent_process():
    """The parent killed with SIGKILL runs no clean-up: the lifeline pipe's EOF ends the sandbox."""
    marker = "session-orphan-" + secrets.token_hex(6)
    script = textwrap.dedent(f"""
        import sys, time
        from verify.session import PythonSession
        s = PythonSession()
        r = s.run({sleeper(marker)!r} + "import time\\ntime.sleep(0.01)")
        print(r.status, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        assert appears(marker)
    finally:
        child.kill()
        child.wait()
    for _ in range(100):
        if not processes_with(marker):
            break
        time.sleep(0.05)
    assert processes_with(marker) == []
    # Nobody was left to remove the dead parent's cgroups: they must be empty; remove them here.
    left = [os.path.join(parent, name) for parent in _plan("auto").cgroup_dirs for name in os.listdir(parent)
            if name.startswith(f"r1-sandbox-{child.pid}-")]

    def members(path):
        with open(os.path.join(path, "cgroup.procs")) as f:
            return f.read().split()
    for _ in range(100):   # the supervisor exits on the lifeline's EOF, a moment after its sandbox's last child
        if not any(members(p) for p in left):
            break
        time.sleep(0.05)
    for path in left:
        assert members(path) == [], path
        os.rmdir(path)


@pytest.mark.filterwarnings("ignore:verify.code sandbox runs without")
@pytest.mark.parametrize("isolation", ["userns", "process"])
def test_fallback_isolation_modes_keep_state_and_clean_up(isolation, monkeypatch):
    # its warning about the missing layers is verify.code's once-per-process one: a set of its own
    # here, so that tests of that warning (tests/verify/test_code.py) see it whatever runs first
    import verify.code
    monkeypatch.setattr(verify.code, "_warned", set())
    marker = "session-fallback-" + secrets.token_hex(6)
    s = PythonSession(isolation=isolation)
    assert s.run("x = 5\n" + sleeper(marker, detach=True)).status == "ok" and appears(marker)
    assert s.run("x * 2").stdout == "10\n"
    assert ("netns" in s.isolation) == (isolation == "userns")
    assert s.run("while True: pass", timeout_s=0.5).status == "timeout"
    time.sleep(0.1)
    assert processes_with(marker) == []
    assert s.run("x").restarted
    s.close()


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------

def _wait_ready(pool: SessionPool, n: int, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while pool.ready() < n and time.monotonic() < end:
        time.sleep(0.02)
    assert pool.ready() == n


def test_pool_hands_out_warm_fresh_sessions_and_refills():
    with SessionPool(size=2) as pool:
        _wait_ready(pool, 2)
        a = pool.acquire()
        assert pool.warm_hits == 1 and a._slot[0].hello     # already waiting for its first command
        r = a.run("x = 'a'\nx")
        assert (r.status, r.stdout, r.restarted) == ("ok", "'a'\n", False)
        b, c = pool.acquire(), pool.acquire()               # the third may find the pool empty
        assert pool.warm_hits + pool.cold_starts == 3
        assert all("NameError" in t.run("x").error for t in (b, c))
        pids, cgroups = tree_of(a)
        pool.release(a)
        assert a.closed
        assert_gone(pids, cgroups)
        _wait_ready(pool, 2)


def test_pool_from_eight_threads_at_once():
    def rollout(i: int) -> list:
        s = pool.acquire()
        try:
            seen = []
            assert s.run(f"me = {i}\nnames = set()").status == "ok"
            for step in range(3):
                r = s.run(f"time_step = {step}\nsorted(k for k in globals() if not k.startswith('__')), me")
                seen.append(r.stdout)
                time.sleep(0.01)
            return seen
        finally:
            pool.release(s)

    before, fds = descendants(os.getpid()), len(os.listdir("/proc/self/fd"))
    with SessionPool(size=4) as pool:
        _wait_ready(pool, 4)
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(rollout, range(8)))
        assert pool.warm_hits + pool.cold_starts == 8 and pool.warm_hits >= 1
    for i, seen in enumerate(results):
        assert seen == [f"(['me', 'names', 'time_step'], {i})\n"] * 3, (i, seen)
    time.sleep(0.05)
    assert {p for p in descendants(os.getpid()) - before if alive(p)} == set()
    assert len(os.listdir("/proc/self/fd")) == fds          # every pipe of every session closed
    assert not [t for t in threading.enumerate() if t.name == "SessionPool-refill"]


def test_pool_close_is_idempotent_and_kills_handed_out_sessions():
    pool = SessionPool(size=2)
    s = pool.acquire()
    assert s.run("x = 1").status == "ok"
    pids, cgroups = tree_of(s)
    pool.close()
    pool.close()
    assert s.closed
    assert_gone(pids, cgroups)
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire()
    with pytest.raises(ValueError, match="size"):
        SessionPool(size=-1)
