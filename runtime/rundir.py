"""Run directories: never overwrite a previous run silently.

Every run writes into one directory: `config.json` (all flags), `metrics.jsonl`, `summary.json`,
`checkpoints/`. `prepare_run_dir` decides what happens to an existing one:
- resume=True: keep it (it must exist and hold config.json);
- otherwise, an existing non-empty directory is moved aside to `<dir>-<YYYYmmdd-HHMMSS>` and the
  move is reported, so the new run starts clean and the old one is kept whole.
Only rank 0 touches the file system; other ranks wait at a barrier and get the same answer.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.distributed import barrier, broadcast_object, get_rank


@dataclass(frozen=True)
class RunDir:
    path: Path
    moved_to: Path | None  # where a previous run in `path` was moved, if any
    resumed: bool


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}-{stamp}")
    k = 1
    while candidate.exists():  # two runs started in the same second
        candidate = path.with_name(f"{path.name}-{stamp}-{k}")
        k += 1
    return candidate


def prepare_run_dir(out: str | os.PathLike, resume: bool = False, log=print) -> RunDir:
    """Create (or, with resume, reopen) the run directory `out`; see the module docstring."""
    path = Path(out)
    result: RunDir | Exception | None = None
    if get_rank() == 0:
        try:
            result = _prepare(path, resume, log)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            result = e
    result = broadcast_object(result)
    barrier()
    if isinstance(result, Exception):
        raise result
    return result


def _prepare(path: Path, resume: bool, log) -> RunDir:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"run directory {path} exists and is not a directory")
    if resume:
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: run directory {path} does not exist (nothing to resume)")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--resume: {path} holds no config.json; it is not a run directory")
        return RunDir(path=path, moved_to=None, resumed=True)
    moved_to = None
    if path.is_dir() and any(path.iterdir()):
        moved_to = _aside_name(path)
        os.replace(path, moved_to)
        log(f"run directory {path} already existed: moved it to {moved_to} (use --resume to continue it)")
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path=path, moved_to=moved_to, resumed=False)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a crash leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_run_config(run: RunDir, config: dict) -> Path:
    """Write the run's flags to config.json (rank 0). On resume the previous flags are kept as
    config.resume-<n>.json beside the new ones, so a changed flag on resume stays visible."""
    path = run.path / "config.json"
    if get_rank() == 0:
        if run.resumed and path.exists():
            n = 1
            while (run.path / f"config.resume-{n}.json").exists():
                n += 1
            os.replace(path, run.path / f"config.resume-{n}.json")
        write_json_atomic(path, config)
    barrier()
    return path


def update_run_config(run: RunDir, **changes) -> None:
    """Record in config.json a flag value the stage settled on after it started (rank 0; e.g. a
    default batch size fitted to the data), so the file says what ran."""
    path = run.path / "config.json"
    if get_rank() == 0 and path.exists():
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        write_json_atomic(path, {**config, **changes})
    barrier()


def fill_default(args, flag: str, value, why: str) -> str:
    """Set the unset (None) flag `flag` of `args` to the value chosen for this run, remember it in
    `args.defaulted` (so config.json says which values were chosen rather than given), and return
    the console line that says so: "--warmup-steps 0 (default: ...)"."""
    setattr(args, flag, value)
    args.defaulted = sorted(set(getattr(args, "defaulted", None) or ()) | {flag})
    return f"--{flag.replace('_', '-')} {value} (default: {why})"


def check_rank_multiple(args, flag: str, default: int, world_size: int) -> list[str]:
    """A count summed over all ranks (--batch-size, --prompts-per-step): an unset one becomes
    `default` rounded up to a multiple of world_size (the console line saying so is returned);
    a given one must be a positive multiple of world_size (ValueError naming the flag)."""
    notes = []
    if getattr(args, flag) is None:
        value = -(-default // world_size) * world_size
        notes.append(fill_default(args, flag, value, f"{default}" + (
            f" rounded up to a multiple of the {world_size} ranks" if value != default else "")))
    value = getattr(args, flag)
    if value < 1 or value % world_size:
        raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a positive multiple of the {world_size} rank(s)")
    return notes

