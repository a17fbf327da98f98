"""runtime/: seeding and RNG capture/restore, metrics.jsonl, progress lines, run directories."""
import json
import math
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from runtime.metrics import MetricsWriter, Progress, format_duration, read_metrics
from runtime.rundir import prepare_run_dir, write_json_atomic, write_run_config
from runtime.seeding import capture_rng_state, restore_rng_state, seed_everything


def draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_capture_restore_reproduces_every_generator(tmp_path):
    seed_everything(123)
    draws()  # advance past the seeding point
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = [draws() for _ in range(3)]
    seed_everything(999)  # disturb everything
    draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [draws() for _ in range(3)] == expected


def test_seed_everything_same_on_all_ranks_unless_asked():
    seed_everything(5, rank=0)
    a = draws()
    seed_everything(5, rank=1)
    assert draws() == a  # model init must match across ranks
    seed_everything(5, rank=1, distinct_per_rank=True)
    assert draws() != a


def test_seed_everything_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        seed_everything(-1)


def test_restore_rejects_wrong_dict():
    with pytest.raises(ValueError, match="missing"):
        restore_rng_state({"torch": torch.get_rng_state()})


def test_metrics_writer_lines_nonfinite_and_tensors(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.log(1, loss=torch.tensor(2.5), lr=np.float32(0.5), n=3)
        w.log(2, loss=float("nan"), grad_norm=float("inf"), note="x")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"step": 1, "loss": 2.5, "lr": 0.5, "n": 3}
    rec = json.loads(lines[1])  # strict JSON: no NaN literal in the file
    assert rec == {"step": 2, "loss": None, "grad_norm": None, "note": "x", "nonfinite": ["loss", "grad_norm"]}
    assert "NaN" not in path.read_text()


def test_metrics_writer_resume_drops_redone_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        for s in range(1, 6):
            w.log(s, loss=float(s))
    with MetricsWriter(path, resume_step=3) as w:  # checkpoint after step 3; steps 4, 5 are redone
        w.log(4, loss=40.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_metrics_writer_only_rank0_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, rank=1)
    w.log(1, loss=1.0)
    w.close()
    assert not path.exists()


def test_read_metrics_names_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_progress_line_rate_and_eta():
    now = [100.0]
    lines = []

    class Sink:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    p = Progress(total=10, desc="sft", every_s=5.0, stream=Sink(), clock=lambda: now[0])
    now[0] += 2.0
    text = p.update(1, loss=1.23456)  # first update always prints
    assert text == "sft step 1/10 (10%) | 2 s/step | elapsed 2s | ETA 18s | loss 1.235"
    now[0] += 2.0
    assert p.update(1) is None  # 2 s since the last line < every_s
    now[0] += 4.0
    text = p.update(2)  # 4 steps in 8 s: 0.5 step/s, 6 left -> 12 s
    assert text == "sft step 4/10 (40%) | 2 s/step | elapsed 8s | ETA 12s"
    now[0] += 0.1
    assert p.update(6) is not None  # the last step always prints
    assert "10/10 (100%)" in lines[-2]


def test_format_duration():
    assert format_duration(4.2) == "4s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(math.nan) == "?"


def test_run_dir_new_then_moved_aside(tmp_path):
    out = tmp_path / "runs" / "exp"
    messages = []
    run = prepare_run_dir(out, log=messages.append)
    assert run.path == out and out.is_dir() and run.moved_to is None and not run.resumed
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    run2 = prepare_run_dir(out, log=messages.append)
    assert run2.moved_to is not None and run2.moved_to.name.startswith("exp-")
    assert (run2.moved_to / "metrics.jsonl").read_text() == '{"step": 1}\n'  # old run kept whole
    assert list(out.iterdir()) == []
    assert len(messages) == 1 and str(run2.moved_to) in messages[0] and "--resume" in messages[0]


def test_run_dir_empty_existing_is_reused(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    assert prepare_run_dir(out, log=lambda m: None).moved_to is None


def test_run_dir_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_run_dir(tmp_path / "nope", resume=True)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_run_dir(tmp_path / "half", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        prepare_run_dir(tmp_path / "file")


def test_write_run_config_keeps_previous_flags_on_resume(tmp_path):
    run = prepare_run_dir(tmp_path / "exp")
    write_run_config(run, {"lr": 1e-3})
    run = prepare_run_dir(tmp_path / "exp", resume=True)
    assert run.resumed
    write_run_config(run, {"lr": 5e-4})
    assert json.loads((tmp_path / "exp" / "config.json").read_text()) == {"lr": 5e-4}
    assert json.loads((tmp_path / "exp" / "config.resume-1.json").read_text()) == {"lr": 1e-3}


def test_write_json_atomic_leaves_no_temp(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


WORKER = textwrap.dedent("""
    import json, sys
    from runtime.distributed import init_distributed, broadcast_object, teardown, print0
    from runtime.rundir import prepare_run_dir, write_run_config
    from runtime.seeding import seed_everything, capture_rng_state
    info = init_distributed()
    try:
        out = sys.argv[1]
        run = prepare_run_dir(out, log=print0)
        write_run_config(run, {"world_size": info.world_size})
        token = broadcast_object({"from": info.rank} if info.rank == 0 else None)
        seed_everything(7, rank=info.rank, distinct_per_rank=True)
        import torch
        draw = torch.rand(1).item()
        with open(f"{out}.rank{info.rank}.json", "w") as f:
            json.dump({"rank": info.rank, "world": info.world_size, "backend": info.backend,
                       "token": token, "moved": str(run.moved_to), "draw": draw}, f)
    finally:
        teardown()
""")


@pytest.mark.distributed
def test_two_ranks_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in recs] == [0, 1] and all(r["world"] == 2 and r["backend"] == "gloo" for r in recs)
    assert all(r["token"] == {"from": 0} for r in recs)
    # rank 0 moved the old run aside exactly once and both ranks were told where
    assert recs[0]["moved"] == recs[1]["moved"] != "None"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run-")]
    assert len(aside) == 1 and (aside[0] / "old.txt").read_text() == "previous run"
    assert json.loads((out / "config.json").read_text()) == {"world_size": 2}
    assert recs[0]["draw"] != recs[1]["draw"]  # distinct_per_rank
