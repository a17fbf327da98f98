"""`python -m verify score`: means and None counts on a small file, and exit status 2 on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {"completion": "<think>\n3+4=7\n</think>\n<answer>\n7\n</answer>", "answer": "7", "prompt": "What is 3 + 4?"},
    {"completion": "<answer>8</answer>", "answer": "7", "prompt": "What is 3 + 4?"},
    {"completion": "<think>\nok\n</think>\n<answer>\n9\n</answer>", "answer": "9", "prompt": "What is 4 + 5?"},
    {"completion": "no format at all", "answer": None, "prompt": "What is 1 + 1?"},
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verify", "score", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("workers", ["0", "1"])
def test_score_means_and_none_counts(tmp_path, workers):
    data = write_jsonl(tmp_path / "c.jsonl", [json.dumps(r) for r in ROWS])
    result = run("--data", str(data), "--reward", "format,arithmetic:2", "--workers", workers, "--timeout", "5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rewards = summary["rewards"]
    assert summary["n"] == 4 and summary["timeouts"] == 0
    # format: rows 1 and 3 -> 2/4; arithmetic: rows 1 and 3 right, row 2 wrong, row 4 no gold -> 2/3, 1 None
    assert rewards["format"] == {"mean": 0.5, "scored": 4, "none": 0}
    assert rewards["arithmetic"] == {"mean": pytest.approx(2 / 3), "scored": 3, "none": 1}
    # weighted: 1 + 2*1, 0 + 2*0, 1 + 2*1, 0 (arithmetic None) -> (3 + 0 + 3 + 0) / 4
    assert rewards["weighted(format,arithmetic:2)"] == {"mean": 1.5, "scored": 4, "none": 0}
    table = result.stdout.splitlines()
    assert table[0].split() == ["reward", "mean", "scored", "none"]
    assert table[2].split() == ["arithmetic", "0.6667", "3", "1"]


def test_missing_file(tmp_path):
    result = run("--data", str(tmp_path / "absent.jsonl"), "--reward", "format")
    assert result.returncode == 2
    assert "no such data file" in result.stderr and "absent.jsonl" in result.stderr


def test_bad_json_line_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "{not json", json.dumps(ROWS[1])])
    result = run("--data", str(data), "--reward", "format")
    assert result.returncode == 2
    assert f"{data}:2: not valid JSON" in result.stderr


def test_missing_completion_column(tmp_path):
    data = write_jsonl(tmp_path / "nocomp.jsonl", [json.dumps(ROWS[0]), json.dumps({"answer": "7"})])
    result = run("--data", str(data), "--reward", "format")
    assert result.returncode == 2
    assert f"{data}:2: expected a `completion` string column" in result.stderr


def test_unknown_reward_and_missing_reward_column(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"completion": "<answer>1</answer>"})])
    result = run("--data", str(data), "--reward", "format,nope")
    assert result.returncode == 2
    assert "unknown reward 'nope'" in result.stderr and "accuracy" in result.stderr
    result = run("--data", str(data), "--reward", "arithmetic", "--workers", "0")
    assert result.returncode == 2
    assert "needs a `answer` column" in result.stderr
