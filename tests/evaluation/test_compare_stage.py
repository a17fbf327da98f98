"""--stage compare and the standard eval suite: two tiny checkpoints over every math set
(--eval-sets all-math) give one markdown table across models and sets and a bar chart; finished
eval runs compare without re-running; MBPP's canonical programs pass their test_list asserts through
the code reward; the eval stage writes its cross-set table (eval.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.datasets import EVAL_GROUPS, load_eval_set
from data.tokenizer import Tokenizer
from evaluation.compare_stage import comparison_table

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(path: Path, tok_dir: Path, seed: int) -> Path:
    from data.tokenizer import load_tokenizer
    from model.checkpoint import save_pretrained
    from model.config import ModelConfig
    from model.transformer import Transformer

    tok = load_tokenizer(tok_dir)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    save_pretrained(Transformer(config), path, tokenizer=tok)
    return path


def test_compare_two_checkpoints_over_all_the_math_sets(shared_data_dir, tmp_path):
    rows = [r["problem"] for r in load_eval_set("math500", shared_data_dir)[:40]]
    Tokenizer.train(rows, vocab_size=400).save(tmp_path / "tok")
    a, b = _checkpoint(tmp_path / "a", tmp_path / "tok", 0), _checkpoint(tmp_path / "b", tmp_path / "tok", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "R1_DATA_DIR": str(shared_data_dir)}
    flags = ["--eval-sets", "all-math", "--eval-limit", "2", "--eval-n", "2", "--eval-max-new-tokens", "6",
             "--chat-template", "r1-zero", "--reward-workers", "1"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "compare", "--models", f"{a},{b}", *flags,
           "--out", str(tmp_path / "cmp")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "cmp"
    results = json.loads((run / "compare.json").read_text())
    math_sets = list(EVAL_GROUPS["all-math"])
    assert list(results) == ["a", "b"] and all(list(results[m]) == math_sets for m in results)
    table = (run / "compare.md").read_text().splitlines()
    assert table[0] == "| set | a pass@1 | b pass@1 | a maj@k | b maj@k |"
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == math_sets
    for line, s in zip(table[2:], math_sets):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(results["a"][s]["pass@1"], abs=5e-5)
        assert float(cells[2]) == pytest.approx(results["b"][s]["pass@1"], abs=5e-5)
    assert "\n".join(table) in p.stdout and (run / "compare.png").stat().st_size > 10_000
    for k, m in enumerate("ab"):   # each model's own eval run, with the eval stage's table across sets
        sub = run / "evals" / f"{k}-{m}"
        assert (sub / "eval.md").read_text().startswith("| set | problems | n | pass@1 | maj@2 | pass@2 | mean length |")
        assert all(results[m][s]["num_problems"] == 2 for s in math_sets)
    # finished eval runs compare without sampling again, to the same table
    again = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "compare", "--models",
                            f"{run / 'evals' / '0-a'},{run / 'evals' / '1-b'}", "--out", str(tmp_path / "cmp2")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "cmp2" / "compare.md").read_text().replace("0-a", "a").replace("1-b", "b") == \
        (run / "compare.md").read_text()


def test_comparison_table_marks_missing_sets_and_common_maj():
    results = {"x": {"s1": {"pass@1": 0.5, "maj@k": {"1": 0.5, "4": 0.75}}, "s2": {"pass@1": 0.25, "maj@k": None}},
               "y": {"s1": {"pass@1": 0.125, "maj@k": {"1": 0.1, "4": 0.2}}}}
    assert comparison_table(results).splitlines() == [
        "| set | x pass@1 | y pass@1 | x maj@k | y maj@k |", "|---|---|---|---|---|",
        "| s1 | 0.5000 | 0.1250 | 0.7500 (k=4) | 0.2000 (k=4) |", "| s2 | 0.2500 | - | - | - |"]


def test_mbpp_loads_with_its_asserts_and_canonical_programs_pass(shared_data_dir):
    from verify.rewards import get_reward
    rows = load_eval_set("mbpp", shared_data_dir)
    assert len(rows) == 500 and rows[0]["id"] == "11" and rows[0]["kind"] == "code"
    assert rows[0]["problem"].startswith(rows[0]["text"]) and rows[0]["test_list"][0] in rows[0]["problem"]
    code = get_reward("code")
    picked = rows[:6]
    scores = code([f"```python\n{r['code']}\n```" for r in picked], **{k: [r.get(k) for r in picked]
                                                                       for k in ("test_list", "test_setup_code")})
    assert scores == [1.0] * 6
    broken = code(["```python\ndef nothing():\n    return None\n```"], test_list=[picked[0]["test_list"]],
                  test_setup_code=[picked[0]["test_setup_code"]])
    assert broken == [0.0]


def test_every_suite_set_loads(shared_data_dir):
    counts = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675,
              "gsm8k": 1319, "humaneval": 164, "mbpp": 500}
    assert list(EVAL_GROUPS["all"]) == [s for s in counts]
    for name, n in counts.items():
        rows = load_eval_set(name, shared_data_dir)
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        assert all(isinstance(r["problem"], str) and r["problem"] for r in rows)
        if rows[0]["kind"] == "math":
            assert all(isinstance(r["answer"], str) and r["answer"] for r in rows), name
