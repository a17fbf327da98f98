"""The README's two commands stay true: CI reads the test command from it, and the main job's
steps after the install run here (in a temporary directory, against this checkout)."""
import importlib.util
import json
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


def test_main_command_runs_the_recipe_chain(tmp_path):
    """The main job after the install, with --recipe-smoke (every stage for a step on small data):
    the stages chain under torchrun and summary.json lists them; a second start moves the first aside."""
    cmd = block_after("main-command")
    assert cmd.startswith(INSTALL + 'pip install -e ".[plot]" && ')
    steps = cmd[len(INSTALL + 'pip install -e ".[plot]" && '):]
    assert steps == "torchrun --nproc_per_node 2 train.py"
    steps = steps.replace("train.py", str(ROOT / "train.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", steps + " --recipe-smoke"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    summary = json.loads((tmp_path / "runs/r1-tiny/summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert summary["eval_problems"] > 0 and summary["wall_s"] > 0
    for s in summary["stages"]:
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["greedy_accuracy"] <= 1 and 0 <= s["lenient_accuracy"] <= 1
        assert s["params"] > 0 and s["wall_s"] > 0
    assert summary["stages"][-1]["params"] < summary["stages"][0]["params"]  # the student is smaller
    if importlib.util.find_spec("matplotlib") is not None:  # the test extra installs it, as the main command does
        assert all((tmp_path / "runs/r1-tiny" / f).stat().st_size > 0 for f in ("rl_curves.png", "accuracy_per_stage.png"))
    else:
        assert "pip install -e '.[plot]'" in p.stdout
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", steps + " --dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "moved" in p.stdout + p.stderr
    aside = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("r1-tiny-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").is_file()


STAGES = ["base", "r1_zero", "cold_start_sft", "reasoning_rl", "rejection_sft", "final_rl", "student"]


def test_real_scale_recipes_are_recipe_files_of_train_py_flags(monkeypatch):
    """Each command of the README's real-scale section runs train.py with --config recipes/<name>.yaml
    (torchrun's own flags aside), every recipe file there is one the README shows, and each parses into
    the parser's flags (recipes/config_file.py checks every key and type) with a --stage, --variant and
    --reward that train.py knows."""
    from recipes.config_file import parse_args
    from recipes.flags import build_parser
    from verify.rewards import REWARDS

    monkeypatch.chdir(ROOT)   # the commands name recipes/ relative to the checkout
    section = README[README.index("## Real-scale recipes"):README.index("## Tests")]
    commands = [line.split("#")[0].split() for b in re.findall(r"```\n(.*?)```", section, re.S)
                for line in b.replace("\\\n", " ").splitlines() if line.startswith("torchrun")]
    assert len(commands) == 6
    shown = []
    for cmd in commands:
        argv = cmd[cmd.index("train.py") + 1:]
        assert {f for f in cmd[1:cmd.index("train.py")] if f.startswith("--")} <= {"--nproc_per_node", "--nnodes"}
        assert argv[0] == "--config" and len(argv) == 2, cmd
        shown.append(argv[1])
        args = parse_args(build_parser(), argv)
        assert args.stage in ("sft", "grpo", "eval", "generate", "pretrain")
        assert args.variant in (None, "grpo", "dapo", "dr_grpo", "gspo")
        assert all(r.split(":")[0] in REWARDS for r in args.reward.split(","))
        assert args.out.startswith("runs/") and (args.model is not None)
    assert sorted(shown) == sorted(f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml"))
