"""Assert tests (MBPP's test_list): per-assert counts, the judge/candidate split holds against
cheats, unsupported rows are refused with a reason (and give no reward), and MBPP's own reference
solutions pass while broken variants fail.

Each run_tests call here starts two sandboxes (candidate and judge, ~0.1 s); the data test runs a
fixed sample of rows through a thread pool, as a reward worker would.
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from verify.code import AssertTest, as_test, run_tests
from verify.code_asserts import assert_plan
from verify.rewards import REWARDS, code_tests

REMOVE_OCC = ('assert remove_Occ("hello","l") == "heo"',      # MBPP/11, plus one challenge assert
              'assert remove_Occ("abcda","a") == "bcd"',
              'assert remove_Occ("PHP","P") == "H"',
              'assert remove_Occ("hellolloll","l") == "helollol"')
RIGHT = ("def remove_Occ(s, ch):\n"
         "    s = s.replace(ch, '', 1)\n"
         "    i = s.rfind(ch)\n"
         "    return s if i < 0 else s[:i] + s[i + 1:]\n")
ALL_OCCURRENCES = "def remove_Occ(s, ch):\n    return s.replace(ch, '')\n"   # right on the first three only
PAIR_TESTS = ("assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3",)
PAIR_SOLUTION = ("class Pair(object):\n"
                 "    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n"
                 "def max_chain_length(arr, n):\n    return 3\n")


# ---------------------------------------------------------------------------------------------
# Counting, per assert
# ---------------------------------------------------------------------------------------------

def _plan_of(test):
    return assert_plan(test.asserts, test.setup)


def test_a_right_solution_passes_every_assert():
    r = run_tests(RIGHT, list(REMOVE_OCC))
    assert (r.status, r.passed, r.total, r.cases, r.unsupported) == ("pass", 4, 4, [True] * 4, False)
    assert "netns" in r.isolation and "uid_nobody" in r.isolation


def test_a_wrong_solution_is_counted_assert_by_assert():
    r = run_tests(ALL_OCCURRENCES, list(REMOVE_OCC))
    assert (r.status, r.passed, r.total, r.cases) == ("fail", 3, 4, [True, True, True, False])
    assert r.message.startswith("assert 3 failed: ") and "hellolloll" in r.message and "AssertionError" in r.message
    # An exception in one call fails that assert only; the ones after it still run.
    raises_once = RIGHT + "_right = remove_Occ\ndef remove_Occ(s, ch):\n" \
                          "    if s == 'abcda':\n        raise ValueError('boom')\n    return _right(s, ch)\n"
    r = run_tests(raises_once, list(REMOVE_OCC))
    assert (r.status, r.passed, r.cases) == ("fail", 3, [True, False, True, True])
    assert "assert 1 failed" in r.message and "ValueError: boom" in r.message


def test_an_exception_in_the_solution_fails_every_assert_with_its_message():
    r = run_tests("def remove_Occ(s, ch):\n    return 1 / 0\n", list(REMOVE_OCC))
    assert (r.status, r.passed, r.total, r.cases) == ("fail", 0, 4, [False] * 4)
    assert "ZeroDivisionError: division by zero" in r.message
    # A solution's own exception class is not a builtin: it arrives as CandidateRaised, still a failure.
    r = run_tests("class Oops(Exception):\n    pass\ndef remove_Occ(s, ch):\n    raise Oops('no')\n", list(REMOVE_OCC))
    assert r.passed == 0 and "CandidateRaised: Oops: no" in r.message


def test_a_solution_defining_only_some_names_passes_only_the_asserts_on_those():
    tests = ["assert add(1, 2) == 3", "assert mul(2, 3) == 6", "assert add(mul(2, 2), 1) == 5", "assert add(0, 0) == 0"]
    assert _plan_of(AssertTest(tuple(tests))).names == ("add", "mul")
    r = run_tests("def add(a, b):\n    return a + b\n", tests)
    assert (r.status, r.cases) == ("fail", [True, False, False, True])
    assert "NameError: name 'mul' is not defined" in r.message
    r = run_tests("def add(a, b):\n    return a + b\ndef mul(a, b):\n    return a * b\n", tests)
    assert (r.status, r.passed) == ("pass", 4)
    r = run_tests("def other(a, b):\n    return a + b\n", tests)    # none of them: a load error
    assert (r.status, r.passed, r.total) == ("error", 0, 4) and "does not define 'add', 'mul'" in r.message


def test_a_timeout_counts_the_asserts_not_reached_as_failed():
    code = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    start = time.monotonic()
    r = run_tests(code, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"], timeout_s=1.0)
    assert (r.status, r.passed, r.total, r.cases) == ("timeout", 1, 3, [True, False, False])
    assert "time limit of 1.0s exceeded" in r.message and time.monotonic() - start < 1.0 + 3.0 + 1.0


def test_setup_runs_in_the_judge_before_the_asserts():
    area = "import math\ndef area(r):\n    return math.pi * r * r\n"
    r = run_tests(area, AssertTest(("assert math.isclose(area(2), 12.566, rel_tol=1e-3)",
                                    "assert math.isclose(area(1), 3.0, rel_tol=1e-3)"), setup="import math"))
    assert (r.status, r.cases) == ("fail", [True, False])      # math.isclose really compares
    r = run_tests(area, AssertTest(("assert close(area(1), 3.14159, rel_tol=1e-4)",
                                    "assert sort_list(DATA) == sorted(DATA)"),
                                   setup="from math import isclose as close\nDATA = [3, 1, 2]"))
    assert r.cases == [True, False] and "NameError: name 'sort_list'" in r.message
    plan = _plan_of(AssertTest(("assert close(area(1), 3.14159)", "assert sort_list(DATA) == 1"),
                                   setup="from math import isclose as close\nDATA = [3, 1, 2]"))
    assert plan.names == ("area", "sort_list") and plan.modules == ()
    # A standard-library module read only as `mod.attr` is imported by the judge (MBPP/596 relies
    # on the solution's own `import sys`); names bound inside an assert are not the program's.
    plan = _plan_of(AssertTest(("assert size((1, 2)) == sys.getsizeof((1, 2))",
                                    "assert all(size(x) > 0 for x in [(1,), ()])", "assert (lambda y: y)(1)")))
    assert plan.names == ("size",) and plan.modules == ("sys",)
    r = run_tests("import sys\ndef size(t):\n    return sys.getsizeof(t)\n",
                  ["assert size((1, 2)) == sys.getsizeof((1, 2))", "assert all(size(x) > 0 for x in [(1,), ()])"])
    assert (r.status, r.passed) == ("pass", 2)


def test_non_plain_results_cross_as_their_truth_value_only():
    regex = "import re\ndef starts_ab(s):\n    return re.match('ab', s)\n"       # MBPP/737 style
    r = run_tests(regex, ["assert starts_ab('abc')", "assert not starts_ab('xbc')",
                          "assert starts_ab('abc') == starts_ab('abc')", "assert starts_ab('abc').group() == 'ab'"])
    assert r.cases == [True, True, False, False]
    r = run_tests("def polar(x):\n    return complex(x, 1)\n", ["assert polar(2) == 2 + 1j", "assert polar(2j) == 1"])
    assert r.cases == [True, False] and "AssertionError" in r.message and "Unserialisable" not in r.message


# ---------------------------------------------------------------------------------------------
# Cheats: the verdict is the judge's
# ---------------------------------------------------------------------------------------------

CHEATS = {
    "lying __eq__": ("class Eq:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
                     "    __hash__ = object.__hash__\n"
                     "def remove_Occ(s, ch):\n    return Eq()\n"),
    "str subclass with a lying __eq__": ("class S(str):\n    def __eq__(self, other): return True\n"
                                         "    __hash__ = str.__hash__\n"
                                         "def remove_Occ(s, ch):\n    return S('nope')\n"),
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "os._exit(0) in the call": "import os\ndef remove_Occ(s, ch):\n    os._exit(0)\n",
    "prints pass": ("import json\nprint('pass'); print('All tests passed')\nprint(json.dumps({'done': True}))\n"
                    "def remove_Occ(s, ch):\n    print(json.dumps({'case': 0, 'ok': True}))\n    return None\n"),
    "writes verdicts to every fd": ("import os\n"
                                    "def remove_Occ(s, ch):\n"
                                    "    for fd in range(3, 64):\n"
                                    "        try:\n"
                                    "            os.write(fd, b'{\"case\":0,\"ok\":true}\\n{\"case\":1,\"ok\":true}\\n'\n"
                                    "                         b'{\"case\":2,\"ok\":true}\\n{\"case\":3,\"ok\":true}\\n{\"done\":true}\\n')\n"
                                    "        except OSError:\n"
                                    "            pass\n"
                                    "    return None\n"),
    "monkeypatches builtins": ("import builtins\n"
                               "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
                               "builtins.isinstance = lambda *a: True\nbuiltins.str = lambda *a: 'heo'\n"
                               "builtins.set = lambda *a: set()\n"
                               "def remove_Occ(s, ch):\n    return 0\n"),
    "sys.exit in the call": "import sys\ndef remove_Occ(s, ch):\n    sys.exit(0)\n",
}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_cheats_do_not_pass(name):
    r = run_tests(CHEATS[name], list(REMOVE_OCC), timeout_s=3.0)
    assert r.status != "pass" and r.passed == 0 and not r.unsupported, r


def test_a_program_cannot_replace_builtins_the_asserts_use():
    # Were `set` forwarded to the program, both sides would be its 0 and the assert would hold.
    r = run_tests("def set(x):\n    return 0\ndef pair(x):\n    return [9, 9]\n", ["assert set(pair(1)) == set((1, 2))"])
    assert (r.status, r.passed) == ("fail", 0)
    # Asserts that call only builtins (MBPP/126's solution is named `sum`) cannot judge anything.
    r = run_tests("def sum(a, b):\n    return 6\n", ["assert sum(10, 15) == 6", "assert sum(4, 6) == 3"])
    assert (r.status, r.passed, r.total, r.cases, r.unsupported) == ("error", 0, 2, [False, False], True)
    assert "call no function the program could define" in r.message and "(sum)" in r.message


# ---------------------------------------------------------------------------------------------
# Objects of the solution's classes cannot cross: refused, with no reward
# ---------------------------------------------------------------------------------------------

def test_tests_constructing_the_solutions_classes_are_refused_with_the_reason():
    r = run_tests(PAIR_SOLUTION, list(PAIR_TESTS))
    assert (r.status, r.passed, r.total, r.unsupported, r.isolation) == ("error", 0, 1, True, ())
    assert r.message == ("assert tests construct objects of the solution's class 'Pair': objects cannot cross "
                         "the sandbox boundary (only built-in values do); such tests are not supported")
    # A tree built by the setup (MBPP/367's test_setup_code), and attributes of an object.
    node = "class Node:\n    def __init__(self, v):\n        self.v, self.left = v, None\ndef depth(t):\n    return 1\n"
    r = run_tests(node, AssertTest(("assert depth(root) == 2",), setup="root = Node(1)\nroot.left = Node(2)"))
    assert r.unsupported and "class 'Node'" in r.message
    assert run_tests(node, ["assert Node(3).v == 3"]).unsupported
    # Without a class of that name in the program the tests run (and here fail: Pair is missing).
    r = run_tests("def max_chain_length(arr, n):\n    return 3\n", list(PAIR_TESTS))
    assert (r.status, r.unsupported) == ("fail", False) and "NameError: name 'Pair'" in r.message


def test_a_class_named_like_the_tested_function_is_an_ordinary_failure():
    # Were any class refused, a failing program could turn its 0 into "no signal" this way.
    sneaky = "class remove_Occ:\n    def __init__(self, s, ch):\n        self.s = s\n"
    r = run_tests(sneaky, list(REMOVE_OCC))
    assert (r.status, r.passed, r.unsupported) == ("fail", 0, False)
    rewards = REWARDS["code"]([sneaky, RIGHT, PAIR_SOLUTION], test_list=[list(REMOVE_OCC)] * 2 + [list(PAIR_TESTS)])
    assert rewards == [0.0, 1.0, None]


# ---------------------------------------------------------------------------------------------
# Test specs and data rows
# ---------------------------------------------------------------------------------------------

def test_assert_test_forms_and_mixed_lists():
    want = AssertTest(("assert f(1) == 1",), "import math")
    assert as_test({"kind": "asserts", "asserts": ["assert f(1) == 1"], "setup": "import math"}) == want
    assert as_test(["assert f(1) == 1"]) == AssertTest(("assert f(1) == 1",))
    assert as_test([("1\n", "2\n")]).cases == (("1\n", "2\n"),)           # pairs of strings stay io cases
    with pytest.raises(ValueError, match=r"assert test 1: expected an assert statement string .*got \('in', 'out'\)"):
        as_test(["assert f(1) == 1", ("in", "out")])
    with pytest.raises(ValueError, match=r"io test case 1: expected a \(stdin, expected_stdout\) pair"):
        as_test([("in", "out"), "assert f(1) == 1"])
    with pytest.raises(ValueError, match="assert 1: not Python"):
        as_test(["assert f(1) == 1", "assert f(1) =="])
    with pytest.raises(ValueError, match="'asserts'"):
        as_test({"kind": "asserts", "setup": "import math"})


def test_code_tests_reads_mbpp_rows_and_the_reward_counts_asserts():
    sanitized = {"prompt": "Write a function ...", "test_list": list(REMOVE_OCC), "test_imports": ["import math"]}
    full = {"text": "Write a function ...", "test_list": json.dumps(list(REMOVE_OCC)), "test_setup_code": "x = 1"}
    assert code_tests(sanitized) == AssertTest(REMOVE_OCC, "import math")
    assert code_tests(full) == AssertTest(REMOVE_OCC, "x = 1")
    with pytest.raises(ValueError, match="test_imports"):
        code_tests({"test_list": list(REMOVE_OCC), "test_imports": [1]})
    got = REWARDS["code"](["```python\n" + RIGHT + "```", ALL_OCCURRENCES, "no code"],
                          test_list=[list(REMOVE_OCC)] * 3, test_imports=[[], ["import math"], []],
                          prompt=["Write remove_Occ."] * 3)
    assert got == [1.0, 0.75, 0.0]


# ---------------------------------------------------------------------------------------------
# MBPP's reference solutions
# ---------------------------------------------------------------------------------------------

WORKERS = 4
# A fixed sample (every 8th row) plus the rows that exercise a special path: 124/590 complex
# values, 596 sys.getsizeof without an import, 737 a re.Match for `assert f(x)`, 126 unsupported.
# MBPP/123 (amicable numbers to 9999, ~8 s) is left out to keep the test short.
SPECIAL = {124, 126, 590, 596, 737}
UNSUPPORTED = {126: "call no function the program could define"}


def _rows(shared_data_dir, name):
    path = shared_data_dir / name
    if not path.exists():
        if os.environ.get("R1_REQUIRE_DATA") == "1":
            pytest.fail(f"{path} not found; R1_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(f"{path} not found")
    with open(path) as f:
        return [json.loads(line) for line in f]


def _run_all(jobs):
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], timeout_s=10.0), jobs))


def test_mbpp_reference_solutions_pass_and_broken_ones_fail(shared_data_dir):
    rows = _rows(shared_data_dir, "mbpp_sanitized.jsonl")
    assert len(rows) == 427
    sample = [row for i, row in enumerate(rows) if i % 8 == 0 or row["task_id"] in SPECIAL]
    tests = [code_tests(row) for row in sample]
    # Breaking rule: redefine, after the reference code, every function the asserts call as
    # `return None`. Some asserts expect a falsy value and still pass; no row passes all of them.
    broken = [row["code"] + "\n" + "".join(f"\ndef {name}(*args, **kwargs):\n    return None\n"
                                           for name in assert_plan(test.asserts, test.setup).names)
              for row, test in zip(sample, tests)]

    start = time.monotonic()
    results = _run_all([(row["code"], t) for row, t in zip(sample, tests)] + list(zip(broken, tests)))
    wall = time.monotonic() - start
    good, bad = results[:len(sample)], results[len(sample):]
    refused = {row["task_id"]: r.message for row, r in zip(sample, good) if r.unsupported}
    print(f"\nmbpp sandbox: {len(sample)} reference solutions + {len(sample)} broken in {wall:.1f} s wall with "
          f"{WORKERS} threads; {len(sample) - len(refused)} judged, {len(refused)} refused: {sorted(refused)}")

    assert sorted(refused) == sorted(UNSUPPORTED)
    assert all(UNSUPPORTED[task] in message for task, message in refused.items())
    # sanitized MBPP has no test that constructs an object of the solution's classes
    assert not any("construct objects" in message for message in refused.values())
    not_passing = [(row["task_id"], r.status, r.message[-300:]) for row, r in zip(sample, good)
                   if r.status != "pass" and not r.unsupported]
    assert not not_passing, f"reference solutions that did not pass: {not_passing}"
    assert all(r.passed == r.total == len(row["test_list"]) for row, r in zip(sample, good) if not r.unsupported)
    passing_broken = [row["task_id"] for row, r in zip(sample, bad)
                      if not r.unsupported and (r.status != "fail" or r.passed == r.total)]
    assert not passing_broken, f"broken variants that did not fail: {passing_broken}"


def test_mbpp_test_split_setup_code_and_its_class_row(shared_data_dir):
    rows = {row["task_id"]: row for row in _rows(shared_data_dir, "mbpp_test.jsonl")}
    # 367 builds a Node tree in test_setup_code: refused. 342 defines Node too, but its tests pass
    # only lists, so it runs. 11 and 12 are plain rows.
    results = _run_all([(rows[task]["code"], code_tests(rows[task])) for task in (367, 342, 11, 12)])
    assert results[0].unsupported and "class 'Node'" in results[0].message
    assert [(r.status, r.passed, r.unsupported) for r in results[1:]] == [("pass", 3, False)] * 3
