"""Reward functions for GRPO, registered by name in REWARDS.

Every reward is `fn(completions: list[str], **kwargs) -> list[float | None]` (TRL's convention):
one value per completion, None meaning "no signal for this completion" (the trainer skips it).
The keyword arguments are every data set column (one value per completion, aligned with
`completions`), plus the reserved `prompts` (list[str], the prompt of each completion) and
`completion_ids` (list[list[int]], its tokens). A reward uses the columns it needs, ignores the
rest, and raises ValueError naming a column it needs but did not get.

Registered rewards (published defaults; the factories build other settings):

  accuracy        math answer check, verify.math.verify(completion, gold) -> 1.0 / 0.0; the gold is
                  the `answer` column (or `solution`, or `gold`); a gold holding a worked solution
                  ("... \\boxed{5}", "#### 5") is reduced to its final answer first. None when
                  the gold is missing, empty, or a solution whose answer cannot be extracted
                  (Open-R1 likewise skips golds it cannot parse).
  format          R1-Zero format: the completion is exactly <think>...</think> then
                  <answer>...</answer>, only whitespace around and between, no tag inside either
                  part -> 1.0, else 0.0.
  think_format    R1-Distill format (the template pre-fills "<think>\\n"): the completion holds
                  reasoning, exactly one "</think>", then a non-empty answer, and no "<think>".
  tag_count       Open-R1: 0.25 for each of "<think>\\n", "\\n</think>\\n", "\\n<answer>\\n",
                  "\\n</answer>" occurring exactly once.
  reasoning_steps Open-R1: min(1, count / 3) where count is the number of "Step k:", numbered-list
                  items ("1." at a line start), "-"/"*" bullets at a line start, and "First,",
                  "Second,", "Next,", "Finally,". (Open-R1's pattern anchors "1." only at the
                  very start of the text, since it does not set re.MULTILINE; we do, so every
                  numbered line counts, as its docstring intends.)
  length          Kimi 1.5 length penalty over prompt groups (make_length_reward).
  cosine          cosine length scaling, Yeo et al. 2025 (make_cosine_reward).
  repetition      n-gram repetition penalty, Yeo et al. 2025 / Open-R1 (make_repetition_reward).
  soft_overlong   DAPO soft overlong punishment (make_soft_overlong_reward).
  language        R1 language consistency: the share of the reasoning's words written in the
                  prompt's script (see language_reward).
  code            pass rate of the completion's program on the row's tests in the sandbox of
                  verify.code (make_code_reward, CodeReward).
  arithmetic      synthetic arithmetic task checker (verify/tasks.py), 1.0 / 0.0.
  countdown       synthetic Countdown task checker (verify/tasks.py), 1.0 / 0.0.
  task            mixed synthetic data: the checker named by each row's `task` column.

Lengths (length, cosine) are token counts from `completion_ids` when given, else characters.
Parameterised rewards are small frozen dataclasses with `__call__`, so they pickle by value into
worker processes (verify/pool.py). Attributes the pool reads: `groupwise` (True when a
completion's reward depends on the other completions of its prompt group, so the pool must
score whole groups together) and `timeout_reward` (the value a completion gets when scoring
it timed out: 0.0 for the correctness checks, i.e. "not verified"; None, no signal, for the
rest). `get_reward("accuracy:1.0,format:0.5")` builds a weighted sum. Published defaults where
there are some: cosine (Open-R1), repetition (Open-R1: 3-grams, -1.0), soft_overlong (DAPO).

verify.math and verify.code are imported inside the rewards that use them, so importing this
module stays cheap (no sympy) and the shape rewards work without them.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, ClassVar

from verify.tasks import arithmetic_reward, countdown_reward, task_reward

RewardFn = Callable[..., list]   # fn(completions: list[str], **kwargs) -> list[float | None]


# ----------------------------------------------------------------------------- column helpers

def _column(kwargs: dict, names: tuple[str, ...], n: int, reward: str) -> list:
    """The first of `names` present in kwargs, checked to hold one value per completion."""
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            values = kwargs[name]
            if len(values) != n:
                raise ValueError(f"the {reward} reward got {n} completions but {len(values)} `{name}` values")
            return list(values)
    wanted = " or ".join(f"`{x}`" for x in names)
    raise ValueError(f"the {reward} reward needs a {wanted} column; got columns {sorted(kwargs)}")


def _lengths(completions: list[str], kwargs: dict) -> list[int]:
    """Token counts from `completion_ids` when given, else character counts."""
    if kwargs.get("completion_ids") is not None:
        return [len(ids) for ids in _column(kwargs, ("completion_ids",), len(completions), "length")]
    return [len(c) for c in completions]


def _prompt_text(prompt) -> str:
    """A prompt as text: a string as is; a conversation (list of {"role", "content"}) as its user turns."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    user = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return "\n".join(user if user else [m.get("content", "") for m in prompt if isinstance(m, dict)])


def prompt_groups(n: int, kwargs: dict) -> list[list[int]]:
    """Indices of the completions of each prompt (equal `prompts` entries, else equal `prompt` column
    entries), groups in order of first appearance. Raises ValueError when neither column is given."""
    prompts = _column(kwargs, ("prompts", "prompt"), n, "group-wise")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p if isinstance(p, str) else repr(p), []).append(i)
    return list(groups.values())


def _correctness(spec, completions: list[str], kwargs: dict) -> list[bool | None]:
    """Per completion: True when the correctness reward gives full marks (>= 1.0), None when it gives None."""
    values = get_reward(spec)(completions, **kwargs)
    return [None if v is None else v >= 1.0 for v in values]


# ----------------------------------------------------------------------------- accuracy

def gold_answer(gold) -> str | None:
    """The answer to compare with: verify.math.gold_answer of the gold's text (a worked solution
    reduced to its final answer, a gold of several differing boxes kept as one ordered answer, a
    bare answer as is). None (no signal) for a missing or empty gold, and for a worked solution
    whose answer cannot be extracted (an unclosed \\boxed{, an empty "####")."""
    if gold is None:
        return None
    from verify.math import gold_answer as math_gold_answer
    return math_gold_answer(str(gold))


def accuracy_reward(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 when verify.math.verify(completion, gold) holds, else 0.0; None when there is no gold."""
    from verify.math import verify
    golds = _column(kwargs, ("answer", "solution", "gold"), len(completions), "accuracy")
    out = []
    for completion, gold in zip(completions, golds):
        answer = gold_answer(gold)
        out.append(None if answer is None else float(verify(completion, answer)))
    return out


accuracy_reward.timeout_reward = 0.0   # a verification that timed out did not verify


# ----------------------------------------------------------------------------- format and tags

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"   # any text holding none of the four tags
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """R1-Zero: 1.0 when the completion matches \\s*<think>X</think>\\s*<answer>Y</answer>\\s* in full
    (DOTALL; X and Y may be empty but hold no think/answer tag), else 0.0."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def think_format_reward(completions: list[str], **kwargs) -> list[float]:
    """R1-Distill (template pre-fills "<think>\\n"): 1.0 when the completion is reasoning (not blank),
    exactly one "</think>", then an answer (not blank), with no "<think>" anywhere; else 0.0."""
    out = []
    for c in completions:
        reasoning, _, answer = c.partition("</think>")
        ok = (c.count("</think>") == 1 and "<think>" not in c
              and reasoning.strip() != "" and answer.strip() != "")
        out.append(1.0 if ok else 0.0)
    return out


def tag_count_reward(completions: list[str], **kwargs) -> list[float]:
    """Open-R1: 0.25 for each tag, with its newlines, that occurs exactly once:
    "<think>\\n", "\\n</think>\\n", "\\n<answer>\\n", "\\n</answer>" (max 1.0)."""
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return [0.25 * sum(c.count(t) == 1 for t in tags) for c in completions]


_STEP = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


def reasoning_steps_reward(completions: list[str], **kwargs) -> list[float]:
    """Open-R1: min(1, count / 3), count = matches of "Step k:", "k." at a line start, "\\n-", "\\n*",
    "First,", "Second,", "Next,", "Finally,"."""
    return [min(1.0, len(_STEP.findall(c)) / 3) for c in completions]


# ----------------------------------------------------------------------------- length shaping

@dataclass(frozen=True)
class LengthReward:
    """Kimi 1.5 length penalty (Kimi Team 2025, "Kimi k1.5", section 2.3.3), per prompt group.

    Within the completions of one prompt (equal `prompts` entries, else `prompt` column entries),
    with len the completion's length (tokens when `completion_ids` is given, else characters):

        lambda = 0.5 - (len - min_len) / (max_len - min_len)
        reward = lambda for a correct completion, min(0, lambda) for an incorrect one

    and 0.0 for every completion of a group whose lengths are all equal. Correctness is the
    `correctness` reward (a REWARDS name or spec) giving full marks (>= 1.0); a completion whose
    correctness is None gets None (its length still counts toward the group's min and max).
    """
    correctness: str = "accuracy"
    groupwise: ClassVar[bool] = True
    timeout_reward: ClassVar[float | None] = None

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        n = len(completions)
        correct = _correctness(self.correctness, completions, kwargs)
        lengths = _lengths(completions, kwargs)
        out: list[float | None] = [None] * n
        for group in prompt_groups(n, kwargs):
            lo, hi = min(lengths[i] for i in group), max(lengths[i] for i in group)
            for i in group:
                if correct[i] is None:
                    continue
                lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if correct[i] else min(0.0, lam)
        return out


@dataclass(frozen=True)
class CosineReward:
    """Cosine length scaling (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in
    LLMs"), with Open-R1's get_cosine_scaled_reward formula and defaults:

        progress = min(len, max_len) / max_len
        correct: lo, hi = min_value_correct, max_value_correct    (0.5, 1.0)
        wrong:   lo, hi = max_value_wrong,   min_value_wrong      (-0.5, -1.0)
        reward  = lo + 0.5 * (hi - lo) * (1 + cos(pi * progress))

    so a correct answer earns 1.0 at length 0 falling to 0.5 at max_len (short correct answers are
    preferred), and a wrong answer gets -1.0 at length 0 rising to -0.5 at max_len (a long wrong
    attempt is punished less than a short one). len is in tokens when `completion_ids` is given,
    else characters. One departure: Open-R1 does not clamp, so past max_len the cosine wraps
    around (a correct answer of 2 * max_len would score 1.0 again); here the length is clamped to
    max_len. Correctness as in LengthReward; None correctness gives None.
    """
    min_value_wrong: float = -1.0
    max_value_wrong: float = -0.5
    min_value_correct: float = 0.5
    max_value_correct: float = 1.0
    max_len: int = 1000
    correctness: str = "accuracy"
    groupwise: ClassVar[bool] = False
    timeout_reward: ClassVar[float | None] = None

    def __post_init__(self):
        if self.max_len <= 0:
            raise ValueError(f"cosine reward: max_len must be > 0, got {self.max_len}")

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        correct = _correctness(self.correctness, completions, kwargs)
        out = []
        for ok, length in zip(correct, _lengths(completions, kwargs)):
            if ok is None:
                out.append(None)
                continue
            cosine = math.cos(math.pi * min(length, self.max_len) / self.max_len)
            lo, hi = ((self.min_value_correct, self.max_value_correct) if ok
                      else (self.max_value_wrong, self.min_value_wrong))
            out.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
        return out


@dataclass(frozen=True)
class RepetitionReward:
    """n-gram repetition penalty (Yeo et al. 2025, appendix C.2; Open-R1 get_repetition_penalty_reward).

    Words are the lower-cased completion split on whitespace; with the n-grams of consecutive words,

        reward = (1 - unique_ngrams / total_ngrams) * max_penalty

    0.0 for a completion of fewer than ngram_size words (the empty one included); max_penalty <= 0.
    """
    ngram_size: int = 3
    max_penalty: float = -1.0
    groupwise: ClassVar[bool] = False
    timeout_reward: ClassVar[float | None] = None

    def __post_init__(self):
        if self.max_penalty > 0:
            raise ValueError(f"repetition reward: max_penalty must be <= 0, got {self.max_penalty}")
        if self.ngram_size < 1:
            raise ValueError(f"repetition reward: ngram_size must be >= 1, got {self.ngram_size}")

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        out = []
        for c in completions:
            words = c.lower().split()
            if len(words) < self.ngram_size:
                out.append(0.0)
                continue
            ngrams = list(zip(*(words[i:] for i in range(self.ngram_size))))
            out.append((1.0 - len(set(ngrams)) / len(ngrams)) * self.max_penalty + 0.0)   # + 0.0: no -0.0
        return out


@dataclass(frozen=True)
class SoftOverlongReward:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13) on token counts |y| = len(completion_ids):

        0                                       if |y| <= max_len - cache_len
        ((max_len - cache_len) - |y|) / cache_len  if max_len - cache_len < |y| <= max_len
        -1                                      if |y| > max_len

    Defaults are DAPO's: 16384 expected tokens + a 4096-token cache, max_len = 20480.
    Needs `completion_ids` (ValueError without it).
    """
    max_len: int = 20480
    cache_len: int = 4096
    groupwise: ClassVar[bool] = False
    timeout_reward: ClassVar[float | None] = None

    def __post_init__(self):
        if not 0 < self.cache_len <= self.max_len:
            raise ValueError(f"soft_overlong reward: need 0 < cache_len <= max_len, got cache_len={self.cache_len}, "
                             f"max_len={self.max_len}")

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        ids = _column(kwargs, ("completion_ids",), len(completions), "soft_overlong")
        start = self.max_len - self.cache_len
        out = []
        for tokens in ids:
            n = len(tokens)
            out.append(0.0 if n <= start else (start - n) / self.cache_len if n <= self.max_len else -1.0)
        return out


def make_length_reward(correctness: str = "accuracy") -> LengthReward:
    """The Kimi 1.5 group length penalty with correctness from the named reward (see LengthReward)."""
    return LengthReward(correctness=correctness)


def make_cosine_reward(min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                       max_value_correct: float = 1.0, max_len: int = 1000, correctness: str = "accuracy") -> CosineReward:
    """Cosine length scaling with these end values (see CosineReward for the formula)."""
    return CosineReward(min_value_wrong, max_value_wrong, min_value_correct, max_value_correct, max_len, correctness)


def make_repetition_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> RepetitionReward:
    """The n-gram repetition penalty (see RepetitionReward)."""
    return RepetitionReward(ngram_size, max_penalty)


def make_soft_overlong_reward(max_len: int = 20480, cache_len: int = 4096) -> SoftOverlongReward:
    """DAPO's soft overlong punishment with these limits in tokens (see SoftOverlongReward)."""
    return SoftOverlongReward(max_len, cache_len)


# ----------------------------------------------------------------------------- language consistency

# Unicode blocks of the scripts we tell apart; letters elsewhere count as "other".
_SCRIPT_RANGES = (
    (0x0041, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"), (0xFF21, 0xFF5A, "latin"),
    (0x0370, 0x03FF, "greek"), (0x1F00, 0x1FFF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "cjk"), (0x3400, 0x4DBF, "cjk"), (0x4E00, 0x9FFF, "cjk"), (0xF900, 0xFAFF, "cjk"),
    (0x20000, 0x2FA1F, "cjk"),
)
_UNSPACED = ("cjk", "thai")   # scripts written without spaces: every character counts as a word


@functools.lru_cache(maxsize=4096)
def _script_of(ch: str) -> str:
    code = ord(ch)
    for lo, hi, script in _SCRIPT_RANGES:
        if lo <= code <= hi:
            return script
    return "other"


def script_word_counts(text: str) -> Counter:
    """Words per script: a word is a maximal run of letters of one script (a combining mark stays
    with its letter); in CJK and Thai every character is a word. Left out: one-letter words of
    spaced scripts (math variables like "x") and runs right after a backslash (LaTeX commands)."""
    keys, prev = [], None
    for ch in text:
        if ch.isalpha():
            prev = _script_of(ch)
        elif not (prev is not None and unicodedata.category(ch).startswith("M")):
            prev = None
        keys.append(prev)
    counts, pos = Counter(), 0
    for script, run in itertools.groupby(keys):
        size = len(list(run))
        if script is not None and not (pos > 0 and text[pos - 1] == "\\"):
            if script in _UNSPACED:
                counts[script] += size
            elif size > 1:
                counts[script] += 1
        pos += size
    return counts


def reasoning_text(completion: str) -> str:
    """The <think> part of a completion: the text before the last "</think>" (after a "<think>" if one
    precedes it); the whole completion when there is no "</think>"."""
    if "</think>" not in completion:
        return completion
    before = completion.rpartition("</think>")[0]
    return before.rpartition("<think>")[2]


def language_reward(completions: list[str], **kwargs) -> list[float | None]:
    """R1 language consistency: the share of the reasoning's words that are in the prompt's script.

    The prompt's script is the one with the most words (script_word_counts) in the prompt: the
    `prompt` column (the user's question; a conversation counts by its user turns), else the
    reserved `prompts` (these may be rendered with an English system prompt, hence the
    preference). The reasoning is reasoning_text(completion). Scripts, not languages, are told
    apart (Latin, CJK, Hangul, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai), so English vs
    French is not penalised; numbers and symbols are not words. None when the prompt or the
    reasoning has no words.
    """
    prompts = _column(kwargs, ("prompt", "prompts"), len(completions), "language")
    out = []
    for completion, prompt in zip(completions, prompts):
        prompt_counts = script_word_counts(_prompt_text(prompt))
        counts = script_word_counts(reasoning_text(completion))
        total = sum(counts.values())
        if not prompt_counts or total == 0:
            out.append(None)
            continue
        target = max(sorted(prompt_counts), key=lambda s: prompt_counts[s])
        out.append(counts[target] / total)
    return out


# ----------------------------------------------------------------------------- code

_CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last ```python (or ```py) block of the completion, else the whole completion."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def _compiles(source: str) -> bool:
    """Is `source` Python syntax? (compile only: nothing runs)"""
    try:
        compile(source, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def code_tests(row: dict):
    """The tests of one data row in a form verify.code.run_tests accepts, or None when it has none.

    - `tests`: handed over as is (a HumanEvalTest/CallTest/IOTest, a {"kind": ...} dict, a list of
      (stdin, stdout) pairs), or as the JSON text of one of those;
    - `test` + `entry_point` (HumanEval rows): a HumanEval test; the row's `prompt` is passed as
      trusted context (HumanEval tests call the prompt's helpers) only when it is Python source,
      so a natural-language prompt is not run;
    - `test_list` (MBPP rows: assert statements, a list or its JSON text): an AssertTest, with
      `test_imports` (sanitized MBPP: a list of import lines) and `test_setup_code` (full MBPP: a
      string) joined into its trusted setup;
    - `verification_info` (Open-R1, a dict or its JSON text): {"language": "python",
      "test_cases": [{"input": stdin, "output": stdout}, ...]} -> stdin/stdout cases.
    """
    if row.get("tests") is not None:
        tests = row["tests"]
        if isinstance(tests, str):
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError as e:
                raise ValueError(f"code reward: a `tests` string must be JSON, got {tests[:80]!r}: {e}") from None
        return tests
    if row.get("test") is not None and row.get("entry_point") is not None:
        prompt = row.get("prompt")
        context = prompt if isinstance(prompt, str) and _compiles(prompt) else ""
        return {"kind": "humaneval", "test": row["test"], "entry_point": row["entry_point"], "context": context}
    if row.get("test_list") is not None:
        from verify.code import AssertTest

        def strings(key):
            value = row.get(key)
            value = json.loads(value) if isinstance(value, str) else list(value or ())
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"code reward: `{key}` must be a list of strings, got {value!r:.80}")
            return value

        setup = "\n".join(strings("test_imports") + [row.get("test_setup_code") or ""]).strip()
        return AssertTest(tuple(strings("test_list")), setup)
    info = row.get("verification_info")
    if info is None:
        return None
    if isinstance(info, str):
        info = json.loads(info)
    language = info.get("language", "python")
    if language != "python":
        raise ValueError(f"code reward: only python tests run here, got verification_info language {language!r}")
    return [(case["input"], case["output"]) for case in info["test_cases"]]


_TEST_COLUMNS = ("tests", "test", "entry_point", "test_list", "test_imports", "test_setup_code",
                 "verification_info", "prompt")


@dataclass(frozen=True)
class CodeReward:
    """Pass rate passed / total of the completion's program (extract_code) on its row's tests
    (code_tests), run by verify.code.run_tests in its sandbox with these limits.

    None for a row without tests (and for every row when no test column is given), and for a run
    whose tests the sandbox cannot support (CodeResult.unsupported: assert tests that construct
    objects of the solution's classes, or call only builtins): that is the row's doing, not the
    program's, so it gives no signal rather than 0. 0.0 when the run counts no tests at all. In
    the worker pool, keep the pool's timeout above timeout_s plus the sandbox's start-up grace
    (verify.code.STARTUP_GRACE_S), or slow programs count as pool timeouts (0.0 as well, but also a
    killed worker).
    """
    timeout_s: float = 5.0
    memory_mb: int = 1024
    groupwise: ClassVar[bool] = False
    timeout_reward: ClassVar[float | None] = 0.0

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        from verify.code import run_tests
        n = len(completions)
        present = [k for k in _TEST_COLUMNS if kwargs.get(k) is not None]
        columns = {k: _column(kwargs, (k,), n, "code") for k in present}
        out = []
        for i, completion in enumerate(completions):
            tests = code_tests({k: v[i] for k, v in columns.items()})
            if tests is None:
                out.append(None)
                continue
            result = run_tests(extract_code(completion), tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
            if result.unsupported:
                out.append(None)
            else:
                out.append(result.passed / result.total if result.total > 0 else 0.0)
        return out


def make_code_reward(timeout_s: float = 5.0, memory_mb: int = 1024) -> CodeReward:
    """The code pass-rate reward with these sandbox limits per completion (see CodeReward)."""
    return CodeReward(timeout_s, memory_mb)


# ----------------------------------------------------------------------------- weighted sums and the registry

@dataclass(frozen=True)
class WeightedSum:
    """sum_i w_i * r_i over the component rewards, per completion.

    A component that gives None for a completion contributes nothing to that completion's sum
    (weights are not renormalised); the sum is None only when every component gives None.
    Components are REWARDS names, specs or picklable reward callables.
    """
    components: tuple[tuple[object, float], ...]

    @property
    def groupwise(self) -> bool:
        return any(getattr(get_reward(spec), "groupwise", False) for spec, _ in self.components)

    @property
    def timeout_reward(self) -> float | None:
        """The weighted sum of the components' timeout values (None if all are None)."""
        values = [(getattr(get_reward(spec), "timeout_reward", None), w) for spec, w in self.components]
        values = [v * w for v, w in values if v is not None]
        return sum(values) if values else None

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        columns = [get_reward(spec)(completions, **kwargs) for spec, _ in self.components]
        out = []
        for i in range(len(completions)):
            terms = [col[i] * w for col, (_, w) in zip(columns, self.components) if col[i] is not None]
            out.append(sum(terms) if terms else None)
        return out


def weighted_sum(rewards) -> WeightedSum:
    """A combined reward from {name: weight} or [(name_or_fn, weight), ...] (see WeightedSum)."""
    items = list(rewards.items()) if isinstance(rewards, dict) else list(rewards)
    if not items:
        raise ValueError("weighted_sum needs at least one (reward, weight) pair")
    for spec, w in items:
        get_reward(spec)   # unknown names fail here, not at scoring time
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"weighted_sum: the weight of {spec!r} must be a finite number, got {w!r}")
    return WeightedSum(tuple((spec, float(w)) for spec, w in items))


def _import_reward(path: str) -> RewardFn:
    """"package.module:function" -> that callable (a user-supplied reward, importable by worker processes)."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward {path!r} ('package.module:function'): {e}") from e
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn


def split_weight(part: str) -> tuple[str, float | None]:
    """"format:0.5" -> ("format", 0.5); "format" or "pkg.mod:fn" -> (part, None)."""
    name, sep, weight = part.rpartition(":")
    if sep:
        try:
            return name.strip(), float(weight)
        except ValueError:
            pass
    return part.strip(), None


def get_reward(spec) -> RewardFn:
    """A reward callable from a spec:

      a callable                      -> itself
      "accuracy"                      -> REWARDS["accuracy"]
      "accuracy:1.0,format:0.5"       -> weighted_sum([("accuracy", 1.0), ("format", 0.5)])
                                         (a part without ":weight" has weight 1.0)
      "package.module:function"       -> that function (a reward defined outside this module)

    Raises ValueError for an unknown name, listing the known ones.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward spec must be a name, 'name:weight,...' or a callable, got {spec!r}")
    parts = [split_weight(p) for p in spec.split(",")]
    if len(parts) > 1 or parts[0][1] is not None:
        return weighted_sum([(name, 1.0 if w is None else w) for name, w in parts])
    name = parts[0][0]
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return _import_reward(name)
    raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} "
                     f"(or 'name:weight,...' for a weighted sum, or 'package.module:function')")


def reward_name(spec) -> str:
    """The name a reward's scores are reported under: the spec string, or a callable's __name__ / class name."""
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__name__", type(spec).__name__)


def _tool_columns(kwargs: dict, n: int, reward: str) -> tuple[list, list, list] | None:
    """The per-completion tool counts a multi-turn rollout passes (tool_calls, tool_errors,
    tool_malformed), or None when the completions come from rollouts without tools."""
    if "tool_calls" not in kwargs:
        return None
    return tuple(_column(kwargs, (name,), n, reward) for name in ("tool_calls", "tool_errors", "tool_malformed"))


def tool_format_reward(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 when the rollout called a tool and every call was well formed (parsed, a known tool, not
    empty or too long), else 0.0; None without tools (no signal). Meant as a small shaping term
    beside the answer's reward: --reward task,format,tool_format:0.1."""
    cols = _tool_columns(kwargs, len(completions), "tool_format")
    if cols is None:
        return [None] * len(completions)
    return [1.0 if c > 0 and m == 0 else 0.0 for c, _, m in zip(*cols)]


def tool_ok_reward(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 when the rollout called a tool and no call failed (no error, timeout or malformed call),
    else 0.0; None without tools."""
    cols = _tool_columns(kwargs, len(completions), "tool_ok")
    if cols is None:
        return [None] * len(completions)
    return [1.0 if c > 0 and e == 0 and m == 0 else 0.0 for c, e, m in zip(*cols)]


REWARDS: dict[str, RewardFn] = {
    "tool_format": tool_format_reward,
    "tool_ok": tool_ok_reward,
    "accuracy": accuracy_reward,
    "format": format_reward,
    "think_format": think_format_reward,
    "tag_count": tag_count_reward,
    "reasoning_steps": reasoning_steps_reward,
    "length": LengthReward(),
    "cosine": CosineReward(),
    "repetition": RepetitionReward(),
    "soft_overlong": SoftOverlongReward(),
    "language": language_reward,
    "code": CodeReward(),
    "arithmetic": arithmetic_reward,
    "countdown": countdown_reward,
    "task": task_reward,
}
