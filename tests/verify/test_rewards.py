"""Each reward on hand-made completions; expected numbers worked out by hand from the formulas."""
import json
import math
import pickle

import pytest

from verify.rewards import (REWARDS, CosineReward, extract_code, format_reward, get_reward, gold_answer, language_reward, make_cosine_reward,
                            make_length_reward, make_repetition_reward, make_soft_overlong_reward,
                            prompt_groups, reasoning_steps_reward, reasoning_text, script_word_counts,
                            tag_count_reward, think_format_reward, weighted_sum)

GOOD = "<think>\nx\n</think>\n<answer>\n5\n</answer>"


def answer(text: str, pad: int = 0) -> str:
    """An R1-Zero completion answering `text`, padded with `pad` spaces of reasoning."""
    return f"<think>{' ' * pad}</think><answer>{text}</answer>"


def ids(n: int) -> list[int]:
    return [0] * n


# ----------------------------------------------------------------------------- accuracy

def test_accuracy_math_answers():
    accuracy = REWARDS["accuracy"]
    completions = ["so \\boxed{\\frac{1}{2}}", "<answer>0.5</answer>", "\\boxed{3}", "I give up", "\\boxed{1}"]
    golds = ["1/2", "\\frac12", "4", "5", None]
    # equivalent forms are right; a wrong value or no answer scores 0; no gold: no signal
    assert accuracy(completions, answer=golds) == [1.0, 1.0, 0.0, 0.0, None]
    assert accuracy(["\\boxed{2}"], answer=["  "]) == [None]
    # a worked solution whose answer cannot be extracted gives no signal either
    assert accuracy(["\\boxed{12}", "\\boxed{12}", "\\boxed{}"], answer=["so \\boxed{12", "####", "\\boxed{}"]) == \
        [None, None, None]


def test_accuracy_gold_columns_and_worked_solutions():
    accuracy = REWARDS["accuracy"]
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    math_solution = "Adding, $5 + 7 = 12$, so the answer is $\\boxed{12}$."
    assert gold_answer(gsm8k) == "72" and gold_answer(math_solution) == "12" and gold_answer("3/4") == "3/4"
    assert accuracy(["\\boxed{72}", "\\boxed{12}"], solution=[gsm8k, math_solution]) == [1.0, 1.0]
    assert accuracy(["\\boxed{72}"], gold=[72]) == [1.0]                       # an int gold column
    assert accuracy(["\\boxed{72}"], answer=["72"], solution=["#### 71"]) == [1.0]  # `answer` comes first
    with pytest.raises(ValueError, match="`answer` or `solution` or `gold`"):
        accuracy(["\\boxed{1}"], prompts=["p"])


def test_length_and_cosine_default_to_math_accuracy():
    completions = ["\\boxed{72}", "\\boxed{7}"]
    # cosine at 500 tokens: correct 0.75, wrong -0.75 (see test_cosine_values)
    assert REWARDS["cosine"](completions, answer=["72", "72"], completion_ids=[ids(500), ids(500)]) == \
        pytest.approx([0.75, -0.75])
    # length: lambda 0.5 for the shorter (correct), -0.5 for the longer (wrong)
    assert REWARDS["length"](completions, answer=["72", "72"], prompts=["p", "p"],
                             completion_ids=[ids(10), ids(20)]) == [0.5, -0.5]


# ----------------------------------------------------------------------------- format and tags

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("  <think>a</think> <answer>5</answer>\n", 1.0),
    ("<think>line 1\nline 2</think>\n\n<answer>\n5\n</answer>", 1.0),   # DOTALL: multi-line parts
    ("<think></think><answer></answer>", 1.0),                          # empty parts are still the format
    ("<think>a</think>", 0.0),
    ("<answer>5</answer>", 0.0),
    ("<think>a</think><answer>5</answer> and more", 0.0),
    ("so <think>a</think><answer>5</answer>", 0.0),
    ("<think>a<think>b</think><answer>5</answer>", 0.0),
    ("<think>a</think><answer>5</answer><answer>6</answer>", 0.0),
    ("<answer>5</answer><think>a</think>", 0.0),
    ("<think>a</think>b<answer>5</answer>", 0.0),
])
def test_format(completion, expected):
    assert format_reward([completion]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("I add 2 and 3.\n</think>\n\nThe answer is 5.", 1.0),
    ("   </think>5", 0.0),                       # blank reasoning
    ("reasoning</think>  \n", 0.0),              # no answer
    ("reasoning</think>5</think>", 0.0),         # two closing tags
    ("<think>reasoning</think>5", 0.0),          # the template already opened <think>
    ("no tags at all", 0.0),
])
def test_think_format(completion, expected):
    assert think_format_reward([completion]) == [expected]


def test_tag_count():
    completions = [
        GOOD,                                                        # all four: 1.0
        "<think>x</think><answer>5</answer>",                         # no newlines: none count
        "<think>\nx\n</think>\n5",                                    # two of four
        "<think>\na\n<think>\nb\n</think>\n<answer>\n5\n</answer>",  # "<think>\n" twice: three of four
    ]
    assert tag_count_reward(completions) == [1.0, 0.0, 0.5, 0.75]


def test_reasoning_steps():
    completions = [
        "Step 1: a\nStep 2: b\nStep 3: c",        # 3 -> 1
        "First, do a. Finally, b.",               # 2 -> 2/3
        "1. a\n2. b",                              # numbered lines: 2 -> 2/3
        "- a\n- b\n- c",                           # "\n-" twice (the first has no newline): 2/3
        "nothing to see",                          # 0
        "Step 1: First, x\n1. y\n* z\nNext, w",    # 5 -> capped at 1
    ]
    assert reasoning_steps_reward(completions) == pytest.approx([1.0, 2 / 3, 2 / 3, 2 / 3, 0.0, 1.0])


# ----------------------------------------------------------------------------- length shaping

def test_length_kimi_groups():
    length = make_length_reward(correctness="arithmetic")
    completions = [answer("7"), answer("8"), answer("7"),     # group p: correct, wrong, correct
                   answer("7"), answer("7"),                  # group q: equal lengths
                   answer("1"), answer("2"),                  # group r: both wrong
                   answer("7")]                               # group p again, no gold
    lens = [10, 15, 30, 40, 40, 5, 25, 12]
    prompts = ["p", "p", "p", "q", "q", "r", "r", "p"]
    golds = ["7", "7", "7", "7", "7", "7", "7", None]
    got = length(completions, answer=golds, prompts=prompts, completion_ids=[ids(n) for n in lens])
    # group p: min 10, max 30 -> lambda = 0.5 - (len - 10) / 20 -> 0.5, 0.25, -0.5 (and 0.4 for len 12)
    #   correct: lambda; wrong: min(0, lambda) -> 0.5, 0.0, -0.5; the gold-less one: None
    # group q: equal lengths -> 0, 0; group r: lambda 0.5, -0.5, both wrong -> 0.0, -0.5
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, -0.5, None])


def test_length_uses_characters_without_ids_and_needs_groups():
    length = make_length_reward(correctness="arithmetic")
    short, long = answer("7"), answer("7", pad=18)           # 33 and 51 characters
    assert length([short, long], answer=["7", "7"], prompts=["p", "p"]) == [0.5, -0.5]
    # the `prompt` column stands in for `prompts`
    assert length([short, long], answer=["7", "7"], prompt=["p", "p"]) == [0.5, -0.5]
    with pytest.raises(ValueError, match="`prompts` or `prompt`"):
        length([short, long], answer=["7", "7"])
    assert prompt_groups(5, {"prompts": ["a", "b", "a", "c", "b"]}) == [[0, 2], [1, 4], [3]]


def test_cosine_values():
    cosine = make_cosine_reward(correctness="arithmetic")   # Open-R1 defaults, max_len 1000
    lens = [0, 250, 500, 1000, 2000, 0, 500, 1000]
    completions = [answer("7")] * 5 + [answer("8")] * 3
    got = cosine(completions, answer=["7"] * 8, completion_ids=[ids(n) for n in lens])
    # correct: 0.5 + 0.25 * (1 + cos(pi * len / 1000)): 1.0; 0.5 + 0.25 * (1 + 0.70711) = 0.92678; 0.75; 0.5;
    #   len 2000 clamped to 1000 -> 0.5
    # wrong: -0.5 + 0.5 * (-1.0 - -0.5) * (1 + cos): -1.0 at 0, -0.75 at 500, -0.5 at 1000
    assert got == pytest.approx([1.0, 0.92678, 0.75, 0.5, 0.5, -1.0, -0.75, -0.5], abs=1e-5)


def test_cosine_custom_ends_characters_and_none():
    cosine = make_cosine_reward(min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=0.0,
                                max_value_correct=2.0, max_len=62, correctness="arithmetic")
    c = answer("7", pad=29)                   # 62 characters: progress 1 -> the far end
    assert len(c) == 62
    assert cosine([c, answer("9", pad=29), c], answer=["7", "7", None]) == pytest.approx([0.0, 0.0, None])
    assert cosine([answer("7")], answer=["7"], completion_ids=[[]]) == [2.0]
    assert cosine([answer("1")], answer=["7"], completion_ids=[[]]) == [-2.0]


def test_repetition():
    rep = REWARDS["repetition"]
    completions = ["a b c a b c",   # trigrams abc bca cab abc: 3 unique of 4 -> -0.25
                   "a a a a",       # aaa aaa: 1 of 2 -> -0.5
                   "A b C a B c",   # lower-cased: as the first
                   "x y z w",       # all unique -> 0
                   "one two",       # fewer words than n -> 0
                   ""]
    assert rep(completions) == pytest.approx([-0.25, -0.5, -0.25, 0.0, 0.0, 0.0])
    bigram = make_repetition_reward(ngram_size=2, max_penalty=-2.0)
    assert bigram(["a b a b"]) == pytest.approx([-2 / 3])   # ab ba ab: 2 of 3 -> (1/3) * -2


def test_soft_overlong():
    soft = make_soft_overlong_reward(max_len=100, cache_len=20)
    lens = [0, 80, 90, 100, 101, 5000]
    # <= 80: 0; (80 - 90) / 20 = -0.5; (80 - 100) / 20 = -1; beyond 100: -1
    assert soft([""] * 6, completion_ids=[ids(n) for n in lens]) == [0.0, 0.0, -0.5, -1.0, -1.0, -1.0]
    dapo = REWARDS["soft_overlong"]   # 20480 with a 4096 cache: (16384 - 18432) / 4096 = -0.5
    assert dapo(["", ""], completion_ids=[ids(16384), ids(18432)]) == [0.0, -0.5]
    with pytest.raises(ValueError, match="`completion_ids`"):
        soft(["text"])


# ----------------------------------------------------------------------------- language

def test_script_word_counts():
    assert script_word_counts("I add two and three.") == {"latin": 4}          # "I" is one letter
    assert script_word_counts("二加三 equals 五") == {"cjk": 4, "latin": 1}      # CJK: one word per character
    assert script_word_counts("\\frac{x}{y} так") == {"cyrillic": 1}           # LaTeX command, variables out
    assert script_word_counts("1 + 2 = 3") == {}
    assert script_word_counts("नमस्ते दुनिया") == {"devanagari": 2}              # combining marks stay in words


def test_language_reward():
    english = "What is the sum of two and three?"
    completions = [
        "<think>\nI add two and three.\n</think>\n<answer>\n5\n</answer>",   # 4 of 4 Latin
        "<think>二加三 equals 五</think><answer>5</answer>",                  # 1 Latin word of 5
        "<think>1+2=3</think><answer>3</answer>",                             # no words: None
    ]
    assert language_reward(completions, prompts=[english] * 3) == pytest.approx([1.0, 0.2, None])
    chinese = "计算二加三等于多少"
    assert language_reward(completions[1:2], prompts=[chinese]) == pytest.approx([0.8])       # 4 of 5 CJK
    russian = "Сколько будет два плюс три?"
    assert language_reward(["два плюс три is five"], prompts=[russian]) == pytest.approx([0.6])  # 3 of 5
    assert language_reward(["\\frac{x}{y} так"], prompts=[english]) == [0.0]                   # 0 of 1
    assert language_reward(["some words"], prompts=["1 + 2?"]) == [None]                       # no script
    # the `prompt` column (the question) is preferred over rendered `prompts` with an English system prompt
    rendered = "A conversation between User and Assistant. The user asks a question. User: " + chinese
    assert language_reward(completions[1:2], prompt=[chinese], prompts=[rendered]) == pytest.approx([0.8])
    conversation = [{"role": "system", "content": "Be brief please"}, {"role": "user", "content": chinese}]
    assert language_reward(completions[1:2], prompt=[conversation]) == pytest.approx([0.8])
    with pytest.raises(ValueError, match="language"):
        language_reward(["x"])


def test_reasoning_text():
    assert reasoning_text("<think>a</think><answer>b</answer>") == "a"
    assert reasoning_text("a</think>b") == "a"          # R1-Distill: <think> was in the prompt
    assert reasoning_text("no tags") == "no tags"


# ----------------------------------------------------------------------------- sums and registry

def test_weighted_sum_and_specs():
    completions = [GOOD, "<think>\nx\n</think>\n5"]
    # format 1, tag_count 1 -> 1 + 0.5; format 0, tag_count 0.5 -> 0.25
    assert weighted_sum({"format": 1.0, "tag_count": 0.5})(completions) == [1.5, 0.25]
    assert get_reward("format:1.0,tag_count:0.5")(completions) == [1.5, 0.25]
    assert get_reward("format,tag_count")(completions) == [2.0, 0.5]
    assert get_reward("tag_count:2")(completions) == [2.0, 1.0]
    assert weighted_sum([(format_reward, -1.0)])(completions) == [-1.0, 0.0]


def test_weighted_sum_none_handling():
    combo = weighted_sum([("arithmetic", 2.0), ("format", 1.0)])
    completions = [answer("7"), answer("7"), "7"]
    # a None component adds nothing: row 1 has no gold, so only format counts
    assert combo(completions, answer=["7", None, "7"]) == [3.0, 1.0, 0.0]
    assert weighted_sum([("arithmetic", 1.0)])([answer("7")], answer=[None]) == [None]   # all None -> None


def test_registry_and_errors():
    assert set(REWARDS) >= {"accuracy", "format", "think_format", "tag_count", "reasoning_steps", "length",
                            "cosine", "repetition", "soft_overlong", "language", "code", "arithmetic", "countdown", "task"}
    assert get_reward("format") is format_reward
    assert get_reward(format_reward) is format_reward
    assert REWARDS["cosine"] == make_cosine_reward() == CosineReward(max_len=1000)   # published defaults
    with pytest.raises(ValueError, match="unknown reward 'nope'.*accuracy.*format"):
        get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("format:1,nope:2")
    with pytest.raises(ValueError, match="cannot load reward"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError):
        get_reward("")
    with pytest.raises(ValueError, match="finite"):
        weighted_sum({"format": math.nan})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum([])
    with pytest.raises(ValueError, match="max_penalty"):
        make_repetition_reward(max_penalty=0.5)
    with pytest.raises(ValueError, match="cache_len"):
        make_soft_overlong_reward(max_len=10, cache_len=20)
    with pytest.raises(ValueError, match="max_len"):
        make_cosine_reward(max_len=0)
    with pytest.raises(ValueError, match="2 completions but 1 `answer`"):
        REWARDS["arithmetic"]([answer("1"), answer("2")], answer=["1"])


def test_pool_attributes_and_pickling():
    for name in ("accuracy", "code", "arithmetic", "countdown"):   # correctness checks: timed out = not verified
        assert REWARDS[name].timeout_reward == 0.0
    assert getattr(REWARDS["format"], "timeout_reward", None) is None
    assert get_reward("arithmetic:2,format:1").timeout_reward == 0.0
    assert REWARDS["length"].groupwise and not REWARDS["cosine"].groupwise
    assert get_reward("length,format").groupwise
    for reward in (make_cosine_reward(max_len=7), make_length_reward("countdown"), get_reward("format:2")):
        assert pickle.loads(pickle.dumps(reward)) == reward


# ----------------------------------------------------------------------------- code (runs the sandbox)

ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def test_code_humaneval_rows():
    right = "Here is my solution.\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    wrong_then_right = "```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n```python\ndef add(a, b):\n    return a + b\n```"
    bare_wrong = "def add(a, b):\n    return a * b\n"          # no block: the whole completion is the program
    got = REWARDS["code"]([right, wrong_then_right, bare_wrong], test=[ADD_TEST] * 3, entry_point=["add"] * 3,
                          prompt=["def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "Write add(a, b).", None])
    assert got == [1.0, 1.0, 0.0]     # the last block counts; a HumanEval test is 1/1 or 0/1


def test_code_pass_rates_and_missing_tests():
    doubler = "```python\nprint(int(input()) * 2)\n```"
    square = "```python\ndef sq(x):\n    return x * x\n```"
    info = {"language": "python", "test_cases": [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9"}]}
    call = {"kind": "call", "fn_name": "sq", "cases": [{"input": [3], "output": 9}, {"input": [4], "output": 16},
                                                       {"input": [5], "output": 25}, {"input": [0], "output": 1}]}
    # doubler: 2 -> 4 right, 3 -> 6 wrong: 1/2; sq: 3 of 4 cases; third row has no tests
    assert REWARDS["code"]([doubler], verification_info=[json.dumps(info)]) == [0.5]
    assert REWARDS["code"]([square, square], tests=[call, None]) == [0.75, None]
    assert REWARDS["code"]([square], answer=["9"]) == [None]          # no test column at all
    assert extract_code("text only") == "text only"
    with pytest.raises(ValueError, match="only python"):
        REWARDS["code"]([square], verification_info=[{"language": "cpp", "test_cases": []}])
