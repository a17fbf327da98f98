"""Data set readers (JSONL/Parquet, prompts, conversations, eval sets) and the sharded sampler."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import data.datasets as datasets
from data.datasets import (ShardedBatchSampler, eval_data_dir, iter_jsonl, load_conversations,
                           load_eval_set, load_prompts, read_jsonl, read_rows)


def write_lines(path: Path, lines) -> Path:
    """Write raw text lines (dicts are JSON-encoded) to a file."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def raw_rows(path: Path) -> list[dict]:
    """The reference reader: plain json.loads per non-blank line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Public benchmark files
# ---------------------------------------------------------------------------------------------

BENCHMARKS = [  # name, file, rows, kind, id column, problem column
    ("math500", "math500.jsonl", 500, "math", "unique_id", "problem"),
    ("aime24", "aime24.jsonl", 30, "math", "id", "problem"),
    ("gsm8k_test", "gsm8k_test.jsonl", 1319, "math", "idx", "question"),
    ("humaneval", "humaneval.jsonl", 164, "code", "task_id", "prompt"),
]


@pytest.mark.parametrize("name,filename,count,kind,id_col,problem_col", BENCHMARKS)
def test_benchmark_files_load_normalised(shared_data_dir, name, filename, count, kind, id_col, problem_col):
    rows = load_eval_set(name, data_dir=shared_data_dir)
    raw = raw_rows(shared_data_dir / filename)
    assert len(rows) == count == len(raw)
    assert len({r["id"] for r in rows}) == count
    for r, src in zip(rows, raw):
        for k, v in src.items():  # every original column is kept, unchanged
            assert r[k] == v
        assert r["id"] == str(src[id_col])
        assert r["problem"] == src[problem_col] and isinstance(r["problem"], str)
        assert r["kind"] == kind
        if kind == "math":
            assert isinstance(r["answer"], str) and r["answer"] == src["answer"]
        else:
            assert "answer" not in r
            assert {"test", "entry_point", "canonical_solution"} <= set(r)


def test_benchmark_spot_values(shared_data_dir):
    aime = load_eval_set("aime24", data_dir=shared_data_dir)
    assert aime[0]["id"] == "2024-I-1" and aime[-1]["id"] == "2024-II-15"
    gsm = load_eval_set("gsm8k", data_dir=shared_data_dir)  # the short name is the test split
    assert gsm == load_eval_set("gsm8k_test", data_dir=shared_data_dir)
    assert gsm[0]["id"] == "0" and gsm[0]["answer"] == "18" and gsm[0]["problem"].startswith("Janet")
    he = load_eval_set("humaneval", data_dir=shared_data_dir)
    assert he[0]["id"] == "HumanEval/0" and he[0]["entry_point"] == "has_close_elements"
    math = load_eval_set("math500", data_dir=shared_data_dir)
    assert math[0]["id"] == "test/precalculus/807.json" and math[0]["level"] == 2


def test_benchmark_found_through_r1_data_dir(shared_data_dir, monkeypatch):
    monkeypatch.setenv("R1_DATA_DIR", str(shared_data_dir))
    assert eval_data_dir() == shared_data_dir
    assert len(load_eval_set("aime24")) == 30


def test_eval_data_dir_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("R1_DATA_DIR", str(tmp_path))
    assert eval_data_dir() == tmp_path
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("R1_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="R1_DATA_DIR=.*nowhere"):
        eval_data_dir()
    monkeypatch.delenv("R1_DATA_DIR")
    default = Path(datasets.__file__).resolve().parents[1].parent / "shared" / "data"
    assert eval_data_dir() == (default if default.is_dir() else None)


def test_benchmark_directory_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"math500\.jsonl not found.*R1_DATA_DIR"):
        load_eval_set("math500", data_dir=tmp_path)
    monkeypatch.setattr(datasets, "eval_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="no data directory.*R1_DATA_DIR"):
        load_eval_set("aime24")
    with pytest.raises(FileNotFoundError, match="no such file.*not a benchmark name"):
        load_eval_set(tmp_path / "mine.jsonl")


def test_truncated_benchmark_is_refused(shared_data_dir, tmp_path):
    lines = (shared_data_dir / "aime24.jsonl").read_text(encoding="utf-8").splitlines()[:10]
    write_lines(tmp_path / "aime24.jsonl", lines)
    with pytest.raises(ValueError, match="'aime24' has 30 problems, the file holds 10"):
        load_eval_set("aime24", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# A user's eval file
# ---------------------------------------------------------------------------------------------


def test_user_eval_file_normalised(tmp_path):
    p = write_lines(tmp_path / "mine.jsonl", [
        {"question": "1+1?", "answer": 2},
        {"problem": "x?", "answer": "3", "id": 7, "extra": [1]},
        {"prompt": "def f():", "test": "assert f() is None"},
        {"problem": "Reach 24", "answer": "24", "kind": "countdown", "numbers": [1, 2]},
    ])
    rows = load_eval_set(p)
    assert [r["id"] for r in rows] == ["mine/1", "7", "mine/3", "mine/4"]
    assert [r["problem"] for r in rows] == ["1+1?", "x?", "def f():", "Reach 24"]
    assert [r["kind"] for r in rows] == ["math", "math", "code", "countdown"]
    assert rows[0]["answer"] == "2" and rows[0]["question"] == "1+1?"
    assert rows[1]["extra"] == [1] and rows[3]["numbers"] == [1, 2]
    assert "answer" not in rows[2] and rows[2]["test"] == "assert f() is None"


@pytest.mark.parametrize("row,message", [
    ({"answer": "1"}, r"mine\.jsonl:2: missing column 'problem' \(or 'question' / 'prompt'\)"),
    ({"problem": "p"}, r"mine\.jsonl:2: missing column 'answer'"),
    ({"problem": "p", "answer": 1.5}, r"mine\.jsonl:2: column 'answer' must be a non-empty string"),
    ({"problem": "p", "kind": "code"}, r"mine\.jsonl:2: a code problem needs column 'test'"),
    ({"problem": "", "answer": "1"}, r"mine\.jsonl:2: column 'problem' must be a non-empty string"),
    ({"problem": "p", "answer": "1", "id": "a"}, r"mine\.jsonl:2: duplicate id 'a' \(first at .*mine\.jsonl:1\)"),
])
def test_user_eval_file_errors(tmp_path, row, message):
    p = write_lines(tmp_path / "mine.jsonl", [{"problem": "ok", "answer": "1", "id": "a"}, row])
    with pytest.raises(ValueError, match=message):
        load_eval_set(p)


# ---------------------------------------------------------------------------------------------
# Raw readers
# ---------------------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_keeps_order(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [{"a": 1}, "", "   ", {"b": [1, 2]}, {"c": "é"}])
    assert read_jsonl(p) == [{"a": 1}, {"b": [1, 2]}, {"c": "é"}]
    assert read_rows(p) == read_jsonl(p)


@pytest.mark.parametrize("bad,message", [
    ('{"a": 1,}', r"bad\.jsonl:3: invalid JSON: Expecting property name"),
    ("[1, 2]", r"bad\.jsonl:3: expected a JSON object per line, got list"),
    ('"text"', r"bad\.jsonl:3: expected a JSON object per line, got str"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    p = write_lines(tmp_path / "bad.jsonl", [{"a": 1}, "", bad, {"a": 2}])
    with pytest.raises(ValueError, match=message):
        read_jsonl(p)


def test_bad_utf8_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_jsonl(p)


def test_iter_jsonl_streams_rows_before_a_bad_line(tmp_path):
    p = write_lines(tmp_path / "s.jsonl", [{"i": 0}, {"i": 1}, "oops"])
    it = iter_jsonl(p)
    assert next(it) == {"i": 0} and next(it) == {"i": 1}
    with pytest.raises(ValueError, match=r"s\.jsonl:3: invalid JSON"):
        next(it)


def test_missing_file_is_named(tmp_path):
    for fn in (read_jsonl, iter_jsonl, read_rows, load_prompts, load_conversations):
        with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
            fn(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="not a file"):
        read_rows(tmp_path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import pyarrow` fail, whether or not it is installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "prompts.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"prompts\.parquet: reading Parquet files needs pyarrow "
                                          r"\(pip install pyarrow\)"):
        read_rows(p)


def test_parquet_rows_go_through_the_same_checks(tmp_path, monkeypatch):
    # A stand-in for pyarrow.parquet.read_table(path).to_pylist(), the only calls the reader makes.
    table_rows = [{"prompt": "a", "answer": "1"}, {"answer": "2"}]
    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = lambda path: types.SimpleNamespace(to_pylist=lambda: [dict(r) for r in table_rows])
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", pyarrow)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    p = tmp_path / "prompts.parquet"
    p.write_bytes(b"PAR1")
    assert read_rows(p) == table_rows
    with pytest.raises(ValueError, match=r"prompts\.parquet row 2: missing column 'prompt'"):
        load_prompts(p)


# ---------------------------------------------------------------------------------------------
# RL prompts
# ---------------------------------------------------------------------------------------------


def test_load_prompts_passes_columns_through(tmp_path):
    src = [
        {"prompt": "2+2?", "answer": "4", "kind": "arithmetic"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "numbers": [3, 5], "target": 8},
        {"prompt": "code", "tests": ["assert True"], "meta": {"a": None}},
    ]
    assert load_prompts(write_lines(tmp_path / "p.jsonl", src)) == src


def test_load_prompts_other_prompt_column(tmp_path):
    p = write_lines(tmp_path / "q.jsonl", [{"question": "why?", "answer": "because"}])
    assert load_prompts(p, prompt_column="question") == [
        {"question": "why?", "answer": "because", "prompt": "why?"}]
    p = write_lines(tmp_path / "clash.jsonl", [{"question": "why?", "prompt": "what?"}])
    with pytest.raises(ValueError, match=r"clash\.jsonl:1: prompt_column is 'question' but the row also "
                                         r"has a different 'prompt' column"):
        load_prompts(p, prompt_column="question")


def test_missing_prompt_column_names_column_file_and_first_line(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", [{"question": "a"}, {"question": "b", "x": 1}, {"q": "c"}, {"x": 1}])
    with pytest.raises(ValueError, match=r"p\.jsonl:3: missing column 'question' \(or 'messages'\); "
                                         r"the row has columns \['q'\]"):
        load_prompts(p, prompt_column="question")


@pytest.mark.parametrize("row,message", [
    ({"prompt": 3}, r"p\.jsonl:1: column 'prompt' must be a non-empty string, got int 3"),
    ({"prompt": " "}, r"p\.jsonl:1: column 'prompt' must be a non-empty string"),
    ({"messages": []}, r"p\.jsonl:1: column 'messages' must be a non-empty list"),
    ({"messages": "hi"}, r"p\.jsonl:1: column 'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, r"p\.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"p\.jsonl:1: messages\[1\]: unknown role 'bot', expected one of system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, r"p\.jsonl:1: messages\[0\]: 'content' must be a string"),
    ({"messages": [{"role": "user"}]}, r"p\.jsonl:1: messages\[0\]: 'content' must be a string, got NoneType"),
])
def test_prompt_shape_errors(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(write_lines(tmp_path / "p.jsonl", [row]))


def test_empty_file_is_an_error(tmp_path):
    p = write_lines(tmp_path / "empty.jsonl", ["", ""])
    assert read_jsonl(p) == []
    for fn in (load_prompts, load_conversations, load_eval_set):
        with pytest.raises(ValueError, match=r"empty\.jsonl: the file holds no rows"):
            fn(p)


# ---------------------------------------------------------------------------------------------
# SFT conversations
# ---------------------------------------------------------------------------------------------


def test_load_conversations_forms(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "reasoning_content": "r"}], "source": "x"},
        {"prompt": "q", "completion": "a", "source": "y"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
         "completion": [{"role": "assistant", "content": "a"}]},
        {"prompt": "q", "completion": "a", "reasoning": "think"},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
         "reasoning": "r2"},
    ])
    rows = load_conversations(p)
    assert rows[0] == {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "reasoning_content": "r"}],
                       "source": "x"}
    assert rows[1] == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "source": "y"}
    assert rows[2] == {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]}
    assert rows[3] == {"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "reasoning_content": "think"}]}
    # `reasoning` goes on the last assistant turn only
    assert rows[4]["messages"][1] == {"role": "assistant", "content": "a1"}
    assert rows[4]["messages"][3] == {"role": "assistant", "content": "a2", "reasoning_content": "r2"}
    assert "reasoning" not in rows[4]


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     r"c\.jsonl:2: the conversation has no assistant message \(roles: \['system', 'user'\]\)"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     r"c\.jsonl:2: the conversation has no assistant message"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"c\.jsonl:2: messages\[0\]: unknown role 'human'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     r"c\.jsonl:2: messages\[1\]: 'content' must be a string, got int 5"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"},
                   {"role": "assistant", "content": "a"}]},
     r"c\.jsonl:2: messages\[0\]: 'reasoning_content' is only allowed on assistant messages"),
    ({"prompt": "q"}, r"c\.jsonl:2: missing column 'completion'"),
    ({"text": "q"}, r"c\.jsonl:2: missing column 'messages' .*the row has columns \['text'\]"),
    ({"prompt": 1, "completion": "a"}, r"c\.jsonl:2: column 'prompt' must be a string or a list of messages"),
    ({"messages": [{"role": "assistant", "content": "a"}], "prompt": "q"},
     r"c\.jsonl:2: the row has both 'messages' and 'prompt'/'completion'"),
    ({"prompt": "q", "completion": "a", "reasoning": ["r"]}, r"c\.jsonl:2: column 'reasoning' must be a string"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a", "reasoning_content": "r"}], "reasoning": "r"},
     r"c\.jsonl:2: column 'reasoning' given but the last assistant message already has 'reasoning_content'"),
])
def test_conversation_errors(tmp_path, row, message):
    ok = {"prompt": "q", "completion": "a"}
    with pytest.raises(ValueError, match=message):
        load_conversations(write_lines(tmp_path / "c.jsonl", [ok, row]))


# ---------------------------------------------------------------------------------------------
# ShardedBatchSampler
# ---------------------------------------------------------------------------------------------


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_follows_the_documented_layout():
    # Reference built by hand from the contract: epoch e's order is default_rng([seed, e]).permutation(N);
    # step s gives rank r the r-th block of B rows of the s-th block of W*B rows.
    N, B, W, seed = 23, 3, 2, 5
    steps = N // (W * B)  # 3, remainder 5 dropped
    for r in range(W):
        got = take(ShardedBatchSampler(N, B, rank=r, world_size=W, seed=seed), 2 * steps)
        want = []
        for e in range(2):
            perm = np.random.default_rng([seed, e]).permutation(N)
            want += [perm[s * W * B + r * B: s * W * B + (r + 1) * B].tolist() for s in range(steps)]
        assert got == want
    assert take(ShardedBatchSampler(7, 2, shuffle=False), 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_shards_are_disjoint_and_cover_the_epoch_minus_remainder():
    N, B, W = 50, 4, 3  # 12 rows a step, 4 steps, 2 rows dropped per epoch
    samplers = [ShardedBatchSampler(N, B, rank=r, world_size=W, seed=1) for r in range(W)]
    assert all(s.steps_per_epoch == 4 for s in samplers)
    dropped = []
    for e in range(3):
        per_rank = [sum(take(s, 4), []) for s in samplers]
        assert all(len(x) == 16 for x in per_rank)  # every rank the same count
        seen = sum(per_rank, [])
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(N))
        dropped.append(set(range(N)) - set(seen))
        assert all(s.epoch == e + 1 and s.position == 0 for s in samplers)
    assert all(len(d) == 2 for d in dropped)
    assert len({frozenset(d) for d in dropped}) > 1  # the remainder moves between epochs


def test_global_batch_depends_only_on_world_times_batch():
    one = take(ShardedBatchSampler(40, 6, world_size=1, seed=3), 10)
    two = [take(ShardedBatchSampler(40, 3, rank=r, world_size=2, seed=3), 10) for r in range(2)]
    assert one == [a + b for a, b in zip(*two)]


def test_seeds_and_epochs_change_the_order():
    a = take(ShardedBatchSampler(100, 10, seed=0), 10)
    assert a == take(ShardedBatchSampler(100, 10, seed=0), 10)
    assert a != take(ShardedBatchSampler(100, 10, seed=1), 10)
    assert sorted(sum(a, [])) == list(range(100))
    assert take(ShardedBatchSampler(100, 10, seed=0), 20)[10:] != a  # epoch 1 is a new permutation


@pytest.mark.parametrize("rank", [0, 2])
def test_resume_matches_uninterrupted(rank):
    N, B, W, seed = 29, 2, 3, 11  # 4 steps per epoch
    total = 14
    full = take(ShardedBatchSampler(N, B, rank=rank, world_size=W, seed=seed), total)
    for cut in (0, 1, 3, 4, 5, 8, 13):  # 4 and 8 are epoch boundaries
        first = ShardedBatchSampler(N, B, rank=rank, world_size=W, seed=seed)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = ShardedBatchSampler(N, B, rank=rank, world_size=W, seed=seed)
        resumed.load_state_dict(state)
        assert head + take(resumed, total - cut) == full, cut
    first = ShardedBatchSampler(N, B, rank=rank, world_size=W, seed=seed)
    take(first, 4)
    assert first.state_dict()["epoch"] == 1 and first.state_dict()["position"] == 0


def test_finite_epochs_stop_and_resume_to_the_end():
    full = list(ShardedBatchSampler(10, 3, seed=2, num_epochs=2))
    assert len(full) == 6
    s = ShardedBatchSampler(10, 3, seed=2, num_epochs=2)
    head = take(s, 4)
    resumed = ShardedBatchSampler(10, 3, seed=2, num_epochs=2)
    resumed.load_state_dict(s.state_dict())
    assert head + list(resumed) == full
    with pytest.raises(StopIteration):
        next(resumed)


@pytest.mark.parametrize("other,message", [
    (dict(num_rows=30), "saved with num_rows=29, this sampler has num_rows=30"),
    (dict(world_size=2, rank=0), "saved with world_size=3, this sampler has world_size=2"),
    (dict(batch_size=3), "saved with batch_size=2"),
    (dict(seed=12), "saved with seed=11"),
])
def test_state_from_a_different_setup_is_refused(other, message):
    state = ShardedBatchSampler(29, 2, rank=1, world_size=3, seed=11).state_dict()
    kwargs = dict(num_rows=29, batch_size=2, rank=1, world_size=3, seed=11) | other
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(**kwargs).load_state_dict(state)
    # another rank of the same run may load it: the state is rank-independent
    ShardedBatchSampler(29, 2, rank=0, world_size=3, seed=11).load_state_dict(state)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="less than one global batch"):
        ShardedBatchSampler(5, 3, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedBatchSampler(10, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ShardedBatchSampler(10, 1, seed=-1)
    s = ShardedBatchSampler(10, 2)
    with pytest.raises(ValueError, match=r"'position' must be an int in \[0, 5\)"):
        s.load_state_dict(s.state_dict() | {"position": 5})
    with pytest.raises(ValueError, match="sampler state has no 'num_rows'"):
        s.load_state_dict({"epoch": 0, "position": 0})
