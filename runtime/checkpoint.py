"""Checkpoints for exact resume, shared by the SFT and GRPO loops.

Layout, one directory per saved step (8-digit step numbers sort as text):

    <run>/checkpoints/step-00000100/
        state.json        trainer state (step, tokens seen, sampler position, guard counters, ...
                          anything JSON-able the loop passes) plus what this module needs to load
                          it back: format, world size, the model's state-dict keys and shapes
        rng-rank{r}.pt    each rank's RNG states (runtime.seeding.capture_rng_state)
        model.pt          single process: torch.save(model.state_dict()) -- exact fp32 weights
        optim.pt          single process: torch.save(optimizer.state_dict())
        model_dcp/        sharded: the model state dict, written with torch.distributed.checkpoint
        optim/            sharded: the optimizer state dict, likewise (__0_0.distcp, __1_0.distcp, ...)
        hf/               optional: the caller's save_model_fn(dir) output (HF folder, maybe bf16)
        adapter/          optional: what save_model_fn writes beside hf/ (a LoRA run's PEFT adapter)
        COMPLETE          written last

Frozen parameters (requires_grad=False: a LoRA run's base weights) are not written to model.pt /
model_dcp/: nothing changes them, and resume rebuilds them from the run's --model or --preset
before loading, so a LoRA checkpoint's resumable state is the adapters, the buffers and the
optimizer, not another copy of the base.

The HF folder is for people and other tools; resume reads model.pt / model_dcp/, because the HF
copy may be in a lower precision and exact resume needs the fp32 master weights. "Sharded" means
several ranks, or FSDP2 (DTensor) parameters even on one rank; then the state dicts are written
by torch.distributed.checkpoint (DCP): each rank writes its own shards, so no rank ever gathers
the whole model or optimizer state, and DCP can reshard on load if the world size changes (then
the RNG states cannot be restored, and a line says so).

Atomicity. Everything is written into `.tmp-step-00000100-<pid>-<random>/` beside the final
directory, every file is fsynced, the COMPLETE marker is written last, and rank 0 renames the
directory into place. A crash (even kill -9) at any point leaves either the previous complete
checkpoints untouched plus a `.tmp-*` directory, or the new complete one. `latest_checkpoint`
scans for `step-*` directories holding COMPLETE, so it never returns a half-written one, and the
next save or load removes stale `.tmp-*` directories with a log line. Old checkpoints beyond
`keep_last` are renamed to `.tmp-*` before they are deleted, for the same reason.

Distributed runs assume a file system every rank sees (what DCP needs anyway); `save_checkpoint`
and `load_checkpoint` are collective: every rank calls them.

In a training loop (model built, sharded and given its optimizer first):

    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step = state["step"]; sampler.load_state_dict(state["sampler"]); guard.load_state_dict(state["guard"])
    ...
    if is_checkpoint_step(step, every=save_every, last_step=max_steps):
        save_checkpoint(run_dir, step, model=model, optimizer=optimizer,
                        trainer_state={"tokens_seen": n, "sampler": sampler.state_dict(), "guard": guard.state_dict()},
                        save_model_fn=lambda d: save_pretrained(model, d))
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from runtime.distributed import barrier, broadcast_object, get_rank, get_world_size, print0
from runtime.rundir import write_json_atomic
from runtime.seeding import capture_rng_state, restore_rng_state

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
MARKER_FILE = "COMPLETE"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives: <run_dir>/checkpoints/step-00000100."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def is_checkpoint_step(step: int, *, every: int, last_step: int) -> bool:
    """True when a loop should save after finishing `step`: every `every` steps (0: never) and at `last_step`."""
    return step == last_step or (every > 0 and step % every == 0)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under <run_dir>/checkpoints as (step, path), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MARKER_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None. Half-written saves are never returned."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- file system helpers

def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


_TMP_OWNER = re.compile(r"^\.tmp-step-\d{8,}-(\d+)-[0-9a-f]+$")


def _save_in_progress(name: str) -> bool:
    """True if `name` is the temporary directory of a save running now in another process on
    this machine (an evaluator loading while the trainer saves must not delete its work)."""
    m = _TMP_OWNER.match(name)
    if m is None or int(m.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(m.group(1)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(root: Path, log) -> None:
    """Delete `.tmp-*` directories under `root`: leftovers of interrupted saves or prunes.

    A save's directory is named after its process id and skipped while that process runs. Saves
    from other machines cannot be told apart this way: only one job may write a run directory.
    """
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if d.name.startswith(_TMP_PREFIX) and d.is_dir() and not _save_in_progress(d.name):
            shutil.rmtree(d, ignore_errors=True)
            log(f"checkpoint: removed stale temporary directory {d} (left by an interrupted save)")


def _discard(path: Path, root: Path) -> None:
    """Delete a checkpoint directory so that no crash leaves a half-deleted `step-*` behind."""
    doomed = root / f"{_TMP_PREFIX}delete-{path.name}-{secrets.token_hex(3)}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)  # whatever is left is removed as stale next time


# ----------------------------------------------------------------------------- save

def _on_rank0(fn: Callable[[], object]):
    """Run `fn` on rank 0 and hand its result to every rank (also a barrier). A file-system error
    there is raised on every rank, so the others fail with it instead of waiting for a timeout."""
    result = None
    if get_rank() == 0:
        try:
            result = fn()
        except OSError as e:
            result = e
    result = broadcast_object(result)
    if isinstance(result, OSError):
        raise result
    return result


def _uses_dcp(model: nn.Module) -> bool:
    """Sharded format when several ranks train together, or when the parameters are DTensors
    (FSDP2, even on a single rank): their state dicts are written and read with DCP."""
    return get_world_size() > 1 or any(isinstance(p, DTensor) for p in model.parameters())


def _trained_state(model: nn.Module, state_dict: dict) -> dict:
    """state_dict without the frozen parameters (the module docstring)."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state_dict.items() if k not in frozen} if frozen else state_dict


def _state_dict_shapes(state_dict: dict) -> dict[str, list[int]]:
    # DTensor.shape is the global shape, so the record is the same on every rank and world size
    return {k: list(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _check_json_able(trainer_state: dict) -> None:
    for key, value in trainer_state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"trainer_state[{key!r}] cannot be written to {STATE_FILE}: {e}") from None


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict,
                    save_model_fn: Callable[[Path], None] | None = None, keep_last: int | None = 3,
                    log: Callable[[str], None] = print0) -> Path:
    """Write the checkpoint of `step` atomically (module docstring) and return its final path.

    trainer_state: JSON-able dict the loop needs to continue (tokens seen, sampler state, guard
        counters, ...); rank 0's copy is saved, so it must be the same on every rank. Its "step",
        if present, must equal `step`.
    save_model_fn: called as save_model_fn(<tmp>/hf) on every rank (it may gather weights
        collectively); it writes the HF model folder (the model package owns that format).
    keep_last: keep this many most recent checkpoints (up to `step`), delete older ones after the
        new one is in place; None keeps all. Checkpoints of a *higher* step (a run resumed from
        an earlier checkpoint) are left alone, with a warning, and never count against keep_last.
    Collective: every rank calls it; rank 0 renames and prunes.
    """
    if step < 0:
        raise ValueError(f"step={step}: expected >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: expected >= 1, or None to keep every checkpoint")
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state['step']={trainer_state['step']} disagrees with step={step}")
    _check_json_able(trainer_state)

    root = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoint_dir(run_dir, step)
    rank, world = get_rank(), get_world_size()
    sharded = _uses_dcp(model)
    tmp = _on_rank0(lambda: _make_tmp_dir(root, final.name, log))  # every rank now knows the directory

    # every rank writes its own part
    _torch_save(capture_rng_state(), tmp / f"rng-rank{rank}.pt")
    model_sd = _trained_state(model, get_model_state_dict(model) if sharded else model.state_dict())
    if sharded:
        dcp.save(model_sd, checkpoint_id=tmp / "model_dcp")
    else:
        _torch_save(model_sd, tmp / "model.pt")
    # A fresh optimizer has no state yet; asking DCP for its state dict would initialise it
    # (one zero step), which would change the run, so an empty optimizer is recorded as such.
    has_optimizer_state = optimizer is not None and len(optimizer.state) > 0
    if has_optimizer_state:
        if sharded:
            dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "optim")
        else:
            _torch_save(optimizer.state_dict(), tmp / "optim.pt")
    if save_model_fn is not None:
        save_model_fn(tmp / "hf")
    barrier()  # all ranks' files are written

    meta = {
        "version": FORMAT_VERSION,
        "step": step,
        "format": "dcp" if sharded else "torch",
        "world_size": world,
        "optimizer": has_optimizer_state,
        "hf": save_model_fn is not None,
        "model_keys": _state_dict_shapes(model_sd),
        "trainer": {**trainer_state, "step": step},
    }
    _on_rank0(lambda: _publish(tmp, final, meta, keep_last, log))
    return final


def _make_tmp_dir(root: Path, name: str, log) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, log)
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, meta: dict, keep_last: int | None, log) -> None:
    """Rank 0, once every rank's files are in `tmp`: state.json, fsync everything, the marker
    last, rename into place, prune."""
    write_json_atomic(tmp / STATE_FILE, meta)
    _fsync_tree(tmp)
    with open(tmp / MARKER_FILE, "w") as f:
        f.write(f"step {meta['step']}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    root = final.parent
    if final.exists():  # saving a step again (e.g. the last step after resuming at it)
        _discard(final, root)
        log(f"checkpoint: replaced the existing {final}")
    os.rename(tmp, final)
    _fsync_path(root)
    _prune(root, meta["step"], keep_last, log)


def _prune(root: Path, step: int, keep_last: int | None, log) -> None:
    found = list_checkpoints(root.parent)
    newer = [p for s, p in found if s > step]
    if newer:
        log(f"checkpoint: warning: {len(newer)} checkpoint(s) of later steps than {step} exist "
            f"({', '.join(p.name for p in newer)}), from before this run was resumed at an earlier step; "
            f"latest_checkpoint() picks them over this run's, so move them away if they are abandoned")
    if keep_last is None:
        return
    older = [p for s, p in found if s <= step]
    for path in older[:-keep_last]:
        _discard(path, root)
        log(f"checkpoint: deleted {path.name} (keep_last={keep_last})")
    _fsync_path(root)


# ----------------------------------------------------------------------------- load

def _mismatch_message(path: Path, saved: dict[str, list[int]], current: dict[str, list[int]],
                      what: str) -> str | None:
    missing = sorted(set(saved) - set(current))
    unexpected = sorted(set(current) - set(saved))
    shapes = [f"{k}: saved {saved[k]}, model {current[k]}" for k in saved if k in current and saved[k] != current[k]]
    if not (missing or unexpected or shapes):
        return None

    def first(names):
        return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")

    parts = []
    if missing:
        parts.append(f"in the checkpoint but not in the {what}: {first(missing)}")
    if unexpected:
        parts.append(f"in the {what} but not in the checkpoint: {first(unexpected)}")
    if shapes:
        parts.append(f"different shapes: {first(shapes)}")
    return f"checkpoint {path} does not match the {what}; " + "; ".join(parts)


def _check_optimizer_groups(path: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """Same number of groups, same parameters in each (by name when both sides carry names)."""
    file = path / "optim.pt"
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint {file}: {len(saved['param_groups'])} parameter groups saved, "
                         f"the optimizer has {len(optimizer.param_groups)}")
    for i, (s, c) in enumerate(zip(saved["param_groups"], optimizer.param_groups)):
        s_names, c_names = s.get("param_names"), c.get("param_names")
        if s_names is not None and c_names is not None and s_names != c_names:
            msg = _mismatch_message(file, dict.fromkeys(s_names, []), dict.fromkeys(c_names, []),
                                    f"optimizer's parameter group {i}")
            raise ValueError(msg or f"checkpoint {file}: parameter group {i} lists its parameters "
                                    f"in a different order than the optimizer")
        if len(s["params"]) != len(c["params"]):
            raise ValueError(f"checkpoint {file}: parameter group {i} holds {len(s['params'])} parameters, "
                             f"the optimizer's {len(c['params'])}")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    log: Callable[[str], None] = print0) -> dict:
    """Restore model weights, optimizer state and this rank's RNG from the checkpoint `path`
    (a step-* directory, e.g. latest_checkpoint(run_dir)); returns the trainer state saved with it,
    "step" included.

    The model (and optimizer) must be built and, under FSDP, sharded exactly as for training
    before this is called. Raises FileNotFoundError for a missing or incomplete directory and
    ValueError naming the keys when the checkpoint does not match the model. Collective.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / MARKER_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {MARKER_FILE} marker: it is incomplete "
                                f"(an interrupted save?); latest_checkpoint(run_dir) returns only complete ones")
    if get_rank() == 0:
        _remove_stale_tmp(path.parent, log)
    meta = json.loads((path / STATE_FILE).read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / STATE_FILE}: format version {meta.get('version')!r}, expected {FORMAT_VERSION}")

    world = get_world_size()
    sharded = _uses_dcp(model)
    saved_format = meta["format"]
    if saved_format != ("dcp" if sharded else "torch"):
        raise ValueError(f"checkpoint {path} was saved by {meta['world_size']} process(es) in the {saved_format} "
                         f"format; this run has {world} and needs the {'dcp' if sharded else 'torch'} format. "
                         f"Resume sharded (FSDP) checkpoints under torchrun with the model sharded, and "
                         f"single-process ones in a single process (the hf/ folder loads anywhere).")

    full_sd = get_model_state_dict(model) if sharded else model.state_dict()
    model_sd = _trained_state(model, full_sd)
    msg = _mismatch_message(path, meta["model_keys"], _state_dict_shapes(model_sd), "model")
    if msg:
        raise ValueError(msg)

    # The optimizer goes first: under DCP, getting a fresh optimizer's state-dict layout runs one
    # zero-gradient step to create its state, and the weights loaded next overwrite anything it did.
    if optimizer is not None and meta["optimizer"]:
        if sharded:
            osd = get_optimizer_state_dict(model, optimizer)  # the target layout
            dcp.load(osd, checkpoint_id=path / "optim")
            set_optimizer_state_dict(model, optimizer, osd)
        else:
            osd = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
            _check_optimizer_groups(path, osd, optimizer)
            optimizer.load_state_dict(osd)
    elif optimizer is not None:
        log(f"checkpoint: {path.name} holds no optimizer state (saved before the first update); "
            f"the optimizer starts fresh")

    partial = len(model_sd) < len(full_sd)   # frozen parameters: rebuilt, not saved
    if sharded:
        dcp.load(model_sd, checkpoint_id=path / "model_dcp")
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=not partial))
    else:
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True), strict=not partial)

    rng_file = path / f"rng-rank{get_rank()}.pt"
    if meta["world_size"] == world:
        restore_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log(f"checkpoint: saved by {meta['world_size']} ranks, resumed on {world}: RNG states not restored, "
            f"so the continuation is not bitwise identical to an uninterrupted run")
    barrier()
    return dict(meta["trainer"])
