"""Scores over n samples per problem: pass@1, unbiased pass@k, maj@k.

For one problem with n samples of which c are correct:

    pass@1  = c / n                                  (DeepSeek-R1's protocol: the mean over n samples)
    pass@k  = 1 - C(n - c, k) / C(n, k)              (Chen et al. 2021, "Evaluating Large Language
                                                      Models Trained on Code": the probability that at
                                                      least one of k samples drawn without replacement
                                                      from the n is correct; unbiased for k <= n)
    maj@k   = 1 if the most common answer among the first k samples is correct, else 0
              (answers grouped by mathematical equivalence, not string equality, so "0.5" and
               "\\frac{1}{2}" vote together; samples with no extracted answer do not vote; a tie
               between groups is broken by the group whose first member came first, so the score is
               deterministic; no answer at all scores 0)

A data set's score is the mean over problems. These functions take plain Python values (booleans,
answer strings) and an equivalence callback, so they are tested exactly with scripted completions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def group_answers(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> list[list[int]]:
    """Partition sample indices by answer equivalence (None answers are left out).

    Each answer joins the first group whose representative (its first member) it is equivalent to,
    so the cost is O(n * groups) equivalence checks.
    """
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if equivalent(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def majority_answer(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> int | None:
    """Index of the representative of the largest equivalence group (ties: the earliest group), or None."""
    groups = group_answers(answers, equivalent)
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equal-sized groups, i.e. the earliest formed
    return best[0]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             equivalent: Callable[[str, str], bool]) -> float:
    """maj@k of one problem: 1.0 when the majority answer among the first k samples is correct."""
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    if not (1 <= k <= len(answers)):
        raise ValueError(f"maj_at_k: need 1 <= k <= n, got k={k}, n={len(answers)}")
    i = majority_answer(answers[:k], equivalent)
    return 0.0 if i is None else float(bool(correct[i]))
