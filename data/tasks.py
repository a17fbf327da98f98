"""Synthetic verifiable tasks for the CPU recipe: problem generators, worked examples, a noisy corpus.

Two tasks, each row a JSON-able dict with an exact gold answer (checking a model's answer is
verify/'s job; this module only makes problems and example solutions):

- arithmetic: "What is 123 + 456?" -> "579". Operands have exactly `digits` digits (0-9 when
  digits=1); ops are "+", "-" (a >= b, so answers are never negative) and "*"; "+" also takes
  more than two operands (`num_operands`).
- countdown: "Using the numbers [3, 7, 15, 2], create an equation that equals 30 ..." -> one
  solution such as "(7 - 3) * 15 / 2". Every number must be used exactly once (the R1 / TinyZero
  rule). Targets are built from a random expression over the numbers in exact rational arithmetic
  (fractions.Fraction), so every instance is solvable by construction.

Held-out split. A problem's split is a pure function of its canonical form (operands and op, with
the operands of + and * sorted; countdown: sorted numbers and target): sha256 of that string,
first 8 bytes as an integer, "test" when below TEST_FRACTION of the range. So a train set drawn
with any seed and a test set drawn with any seed never share a problem, and "123 + 456" in a
test set keeps "456 + 123" out of every train set.

Worked examples (`solve_arithmetic`, `solve_countdown`) are completions in the R1-Zero format
    <think>\\n{steps, one per line}\\n</think>\\n<answer>\\n{answer}\\n</answer>
which also matches the strict Open-R1 format pattern. Addition is done column by column from the
right with the carry written out ("9+8=17, carry 1." then "2+5+1=8, carry 0."), subtraction
with borrows, multiplication as one-digit partial products followed by column additions. With
carry_bug=True every step writes "carry 0" / "borrow 0" (the trace stays internally consistent),
so the final answer is wrong exactly when the correct computation has a carry.
A Countdown example is a short search trace: 0..max_failed random attempts that miss the target,
then the gold expression evaluated step by step; its systematic bug (paren_bug=True) writes the
answer without parentheses, which is wrong exactly when the dropped parentheses change the value.

The corpus (`pretraining_corpus`) mixes clean and deliberately noisy worked examples; each row
says which noise it carries and whether its final answer is right. Knobs (fractions of rows,
disjoint, assigned exactly: round(n * fraction) rows each, the rest clean):
- carry_bug: the task's systematic trace bug (arithmetic: dropped carries/borrows, label
  "carry_bug"; countdown: parentheses dropped from the answer, label "paren_bug").
- wrong_answer: a correct trace whose answer tag disagrees with it.
- missing_tags: a correct trace with one of the <think>/<answer> tags dropped.
Recommended for the tiny recipe (3-digit addition; measured on a 0.4M-parameter prototype over
3 seeds): carry_bug=0.7, wrong_answer=0.05, missing_tags=0.05. The pretrained base then starts
at 17-33% greedy accuracy and GRPO with a correctness reward lifts it to 97-99%. The model's
error rate tracks the corpus's, so keep carry_bug well away from 0.5 (at 0.6 one seed started at
83%) and below 1.0 (at 1.0 no sampled answer is ever right and RL has nothing to reinforce); a
mild 0.15 leaves greedy near 99% from the start and RL little to fix.

CLI (writes JSONL atomically, refuses to overwrite without --force):
    python -m data.tasks --task arithmetic --n 5000 --seed 0 --out train.jsonl [--split train|test]
        [--digits 3] [--ops + - '*'] [--num-operands 2] [--num-numbers 4] [--max-number 100]
        [--target-min 1] [--target-max 1000]
        [--corpus [--carry-bug 0.7] [--wrong-answer 0.05] [--missing-tags 0.05]] [--force]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import tempfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

from data.chat import render

TEST_FRACTION = 0.1   # share of every task's problem space reserved for evaluation
ARITHMETIC_OPS = ("+", "-", "*")
COUNTDOWN_OPS = ("+", "-", "*", "/")
SPLITS = ("train", "test")
TASKS = ("arithmetic", "countdown")
NOISE_LABELS = ("carry_bug", "paren_bug", "wrong_answer", "missing_tags", "none")


# ----------------------------------------------------------------------------- split and helpers

def split_of(key: str) -> str:
    """"train" or "test" for a problem's canonical key: sha256(key)[:8] / 2**64 < TEST_FRACTION -> test."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h < TEST_FRACTION * 2 ** 64 else "train"


def _problem_id(task: str, key: str) -> str:
    # Derived from the problem itself, so the same problem has the same id in every file.
    return f"{task}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _draw_unique(n: int, split: str, draw, what: str) -> list[dict]:
    """Call `draw()` (-> (key, row) or None for a rejected draw) until n distinct problems of `split`.

    The budget of draws is generous (rejection by split alone keeps 10% or 90%); running out means
    the problem space is too small for n distinct problems, which is a user error.
    """
    rows, seen = [], set()
    budget = 200 * n + 10_000
    for _ in range(budget):
        if len(rows) == n:
            break
        drawn = draw()
        if drawn is None:
            continue
        key, row = drawn
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        rows.append(row)
    if len(rows) < n:
        raise ValueError(f"could only find {len(rows)} distinct {split} {what} problems out of n={n} "
                         f"after {budget} draws: the problem space is too small; ask for fewer problems "
                         f"or a larger space (more digits / numbers)")
    return rows


def _completion(think_lines: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(think_lines) + "\n</think>\n<answer>\n" + answer + "\n</answer>"


def _require_keys(problem: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in problem]
    if missing:
        raise ValueError(f"{what} problem is missing key(s) {missing}; expected keys {list(keys)}, "
                         f"got {sorted(problem)}")


# ----------------------------------------------------------------------------- arithmetic

def _arithmetic_key(operands: list[int], op: str) -> str:
    canon = sorted(operands) if op in "+*" else list(operands)   # + and * commute
    return f"arithmetic:{op}:" + ",".join(map(str, canon))


def _arithmetic_value(operands: list[int], op: str) -> int:
    if op == "+":
        return sum(operands)
    if op == "-":
        return operands[0] - sum(operands[1:])
    return math.prod(operands)


def arithmetic_problems(n: int, seed: int, digits: int = 3, ops=("+",), split: str = "train",
                        num_operands: int = 2) -> list[dict]:
    """n distinct arithmetic problems of one split, deterministic in `seed`.

    Each row: {"id", "task": "arithmetic", "prompt": "What is 123 + 456?", "answer": "579",
    "operands": [123, 456], "op": "+"}. The op is drawn uniformly from `ops` per problem; each
    operand uniformly among the integers with exactly `digits` digits (0-9 when digits=1). For "-"
    the operands are ordered a >= b, so answers are never negative. "-" and "*" take two operands.
    """
    _check_count("n", n, 0)
    _check_count("digits", digits, 1)
    _check_count("num_operands", num_operands, 2)
    _check_split(split)
    ops = tuple(ops)
    if not ops or any(op not in ARITHMETIC_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty selection of {ARITHMETIC_OPS}, got {ops!r}")
    if num_operands > 2 and any(op != "+" for op in ops):
        raise ValueError(f"num_operands={num_operands} is supported for '+' only, got ops={ops!r}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    rng = random.Random(seed)

    def draw():
        op = rng.choice(ops)
        operands = [rng.randint(lo, hi) for _ in range(num_operands)]
        if op == "-":
            operands.sort(reverse=True)
        key = _arithmetic_key(operands, op)
        return key, {"id": _problem_id("arithmetic", key), "task": "arithmetic",
                     "prompt": "What is " + f" {op} ".join(map(str, operands)) + "?",
                     "answer": str(_arithmetic_value(operands, op)), "operands": operands, "op": op}

    return _draw_unique(n, split, draw, "arithmetic")


def _digits_from_right(x: int, width: int) -> list[int]:
    return [int(c) for c in reversed(str(x).zfill(width))]


def _from_digits(digits_from_right: list[int], top: int = 0) -> int:
    """The integer with these digits (least significant first), plus `top` above the highest one."""
    return sum(d * 10 ** i for i, d in enumerate(digits_from_right)) + top * 10 ** len(digits_from_right)


def _column_add(numbers: list[int], carry_bug: bool) -> tuple[list[str], int]:
    """Column addition from the right: the step strings ("2+5+1=8, carry 0.") and the result they give.

    The first column has no incoming carry term. With carry_bug every carry is written (and used)
    as 0, including the final one, so the result is the column sums mod 10.
    """
    width = max(len(str(x)) for x in numbers)
    columns = list(zip(*(_digits_from_right(x, width) for x in numbers)))
    steps, out, carry = [], [], 0
    for i, col in enumerate(columns):
        total = sum(col) + carry
        terms = "+".join(map(str, col)) + (f"+{carry}" if i > 0 else "")
        carry = 0 if carry_bug else total // 10
        steps.append(f"{terms}={total}, carry {carry}.")
        out.append(total % 10)
    return steps, _from_digits(out, carry)


def _column_subtract(a: int, b: int, carry_bug: bool) -> tuple[list[str], int]:
    """Column subtraction a - b (a >= b) from the right, borrowing ten when a column goes negative.

    A borrowing column is written with the borrowed ten in front ("13-6-0=7, borrow 1."). With
    carry_bug the ten is still borrowed but the borrow is never paid back (written "borrow 0"), so
    each result digit is (a_i - b_i) mod 10.
    """
    assert a >= b, f"column subtraction expects a >= b, got {a} - {b}"
    width = len(str(a))
    steps, out, borrow = [], [], 0
    for i, (da, db) in enumerate(zip(_digits_from_right(a, width), _digits_from_right(b, width))):
        x = da - db - borrow
        lhs = f"{da}" if x >= 0 else f"1{da}"
        terms = f"{lhs}-{db}" + (f"-{borrow}" if i > 0 else "")
        x, need = (x, 0) if x >= 0 else (x + 10, 1)
        borrow = 0 if carry_bug else need
        steps.append(f"{terms}={x}, borrow {borrow}.")
        out.append(x)
    return steps, _from_digits(out)


def _long_multiply(a: int, b: int, carry_bug: bool) -> tuple[list[str], int]:
    """a * b as one partial product per digit of b (shifted), then a running column sum.

    Lines: "123*6: 3*6=18, carry 1. 2*6+1=13, carry 1. 1*6+1=7, carry 0. So 738." and
    "738+6150: 8+0=8, carry 0. ... So 6888.". carry_bug drops every carry in both stages, which
    can only lower each partial and each sum, so the result is wrong iff any carry occurs.
    """
    steps, partials = [], []
    a_digits = _digits_from_right(a, len(str(a)))
    for shift, db in enumerate(_digits_from_right(b, len(str(b)))):
        parts, out, carry = [], [], 0
        for i, da in enumerate(a_digits):
            total = da * db + carry
            terms = f"{da}*{db}" + (f"+{carry}" if i > 0 else "")
            carry = 0 if carry_bug else total // 10
            parts.append(f"{terms}={total}, carry {carry}.")
            out.append(total % 10)
        partial = _from_digits(out, carry)
        shifted = partial * 10 ** shift
        tail = f" So {partial}" + (f", shifted {shifted}." if shift else ".")
        steps.append(f"{a}*{db}: " + " ".join(parts) + tail)
        partials.append(shifted)
    total = partials[0]
    for p in partials[1:]:
        add_steps, s = _column_add([total, p], carry_bug)
        steps.append(f"{total}+{p}: " + " ".join(add_steps) + f" So {s}.")
        total = s
    return steps, total


def arithmetic_trace(problem: dict, carry_bug: bool = False) -> tuple[list[str], int]:
    """The worked steps for an arithmetic problem and the integer result those steps reach.

    The result equals the gold answer when carry_bug is False; with carry_bug it differs exactly
    when the correct computation has a carry (or a borrow).
    """
    _require_keys(problem, ("operands", "op"), "arithmetic")
    operands, op = [int(x) for x in problem["operands"]], problem["op"]
    if op not in ARITHMETIC_OPS:
        raise ValueError(f"arithmetic problem op must be one of {ARITHMETIC_OPS}, got {op!r}")
    if len(operands) < 2 or any(x < 0 for x in operands):
        raise ValueError(f"arithmetic problem needs >= 2 non-negative operands, got {operands}")
    if op == "+":
        steps, result = _column_add(operands, carry_bug)
        return steps + [f"So {result}."], result
    if len(operands) != 2:
        raise ValueError(f"'{op}' worked examples take two operands, got {operands}")
    if op == "-":
        if operands[0] < operands[1]:
            raise ValueError(f"'-' worked examples need a >= b, got {operands}")
        steps, result = _column_subtract(*operands, carry_bug)
        return steps + [f"So {result}."], result
    return _long_multiply(*operands, carry_bug)


def solve_arithmetic(problem: dict, carry_bug: bool = False) -> str:
    """A worked example: "<think>\\n3+6=9, carry 0.\\n...\\nSo 579.\\n</think>\\n<answer>\\n579\\n</answer>".

    With carry_bug=True the steps systematically drop carries (see `arithmetic_trace`) and the
    answer tag holds what those steps reach.
    """
    steps, result = arithmetic_trace(problem, carry_bug)
    return _completion(steps, str(result))


# ----------------------------------------------------------------------------- countdown
# An expression tree is an int (a leaf) or a tuple (op, left, right).

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _random_tree(rng: random.Random, leaves: list[int]):
    """A random binary expression over `leaves` in this order (random split points, random ops)."""
    if len(leaves) == 1:
        return leaves[0]
    k = rng.randint(1, len(leaves) - 1)
    return (rng.choice(COUNTDOWN_OPS), _random_tree(rng, leaves[:k]), _random_tree(rng, leaves[k:]))


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return None if y == 0 else x / y


def _evaluate(tree) -> Fraction | None:
    """Exact value of a tree; None when it divides by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    x, y = _evaluate(left), _evaluate(right)
    return None if x is None or y is None else _apply(op, x, y)


def _leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def _render(tree, parens: bool = True) -> str:
    """Infix text with the fewest parentheses that keep the tree's value ("(7 - 3) * 15 / 2").

    A child needs parentheses when it binds looser than its parent, or, on the right of - or /,
    equally loosely. parens=False drops them all (the countdown systematic bug).
    """
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ls, rs = _render(left, parens), _render(right, parens)
    if parens and not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        ls = f"({ls})"
    if parens and not isinstance(right, int) and (
            _PRECEDENCE[right[0]] < _PRECEDENCE[op]
            or (_PRECEDENCE[right[0]] == _PRECEDENCE[op] and op in "-/")):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _parse(text: str):
    """Parse "(7 - 3) * 15" (non-negative integers, + - * /, parentheses) into a tree; None if not such text.

    Built on Python's own parser with a whitelist of node types; nothing is ever evaluated as code.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def convert(nd):
        if isinstance(nd, ast.Constant) and type(nd.value) is int and nd.value >= 0:
            return nd.value
        if isinstance(nd, ast.BinOp) and type(nd.op) in _AST_OPS:
            left, right = convert(nd.left), convert(nd.right)
            return None if left is None or right is None else (_AST_OPS[type(nd.op)], left, right)
        return None

    return convert(node)


def _countdown_correct(text: str, numbers: list[int], target: int) -> bool:
    """Does `text` use exactly `numbers` (as a multiset) and equal `target`? (labels corpus rows)"""
    tree = _parse(text)
    return (tree is not None and Counter(_leaves(tree)) == Counter(numbers)
            and _evaluate(tree) == target)


def _countdown_key(numbers: list[int], target: int) -> str:
    return "countdown:" + ",".join(map(str, sorted(numbers))) + f"={target}"


def countdown_prompt(numbers: list[int], target: int) -> str:
    return (f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
            f"You can use + - * / and parentheses, and you must use every number exactly once. "
            f"Put only the expression in the answer, for example (1 + 2) * 3.")


def countdown_problems(n: int, seed: int, num_numbers: int = 4, max_number: int = 100,
                       target_range: tuple[int, int] = (1, 1000), split: str = "train") -> list[dict]:
    """n distinct solvable Countdown problems of one split, deterministic in `seed`.

    Each row: {"id", "task": "countdown", "prompt", "answer": "(7 - 3) * 15 / 2",
    "numbers": [3, 7, 15, 2], "target": 30}. Numbers are uniform in 1..max_number (repeats
    allowed); the target is the exact value of a random expression over a shuffled copy of the
    numbers (random shape, ops from + - * /), kept when it is an integer in target_range
    (inclusive) and no step divides by zero; intermediate values may be fractions. The answer is
    that expression, written with minimal parentheses. Defaults follow TinyZero's Countdown
    (numbers 1..100, targets up to 1000).
    """
    _check_count("n", n, 0)
    _check_count("num_numbers", num_numbers, 2)
    _check_count("max_number", max_number, 1)
    _check_split(split)
    if (len(target_range) != 2 or not all(isinstance(t, int) for t in target_range)
            or target_range[0] > target_range[1]):
        raise ValueError(f"target_range must be two integers (lo, hi) with lo <= hi, got {target_range!r}")
    lo, hi = target_range
    rng = random.Random(seed)

    def draw():
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        # Shuffled leaves: the listed order must not give the solution's order away.
        tree = _random_tree(rng, rng.sample(numbers, len(numbers)))
        value = _evaluate(tree)
        if value is None or value.denominator != 1 or not lo <= value <= hi:
            return None
        target = int(value)
        key = _countdown_key(numbers, target)
        return key, {"id": _problem_id("countdown", key), "task": "countdown",
                     "prompt": countdown_prompt(numbers, target), "answer": _render(tree),
                     "numbers": numbers, "target": target}

    return _draw_unique(n, split, draw, "countdown")


def _fmt(x: Fraction, operand: bool = False) -> str:
    """"7", "-5", "27/62"; as an operand, negatives and fractions go in parentheses ("8 / (27/62)")."""
    text = str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return f"({text})" if operand and (x < 0 or x.denominator != 1) else text


def _steps(tree) -> tuple[list[str], Fraction]:
    """Post-order evaluation steps ("7 - 3 = 4", "4 * 15 = 60") and the value (tree must not divide by 0)."""
    if isinstance(tree, int):
        return [], Fraction(tree)
    op, left, right = tree
    ls, x = _steps(left)
    rs, y = _steps(right)
    v = _apply(op, x, y)
    assert v is not None, "steps of a tree that divides by zero"
    return ls + rs + [f"{_fmt(x, True)} {op} {_fmt(y, True)} = {_fmt(v)}"], v


def countdown_trace(problem: dict, seed: int = 0, max_failed: int = 2,
                    paren_bug: bool = False) -> tuple[list[str], str]:
    """A search trace for a Countdown problem and the expression it answers with.

    Lines: 0..max_failed random attempts over all the numbers that miss the target
    ("12 + 7 = 19, 19 * 3 = 57, 57 - 5 = 52, not 60."), then the gold expression evaluated step
    by step ("..., equals 60."). The answer is the gold expression, or with paren_bug the same
    expression with every parenthesis dropped.
    """
    _require_keys(problem, ("numbers", "target", "answer"), "countdown")
    numbers, target = list(problem["numbers"]), problem["target"]
    tree = _parse(str(problem["answer"]))
    if tree is None or Counter(_leaves(tree)) != Counter(numbers) or _evaluate(tree) != target:
        raise ValueError(f"countdown problem's answer {problem['answer']!r} is not an expression over "
                         f"exactly {numbers} equal to {target}")
    rng = random.Random(seed)
    lines = []
    for _ in range(rng.randint(0, max_failed)):
        attempt = _random_tree(rng, rng.sample(numbers, len(numbers)))
        value = _evaluate(attempt)
        if value is None or value == target:   # a division by zero or a lucky hit: not a failed attempt
            continue
        lines.append(", ".join(_steps(attempt)[0]) + f", not {target}.")
    lines.append(", ".join(_steps(tree)[0]) + f", equals {target}.")
    return lines, _render(tree, parens=not paren_bug)


def solve_countdown(problem: dict, seed: int = 0, max_failed: int = 2, paren_bug: bool = False) -> str:
    """A worked example "<think>\\n{trace}\\n</think>\\n<answer>\\n{expression}\\n</answer>" (see countdown_trace)."""
    lines, answer = countdown_trace(problem, seed, max_failed, paren_bug)
    return _completion(lines, answer)


# ----------------------------------------------------------------------------- noisy corpus

def _wrong_arithmetic_answer(rng: random.Random, gold: int) -> int:
    """A near miss: gold +- 10^k for a digit position k of the gold (never negative, never gold)."""
    delta = 10 ** rng.randrange(len(str(gold)))
    return gold + delta if gold - delta < 0 or rng.random() < 0.5 else gold - delta


def _with_leaves(tree, leaves):
    """The tree with its leaves replaced, left to right, by `leaves` (an iterator)."""
    if isinstance(tree, int):
        return next(leaves)
    return (tree[0], _with_leaves(tree[1], leaves), _with_leaves(tree[2], leaves))


def _with_op(tree, index: int, op: str):
    """The tree with its `index`-th operator (pre-order) replaced by `op`; returns (tree, next index)."""
    if isinstance(tree, int):
        return tree, index
    left, i = _with_op(tree[1], index - 1, op)
    right, i = _with_op(tree[2], i, op)
    return (op if index == 0 else tree[0], left, right), i


def _wrong_countdown_answer(rng: random.Random, tree, numbers: list[int], target: int) -> str:
    """An expression that is wrong: one operator changed, or one number used twice (another unused)."""
    leaves = _leaves(tree)
    for _ in range(50):
        if rng.random() < 0.5:
            candidate, _ = _with_op(tree, rng.randrange(len(leaves) - 1), rng.choice(COUNTDOWN_OPS))
        else:
            i, j = rng.sample(range(len(leaves)), 2)
            candidate = _with_leaves(tree, iter(leaves[:i] + [leaves[j]] + leaves[i + 1:]))
        text = _render(candidate)
        if _evaluate(candidate) is not None and not _countdown_correct(text, numbers, target):
            return text
    # Always wrong: bumping a number by one changes the multiset of numbers used.
    return _render(_with_leaves(tree, iter([leaves[0] + 1] + leaves[1:])))


# How a "missing_tags" row breaks the format, and whether its <answer>...</answer> survives.
_TAG_DAMAGE = ("drop_think_open", "drop_think_close", "drop_answer_tags", "drop_answer_close")


def _damage_tags(rng: random.Random, completion: str) -> tuple[str, bool]:
    """(damaged completion, does a complete <answer>...</answer> remain)."""
    kind = rng.choice(_TAG_DAMAGE)
    if kind == "drop_think_open":
        return completion.replace("<think>\n", "", 1), True
    if kind == "drop_think_close":
        return completion.replace("\n</think>", "", 1), True
    if kind == "drop_answer_tags":
        return completion.replace("<answer>\n", "", 1).replace("\n</answer>", "", 1), False
    return completion.replace("\n</answer>", "", 1), False


def pretraining_corpus(task: str, n: int, seed: int, carry_bug: float = 0.7, wrong_answer: float = 0.05,
                       missing_tags: float = 0.05, digits: int = 3, template: str = "r1-zero",
                       ops=("+",), num_operands: int = 2, num_numbers: int = 4, max_number: int = 100,
                       target_range: tuple[int, int] = (1, 1000)) -> list[dict]:
    """n worked examples of train-split problems, with deliberate noise, deterministic in `seed`.

    Each row: {"text", "prompt", "completion", "answer" (gold), "correct", "noise", "id", "task",
    and the problem's own fields}. text = render([user: prompt, assistant: completion], template)
    with no EOS (the pretraining loop appends one per document). `correct` is True when the
    completion has a complete <answer>...</answer> whose content is right (arithmetic: equals the
    gold; countdown: uses exactly the numbers and equals the target).

    Noise knobs are fractions of rows, disjoint, and exact (round(n * f) rows each; labels are
    shuffled over the rows); the rest are clean ("none"):
    - carry_bug -> "carry_bug" (arithmetic, every carry/borrow dropped; right only when the problem
      has none) or "paren_bug" (countdown, parentheses dropped from the answer);
    - wrong_answer -> "wrong_answer": a correct trace whose answer tag disagrees with it;
    - missing_tags -> "missing_tags": a correct trace with <think> or </think> dropped (answer
      still right), or with the answer's tags dropped or left unclosed (answer unreadable).
    The prototype's recommended values are the defaults (see the module docstring). Other
    arguments select the problems as in arithmetic_problems / countdown_problems.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    _check_count("n", n, 0)
    fractions_ = {"carry_bug": carry_bug, "wrong_answer": wrong_answer, "missing_tags": missing_tags}
    for name, f in fractions_.items():
        if not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {f!r}")
    if sum(fractions_.values()) > 1.0 + 1e-9:
        raise ValueError(f"carry_bug + wrong_answer + missing_tags must be <= 1 (the noises are disjoint), "
                         f"got {carry_bug} + {wrong_answer} + {missing_tags}")
    counts = {name: round(n * f) for name, f in fractions_.items()}
    if sum(counts.values()) > n:   # rounding up three fractions that sum to 1 can overshoot by one
        counts["carry_bug"] -= sum(counts.values()) - n
    labels = [name for name, c in counts.items() for _ in range(c)]
    labels += ["none"] * (n - len(labels))

    if task == "arithmetic":
        problems = arithmetic_problems(n, seed, digits=digits, ops=ops, split="train", num_operands=num_operands)
    else:
        problems = countdown_problems(n, seed, num_numbers=num_numbers, max_number=max_number,
                                      target_range=target_range, split="train")
    # A separate stream for noise, so the problems of a seed do not depend on the noise knobs.
    rng = random.Random(f"{seed}:corpus-noise")
    rng.shuffle(labels)

    rows = []
    for problem, label in zip(problems, labels):
        if task == "arithmetic":
            gold = int(problem["answer"])
            steps, result = arithmetic_trace(problem, carry_bug=(label == "carry_bug"))
            answer = str(result)
            if label == "wrong_answer":
                answer = str(_wrong_arithmetic_answer(rng, gold))
            correct = answer == problem["answer"]
        else:
            label = "paren_bug" if label == "carry_bug" else label
            steps, answer = countdown_trace(problem, seed=rng.randrange(2 ** 32),
                                            paren_bug=(label == "paren_bug"))
            if label == "wrong_answer":
                answer = _wrong_countdown_answer(rng, _parse(problem["answer"]), problem["numbers"],
                                                 problem["target"])
            correct = _countdown_correct(answer, problem["numbers"], problem["target"])
        completion = _completion(steps, answer)
        if label == "missing_tags":
            completion, answer_readable = _damage_tags(rng, completion)
            correct = correct and answer_readable
        text = render([{"role": "user", "content": problem["prompt"]},
                       {"role": "assistant", "content": completion}], template)
        rows.append({**problem, "text": text, "completion": completion, "correct": correct, "noise": label})
    return rows


# ----------------------------------------------------------------------------- tool-use traces

def _typo(rng: random.Random, x: int) -> int:
    """x with one digit replaced by another (the leading digit never by 0): a miscopied operand."""
    digits = list(str(x))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def tool_use_corpus(n: int, seed: int, digits: int = 3, tool_rate: float = 0.2, miscopy: float = 0.5,
                    head_right: float = 0.05, template: str = "r1-zero") -> list[dict]:
    """n worked multiplications (train split) in which a calculator call is rare and often wrong: the
    base of a tool-use RL run (recipes/tool_tiny.py), deterministic in `seed`.

    Each row as pretraining_corpus's ({"text", "completion", "correct", "noise", ...} plus the problem).
    Exact fractions of the rows (labels shuffled):
    - tool_rate: a call in the fenced format (envs/formats.py), its output block, and the answer read
      from it; of those, `miscopy` copy an operand into the call with one digit wrong (noise
      "tool_miscopy": the output is right for the call, the answer wrong for the problem), the
      others are right ("tool");
    - the rest answer "in the head": a guess near the product (noise "head"), right for `head_right`
      of them ("head_right"): the model cannot multiply, and the corpus says so.
    The output block holds what the calculator prints for the call (envs.calculator), so a model that
    calls the tool during RL reads the same kind of text it was pretrained on.
    """
    _check_count("n", n, 0)
    for name, f in (("tool_rate", tool_rate), ("miscopy", miscopy), ("head_right", head_right)):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {f!r}")
    problems = arithmetic_problems(n, seed, digits=digits, ops=("*",), split="train")
    rng = random.Random(f"{seed}:tool-corpus")
    n_tool = round(n * tool_rate)
    n_miscopy = round(n_tool * miscopy)
    n_right = round((n - n_tool) * head_right)
    labels = (["tool_miscopy"] * n_miscopy + ["tool"] * (n_tool - n_miscopy) + ["head_right"] * n_right
              + ["head"] * (n - n_tool - n_right))
    rng.shuffle(labels)
    rows = []
    for problem, label in zip(problems, labels):
        a, b = problem["operands"]
        gold = a * b
        if label.startswith("tool"):
            if label == "tool_miscopy":
                a, b = (_typo(rng, a), b) if rng.random() < 0.5 else (a, _typo(rng, b))
            result = a * b
            completion = (f"<think>I use the calculator.\n```calculator\n{a} * {b}\n```\n```output\n{result}\n```\n"
                          f"So it is {result}.</think> <answer>{result}</answer>")
            answer = result
        else:
            answer = gold if label == "head_right" else _wrong_arithmetic_answer(rng, gold)
            completion = f"<think>{problem['operands'][0]} * {problem['operands'][1]} is about {answer}.</think> " \
                         f"<answer>{answer}</answer>"
        text = render([{"role": "user", "content": problem["prompt"]},
                       {"role": "assistant", "content": completion}], template)
        rows.append({**problem, "text": text, "completion": completion, "correct": answer == gold, "noise": label})
    return rows


# ----------------------------------------------------------------------------- files and CLI

def write_jsonl(rows: list[dict], path, force: bool = False) -> Path:
    """Write rows as JSONL atomically: a temporary file in the same directory, then os.replace.

    Raises FileExistsError naming the file when it exists and force is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"refusing to overwrite existing file {path} (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temporary file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m data.tasks",
                                description="Write synthetic task problems (RL prompts / eval sets) or a "
                                            "noisy pretraining corpus of worked examples as JSONL.")
    # what to write
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--n", type=int, required=True, help="number of rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    # arithmetic
    p.add_argument("--digits", type=int, default=3, help="digits per operand")
    p.add_argument("--ops", nargs="+", choices=ARITHMETIC_OPS, default=["+"], help="e.g. --ops + - '*'")
    p.add_argument("--num-operands", type=int, default=2, help="operands per problem (> 2 for + only)")
    # countdown
    p.add_argument("--num-numbers", type=int, default=4)
    p.add_argument("--max-number", type=int, default=100)
    p.add_argument("--target-min", type=int, default=1)
    p.add_argument("--target-max", type=int, default=1000)
    # corpus
    p.add_argument("--corpus", action="store_true", help="write worked examples with noise instead of problems")
    p.add_argument("--carry-bug", type=float, default=0.7, help="share of rows with the systematic bug")
    p.add_argument("--wrong-answer", type=float, default=0.05, help="share of rows whose answer tag is wrong")
    p.add_argument("--missing-tags", type=float, default=0.05, help="share of rows with broken tags")
    p.add_argument("--template", default="r1-zero", help="chat template rendering the corpus text")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    parser, args = _parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        parser.error(f"refusing to overwrite existing file {out} (pass --force to replace it)")
    if args.corpus and args.split != "train":
        parser.error("--corpus draws its problems from the train split only; drop --split test")
    try:
        if args.corpus:
            rows = pretraining_corpus(args.task, args.n, args.seed, carry_bug=args.carry_bug,
                                      wrong_answer=args.wrong_answer, missing_tags=args.missing_tags,
                                      digits=args.digits, template=args.template, ops=args.ops,
                                      num_operands=args.num_operands, num_numbers=args.num_numbers,
                                      max_number=args.max_number, target_range=(args.target_min, args.target_max))
        elif args.task == "arithmetic":
            rows = arithmetic_problems(args.n, args.seed, digits=args.digits, ops=args.ops, split=args.split,
                                       num_operands=args.num_operands)
        else:
            rows = countdown_problems(args.n, args.seed, num_numbers=args.num_numbers, max_number=args.max_number,
                                      target_range=(args.target_min, args.target_max), split=args.split)
    except ValueError as e:
        parser.error(str(e))
    write_jsonl(rows, out, force=args.force)
    what = "corpus rows" if args.corpus else "problems"
    print(f"wrote {len(rows)} {args.task} {what} (split={args.split}, seed={args.seed}) to {out}")
    if args.corpus:
        noise = Counter(r["noise"] for r in rows)
        print("noise: " + ", ".join(f"{k}={noise[k]}" for k in NOISE_LABELS if noise[k]))
        print(f"correct final answers: {sum(r['correct'] for r in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
