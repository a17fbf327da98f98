"""Synthetic tasks: gold answers recomputed independently, solvability by brute force, held-out
split, determinism, the corpus's noise and `correct` flags, worked-example steps, and the CLI."""
import ast
import json
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import pytest

from data.tasks import (arithmetic_problems, countdown_problems, pretraining_corpus, solve_arithmetic,
                        solve_countdown)

ROOT = Path(__file__).resolve().parents[2]
STRICT_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ----------------------------------------------------------------------------- independent references

def parse_arithmetic_prompt(prompt: str) -> tuple[list[int], str]:
    m = re.fullmatch(r"What is (\d+(?: [-+*] \d+)+)\?", prompt)
    assert m, prompt
    tokens = m.group(1).split(" ")
    ops = set(tokens[1::2])
    assert len(ops) == 1, prompt
    return [int(t) for t in tokens[0::2]], ops.pop()


def compute(operands: list[int], op: str) -> int:
    result = operands[0]
    for x in operands[1:]:
        result = result + x if op == "+" else result - x if op == "-" else result * x
    return result


def safe_eval(text: str, unary_minus: bool = False) -> tuple[Fraction, list[int]]:
    """Value (exact) and the integer literals of an expression of + - * / and parentheses.

    unary_minus admits "-5" (trace steps show negative intermediates; answers may not use it).
    """
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
    used = []

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if unary_minus and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not allowed: {ast.dump(node)}")

    return ev(ast.parse(text, mode="eval").body), used


def countdown_ok(text: str, numbers: list[int], target: int) -> bool:
    try:
        value, used = safe_eval(text)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return False
    return value == target and sorted(used) == sorted(numbers)


@lru_cache(maxsize=None)
def reachable(values: tuple) -> frozenset:
    """Every value reachable by combining all of `values` (sorted tuple of Fractions) pairwise."""
    if len(values) == 1:
        return frozenset(values)
    out = set()
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            a, b = values[i], values[j]
            rest = values[:i] + values[i + 1:j] + values[j + 1:]
            results = {a + b, a - b, b - a, a * b}
            if b != 0:
                results.add(a / b)
            if a != 0:
                results.add(b / a)
            for r in results:
                out |= reachable(tuple(sorted(rest + (r,))))
    return frozenset(out)


def brute_force_solvable(numbers: list[int], target: int) -> bool:
    return Fraction(target) in reachable(tuple(sorted(Fraction(x) for x in numbers)))


def has_carry(operands: list[int], op: str) -> bool:
    """Does long addition / subtraction / multiplication of these operands carry or borrow anywhere?"""
    def add_carries(nums):
        width = max(len(str(x)) for x in nums)
        carry = 0
        for i in range(width):
            carry = (sum((x // 10 ** i) % 10 for x in nums) + carry) // 10
            if carry:
                return True
        return False

    if op == "+":
        return add_carries(operands)
    a, b = operands
    if op == "-":
        borrow = 0
        for i in range(len(str(a))):
            borrow = 1 if (a // 10 ** i) % 10 - (b // 10 ** i) % 10 - borrow < 0 else 0
            if borrow:
                return True
        return False
    partials = []
    for j, d in enumerate(reversed(str(b))):
        carry = 0
        for c in reversed(str(a)):
            carry = (int(c) * int(d) + carry) // 10
            if carry:
                return True
        partials.append(a * int(d) * 10 ** j)
    return add_carries(partials)


def canonical(row: dict) -> str:
    if row["task"] == "arithmetic":
        operands, op = parse_arithmetic_prompt(row["prompt"])
        return f"{op}:{sorted(operands) if op in '+*' else operands}"
    return f"{sorted(row['numbers'])}={row['target']}"


# ----------------------------------------------------------------------------- problems

@pytest.mark.parametrize("n,digits,ops,num_operands", [
    (40, 1, ("+",), 2), (200, 3, ("+",), 2), (200, 4, ("+",), 3), (200, 3, ("-",), 2), (200, 2, ("*",), 2),
    (200, 3, ("+", "-", "*"), 2),
])
def test_arithmetic_gold_answers_recomputed_from_prompt(n, digits, ops, num_operands):
    rows = arithmetic_problems(n, seed=7, digits=digits, ops=ops, num_operands=num_operands)
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    for r in rows:
        operands, op = parse_arithmetic_prompt(r["prompt"])
        assert r["task"] == "arithmetic" and op in ops and op == r["op"] and operands == r["operands"]
        assert len(operands) == num_operands
        assert all(len(str(x)) == digits for x in operands), operands
        assert r["answer"] == str(compute(operands, op))
        assert int(r["answer"]) >= 0
    if len(ops) == 3:
        assert set(r["op"] for r in rows) == set(ops)


@pytest.mark.parametrize("num_numbers,max_number,target_range", [
    (2, 20, (1, 50)), (3, 50, (1, 200)), (4, 100, (1, 1000)), (5, 20, (10, 100)),
])
def test_countdown_gold_expression_uses_all_numbers_and_hits_target(num_numbers, max_number, target_range):
    rows = countdown_problems(75, seed=3, num_numbers=num_numbers, max_number=max_number,
                              target_range=target_range)
    assert len({r["id"] for r in rows}) == 75
    for r in rows:
        assert r["task"] == "countdown" and len(r["numbers"]) == num_numbers
        assert all(1 <= x <= max_number for x in r["numbers"])
        assert target_range[0] <= r["target"] <= target_range[1]
        assert str(r["numbers"]) in r["prompt"] and f"equals {r['target']}." in r["prompt"]
        assert "exactly once" in r["prompt"]
        assert countdown_ok(r["answer"], r["numbers"], r["target"]), r


def test_countdown_every_instance_solvable_by_brute_force():
    rows = (countdown_problems(100, seed=11, num_numbers=2, max_number=30, target_range=(1, 100))
            + countdown_problems(100, seed=12, num_numbers=3, max_number=50, target_range=(1, 300))
            + countdown_problems(80, seed=13, num_numbers=4, max_number=100, target_range=(1, 1000))
            + countdown_problems(20, seed=14, num_numbers=5, max_number=12, target_range=(1, 100)))
    assert len(rows) == 300
    for r in rows:
        assert brute_force_solvable(r["numbers"], r["target"]), r


def test_brute_force_solver_rejects_impossible_instances():
    # The reference must be able to say no, or the test above proves nothing.
    assert not brute_force_solvable([1, 1], 5)
    assert not brute_force_solvable([2, 3, 5], 1000)
    assert brute_force_solvable([3, 7, 15, 2], 30)   # (7 - 3) * 15 / 2


def test_train_and_test_splits_disjoint_across_seeds():
    for make in (lambda n, s, split: arithmetic_problems(n, s, digits=2, ops=("+", "*"), split=split),
                 lambda n, s, split: countdown_problems(n, s, num_numbers=3, max_number=20,
                                                        target_range=(1, 100), split=split)):
        train = {canonical(r) for seed in range(3) for r in make(300, seed, "train")}
        test = {canonical(r) for seed in range(3) for r in make(60, seed, "test")}
        assert len(test) > 60, "different seeds should draw different test problems"
        assert not train & test
    # The split is by problem, not by wording: a test "a + b" keeps "b + a" out of training.
    test_rows = arithmetic_problems(30, 0, digits=2, split="test")
    swapped = {f"What is {r['operands'][1]} + {r['operands'][0]}?" for r in test_rows}
    train_prompts = {r["prompt"] for r in arithmetic_problems(2000, 5, digits=2, split="train")}
    assert not swapped & train_prompts


def test_deterministic_under_seed():
    assert arithmetic_problems(50, 4, ops=("+", "-")) == arithmetic_problems(50, 4, ops=("+", "-"))
    assert arithmetic_problems(50, 4) != arithmetic_problems(50, 5)
    assert countdown_problems(30, 4) == countdown_problems(30, 4)
    assert countdown_problems(30, 4) != countdown_problems(30, 5)
    assert pretraining_corpus("arithmetic", 100, 2) == pretraining_corpus("arithmetic", 100, 2)
    assert pretraining_corpus("countdown", 50, 2) == pretraining_corpus("countdown", 50, 2)
    assert pretraining_corpus("arithmetic", 100, 2) != pretraining_corpus("arithmetic", 100, 3)
    # The noise stream is separate: the same seed gives the same problems whatever the knobs.
    clean = pretraining_corpus("arithmetic", 100, 2, carry_bug=0, wrong_answer=0, missing_tags=0)
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in pretraining_corpus("arithmetic", 100, 2)]


# ----------------------------------------------------------------------------- worked examples

def test_worked_examples_written_out_by_hand():
    add = {"operands": [478, 356], "op": "+"}
    assert solve_arithmetic(add) == (
        "<think>\n8+6=14, carry 1.\n7+5+1=13, carry 1.\n4+3+1=8, carry 0.\nSo 834.\n</think>\n"
        "<answer>\n834\n</answer>")
    assert solve_arithmetic(add, carry_bug=True) == (
        "<think>\n8+6=14, carry 0.\n7+5+0=12, carry 0.\n4+3+0=7, carry 0.\nSo 724.\n</think>\n"
        "<answer>\n724\n</answer>")
    assert solve_arithmetic({"operands": [999, 1], "op": "+"}).endswith("So 1000.\n</think>\n<answer>\n1000\n</answer>")
    assert solve_arithmetic({"operands": [902, 514], "op": "-"}) == (
        "<think>\n12-4=8, borrow 1.\n10-1-1=8, borrow 1.\n9-5-1=3, borrow 0.\nSo 388.\n</think>\n"
        "<answer>\n388\n</answer>")
    assert solve_arithmetic({"operands": [123, 45], "op": "*"}) == (
        "<think>\n"
        "123*5: 3*5=15, carry 1. 2*5+1=11, carry 1. 1*5+1=6, carry 0. So 615.\n"
        "123*4: 3*4=12, carry 1. 2*4+1=9, carry 0. 1*4+0=4, carry 0. So 492, shifted 4920.\n"
        "615+4920: 5+0=5, carry 0. 1+2+0=3, carry 0. 6+9+0=15, carry 1. 0+4+1=5, carry 0. So 5535.\n"
        "</think>\n<answer>\n5535\n</answer>")


STEP = re.compile(r"(\d+(?:[-+*]\d+)+)=(\d+), (carry|borrow) (\d+)\.")


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_every_column_step_is_right_and_the_bug_only_drops_carries(op):
    for r in arithmetic_problems(150, seed=21, digits=3, ops=(op,)):
        for bug in (False, True):
            completion = solve_arithmetic(r, carry_bug=bug)
            assert STRICT_FORMAT.match(completion)
            steps = STEP.findall(completion)
            assert steps, completion
            for lhs, value, kind, carry in steps:
                if kind == "borrow":
                    # "13-6-1": the leading 1 is the borrowed ten.
                    first, *rest = lhs.split("-")
                    assert int(value) == int(first) - sum(map(int, rest)) and 0 <= int(value) <= 9
                    assert (len(first) == 2) == (carry == "1") or bug
                else:
                    assert int(value) == safe_eval(lhs)[0]
                    assert int(carry) == (0 if bug else int(value) // 10)
            if bug:
                assert all(c == "0" for *_, c in steps)
            answer = ANSWER.findall(completion)[-1].strip()
            gold = compute(r["operands"], op)
            assert (answer == str(gold)) == (not bug or not has_carry(r["operands"], op)), (r, completion)


def test_countdown_trace_steps_are_exact_and_end_on_the_answer():
    for i, r in enumerate(countdown_problems(100, seed=5)):
        completion = solve_countdown(r, seed=i)
        assert STRICT_FORMAT.match(completion)
        think = completion.split("</think>")[0].removeprefix("<think>\n").strip().split("\n")
        for k, line in enumerate(think):
            *steps, verdict = line.rstrip(".").split(", ")
            value = None
            for step in steps:
                lhs, rhs = step.split(" = ")
                value = Fraction(rhs)
                assert safe_eval(lhs, unary_minus=True)[0] == value, line
            if k == len(think) - 1:
                assert verdict == f"equals {r['target']}" and value == r["target"]
            else:
                assert verdict == f"not {r['target']}" and value != r["target"]
        assert ANSWER.findall(completion)[-1].strip() == r["answer"]
        bugged = ANSWER.findall(solve_countdown(r, seed=i, paren_bug=True))[-1].strip()
        assert bugged == r["answer"].replace("(", "").replace(")", "")


# ----------------------------------------------------------------------------- corpus

def check_corpus_rows(rows, task):
    for r in rows:
        assert r["text"].endswith("\nUser: " + r["prompt"] + "\nAssistant: " + r["completion"]), r["text"]
        assert r["text"].startswith("A conversation between User and Assistant.")
        answers = ANSWER.findall(r["completion"])
        if task == "arithmetic":
            gold = compute(*parse_arithmetic_prompt(r["prompt"]))
            assert r["answer"] == str(gold)
            correct = bool(answers) and answers[-1].strip() == str(gold)
        else:
            assert countdown_ok(r["answer"], r["numbers"], r["target"])
            correct = bool(answers) and countdown_ok(answers[-1].strip(), r["numbers"], r["target"])
        assert r["correct"] == correct, r
        assert bool(STRICT_FORMAT.match(r["completion"])) == (r["noise"] != "missing_tags"), r
        if r["noise"] in ("none", "wrong_answer", "missing_tags"):
            # The trace itself is right: for arithmetic its "So N." line is the gold.
            if task == "arithmetic":
                assert f"So {r['answer']}." in r["completion"]
            else:
                assert f"equals {r['target']}." in r["completion"]
        if r["noise"] == "none":
            assert correct
        if r["noise"] == "wrong_answer":
            assert answers and not correct


def test_arithmetic_corpus_noise_fractions_and_correct_flags():
    n = 2000
    rows = pretraining_corpus("arithmetic", n, seed=0, carry_bug=0.7, wrong_answer=0.05, missing_tags=0.05)
    assert len(rows) == n
    share = {k: v / n for k, v in Counter(r["noise"] for r in rows).items()}
    for label, knob in (("carry_bug", 0.7), ("wrong_answer", 0.05), ("missing_tags", 0.05), ("none", 0.2)):
        assert abs(share.get(label, 0.0) - knob) <= 0.02, share
    check_corpus_rows(rows, "arithmetic")
    for r in rows:
        if r["noise"] == "carry_bug":
            assert r["correct"] == (not has_carry(r["operands"], r["op"])), r
    # Prototype regime: most rows wrong, but a real share right (3-digit sums rarely avoid carries).
    correct_share = sum(r["correct"] for r in rows) / n
    assert 0.2 < correct_share < 0.45, correct_share
    # Corpus problems come from the train split only.
    held_out = {canonical(r) for seed in range(3) for r in arithmetic_problems(300, seed, split="test")}
    assert not held_out & {canonical(r) for r in rows}


def test_corpus_with_all_ops_and_countdown():
    rows = pretraining_corpus("arithmetic", 300, seed=1, ops=("+", "-", "*"), carry_bug=0.5,
                              wrong_answer=0.2, missing_tags=0.2)
    check_corpus_rows(rows, "arithmetic")
    for r in rows:
        if r["noise"] == "carry_bug":
            assert r["correct"] == (not has_carry(r["operands"], r["op"])), r

    rows = pretraining_corpus("countdown", 400, seed=1, carry_bug=0.5, wrong_answer=0.2, missing_tags=0.2)
    assert Counter(r["noise"] for r in rows) == {"paren_bug": 200, "wrong_answer": 80, "missing_tags": 80, "none": 40}
    check_corpus_rows(rows, "countdown")
    for r in rows:
        if r["noise"] == "paren_bug":
            assert ANSWER.findall(r["completion"])[-1].strip() == r["answer"].replace("(", "").replace(")", "")
    # The bug bites only when parentheses matter: both outcomes occur.
    assert Counter(r["correct"] for r in rows if r["noise"] == "paren_bug").keys() == {True, False}


def test_noise_counts_are_exact_and_never_exceed_n():
    rows = pretraining_corpus("arithmetic", 10, 0, carry_bug=0.35, wrong_answer=0.35, missing_tags=0.3)
    counts = Counter(r["noise"] for r in rows)
    assert len(rows) == 10 and "none" not in counts
    knobs = {"carry_bug": 0.35, "wrong_answer": 0.35, "missing_tags": 0.3}
    assert all(abs(counts[k] - 10 * f) <= 1 for k, f in knobs.items())
    rows = pretraining_corpus("arithmetic", 200, 0, carry_bug=0, wrong_answer=0, missing_tags=0)
    assert all(r["noise"] == "none" and r["correct"] for r in rows)


@pytest.mark.parametrize("call,match", [
    (lambda: arithmetic_problems(5, 0, split="dev"), "split must be one of"),
    (lambda: arithmetic_problems(5, 0, ops=("/",)), "ops must be"),
    (lambda: arithmetic_problems(5, 0, ops=("-",), num_operands=3), "for '\\+' only"),
    (lambda: arithmetic_problems(200, 0, digits=1), "problem space is too small"),
    (lambda: countdown_problems(5, 0, target_range=(10, 1)), "target_range"),
    (lambda: pretraining_corpus("arithmetic", 10, 0, carry_bug=0.9, wrong_answer=0.2), "must be <= 1"),
    (lambda: pretraining_corpus("sudoku", 10, 0), "task must be one of"),
    (lambda: solve_arithmetic({"operands": [1, 2]}), "missing key"),
    (lambda: solve_countdown({"numbers": [1, 2], "target": 3, "answer": "1 + 1"}), "not an expression over"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data.tasks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_cli_writes_refuses_to_overwrite_and_forces(tmp_path):
    out = tmp_path / "sub" / "eval.jsonl"
    res = run_cli("--task", "arithmetic", "--n", "40", "--seed", "3", "--split", "test", "--digits", "2",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote 40" in res.stdout and "split=test" in res.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == arithmetic_problems(40, 3, digits=2, split="test")

    before = out.read_bytes()
    res = run_cli("--task", "countdown", "--n", "10", "--out", str(out))
    assert res.returncode != 0
    assert str(out) in res.stderr and "--force" in res.stderr and "refusing to overwrite" in res.stderr
    assert out.read_bytes() == before

    res = run_cli("--task", "countdown", "--n", "100", "--seed", "1", "--out", str(out), "--force", "--corpus",
                  "--carry-bug", "0.5", "--wrong-answer", "0.1", "--missing-tags", "0.1")
    assert res.returncode == 0, res.stderr
    assert "paren_bug=50" in res.stdout and "wrong_answer=10" in res.stdout and "missing_tags=10" in res.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 100 and Counter(r["noise"] for r in rows)["none"] == 30
    check_corpus_rows(rows, "countdown")
    assert [p.name for p in out.parent.iterdir()] == ["eval.jsonl"], "temporary file left behind"

    res = run_cli("--task", "arithmetic", "--n", "5", "--out", str(tmp_path / "c.jsonl"), "--corpus", "--split", "test")
    assert res.returncode != 0 and "train split only" in res.stderr
