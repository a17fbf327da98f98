"""The tool-tiny recipe chains its stages (--recipe-smoke: a few steps on small data, 2 gloo ranks)
and writes the summary the recipe promises: base then tool_rl, each with sampled, greedy and
lenient accuracy and the tool share. The learning figures are the recipe's own (recipes/tool_tiny.py,
measured over seeds 0-2); this checks the plumbing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_tool_tiny_smoke_writes_its_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), "--recipe", "tool-tiny", "--recipe-smoke", "--out", str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base", "tool_rl"]
    for s in summary["stages"]:
        for key in ("accuracy", "greedy_accuracy", "lenient_accuracy", "tool_share"):
            assert 0.0 <= s[key] <= 1.0, (s["name"], key)
    rows = [json.loads(line) for line in (tmp_path / "run" / "tool_rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("tool/calls_per_rollout" in r for r in rows if "reward/mean" in r)
    assert json.loads((tmp_path / "run" / "tool_rl" / "config.json").read_text())["tools"] == "calculator"
