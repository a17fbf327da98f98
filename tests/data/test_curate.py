"""python -m data.curate: decontamination finds the planted overlaps with an eval set (changed case,
spacing and LaTeX spacing included) and nothing else; dedup drops exact and normalised repeats;
rows come out unchanged with all their columns (JSONL and Parquet); bad input names the file,
the row and the column."""
import json

import pytest

from data.curate import main, normalise
from data.datasets import read_jsonl

EVAL = [
    {"id": "e1", "problem": "Let $x$ be the smallest positive integer such that $x^2 + 3x$ is divisible by 17. Find $x$.",
     "answer": "14"},
    {"id": "e2", "problem": "Compute $2+2$.", "answer": "4"},            # shorter than 8 words: matched whole
    {"id": "e3", "problem": "How many ways can seven distinct books be arranged on a shelf of three?", "answer": "210"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def planted(tmp_path):
    rows = [
        {"id": "t1", "problem": "What is 3 + 4?", "source": "a", "extra": [1, 2]},
        # e1's words 2-9 with other case, spacing and LaTeX spacing: contaminated
        {"id": "t2", "problem": "Warm-up.  X BE THE SMALLEST   positive\\, integer such that $x^2+3x$ is nice", "source": "b"},
        {"id": "t3", "problem": "Compute $2 + 2$.", "source": "c"},                       # e2 whole
        # 7 of e3's words in a row, then others: below the 8-gram, kept
        {"id": "t4", "problem": "How many ways can seven distinct books sit at a fair?", "source": "d"},
        {"id": "t5", "problem": "Find the area of a circle of radius 2.", "source": "e"},
    ]
    return _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "eval.jsonl", EVAL), rows


def test_decontamination_finds_the_planted_overlaps_and_nothing_else(planted, tmp_path, capsys):
    train, evals, rows = planted
    out = tmp_path / "clean.jsonl"
    assert main(["decontaminate", "--data", str(train), "--out", str(out), "--against", str(evals)]) == 0
    kept = read_jsonl(out)
    assert kept == [rows[0], rows[3], rows[4]]                   # unchanged, every column, in order
    report = json.loads((tmp_path / "clean.jsonl.curate.json").read_text())
    assert report["dropped"] == 2 and report["ngram"] == 8
    assert report["against"]["eval"] == {"items": 3, "items_hit": 2, "hit": {"e1": 1, "e2": 1}}
    assert "eval: 2 of 3 items hit (e1, e2)" in capsys.readouterr().out
    # a shorter n-gram also catches the 7-word overlap
    assert main(["decontaminate", "--data", str(train), "--out", str(out), "--against", str(evals), "--ngram", "7"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["t1", "t5"]


def test_a_math500_problem_is_found_by_its_benchmark_name(shared_data_dir, tmp_path):
    from data.datasets import load_eval_set
    item = next(r for r in load_eval_set("math500", shared_data_dir) if "[asy]" not in r["problem"] and len(r["problem"].split()) > 30)
    train = _write(tmp_path / "t.jsonl", [{"question": "Unrelated: what is 1 + 1?"},
                                          {"question": "Solve this. " + item["problem"].upper()}])
    out = tmp_path / "o.jsonl"
    assert main(["decontaminate", "--data", str(train), "--out", str(out), "--against", "all-math",
                 "--data-dir", str(shared_data_dir)]) == 0
    report = json.loads((tmp_path / "o.jsonl.curate.json").read_text())
    assert report["kept"] == 1 and item["id"] in report["against"]["math500"]["hit"]
    assert report["against"]["math500"]["items"] == 500 and report["against"]["aime24"]["items"] == 30
    assert list(report["against"]) == ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "gsm8k"]


def test_dedup_drops_exact_and_normalised_repeats(tmp_path, capsys):
    rows = [{"prompt": "Find x if 2x = 4.", "k": 0}, {"prompt": "Find x if 2x = 4.", "k": 1},
            {"prompt": "find  X if 2x=4 .", "k": 2}, {"prompt": "Find y if 2y = 4.", "k": 3}]
    out = tmp_path / "d.jsonl"
    assert main(["dedup", "--data", str(_write(tmp_path / "in.jsonl", rows)), "--out", str(out)]) == 0
    assert [r["k"] for r in read_jsonl(out)] == [0, 3]
    report = json.loads((tmp_path / "d.jsonl.curate.json").read_text())
    assert report["duplicates"] == {"exact": 1, "normalised": 1}
    assert "exact duplicates 1, normalised 1" in capsys.readouterr().out
    assert normalise("Let $x\\,=\\!2$ ,  Then") == normalise("let x = 2, then")


def test_parquet_in_and_out_keeps_every_column(tmp_path):
    import pyarrow as pa   # the test extra's
    import pyarrow.parquet as pq
    rows = [{"problem": "A?", "answer": "1", "level": 3}, {"problem": "a ?", "answer": "1", "level": 3},
            {"problem": "B?", "answer": "2", "level": 5}]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    assert main(["dedup", "--data", str(src), "--out", str(tmp_path / "out.parquet")]) == 0
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [rows[0], rows[2]]


def test_bad_input_names_the_file_row_and_column(tmp_path, capsys):
    data = _write(tmp_path / "in.jsonl", [{"problem": "A?"}, {"text": "no problem column"}])
    assert main(["dedup", "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "problem, question, prompt" in err and "columns are text" in err
    assert main(["dedup", "--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--column", "body"]) == 2
    assert "no column 'body'" in capsys.readouterr().err
    assert main(["dedup", "--data", str(data), "--out", str(data)]) == 2       # never over its own input
    assert not (tmp_path / "o.jsonl").exists()
