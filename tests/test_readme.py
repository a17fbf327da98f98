"""The README's two commands stay true: CI reads the test command from it, and the main job's
steps after the install run here (in a temporary directory, against this checkout)."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL = "python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "


def block_after(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", README, re.S)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1).strip()


def test_test_command_installs_its_own_environment_and_runs_pytest():
    cmd = block_after("test-command")
    assert cmd.startswith(INSTALL) and 'pip install -e ".[test]"' in cmd and cmd.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci  # CI runs the README's block, not a copy of it


def test_main_command_steps_run(tmp_path):
    cmd = block_after("main-command")
    assert cmd.startswith(INSTALL + "pip install -e . && ")
    steps = cmd[len(INSTALL + "pip install -e . && "):]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ["runs/data/corpus.jsonl", "runs/data/prompts.jsonl", "runs/data/heldout.jsonl",
              "runs/data/tokenizer/tokenizer.json"]:
        assert (tmp_path / f).stat().st_size > 0, f
    # rerunnable: a second run of the same command succeeds (files are replaced with --force)
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
