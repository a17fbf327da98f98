"""runtime/checkpoint.py: exact resume (in process, after kill -9, and sharded on 2 ranks), atomic
layout, keep_last, stale temporary directories, and errors on bad input.

The training run is tests/runtime/_ckpt_worker.py: AdamW with two groups and a cosine schedule,
clipping and the non-finite guard, dropout, numpy and python randomness, a shuffling sampler.
"""
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from runtime.checkpoint import (
    checkpoint_dir,
    is_checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from runtime.optim import build_optimizer
from runtime.seeding import seed_everything

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "runtime" / "_ckpt_worker.py"


def load_worker():
    spec = importlib.util.spec_from_file_location("_ckpt_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item()}"


@contextlib.contextmanager
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process, for FSDP2 without torchrun."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        # FSDP2 modules reach the group through reference cycles: collect them while it is alive
        # (left to interpreter exit, their gloo handles can abort the process)
        gc.collect()
        dist.destroy_process_group()


def run_worker(*args, torchrun=False, timeout=120):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, str(WORKER), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------- exact resume

def test_exact_resume_single_process(tmp_path, monkeypatch):
    worker = load_worker()
    reference = worker.run_training(tmp_path / "straight", steps=10)
    worker.run_training(tmp_path / "split", steps=10, stop_at=5, save_every=5)
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [5]
    seed_everything(12345)  # disturb every generator: the resume must restore them
    resumed = worker.run_training(tmp_path / "split", steps=10, resume=True)
    assert_bitwise_equal(reference, resumed)

    # the comparison is sharp: without the RNG restore (dropout, noise) the weights differ
    monkeypatch.setattr("runtime.checkpoint.restore_rng_state", lambda state: None)
    seed_everything(12345)
    unrestored = worker.run_training(tmp_path / "split", steps=10, resume=True)  # from step 5 again
    assert not torch.equal(unrestored["fc1.weight"], reference["fc1.weight"])

    state = json.loads((checkpoint_dir(tmp_path / "split", 5) / "state.json").read_text())
    assert state["trainer"] == {"examples_seen": 40, "sampler": {"epoch": 0, "pos": 40},
                                "guard": {"skipped_total": 0, "skipped_in_a_row": 0}, "step": 5}
    assert state["format"] == "torch" and state["model_keys"]["fc1.weight"] == [32, 8]


def test_kill_9_during_saves_then_resume(tmp_path, capsys):
    """SIGKILL in the middle of the save of step 6 (after the HF folder is written); resume in a
    new process, SIGKILL again at step 9 just before the rename (every file and the marker already
    in the temporary directory); resume again: the end weights equal an uninterrupted run's."""
    run = tmp_path / "run"
    common = ["--run-dir", run, "--steps", 10, "--save-every", 3]
    proc = run_worker(*common, "--kill-at", 6, "--kill-point", "hf", "--out", tmp_path / "never.pt")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert latest_checkpoint(run) == checkpoint_dir(run, 3)
    tmps = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [p.name[:len(".tmp-step-00000006-")] for p in tmps] == [".tmp-step-00000006-"]
    assert (tmps[0] / "hf" / "weights.pt").exists() and not (tmps[0] / "COMPLETE").exists()

    proc = run_worker(*common, "--resume", "--kill-at", 9, "--kill-point", "rename", "--out", tmp_path / "never.pt")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "removed stale temporary directory" in proc.stdout and tmps[0].name in proc.stdout
    assert "resumed from step-00000003 at step 3" in proc.stdout
    assert latest_checkpoint(run) == checkpoint_dir(run, 6)
    tmps = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    # complete in every file, marker included, yet ignored: only step-* directories count
    assert len(tmps) == 1 and tmps[0].name.startswith(".tmp-step-00000009-") and (tmps[0] / "COMPLETE").exists()

    # the last leg runs in this process (the one above already resumed in a fresh process)
    worker = load_worker()
    resumed = worker.run_training(run, steps=10, save_every=3, resume=True)
    out = capsys.readouterr().out
    assert "removed stale temporary directory" in out and "resumed from step-00000006 at step 6" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000009",
                                                                       "step-00000010"]
    assert_bitwise_equal(worker.run_training(tmp_path / "straight", steps=10), resumed)


def test_fsdp_single_rank_uses_dcp_and_resumes_exactly(tmp_path):
    """FSDP2 on a one-rank group (what `torchrun --nproc_per_node 1` gives): DTensor parameters,
    so the sharded format is used even though there is one process."""
    worker = load_worker()
    with one_rank_group(tmp_path):
        reference = worker.run_training(tmp_path / "straight", steps=8, fsdp=True)
        worker.run_training(tmp_path / "split", steps=8, stop_at=4, save_every=4, fsdp=True)
        ckpt = checkpoint_dir(tmp_path / "split", 4)
        assert json.loads((ckpt / "state.json").read_text())["format"] == "dcp"
        assert (ckpt / "optim" / "__0_0.distcp").exists() and not (ckpt / "optim.pt").exists()
        seed_everything(99)
        resumed = worker.run_training(tmp_path / "split", steps=8, resume=True, fsdp=True)
        assert_bitwise_equal(reference, resumed)
        with pytest.raises(ValueError, match="in the dcp format; .* needs the torch format"):
            load_checkpoint(ckpt, model=worker.TinyNet(), log=lambda m: None)  # an unsharded model


@pytest.mark.distributed
def test_fsdp_two_ranks_sharded_save_and_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_worker("--fsdp", "--run-dir", straight, "--steps", 10, "--save-every", 5,
                      "--out", tmp_path / "straight.pt", torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint_dir(straight, 5)
    proc = run_worker("--fsdp", "--run-dir", resumed, "--steps", 10, "--save-every", 5, "--resume-from", ckpt,
                      "--out", tmp_path / "resumed.pt", torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bitwise_equal(torch.load(tmp_path / "straight.pt", weights_only=True),
                         torch.load(tmp_path / "resumed.pt", weights_only=True))

    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2
    assert state["model_keys"]["fc1.weight"] == [32, 8]  # global shapes, not a shard's
    names = {p.name for p in ckpt.iterdir()}
    assert {"rng-rank0.pt", "rng-rank1.pt", "model_dcp", "optim", "hf", "COMPLETE"} <= names
    assert not {"model.pt", "optim.pt"} & names
    from torch.distributed.checkpoint import FileSystemReader
    for sub in ("optim", "model_dcp"):
        assert {p.name for p in (ckpt / sub).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        # every sharded tensor is split between the two ranks' files: no file holds all the state
        files_of = {}
        for index, info in FileSystemReader(ckpt / sub).read_metadata().storage_data.items():
            files_of.setdefault(index.fqn, set()).add(info.relative_path)
        sharded = [fqn for fqn in files_of if fqn.endswith(("exp_avg", "exp_avg_sq", "weight", "bias", "gain"))]
        assert sharded and all(files_of[fqn] == {"__0_0.distcp", "__1_0.distcp"} for fqn in sharded), files_of

    # DCP reshards: the 2-rank checkpoint of step 10 loads into FSDP2 on a one-rank group, with a
    # line saying the RNG states could not be restored
    with one_rank_group(tmp_path):
        state, logs, weights, adam_steps = load_on_one_rank(checkpoint_dir(straight, 10))
    assert state["step"] == 10 and state["examples_seen"] == 80
    assert any("saved by 2 ranks, resumed on 1: RNG states not restored" in m for m in logs)
    assert_bitwise_equal(torch.load(tmp_path / "straight.pt", weights_only=True), weights)
    assert adam_steps == {10}


def load_on_one_rank(ckpt: Path):
    """Load `ckpt` into the tiny model sharded by FSDP2 over a one-rank group; returns the trainer
    state, the log lines, the full weights and the optimizer's step counts."""
    from torch.distributed.fsdp import fully_shard
    worker = load_worker()
    model = worker.TinyNet()
    fully_shard(model.fc1)
    fully_shard(model)
    optimizer = build_optimizer(model, lr=1e-2)
    logs = []
    state = load_checkpoint(ckpt, model=model, optimizer=optimizer, log=logs.append)
    adam_steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
    return state, logs, worker.full_state_dict(model, fsdp=True), adam_steps


# ----------------------------------------------------------------------------- layout and policy

def tiny():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def save(run, step, model, opt, logs=None, **kw):
    return save_checkpoint(run, step, model=model, optimizer=opt, trainer_state={"tokens": step * 10},
                           log=(logs.append if logs is not None else lambda m: None), **kw)


def test_keep_last_removes_older_ones(tmp_path):
    model, opt = tiny()
    logs = []
    for step in range(1, 6):
        save(tmp_path, step, model, opt, logs, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert "deleted step-00000003 (keep_last=2)" in logs[-1]
    # a run resumed from an earlier step saves below a later checkpoint: the new one is kept,
    # the later one is left alone with a warning
    save(tmp_path, 2, model, opt, logs, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert any("later steps than 2" in m for m in logs)
    save(tmp_path, 7, model, opt, logs, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5, 7]


def test_latest_scans_complete_directories_only(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, opt = tiny()
    path = save(tmp_path, 3, model, opt)
    assert path == tmp_path / "checkpoints" / "step-00000003" and latest_checkpoint(tmp_path) == path
    (tmp_path / "checkpoints" / "step-00000009").mkdir()               # no COMPLETE marker
    (tmp_path / "checkpoints" / "step-12").mkdir()                      # not an 8-digit name
    (tmp_path / "checkpoints" / "step-12" / "COMPLETE").write_text("")
    assert latest_checkpoint(tmp_path) == path
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000009", model=model)


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_tmp_dirs_removed_on_save_and_load(tmp_path):
    model, opt = tiny()
    root = tmp_path / "checkpoints"
    stale = root / f".tmp-step-00000004-{dead_pid()}-abcdef"
    (stale / "hf").mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"half")
    live = root / f".tmp-step-00000006-{os.getppid()}-abcdef"  # a save running in another live process
    live.mkdir()
    logs = []
    path = save(tmp_path, 5, model, opt, logs)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step-00000005"]
    assert any("removed stale temporary directory" in m and stale.name in m for m in logs)
    stale.mkdir()
    logs.clear()
    load_checkpoint(path, model=model, optimizer=opt, log=logs.append)
    assert not stale.exists() and live.exists() and len(logs) == 1


def test_round_trip_restores_weights_optimizer_and_state(tmp_path):
    model, opt = tiny()
    path = save_checkpoint(tmp_path, 4, model=model, optimizer=opt, trainer_state={"step": 4, "data": {"pos": 7}},
                           log=lambda m: None)
    fresh = nn.Linear(3, 2)
    fresh_opt = build_optimizer(fresh, lr=0.1)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_opt, log=lambda m: None)
    assert state == {"step": 4, "data": {"pos": 7}}
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i in saved["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved["state"][i][k], loaded["state"][i][k])


def test_fresh_optimizer_is_saved_as_empty_and_not_touched(tmp_path):
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1)
    path = save(tmp_path, 0, model, opt)
    assert len(opt.state) == 0 and not (path / "optim.pt").exists()
    assert json.loads((path / "state.json").read_text())["optimizer"] is False
    other = build_optimizer(nn.Linear(3, 2), lr=0.1)
    logs = []
    load_checkpoint(path, model=nn.Linear(3, 2), optimizer=other, log=logs.append)
    assert len(other.state) == 0 and logs == [f"checkpoint: {path.name} holds no optimizer state "
                                              "(saved before the first update); the optimizer starts fresh"]


def test_same_step_saved_again_replaces_it(tmp_path):
    model, opt = tiny()
    logs = []
    save(tmp_path, 3, model, opt, logs)
    with torch.no_grad():
        model.weight.add_(1.0)
    path = save(tmp_path, 3, model, opt, logs)
    assert any("replaced" in m for m in logs)
    fresh = nn.Linear(3, 2)
    load_checkpoint(path, model=fresh, log=lambda m: None)
    assert torch.equal(fresh.weight, model.weight)


def test_is_checkpoint_step():
    assert [s for s in range(1, 11) if is_checkpoint_step(s, every=4, last_step=10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if is_checkpoint_step(s, every=0, last_step=10)] == [10]


# ----------------------------------------------------------------------------- errors on bad input

def test_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="step-00000042 does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000042", model=nn.Linear(2, 2))


def test_mismatched_model_names_the_keys(tmp_path):
    model, opt = tiny()
    path = save(tmp_path, 1, model, opt)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 5))
            self.scale = nn.Parameter(torch.zeros(2))

    with pytest.raises(ValueError) as err:
        load_checkpoint(path, model=Other())
    msg = str(err.value)
    assert str(path) in msg
    assert "in the checkpoint but not in the model: bias" in msg
    assert "in the model but not in the checkpoint: scale" in msg
    assert "weight: saved [2, 3], model [2, 5]" in msg


def test_mismatched_optimizer_groups_name_the_params(tmp_path):
    model, opt = tiny()
    path = save(tmp_path, 1, model, opt)
    fresh = nn.Linear(3, 2)
    other_opt = build_optimizer(fresh, lr=0.1, no_decay_names=("weight",))  # one group, not two
    with pytest.raises(ValueError, match="2 parameter groups saved, the optimizer has 1"):
        load_checkpoint(path, model=fresh, optimizer=other_opt)
    swapped = torch.optim.AdamW([{"params": [("bias", fresh.bias)]}, {"params": [("weight", fresh.weight)]}])
    with pytest.raises(ValueError, match="not in the optimizer's parameter group 0: weight; "
                                         ".* but not in the checkpoint: bias"):
        load_checkpoint(path, model=fresh, optimizer=swapped)


def test_sharded_checkpoint_refused_in_single_process(tmp_path):
    model, opt = tiny()
    path = save(tmp_path, 1, model, opt)
    meta = json.loads((path / "state.json").read_text())
    meta.update(format="dcp", world_size=2)
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="saved by 2 process.*this run has 1"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_bad_trainer_state_and_arguments(tmp_path):
    model, opt = tiny()
    with pytest.raises(ValueError, match=r"trainer_state\['sampler'\] cannot be written"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"sampler": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"trainer_state\['step'\]=2 disagrees with step=1"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"step": 2})
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={}, keep_last=0)
    assert not (tmp_path / "checkpoints").exists()  # nothing written for rejected input


def test_run_dir_that_is_a_file_raises(tmp_path):
    model, opt = tiny()
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(OSError):
        save(tmp_path / "run", 1, model, opt)


def test_directory_copy_is_a_complete_checkpoint(tmp_path):
    # a finished checkpoint directory is self-contained: copied elsewhere it still loads
    model, opt = tiny()
    path = save(tmp_path / "a", 2, model, opt)
    copy = tmp_path / "b" / "checkpoints" / path.name
    shutil.copytree(path, copy)
    assert latest_checkpoint(tmp_path / "b") == copy
    fresh = nn.Linear(3, 2)
    assert load_checkpoint(copy, model=fresh, log=lambda m: None)["tokens"] == 20
    assert torch.equal(fresh.weight, model.weight)
