"""pass@1 / pass@k / maj@k against hand-computed values and the closed form."""
import itertools
from fractions import Fraction

import pytest

from evaluation.metrics import group_answers, maj_at_k, majority_answer, pass_at_k


def brute_pass_at_k(flags, k):
    """Fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 4) == 1.0                         # n - c = 3 < k
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252


@pytest.mark.parametrize("flags", [(1, 0, 0, 1, 0), (0, 0, 0, 0), (1, 1, 1), (0, 1, 0, 0, 0, 1, 0)])
def test_pass_at_k_equals_enumeration(flags):
    for k in range(1, len(flags) + 1):
        assert pass_at_k(len(flags), sum(flags), k) == pytest.approx(brute_pass_at_k(flags, k))


def test_pass_at_k_bad_arguments():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def fraction_equal(a: str, b: str) -> bool:
    """A stand-in equivalence for tests: numbers written as decimals or a/b or \\frac{a}{b}."""
    def value(s):
        s = s.replace("\\frac{", "").replace("}{", "/").replace("}", "")
        return Fraction(s)
    return value(a) == value(b)


def test_equivalent_answers_vote_together():
    answers = ["0.5", "3", "\\frac{1}{2}", "3", "1/2", None]
    assert group_answers(answers, fraction_equal) == [[0, 2, 4], [1, 3]]
    assert majority_answer(answers, fraction_equal) == 0
    correct = [True, False, True, False, True, False]
    assert maj_at_k(answers, correct, 6, fraction_equal) == 1.0
    # among the first 4: {0.5, 1/2} has 2 votes, {3} has 2: the earliest group wins
    assert maj_at_k(answers, correct, 4, fraction_equal) == 1.0
    assert maj_at_k(["3", "0.5", "3", "1/2"], [False, True, False, True], 4, fraction_equal) == 0.0
    assert maj_at_k([None, None], [False, False], 2, fraction_equal) == 0.0  # nobody answered


def test_maj_at_k_bad_arguments():
    with pytest.raises(ValueError, match="2 answers but 1"):
        maj_at_k(["1", "2"], [True], 1, fraction_equal)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        maj_at_k(["1"], [True], 2, fraction_equal)
