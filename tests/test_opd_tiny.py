"""The opd-tiny recipe chains its stages on an r1-tiny run (both --recipe-smoke: a few steps on small
data, one process) and writes the summary it promises: student_base, opd and sft_traces, each with
sampled and greedy accuracy, wall time and the student tokens it trained on, sft_traces sized to
opd's tokens. The comparison's figures are the recipe's own (recipes/opd_tiny.py); this checks the
plumbing, and that a --from-run that is not a finished r1-tiny run is refused naming what it lacks."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train(tmp_path, *flags):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_opd_tiny_smoke_on_an_r1_tiny_smoke_writes_its_summary(tmp_path):
    p = _train(tmp_path, "--recipe-smoke", "--out", str(tmp_path / "r1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    missing = _train(tmp_path, "--recipe", "opd-tiny", "--recipe-smoke", "--from-run", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "bad"))
    assert missing.returncode != 0 and "not a finished r1-tiny run" in missing.stdout + missing.stderr
    p = _train(tmp_path, "--recipe", "opd-tiny", "--recipe-smoke", "--from-run", str(tmp_path / "r1"),
               "--out", str(tmp_path / "opd"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "opd" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["student_base", "opd", "sft_traces"]
    for s in summary["stages"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["greedy_accuracy"] <= 1.0 and s["student_tokens"] > 0
    config = json.loads((tmp_path / "opd" / "opd" / "config.json").read_text())
    assert config["variant"] == "opd" and config["teacher"].startswith(str(tmp_path / "r1" / "final_rl"))
    rows = [json.loads(line) for line in (tmp_path / "opd" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert all("distill/reverse_kl" in r for r in rows if "reward/mean" in r)
    assert summary["teacher"]["name"] == "final_rl"
