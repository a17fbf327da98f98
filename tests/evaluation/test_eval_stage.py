"""The eval stage: pass@1 / pass@k / maj@k of scripted completions against hand-computed values,
HumanEval programs through the sandbox, and a tiny model end to end through train.py."""
import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

from data.datasets import load_eval_set
from data.tokenizer import Tokenizer
from evaluation.eval_stage import (AnswerClasses, check_flags, parse_ks, program_of, sample_and_score, set_label, summarise,
                                   template_source)
from sampling.sampler import Completion
from verify.pool import RewardPool

ROOT = Path(__file__).resolve().parents[2]


class ScriptedSampler:
    """Stands in for sampling.Sampler: prompt i gets the fixed texts script[i], tokenized, ending in EOS."""

    def __init__(self, tok, script: list[list[str]]):
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, prompts, params):
        assert len(prompts) == len(params) == len(self.script)
        self.calls.append((prompts, params))
        out = []
        for texts, p in zip(self.script, params):
            assert p.n == len(texts)
            ids = [self.tok.encode(t) + [self.tok.eos_id] for t in texts]
            out.append([Completion(i, [0.0] * len(i), "stop") for i in ids])
        return out


@pytest.fixture(scope="module")
def tok():
    corpus = ["The answer is \\boxed{\\frac{1}{2}} and 0.5 and 5.0 or 12, 13, 7.",
              "def f(x):\n    return x + 1\n```python\nprint('hi')\n```"] * 4
    return Tokenizer.train(corpus, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=30.0) as p:
        yield p


def math_row(i, answer):
    return {"id": f"p{i}", "problem": f"Problem {i}.", "kind": "math", "answer": answer}


# Three problems, n = 4. Correct flags, and the answers' equivalence classes (the vote):
#   p0, gold 1/2: 3 | 0.5 | \frac{1}{2} | \frac12      c = 3; classes {3} {0.5, 1/2, 1/2}
#   p1, gold 7:   7 | 5   | 5.0         | (none)      c = 1; classes {7} {5, 5.0}
#   p2, gold 12:  12 | 2  | 2           | 2           c = 1; classes {12} {2, 2, 2}
SCRIPT = [
    ["\\boxed{3}", "\\boxed{0.5}", "so \\boxed{\\frac{1}{2}}", "The answer is $\\frac12$."],
    ["\\boxed{7}", "\\boxed{5}", "\\boxed{5.0}", "I do not know."],
    ["\\boxed{12}", "\\boxed{2}", "\\boxed{2}", "\\boxed{2}"],
]
ROWS = [math_row(0, "\\frac{1}{2}"), math_row(1, "7"), math_row(2, "12")]


def test_metrics_of_scripted_completions_by_hand(tok, pool):
    sampler = ScriptedSampler(tok, SCRIPT)
    records = sample_and_score(ROWS, tok, pool, n=4, sampler=sampler, template="r1-zero", seed=3)
    got = summarise(records, 4, [1, 2, 3, 4])

    assert [r["completion"] for r in records] == [t for texts in SCRIPT for t in texts]  # EOS stripped
    assert [r["correct"] for r in records] == [False, True, True, True, True, False, False, False,
                                               True, False, False, False]
    assert [r["answer"] for r in records[:8]] == ["3", "0.5", "\\frac{1}{2}", "\\frac12", "7", "5", "5.0", None]
    # "0.5", "\frac{1}{2}" and "\frac12" vote together (class of sample 1); no answer, no vote
    assert [r["vote"] for r in records] == [0, 1, 1, 1, 0, 1, 1, None, 0, 1, 1, 1]

    assert got["num_problems"] == 3 and got["n"] == 4 and got["kinds"] == ["math"]
    assert got["pass@1"] == pytest.approx(5 / 12)                      # (3 + 1 + 1) / 12
    # unbiased pass@k per problem, 1 - C(n-c, k) / C(n, k), then the mean over problems
    closed = lambda n, c, k: 1 - comb(n - c, k) / comb(n, k)  # noqa: E731
    hand = {1: (3 / 4 + 1 / 4 + 1 / 4) / 3, 2: (1 + 1 / 2 + 1 / 2) / 3, 3: (1 + 3 / 4 + 3 / 4) / 3, 4: 1.0}
    for k, value in hand.items():
        assert got["pass@k"][str(k)] == pytest.approx(value)
        assert got["pass@k"][str(k)] == pytest.approx(sum(closed(4, c, k) for c in (3, 1, 1)) / 3)
    assert got["pass@k"]["1"] == pytest.approx(got["pass@1"])
    # maj@k over the first k samples, ties to the earliest class:
    #   k=1: 3 / 7 / 12 -> 0, 1, 1;   k=2: {3} vs {0.5} tie -> 3; 7 vs 5 -> 7; 12 vs 2 -> 12 -> 0, 1, 1
    #   k=3: {0.5, 1/2} -> 1; {5, 5.0} -> 0; {2, 2} -> 0;  k=4: 1, 0, 0
    assert got["maj@k"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "3": 1 / 3, "4": 1 / 3})
    lengths = [len(tok.encode(t)) + 1 for texts in SCRIPT for t in texts]   # + the EOS
    assert got["mean_length"] == pytest.approx(sum(lengths) / 12) and got["truncated"] == 0.0

    # math prompts carry DeepSeek's instruction; problem i samples with seed seed * 1_000_003 + i
    prompts, params = sampler.calls[0]
    assert "Please reason step by step" in tok.decode(prompts[0])
    assert [p.seed for p in params] == [3 * 1_000_003 + i for i in range(3)]
    assert {(p.temperature, p.top_p) for p in params} == {(0.6, 0.95)}


def test_closed_form_pass_at_k_for_other_counts(tok, pool):
    # n = 5 with c = 2 and c = 0: pass@k = 1 - C(3, k)/C(5, k) and 0
    script = [["\\boxed{1}", "\\boxed{0}", "\\boxed{1}", "x", "\\boxed{9}"], ["\\boxed{4}"] * 5]
    rows = [math_row(0, "1"), math_row(1, "5")]
    records = sample_and_score(rows, tok, pool, n=5, sampler=ScriptedSampler(tok, script), template="r1-zero")
    got = summarise(records, 5, [1, 2, 3, 4, 5])
    assert got["pass@k"] == pytest.approx({"1": 0.2, "2": 0.35, "3": 0.45, "4": 0.5, "5": 0.5})
    assert got["pass@k"] == pytest.approx({str(k): (1 - comb(3, k) / comb(5, k)) / 2 for k in range(1, 6)})
    # identical wrong answers win the vote of problem 1; problem 0: {1} has 2 votes against {0}, {9}
    assert got["maj@k"]["5"] == pytest.approx(0.5)


def test_answer_classes_group_equivalent_answers():
    values = AnswerClasses()(["1/2", "", "3", "0.5", "\\frac{1}{2}", "3.0"])
    assert values == [0.0, None, 2.0, 0.0, 0.0, 2.0]
    assert AnswerClasses.groupwise   # the pool must hand it a whole problem's samples


def test_program_of_follows_humaneval_and_fenced_code():
    row = {"prompt": "import math\n\n\ndef f(x):\n    \"\"\"Square root.\"\"\"\n", "entry_point": "f"}
    body = "    return math.sqrt(x)\n"
    assert program_of(body, row) == row["prompt"] + body                   # HumanEval: prompt + completion
    fenced = "Here:\n```python\ndef f(x):\n    return x ** 0.5\n```\nDone."
    assert program_of(fenced, row) == row["prompt"].rstrip() + "\n\n\ndef f(x):\n    return x ** 0.5\n"
    # the last block wins; a block that does not define f continues the prompt's body
    two = "```python\ndef f(x):\n    return 0\n```\n```py\n    return 1\n```"
    assert program_of(two, row) == row["prompt"] + "    return 1\n"
    # a natural-language prompt is not Python: the code alone runs
    text_row = {"prompt": "Write f that returns 1.", "entry_point": "f"}
    assert program_of("```python\ndef f():\n    return 1\n```", text_row) == "def f():\n    return 1\n"


def test_parse_ks_and_labels(tmp_path):
    assert parse_ks("", 8) == [1, 8] and parse_ks(None, 1) == [1] and parse_ks("4,1,4,2", 4) == [1, 2, 4]
    with pytest.raises(ValueError, match="every k must be in 1..--eval-n \\(4\\), got \\[8\\]"):
        parse_ks("1,8", 4)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ks("1,a", 4)
    assert set_label("math500") == "math500" and set_label("/x/my set.jsonl") == "my_set"
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}")
    assert template_source(str(f)) == "{{ messages[0].content }}" and template_source("r1-zero") == "r1-zero"


def test_flag_errors_name_the_flag():
    from recipes.flags import build_parser

    def flags(*extra, model=("--preset", "tiny", "--tokenizer", "tok")):
        return build_parser().parse_args(["--stage", "eval", *model, *extra])

    check_flags(flags("--eval-sets", "math500,aime24", "--eval-k", "1,2"), 1)
    for extra, message in [(("--eval-k", "8"), "every k must be in 1..--eval-n \\(4\\), got \\[8\\]"),
                           (("--eval-sets", "nope.jsonl"), "'nope.jsonl' is neither a benchmark"),
                           (("--eval-top-p", "0"), "--eval-top-p in \\(0, 1\\], got 0.6 and 0.0"),
                           (("--eval-n", "0"), "--eval-n and --eval-max-new-tokens must be >= 1"),
                           (("--eval-limit", "-1"), "--eval-limit must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            check_flags(flags(*extra), 1)
    with pytest.raises(ValueError, match="exactly one of --model DIR and --preset NAME"):
        check_flags(flags(model=()), 1)
    with pytest.raises(ValueError, match="--preset needs --tokenizer"):
        check_flags(flags(model=("--preset", "tiny")), 1)


@pytest.mark.parametrize("stage, flags, message", [
    ("eval", ["--eval-k", "9"], "--eval-k '9': every k must be in 1..--eval-n (4)"),
    ("generate", ["--data", "p.jsonl", "--keep-if", "lang>=1"], "names 'lang', which --reward does not score")])
def test_train_py_refuses_bad_flags_before_writing_anything(tmp_path, monkeypatch, capsys, stage, flags, message):
    import train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "1 + 1?"}\n')
    assert train.main(["--stage", stage, "--preset", "tiny", "--tokenizer", "tok", "--out", "run", *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_unknown_kind_is_an_error_naming_the_set(tok, pool):
    rows = [{"id": "q", "problem": "?", "kind": "poetry", "answer": "1"}]
    with pytest.raises(ValueError, match="mine: problem 'q' has kind 'poetry'"):
        sample_and_score(rows, tok, pool, n=1, sampler=ScriptedSampler(tok, [["1"]]), template="r1-zero",
                         where="mine")


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(shared_data_dir, tok, pool):
    rows = load_eval_set("humaneval", shared_data_dir)[:5]
    # sample 0 continues the prompt (HumanEval's convention), sample 1 writes the whole function in a block
    good = [[row["canonical_solution"],
             f"Sure.\n```python\ndef {row['entry_point']}{row['prompt'].split('def ' + row['entry_point'])[1]}"
             f"{row['canonical_solution']}```"] for row in rows]
    broken = [["    return None\n", f"```python\ndef {row['entry_point']}(*args):\n    return None\n```"]
              for row in rows]
    for script, expected in ((good, 1.0), (broken, 0.0)):
        records = sample_and_score(rows, tok, pool, n=2, sampler=ScriptedSampler(tok, script), template="chatml")
        got = summarise(records, 2, [1, 2])
        assert got["pass@1"] == expected, [(r["id"], r["sample"], r["score"]) for r in records]
        assert got["maj@k"] is None and got["kinds"] == ["code"]
        assert all(r["answer"].startswith(row["prompt"].rstrip()) for r, row in zip(records[::2], rows))


def _tokenizer(shared_data_dir, tmp_path) -> Path:
    problems = [json.loads(line) for line in (shared_data_dir / "math500.jsonl").read_text().splitlines()[:50]]
    tok = Tokenizer.train([p["problem"] + "\n" + p["solution"] for p in problems], vocab_size=512)
    return tok.save(tmp_path / "tok")


def _eval(tmp_path, shared_data_dir, out, *flags, torchrun=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "R1_DATA_DIR": str(shared_data_dir)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), "--stage", "eval", "--preset", "tiny", "--tokenizer",
           str(tmp_path / "tok"), "--chat-template", "r1-zero", "--reward-workers", "1", "--out", str(tmp_path / out),
           *flags]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return tmp_path / out


def _samples(run: Path, label: str) -> list[dict]:
    return [json.loads(line) for line in (run / f"samples-{label}.jsonl").read_text().splitlines()]


def test_tiny_model_on_math500_subset_end_to_end(shared_data_dir, tmp_path):
    _tokenizer(shared_data_dir, tmp_path)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))
    run = _eval(tmp_path, shared_data_dir, "run", "--eval-sets", f"math500,{mine}", "--eval-limit", "20",
                "--eval-n", "4", "--eval-k", "1,2,4", "--eval-max-new-tokens", "16")

    report = json.loads((run / "eval.json").read_text())
    assert sorted(report) == ["math500", "mine"]
    m = report["math500"]
    assert sorted(m) == sorted(["num_problems", "n", "kinds", "pass@1", "pass@k", "maj@k", "mean_length",
                                "truncated", "scoring_timeouts", "wall_s", "rollout_tp", "weight_bytes_per_rank"])
    assert m["rollout_tp"] == 1 and m["weight_bytes_per_rank"] > 0
    assert m["num_problems"] == 20 and m["n"] == 4 and sorted(m["pass@k"]) == sorted(m["maj@k"]) == ["1", "2", "4"]
    assert 0 < m["mean_length"] <= 16 and report["mine"]["num_problems"] == 3
    samples = _samples(run, "math500")
    ids = [row["id"] for row in load_eval_set("math500", shared_data_dir)[:20]]
    assert [(s["id"], s["sample"]) for s in samples] == [(i, j) for i in ids for j in range(4)]
    assert all(set(s) >= {"completion", "answer", "correct", "score"} for s in samples)
    assert m["pass@1"] == sum(s["correct"] for s in samples) / 80
    summary = json.loads((run / "summary.json").read_text())
    assert summary["math500/pass@1"] == m["pass@1"] and "mine/maj@4" in summary


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_sample_what_one_process_samples(shared_data_dir, tmp_path):
    # rank r takes problems r, r + 2, ...; seeds follow the problem's index, so the samples are the same
    _tokenizer(shared_data_dir, tmp_path)
    flags = ["--eval-sets", "math500", "--eval-limit", "7", "--eval-n", "2", "--eval-max-new-tokens", "8"]
    one = _samples(_eval(tmp_path, shared_data_dir, "one", *flags), "math500")
    two = _samples(_eval(tmp_path, shared_data_dir, "two", *flags, torchrun=True), "math500")
    assert len(one) == 14 and one == two
