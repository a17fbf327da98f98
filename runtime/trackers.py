"""Experiment trackers (`--report-to wandb,tensorboard`): the rows of metrics.jsonl, mirrored.

    trackers = make_trackers(args, run_dir, config)     # rank 0 only; [] for --report-to none
    metrics = MetricsWriter(run_dir / "metrics.jsonl", trackers=trackers)   # every line goes to each
    log_table(trackers, step, "rollouts", rows)         # a table (wandb.Table; tensorboard: text)

- wandb: `wandb.init(project=--wandb-project, name=the run directory's name, dir=the run directory,
  config=config.json's flags)`. The run id is kept in `<run>/wandb_id`, so `--resume` continues
  the same wandb run. WANDB_MODE=offline works without a network (`wandb sync` uploads later).
- tensorboard: `torch.utils.tensorboard.SummaryWriter` with event files under `<run>/tensorboard/`,
  every numeric value a scalar at its step, the flags as a text summary at step 0.

The keys and values are metrics.jsonl's, as written (non-finite values are left out: they are
null there). Neither library is a run-time dependency: each is imported only when named, and a
missing one is an error before the run starts, naming the extra to install (`pip install -e
".[track]"`). A tracker that fails mid-run (its process dies, the disk fills) is reported once
and dropped; training goes on and metrics.jsonl stays complete.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

from runtime.distributed import get_rank, print0

TRACKERS = ("wandb", "tensorboard")
_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def parse_report_to(text: str) -> list[str]:
    """--report-to: comma-separated names of TRACKERS, or none; ValueError naming an unknown one or a
    missing package (and the extra that installs it)."""
    names = [n.strip() for n in (text or "none").split(",") if n.strip()]
    if names == ["none"] or not names:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad or "none" in names:
        raise ValueError(f"--report-to {text!r}: {bad[0] if bad else 'none'!r} is not a tracker; expected none or "
                         f"a comma-separated list of {', '.join(TRACKERS)}")
    for n in names:
        if importlib.util.find_spec(_PACKAGES[n]) is None:
            raise ValueError(f"--report-to {n}: the {_PACKAGES[n]} package is not installed; "
                             f"pip install -e \".[track]\" (or pip install {_PACKAGES[n]})")
    return list(dict.fromkeys(names))


def _numbers(row: dict) -> dict:
    """The numeric entries of a metrics row (bools and non-finite values left out)."""
    out = {}
    for k, v in row.items():
        if k in ("step", "nonfinite") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v == v and v not in (float("inf"), float("-inf")):
            out[k] = v
    return out


class _Wandb:
    """wandb: log rows and tables to one run, continued across --resume."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str):
        os.environ.setdefault("WANDB_SILENT", "true")   # its banner would interleave with the progress lines
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, reinit="finish_previous")

    def log(self, step, row):
        self.run.log(_numbers(row), step=step)

    def table(self, step, name, rows):
        if not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[json.dumps(r[c]) if isinstance(r.get(c), (dict, list)) else r.get(c) for c in columns] for r in rows]
        self.run.log({name: self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self):
        self.run.finish()


class _TensorBoard:
    """tensorboard: scalars and text summaries under <run>/tensorboard/."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, step, row):
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, step, name, rows):
        lines = [json.dumps(r, default=str) for r in rows]
        self.writer.add_text(name, "\n\n".join(f"`{line}`" for line in lines), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Trackers:
    """The trackers of a run (rank 0); each call goes to every live tracker, and one that raises is
    reported once and dropped."""

    def __init__(self, trackers: list):
        self.live = list(trackers)

    def _each(self, what: str, fn) -> None:
        for t in list(self.live):
            try:
                fn(t)
            except Exception as e:   # a tracker must never stop the run
                self.live.remove(t)
                print0(f"warning: {t.name} failed while {what} ({type(e).__name__}: {e}); it is disabled for the rest "
                       f"of the run, metrics.jsonl is complete")

    def log(self, step: int, row: dict) -> None:
        self._each(f"logging step {step}", lambda t: t.log(step, row))

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        self._each(f"logging the {name} table", lambda t: t.table(step, name, rows))

    def close(self) -> None:
        self._each("closing", lambda t: t.close())
        self.live = []


def make_trackers(args, run_dir, config: dict | None = None) -> Trackers | None:
    """The --report-to trackers of this run on rank 0 (None elsewhere, or for none). `config`: the
    flags (default: the run directory's config.json)."""
    names = parse_report_to(getattr(args, "report_to", "none"))
    if not names or get_rank() != 0:
        return None
    run_dir = Path(run_dir)
    if config is None:
        path = run_dir / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else dict(vars(args))
    made = []
    for n in names:
        try:
            made.append(_Wandb(run_dir, config, getattr(args, "wandb_project", None) or "r1-recipe") if n == "wandb"
                        else _TensorBoard(run_dir, config))
        except Exception as e:
            print0(f"warning: --report-to {n}: could not start ({type(e).__name__}: {e}); the run goes on without it")
    return Trackers(made) if made else None


def log_table(trackers: Trackers | None, step: int, name: str, rows: list[dict]) -> None:
    if trackers is not None:
        trackers.table(step, name, rows)

