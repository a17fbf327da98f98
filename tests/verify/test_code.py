"""The code sandbox: honest programs pass, partial passes are counted, and no attack passes,
escapes, outlives the call or hurts the calling process.

Each attack runs against a small task (`add`, or doubling numbers on stdin) whose correct answer the
attacker does not compute, so "not pass" means the sandbox did not let it fake one. The isolation
layers are checked on this machine directly (network, files outside the sandbox, environment,
process cap, leftover processes).
"""
import os
import secrets
import socket
import time

import pytest

from verify._sandbox_harness import Unserialisable, decode, encode
from verify.code import (AssertTest, CallTest, CodeResult, HumanEvalTest, IOTest, as_test,
                         normalise_output, run_tests, values_equal)

ADD_TEST = HumanEvalTest(
    test="def check(candidate):\n"
         "    assert candidate(1, 2) == 3\n"
         "    assert candidate(-5, 5) == 0\n"
         "    assert candidate(10, 32) == 42\n",
    entry_point="add")
ADD_CALLS = CallTest("add", (([1, 2], 3), ([-5, 5], 0), ([10, 32], 42)))
DOUBLE_IO = IOTest((("1\n2\n", "2\n4\n"), ("21", "42")))
ADD_ASSERTS = AssertTest(("assert add(1, 2) == 3", "assert add(-5, 5) == 0", "assert add(10, 32) == 42"))


def run_all_kinds(code: str, **kw) -> list[CodeResult]:
    """The attack as a candidate for a HumanEval test, a call test, a stdin/stdout test and assert
    tests (MBPP style; more of them in test_mbpp.py)."""
    return [run_tests(code, t, **kw) for t in (ADD_TEST, ADD_CALLS, DOUBLE_IO, ADD_ASSERTS)]


def assert_none_pass(results):
    for r in results:
        assert r.status != "pass" and r.passed < r.total, r


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line holds marker."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


# ---------------------------------------------------------------------------------------------
# Honest programs
# ---------------------------------------------------------------------------------------------

def test_correct_solutions_pass_every_kind():
    code = ("def add(a, b):\n    return a + b\n"
            "if __name__ == '__main__':\n"
            "    import sys\n"
            "    print('\\n'.join(str(2 * int(x)) for x in sys.stdin.read().split()))\n")
    for r in run_all_kinds(code):
        assert (r.status, r.passed, r.total) == ("pass", r.total, r.total), r
    r = run_tests(code, ADD_TEST)
    assert "netns" in r.isolation and "uid_nobody" in r.isolation and r.stdout == ""


def test_partial_passes_are_counted():
    code = "def add(a, b):\n    return a + b if a > 0 else 7\n"
    r = run_tests(code, ADD_CALLS)
    assert (r.status, r.passed, r.total, r.cases) == ("fail", 2, 3, [True, False, True])
    assert "case 1" in r.message and "expected 0" in r.message
    r = run_tests("import sys\nfor x in sys.stdin.read().split():\n    print(2 * int(x) if int(x) < 20 else 0)\n",
                  DOUBLE_IO)
    assert (r.status, r.passed, r.total) == ("fail", 1, 2)
    assert run_tests(code, ADD_TEST).status == "fail"  # HumanEval checks are all-or-nothing


def test_stdin_stdout_whitespace_is_normalised_and_exit_status_counts():
    r = run_tests("print('  2 \\t 3  ')\nprint()\n", [("", "2 3\n"), ("", "2 3")])
    assert (r.status, r.passed) == ("pass", 2)
    assert normalise_output(" a  b \n\n c\n\n") == "a b\nc"
    r = run_tests("print(42)\nraise SystemExit(3)\n", [("", "42")])
    assert r.status == "error" and r.cases == [False] and "exit status 3" in r.message


def test_errors_timeouts_and_load_failures_have_their_own_status():
    assert run_tests("def add(a, b) return a", ADD_TEST).status == "error"
    assert run_tests("def other(a, b):\n    return a + b\n", ADD_CALLS).status == "error"
    r = run_tests("raise ValueError('boom at import')\n", ADD_TEST)
    assert r.status == "error" and "boom at import" in r.message
    r = run_tests("def add(a, b):\n    return 1 / 0\n", ADD_TEST)
    assert r.status == "fail" and "ZeroDivisionError" in r.message


def test_values_cross_as_plain_data_and_are_compared_strictly():
    value = {1: (2.5, [b"x", None]), "s": {frozenset({1}), 3}, (1, 2): [True, float("nan"), -2 + 0.5j]}
    back = decode(encode(value))
    assert values_equal(back, value) and type(back[(1, 2)][0]) is bool
    liar = type("Liar", (complex,), {"real": property(lambda self: 99.0), "__eq__": lambda s, o: True})
    assert type(decode(encode(liar(1, 2)))) is complex and decode(encode(liar(1, 2))) == 1 + 2j
    assert not values_equal(True, 1) and not values_equal(1, "1") and values_equal(2, 2.0)
    assert values_equal([1, [2]], (1, (2,))) and not values_equal({"a": 1}, {"a": True})
    with pytest.raises(Unserialisable):
        encode(object())
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(Unserialisable):
        encode(cyclic)


def test_bad_test_specs_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="fn_name"):
        as_test({"kind": "call", "cases": []})
    with pytest.raises(ValueError, match="case 0"):
        as_test([("only stdin",)])
    assert as_test({"test": "x", "entry_point": "f", "prompt": "p"}) == HumanEvalTest("x", "f", "p")


# ---------------------------------------------------------------------------------------------
# Resource attacks
# ---------------------------------------------------------------------------------------------

def test_infinite_loop_times_out():
    start = time.monotonic()
    results = run_all_kinds("def add(a, b):\n    while True: pass\nwhile True: pass\n", timeout_s=1.0)
    assert all(r.status == "timeout" for r in results), results
    assert time.monotonic() - start < 4 * (1.0 + 3.0)


def test_deep_recursion_and_memory_bomb_fail_without_hurting_the_caller():
    rec = ("import sys\nsys.setrecursionlimit(10**9)\n"
           "def add(a, b):\n    return add(a, b)\n")
    assert_none_pass([run_tests(rec, t, timeout_s=2.0, memory_mb=256) for t in (ADD_TEST, ADD_CALLS)])
    bomb = "def add(a, b):\n    x = [bytearray(50 << 20) for _ in range(1000)]\n    return a + b\n"
    results = [run_tests(bomb, ADD_TEST, memory_mb=256), run_tests(bomb, ADD_CALLS, memory_mb=256)]
    assert_none_pass(results)
    assert "MemoryError" in results[0].message


def test_fork_bomb_is_capped_and_leaves_nothing_behind():
    marker = "forkbomb-" + secrets.token_hex(6)
    code = ("import os, time\n"
            f"MARK = {marker!r}\n"
            "made = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.execv('/bin/sleep', ['sleep', '30', MARK])\n"
            "        made += 1\n"
            "    except OSError:\n"
            "        break\n"
            "print('forked', made, flush=True)\n"
            "def add(a, b):\n    return 0\n")
    r = run_tests(code, ADD_CALLS)
    made = int(r.stdout.split()[1])
    assert 0 < made < 64 and r.status == "fail"
    assert processes_with(marker) == []


def test_gigabyte_of_output_is_capped_in_the_caller():
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    before = rss_mb()
    code = ("import sys\nblock = 'x' * (1 << 20)\n"
            "for _ in range(1024):\n    sys.stdout.write(block)\n    sys.stderr.write(block)\n"
            "def add(a, b):\n    return a + b\n")
    r = run_tests(code, ADD_CALLS, timeout_s=20.0)
    assert rss_mb() - before < 100
    assert len(r.stdout) < 100_000 and "more bytes discarded" in r.stdout
    r = run_tests("print('x' * (64 << 20))\n", [("", "x")], timeout_s=20.0)
    assert r.status == "fail" and len(r.stdout) <= 64 << 10
    assert rss_mb() - before < 100


# ---------------------------------------------------------------------------------------------
# Escapes
# ---------------------------------------------------------------------------------------------

def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = ("import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('blocked', e)\n"
            "def add(a, b):\n    return a + b\n")
    r = run_tests(code, ADD_CALLS)
    assert r.stdout.startswith("blocked"), r.stdout
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()


def test_writes_outside_the_sandbox_do_not_reach_the_host(tmp_path):
    name = "outside-" + secrets.token_hex(6)
    targets = [f"/tmp/{name}", f"/dev/shm/{name}", f"/var/tmp/{name}", str(tmp_path / name),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
    code = ("import os\n"
            f"for path in {targets!r}:\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('escaped')\n"
            "        print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print('refused', path, type(e).__name__)\n"
            "open('inside.txt', 'w').write('ok')\n"
            "print('cwd', os.getcwd(), os.listdir('.'))\n"
            "def add(a, b):\n    return a + b\n")
    r = run_tests(code, ADD_CALLS)
    assert r.status == "pass" and "cwd /sandbox ['inside.txt']" in r.stdout, r.stdout
    for path in targets:
        assert not os.path.exists(path), path
    # The project and the benchmark data are not even visible.
    r = run_tests("import os\nprint(os.listdir('/'))\nprint(os.path.exists(" + repr(__file__) + "))\n", [("", "")])
    assert "False" in r.stdout and "'work'" not in r.stdout and "'root'" in r.stdout


def test_environment_secrets_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("R1_SECRET_TEST", "x-secret-value")
    r = run_tests("import os\nprint(sorted(os.environ.items()))\nprint(open('/proc/1/environ','rb').read())\n",
                  [("", "")])
    assert "x-secret-value" not in r.stdout + r.stderr and "R1_SECRET_TEST" not in r.stdout
    assert "PYTHONHASHSEED" in r.stdout


def test_killing_the_parent_and_setsid_double_fork_leave_the_caller_healthy():
    marker = "sleeper-" + secrets.token_hex(6)
    code = ("import os, signal\n"
            f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '60', {marker!r}])\n"
            "    os._exit(0)\n"
            "os.wait()\n"
            "def add(a, b):\n    return a + b\n")
    results = [run_tests(code, ADD_TEST), run_tests(code, ADD_CALLS)]
    assert [r.status for r in results] == ["pass", "pass"]   # the attack cannot even stop itself
    time.sleep(0.1)
    assert processes_with(marker) == []


# ---------------------------------------------------------------------------------------------
# Faked passes
# ---------------------------------------------------------------------------------------------

FAKES = {
    "os._exit before tests": "import os\nos._exit(0)\n",
    "sys.exit before tests": "import sys\nsys.exit(0)\n",
    "exit in the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    raise AssertionError\n",
    "excepthook": "import sys\nsys.excepthook = lambda *a: None\ndef add(a, b):\n    return None\n",
    "settrace": ("import sys\n"
                 "def tracer(frame, event, arg):\n    frame.f_trace_lines = False\n    return None\n"
                 "sys.settrace(tracer)\ndef add(a, b):\n    return -1\n"),
    "builtins patched": ("import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                         "builtins.print = lambda *a, **k: None\n__builtins__['AssertionError'] = Exception\n"
                         "def add(a, b):\n    return None\n"),
    "unittest patched": ("import unittest\nunittest.TestCase.assertEqual = lambda *a: None\n"
                         "unittest.TestCase.run = lambda self, result=None: result\n"
                         "def add(a, b):\n    return None\n"),
    "SkipTest at load": "import unittest\nraise unittest.SkipTest('skip')\n",
    "SkipTest in the call": "import unittest\ndef add(a, b):\n    raise unittest.SkipTest('skip')\n",
    "success markers": ("import json, os\nprint('All tests passed')\nprint(json.dumps({'verdict': 'pass'}))\n"
                        "print(json.dumps({'loaded': True}))\nprint(json.dumps({'ok': ['i', '0x3']}))\n"
                        "for fd in range(3, 64):\n"
                        "    try:\n        os.write(fd, b'{\"verdict\":\"pass\"}\\n{\"ok\":[\"i\",\"0x3\"]}\\n')\n"
                        "    except OSError:\n        pass\n"
                        "def add(a, b):\n    print('PASS'); return None\n"),
    "fake result files": ("import os\nfor p in ('result.json', '/tmp/result.json', 'verdict', '../result.json'):\n"
                          "    try:\n        open(p, 'w').write('{\"verdict\": \"pass\", \"passed\": 3, \"total\": 3}')\n"
                          "    except OSError:\n        pass\n"
                          "def add(a, b):\n    return None\n"),
    "always-equal object": ("class Eq:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
                            "    __hash__ = object.__hash__\n"
                            "def add(a, b):\n    return Eq()\n"),
    "int subclass equal to everything": ("class Liar(int):\n    def __eq__(self, other): return True\n"
                                         "    def __ne__(self, other): return False\n    __hash__ = int.__hash__\n"
                                         "def add(a, b):\n    return Liar(0)\n"),
    "lying __class__": ("class Fake:\n    __class__ = int\n    def __eq__(self, other): return True\n"
                        "def add(a, b):\n    return Fake()\n"),
    "patched harness": ("import sys\nh = sys.modules.get('__main__')\n"
                        "if h is not None and hasattr(h, 'encode'):\n"
                        "    h.encode = lambda x, depth=0: ['i', '0x3']\n"
                        "def add(a, b):\n    return None\n"),
}


@pytest.mark.parametrize("name", sorted(FAKES))
def test_faked_passes_do_not_pass(name):
    results = run_all_kinds(FAKES[name], timeout_s=3.0)
    assert_none_pass(results)
    if "patched harness" in name:  # the forged channel carries 3 for every call: 1 of 3 right
        assert results[1].passed == 1 and results[3].cases == [True, False, False]


def test_stdin_stdout_attacks_do_not_pass():
    attacks = ["import os\nos._exit(0)\n",
               "print('2\\n4')\n",                      # the first case's answer for every case
               "import sys\nsys.stdout.write('42')\nsys.stdout.flush()\nimport os\nos.kill(os.getpid(), 9)\n"]
    for code in attacks:
        r = run_tests(code, DOUBLE_IO)
        assert r.status != "pass" and r.passed < 2, (code, r)


# ---------------------------------------------------------------------------------------------
# Weaker isolation modes (what a machine without root or without namespaces gets)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isolation", ["userns", "process"])
def test_fallback_modes_judge_the_same_and_clean_up(isolation):
    marker = "fallback-" + secrets.token_hex(6)
    sleeper = ("import os\n"
               "if os.fork() == 0:\n    os.setsid()\n"
               f"    os.execv('/bin/sleep', ['sleep', '60', {marker!r}])\n")
    with pytest.warns(RuntimeWarning, match="sandbox runs without"):
        good = run_tests(sleeper + "def add(a, b):\n    return a + b\n", ADD_TEST, isolation=isolation)
    bad = run_tests(FAKES["int subclass equal to everything"], ADD_TEST, isolation=isolation)
    assert (good.status, bad.status) == ("pass", "fail")
    assert ("netns" in good.isolation) == (isolation == "userns")
    time.sleep(0.1)
    assert processes_with(marker) == []
