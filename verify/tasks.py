"""Checkers for the synthetic verifiable tasks (arithmetic and Countdown) and their rewards.

The generators live in data/tasks.py; this module only parses strings, so it imports nothing of the
project and no sympy (a checker costs microseconds). Formats it checks (see data/tasks.py):

- arithmetic: prompt "What is 123 + 456?", gold `answer` "579" (a non-negative or negative integer
  as a string). The model's answer is the text of the last complete <answer>...</answer>, or else
  the last \\boxed{...}; it must be an integer (optional sign, digits, optionally grouped in threes
  by commas: "1,234") equal to the gold. Nothing else may stand in the answer ("579." or
  "x = 579" are wrong): the R1-Zero format asks for the answer alone.
- countdown: columns `numbers` (e.g. [3, 7, 15, 2]) and `target` (30). The answer is an expression
  over + - * / and parentheses (also accepted: the symbols × ÷ −), non-negative integer literals,
  and whitespace, that uses every number of `numbers` exactly once (as a multiset: a number listed
  twice must appear twice) and whose exact rational value equals the target. Intermediate values
  may be fractions ("8 / 3 * 3" is fine); division by zero makes the answer wrong. No unary minus,
  no decimals, no "= 30" suffix: the same rules as data/tasks.py uses to label its corpus rows.

Rewards: `arithmetic_reward` and `countdown_reward` (1.0 / 0.0 per completion) and `task_reward`,
which picks the checker by each row's `task` column for data that mixes the two tasks.

The expression is never given to Python's eval or parser: a tokenizer plus a recursive-descent
parser builds the value with fractions.Fraction, and anything outside the grammar is rejected.
Guards keep hostile answers cheap: at most MAX_EXPRESSION_CHARS characters, MAX_NUMBER_DIGITS
digits per literal and MAX_DEPTH nested parentheses; there is no power operator, so
"2**999999" is a syntax error, not a computation. Since every literal must be one of the given
numbers, values stay as small as the task makes them.
"""
from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

MAX_EXPRESSION_CHARS = 1000   # longer answers are rejected before tokenizing
MAX_NUMBER_DIGITS = 12        # longer integer literals are rejected
MAX_DEPTH = 100               # nested parentheses; deeper input is rejected (no RecursionError)
MAX_ANSWER_CHARS = 10_000     # an arithmetic answer longer than this is not an integer we parse

_OPERATOR_ALIASES = {"×": "*", "÷": "/", "−": "-"}
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()×÷−]))")
_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ----------------------------------------------------------------------------- answer extraction

def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces; None when there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for i in range(start + len("\\boxed"), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{"):i]
        start = text.rfind("\\boxed{", 0, start)   # unclosed: try the one before
    return None


def extract_task_answer(completion: str) -> str | None:
    """The answer a completion gives: the last complete <answer>...</answer>, else the last \\boxed{...}.

    The content is returned stripped of surrounding whitespace; None when neither form is present.
    (A lightweight twin of verify.math.extract_answer for the synthetic tasks: no sympy import.)
    """
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(completion)
    return boxed.strip() if boxed is not None else None


# ----------------------------------------------------------------------------- arithmetic

def parse_integer(text: str) -> int | None:
    """The integer written in `text` ("579", "-12", "+3", "1,234"), or None for anything else."""
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS or not _INTEGER.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def check_arithmetic(completion: str, gold) -> bool:
    """Is the completion's answer (see extract_task_answer) the integer `gold` (an int or its string)?

    Raises ValueError when the gold itself is not an integer: that is a data error, not a wrong answer.
    """
    gold_value = gold if isinstance(gold, int) and not isinstance(gold, bool) else parse_integer(str(gold))
    if gold_value is None:
        raise ValueError(f"arithmetic gold answer must be an integer, got {gold!r}")
    answer = extract_task_answer(completion)
    return answer is not None and parse_integer(answer) == gold_value


# ----------------------------------------------------------------------------- countdown

def _tokenize(text: str) -> list[str] | None:
    """["(", "7", "-", "3", ")", ...]; None when any character is outside the grammar or a literal is too long."""
    tokens, pos, end = [], 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        number, op = m.groups()
        if number is not None and len(number) > MAX_NUMBER_DIGITS:
            return None
        tokens.append(number if number is not None else _OPERATOR_ALIASES.get(op, op))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent over the grammar

        expr   := term (("+" | "-") term)*
        term   := factor (("*" | "/") factor)*
        factor := INTEGER | "(" expr ")"

    evaluating as it goes with exact fractions. Every method returns a Fraction or None (syntax error
    or division by zero); the integer literals seen are collected in `leaves`.
    """

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth, self.leaves = tokens, 0, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction | None:
        value = self._expr()
        return value if value is not None and self.pos == len(self.tokens) else None

    def _expr(self) -> Fraction | None:
        value = self._term()
        while value is not None and self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            right = self._term()
            value = None if right is None else (value + right if op == "+" else value - right)
        return value

    def _term(self) -> Fraction | None:
        value = self._factor()
        while value is not None and self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            right = self._factor()
            if right is None or (op == "/" and right == 0):
                return None
            value = value * right if op == "*" else value / right
        return value

    def _factor(self) -> Fraction | None:
        token = self._peek()
        if token is None:
            return None
        self.pos += 1
        if token.isdigit():
            self.leaves.append(int(token))
            return Fraction(int(token))
        if token != "(":
            return None
        self.depth += 1
        if self.depth > MAX_DEPTH:
            return None
        value = self._expr()
        if value is None or self._peek() != ")":
            return None
        self.pos += 1
        self.depth -= 1
        return value


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals in order) of a Countdown expression; None when it is not one.

    Rejected: text over MAX_EXPRESSION_CHARS, any character outside digits, + - * / × ÷ −,
    parentheses and whitespace, a literal over MAX_NUMBER_DIGITS digits, nesting deeper than
    MAX_DEPTH, a syntax error (unary minus, "**", empty parentheses, ...), and division by zero.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    tokens = _tokenize(text)
    if not tokens:
        return None
    parser = _Parser(tokens)
    value = parser.parse()
    return None if value is None else (value, parser.leaves)


def _as_numbers(numbers) -> list[int]:
    """The `numbers` column as a list of ints: a list of ints, or its string form "[3, 7, 15, 2]"."""
    if isinstance(numbers, str):
        if not re.fullmatch(r"\s*\[?\s*(\d+\s*(,\s*\d+\s*)*)?\]?\s*", numbers):
            raise ValueError(f"countdown `numbers` must be a list of non-negative integers, got {numbers!r}")
        return [int(x) for x in re.findall(r"\d+", numbers)]
    if not isinstance(numbers, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in numbers):
        raise ValueError(f"countdown `numbers` must be a list of non-negative integers, got {numbers!r}")
    return list(numbers)


def check_countdown_expression(expression: str, numbers, target) -> bool:
    """Does `expression` use exactly `numbers` (each once, as a multiset) and equal `target` exactly?

    Raises ValueError when `numbers` or `target` are malformed (data errors, not wrong answers).
    """
    numbers = _as_numbers(numbers)
    target_value = target if isinstance(target, int) and not isinstance(target, bool) else parse_integer(str(target))
    if target_value is None:
        raise ValueError(f"countdown `target` must be an integer, got {target!r}")
    parsed = evaluate_expression(expression)
    if parsed is None:
        return False
    value, leaves = parsed
    return Counter(leaves) == Counter(numbers) and value == target_value


def check_countdown(completion: str, numbers, target) -> bool:
    """Is the completion's answer (see extract_task_answer) a valid Countdown solution for numbers/target?"""
    answer = extract_task_answer(completion)
    return answer is not None and check_countdown_expression(answer, numbers, target)


# ----------------------------------------------------------------------------- rewards

def _column(kwargs: dict, name: str, n: int, reward: str) -> list:
    if name not in kwargs:
        raise ValueError(f"the {reward} reward needs a `{name}` column; got columns {sorted(kwargs)}")
    values = kwargs[name]
    if len(values) != n:
        raise ValueError(f"the {reward} reward got {n} completions but {len(values)} `{name}` values")
    return values


def arithmetic_reward(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 when the answer equals the `answer` column's integer, else 0.0; None where the gold is None."""
    golds = _column(kwargs, "answer", len(completions), "arithmetic")
    return [None if gold is None else float(check_arithmetic(c, gold)) for c, gold in zip(completions, golds)]


def countdown_reward(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 for a valid solution over the `numbers` and `target` columns, else 0.0; None where either is None."""
    numbers = _column(kwargs, "numbers", len(completions), "countdown")
    targets = _column(kwargs, "target", len(completions), "countdown")
    return [None if nums is None or target is None else float(check_countdown(c, nums, target))
            for c, nums, target in zip(completions, numbers, targets)]


def task_reward(completions: list[str], **kwargs) -> list[float | None]:
    """Mixed synthetic data: each row checked by the checker its `task` column names.

    task "arithmetic" -> check_arithmetic against `answer`; "countdown" -> check_countdown against
    `numbers` and `target` (None where those are None); any other task (or None) -> None, since
    no checker here knows that task.
    """
    n = len(completions)
    tasks = _column(kwargs, "task", n, "task")
    columns = {k: _column(kwargs, k, n, "task") for k in ("answer", "numbers", "target") if kwargs.get(k) is not None}
    out = []
    for i, (completion, task) in enumerate(zip(completions, tasks)):
        row = {k: v[i] for k, v in columns.items()}
        if task == "arithmetic" and row.get("answer") is not None:
            out.append(float(check_arithmetic(completion, row["answer"])))
        elif task == "countdown" and row.get("numbers") is not None and row.get("target") is not None:
            out.append(float(check_countdown(completion, row["numbers"], row["target"])))
        else:
            out.append(None)
    return out


# In the worker pool, a check that timed out counts as not verified.
arithmetic_reward.timeout_reward = 0.0
countdown_reward.timeout_reward = 0.0
task_reward.timeout_reward = 0.0
