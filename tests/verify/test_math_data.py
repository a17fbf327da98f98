"""verify.math on every gold answer of MATH-500, AIME 2024 and GSM8K.

Two checks per row:
  - a completion that boxes the gold is verified correct, and the gold parses (its structure is
    read by the parser, not only matched as a string), unless it is a choice letter or words;
  - a wrong answer made by a fixed rule is rejected. The rule: add 1 to the last integer (maximal
    digit run) of the gold that is part of its mathematical value, i.e. not inside a \\text{} /
    \\mbox{} label and not the power of such a unit ("15\\mbox{ cm}^2" -> "16\\mbox{ cm}^2"). Rows
    with no such integer ("\\text{(C)}", "\\pi", "p - q") are not mutated; no row is skipped after
    mutation, so every mutated row must be rejected.
    Rows without any integer get a second rule: a choice letter moves to the next letter
    ("(C)" -> "(D)"), any other math gold gets "+1" appended ("\\pi" -> "\\pi+1"). Only golds
    made of words ("\\text{Evelyn}") have no wrong answer made by rule; they are counted, and
    must stay under 2% of the rows.
"""
import re
import time

import pytest

from data.datasets import load_eval_set
from verify.math import is_equivalent, parse_answer, verify
from verify.latex import clean_latex

BENCHMARKS = ["math500", "aime24", "gsm8k"]
_LABEL = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}(?:\s*\^\s*(?:\{\d\}|\d))?")


def mutate(gold: str) -> str | None:
    """A wrong answer made from the gold by the rules of the module docstring; None for words."""
    masked = _LABEL.sub(lambda m: "#" * len(m.group(0)), gold)
    matches = list(re.finditer(r"\d+", masked))
    if matches:
        m = matches[-1]
        return gold[:m.start()] + str(int(m.group(0)) + 1) + gold[m.end():]
    choice = re.fullmatch(r"\\text\{\(([A-D])\)\}", gold)
    if choice:
        return "\\text{(" + chr(ord(choice.group(1)) + 1) + ")}"
    if re.fullmatch(r"\\text\{[A-Za-z ]+\}", gold):
        return None
    return gold + "+1"


def test_mutate_rule():
    assert mutate("18") == "19"
    assert mutate("-3") == "-4"
    assert mutate(r"\frac{3}{2}") == r"\frac{3}{3}"
    assert mutate(r"15\mbox{ cm}^2") == r"16\mbox{ cm}^2"
    assert mutate(r"\frac{270}7\text{ degrees}") == r"\frac{270}8\text{ degrees}"
    assert mutate(r"\text{(C)}") == r"\text{(D)}"
    assert mutate(r"\pi") == r"\pi+1"
    assert mutate(r"\text{Evelyn}") is None


@pytest.mark.parametrize("name", BENCHMARKS)
def test_gold_verifies_and_mutation_is_rejected(name, shared_data_dir):
    rows = load_eval_set(name, shared_data_dir)
    start = time.perf_counter()
    wrong_accepted, gold_rejected, unparsed, not_mutated = [], [], [], []
    for row in rows:
        gold = row["answer"]
        if not verify("Reasoning... so the result is \\boxed{" + gold + "}.", gold):
            gold_rejected.append(gold)
        try:
            parse_answer(clean_latex(gold).text)
        except ValueError:
            unparsed.append(gold)
        wrong = mutate(gold)
        if wrong is None:
            not_mutated.append(gold)
        elif is_equivalent(wrong, gold) or verify("\\boxed{" + wrong + "}", gold):
            wrong_accepted.append((wrong, gold))
    elapsed = time.perf_counter() - start
    print(f"{name}: {len(rows)} rows, {len(not_mutated)} words without a wrong answer by rule, "
          f"{len(unparsed)} read as words/letters, {elapsed:.1f} s")
    assert gold_rejected == []
    assert wrong_accepted == []
    # Only choice letters and words ("\text{(C)}", "\text{Evelyn}") may fail to parse as math.
    assert all(re.fullmatch(r"\\text\{[A-Za-z() ]+\}", g) for g in unparsed), unparsed
    assert len(not_mutated) <= 0.02 * len(rows), not_mutated
