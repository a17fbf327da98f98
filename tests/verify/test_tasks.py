"""Synthetic task checkers: Countdown expressions (valid, wrong numbers, abuse) and arithmetic answers."""
import time
from fractions import Fraction

import pytest

from data.tasks import arithmetic_problems, countdown_problems, pretraining_corpus, solve_arithmetic, solve_countdown
from verify.tasks import (MAX_DEPTH, MAX_EXPRESSION_CHARS, arithmetic_reward, check_arithmetic, check_countdown,
                          check_countdown_expression, countdown_reward, evaluate_expression, extract_task_answer,
                          task_reward)


def answer(text: str) -> str:
    return f"<think>\nworking\n</think>\n<answer>\n{text}\n</answer>"


# ----------------------------------------------------------------------------- countdown

@pytest.mark.parametrize("expression, numbers, target", [
    ("(7 - 3) * 15 / 2", [3, 7, 15, 2], 30),
    ("(7-3)*15/2", [3, 7, 15, 2], 30),
    ("15 * (7 - 3) / 2", [2, 3, 7, 15], 30),
    ("8 / 3 * 3", [3, 3, 8], 8),                 # a fractional intermediate value is fine
    ("((1 + 2)) * 3", [1, 2, 3], 9),             # redundant parentheses
    ("5 + 5 - 5", [5, 5, 5], 5),                 # a repeated number used as often as listed
    ("(7 − 3) × 15 ÷ 2", [3, 7, 15, 2], 30),     # the typographic operators
    ("  100 - 1  ", [100, 1], 99),
])
def test_countdown_accepts_valid_expressions(expression, numbers, target):
    assert check_countdown_expression(expression, numbers, target)
    assert check_countdown(answer(expression), numbers, target)


@pytest.mark.parametrize("expression, why", [
    ("(7 - 3) * 15 / 2 + 0", "a number that is not in the list"),
    ("(7 - 3) * 15", "a number left out"),
    ("(7 - 7) * 15 / 2 + 3", "7 used twice"),
    ("7 - 3 * 15 / 2", "right numbers, wrong value"),
    ("(7 - 3) * 15 / 2 = 30", "an equation, not an expression"),
    ("-(3 - 7) * 15 / 2", "unary minus"),
    ("(7 - 3) * 15 / 2.0", "a decimal"),
    ("(7 - 3) * 15 // 2", "floor division"),
    ("(7 - 3 * 15 / 2", "unbalanced parentheses"),
    ("(7 - 3)) * 15 / 2", "unbalanced parentheses"),
    ("(7 - 3)(15 / 2)", "implicit multiplication"),
    ("", "empty"),
    ("thirty", "words"),
])
def test_countdown_rejects_wrong_answers(expression, why):
    assert not check_countdown_expression(expression, [3, 7, 15, 2], 30), why


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo pwned')",
    "2**999999",
    "2 ** 3 ** 4",
    "9**9**9**9",
    "(lambda: 30)()",
    "30 if True else 0",
    "0x1e",
    "1_0 + 20",
    "3e1",
])
def test_countdown_rejects_code_and_powers(expression):
    assert evaluate_expression(expression) is None
    assert not check_countdown_expression(expression, [2, 10], 30)


def test_countdown_rejects_division_by_zero():
    assert evaluate_expression("1 / 0") is None
    assert evaluate_expression("5 / (3 - 3)") is None
    assert not check_countdown_expression("5 / (3 - 3) + 30", [5, 3, 3, 30], 30)


def test_countdown_rejects_extreme_input_quickly():
    start = time.perf_counter()
    long_sum = " + ".join(["1"] * 2000)                             # over MAX_EXPRESSION_CHARS
    assert len(long_sum) > MAX_EXPRESSION_CHARS and evaluate_expression(long_sum) is None
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)      # deeper than allowed
    assert evaluate_expression(deep) is None
    assert evaluate_expression("(" * 400 + "1" + ")" * 400) is None  # no RecursionError either
    assert evaluate_expression("9" * 13) is None                    # a literal over 12 digits
    assert not check_countdown("<answer>" + "1" * 1_000_000 + "</answer>", [1], 1)
    assert time.perf_counter() - start < 1.0


def test_countdown_exact_values():
    assert evaluate_expression("(7 - 3) * 15 / 2") == (Fraction(30), [7, 3, 15, 2])
    assert evaluate_expression("1 / 3 + 1 / 6") == (Fraction(1, 2), [1, 3, 1, 6])
    assert evaluate_expression("10 - 2 - 3") == (Fraction(5), [10, 2, 3])      # left associative
    assert evaluate_expression("48 / 4 / 2") == (Fraction(6), [48, 4, 2])
    assert evaluate_expression("2 + 3 * 4") == (Fraction(14), [2, 3, 4])       # precedence


def test_countdown_column_forms_and_bad_data():
    assert check_countdown_expression("(7 - 3) * 15 / 2", "[3, 7, 15, 2]", "30")   # string columns
    with pytest.raises(ValueError, match="numbers"):
        check_countdown_expression("1 + 2", [1, "x"], 3)
    with pytest.raises(ValueError, match="target"):
        check_countdown_expression("1 + 2", [1, 2], "three")


def test_countdown_agrees_with_the_generator():
    problems = countdown_problems(40, seed=3)
    for p in problems:
        assert check_countdown(solve_countdown(p), p["numbers"], p["target"])
    # the corpus's own `correct` labels (which include deliberately wrong answers) agree with the checker
    for row in pretraining_corpus("countdown", 60, seed=1, carry_bug=0.4, wrong_answer=0.2, missing_tags=0.2):
        assert check_countdown(row["completion"], row["numbers"], row["target"]) == row["correct"], row["completion"]


def test_countdown_reward_columns():
    completions = [answer("(7 - 3) * 15 / 2"), answer("7 + 3 + 15 + 2"), answer("1 + 2")]
    got = countdown_reward(completions, numbers=[[3, 7, 15, 2], [3, 7, 15, 2], None], target=[30, 30, 3])
    assert got == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="`target` column"):
        countdown_reward(completions, numbers=[[1]] * 3)


# ----------------------------------------------------------------------------- arithmetic

def test_extract_task_answer():
    assert extract_task_answer("<answer> 1 </answer> then <answer>\n2\n</answer>") == "2"
    assert extract_task_answer("so \\boxed{57} and finally \\boxed{579}") == "579"
    assert extract_task_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_task_answer("<answer>5</answer> \\boxed{6}") == "5"      # the answer tag wins
    assert extract_task_answer("<answer>5") is None                          # unclosed
    assert extract_task_answer("579") is None


@pytest.mark.parametrize("completion, correct", [
    (answer("579"), True),
    ("<answer>579</answer>", True),
    ("the sum is \\boxed{579}", True),
    (answer("+579"), True),
    (answer("578"), False),
    (answer("579."), False),
    (answer("x = 579"), False),
    (answer("5 79"), False),
    (answer(""), False),
    ("579", False),                       # no answer tag, no box
    ("<answer>\n579", False),             # unclosed tag
])
def test_arithmetic_checker(completion, correct):
    assert check_arithmetic(completion, "579") is correct


def test_arithmetic_thousands_and_negative():
    assert check_arithmetic(answer("1,234"), "1234")
    assert check_arithmetic(answer("1234"), 1234)
    assert not check_arithmetic(answer("12,34"), "1234")     # misplaced separator
    assert check_arithmetic(answer("-12"), "-12")
    with pytest.raises(ValueError, match="gold"):
        check_arithmetic(answer("1"), "one")


def test_arithmetic_agrees_with_the_generator():
    for p in arithmetic_problems(30, seed=0, ops=("+", "-", "*")):
        assert check_arithmetic(solve_arithmetic(p), p["answer"])
    for row in pretraining_corpus("arithmetic", 60, seed=2, carry_bug=0.5, wrong_answer=0.2, missing_tags=0.2):
        assert check_arithmetic(row["completion"], row["answer"]) == row["correct"], row["completion"]


def test_arithmetic_reward():
    got = arithmetic_reward([answer("7"), answer("8"), answer("7")], answer=["7", "7", None])
    assert got == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="`answer` column"):
        arithmetic_reward([answer("7")], gold=["7"])


def test_task_reward_dispatches_on_the_task_column():
    completions = [answer("579"), answer("(7 - 3) * 15 / 2"), answer("580"), answer("7 + 3 + 15 + 2"), answer("1")]
    got = task_reward(completions,
                      task=["arithmetic", "countdown", "arithmetic", "countdown", "math"],
                      answer=["579", "(7 - 3) * 15 / 2", "579", "(7 - 3) * 15 / 2", "1"],
                      numbers=[None, [3, 7, 15, 2], None, [3, 7, 15, 2], None],
                      target=[None, 30, None, 30, None])
    assert got == [1.0, 1.0, 0.0, 0.0, None]    # an unknown task gets no signal
    with pytest.raises(ValueError, match="`task` column"):
        task_reward(completions[:1], answer=["579"])
