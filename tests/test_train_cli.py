"""train.py: flags, config.json in the run directory, unbuilt stages, existing run directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from recipes import stages
from recipes.flags import STAGES

ROOT = Path(__file__).resolve().parents[1]


def run_train(args, cwd, torchrun=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args, what", [([], "recipe 'r1-tiny'")] +
                         [(["--stage", s, "--out", "x"], f"stage '{s}'") for s in STAGES])
def test_unbuilt_stage_or_recipe_exits_nonzero_naming_it(tmp_path, monkeypatch, capsys, args, what):
    # Stages land one by one; empty registries stand for "not built yet" whatever has landed.
    monkeypatch.setattr(stages, "RUNNERS", {})
    monkeypatch.setattr(train, "RECIPE_RUNNERS", {})
    monkeypatch.chdir(tmp_path)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"{what} is not built yet" in err and "nothing was run or written" in err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_unbuilt_message_without_traceback_in_a_fresh_process(tmp_path):
    code = "import sys, train; train.stages.RUNNERS.clear(); sys.exit(train.main(['--stage', 'grpo']))"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "stage 'grpo' is not built yet" in p.stderr
    assert "Traceback" not in p.stderr


def test_dry_run_writes_parsed_flags(tmp_path):
    p = run_train(["--stage", "grpo", "--out", "runs/a", "--seed", "7", "--dry-run"], tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "runs/a/config.json").read_text())
    assert cfg["stage"] == "grpo" and cfg["seed"] == 7 and cfg["out"] == "runs/a" and cfg["world_size"] == 1
    assert cfg["resume"] is False and cfg["recipe"] == "r1-tiny"


def test_default_out_is_named_after_the_stage(tmp_path):
    p = run_train(["--stage", "eval", "--dry-run"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "runs/eval/config.json").read_text())["out"] == "runs/eval"


def test_existing_run_dir_moved_aside_and_said(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    p = run_train(["--stage", "sft", "--out", "r", "--dry-run"], tmp_path)
    assert p.returncode == 0, p.stderr
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("r-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == "{}\n"
    assert f"moved it to {aside[0].name}" in p.stdout or str(aside[0].name) in p.stdout


def test_resume_of_missing_run_dir_is_an_error(tmp_path):
    p = run_train(["--stage", "sft", "--out", "nope", "--resume", "--dry-run"], tmp_path)
    assert p.returncode == 2 and "nope does not exist" in p.stderr and "Traceback" not in p.stderr


def test_bad_flag_values(tmp_path):
    p = run_train(["--stage", "nonsense"], tmp_path)
    assert p.returncode == 2 and "invalid choice: 'nonsense'" in p.stderr
    p = run_train(["--stage", "sft", "--seed", "-3", "--dry-run"], tmp_path)
    assert p.returncode == 2 and "--seed -3" in p.stderr


@pytest.mark.distributed
def test_dry_run_under_torchrun_two_ranks(tmp_path):
    p = run_train(["--stage", "sft", "--out", "d", "--dry-run"], tmp_path, torchrun=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "d/config.json").read_text())["world_size"] == 2
    assert p.stdout.count("run directory d (new)") == 1  # printed by rank 0 only
