"""Per-step metrics (`metrics.jsonl`) and progress lines for long work.

`MetricsWriter` appends one JSON object per step to `<run>/metrics.jsonl` from rank 0, flushed per
line so a crash loses at most the line being written. Values may be Python numbers, 0-d tensors
or numpy scalars; non-finite floats are written as null (JSON has no NaN), with the key listed
under "nonfinite" so the fact is not lost. On resume the writer drops the lines of steps after
the checkpoint, so the file shows each step once.

With `trackers` (runtime/trackers.py, `--report-to`), every line written is also sent to each
tracker, as written.

`Progress` prints `desc  step/total (pct) | rate | elapsed | ETA | metrics` at most every
`every_s` seconds (and at the end).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from runtime.distributed import get_rank


def _plain(value):
    """A JSON-safe Python value: tensors/numpy scalars -> numbers, non-finite floats -> None."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Append-only JSONL of per-step metrics, written by rank 0 only.

    resume_step: when resuming from a checkpoint taken after step k, lines with step > k are
    dropped (they belong to work that is being redone).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, rank: int | None = None,
                 trackers=None):
        self.path = Path(path)
        self.trackers = trackers   # runtime.trackers.Trackers: each line written is also sent there
        self.enabled = (get_rank() if rank is None else rank) == 0
        self._file = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **metrics) -> dict:
        """Write {"step": step, **metrics} as one line; returns the record as written."""
        record = {"step": int(step)}
        nonfinite = []
        for key, value in metrics.items():
            plain = _plain(value)
            if plain is None and value is not None:
                nonfinite.append(key)
            record[key] = plain
        if nonfinite:
            record["nonfinite"] = nonfinite
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self.trackers is not None:
                self.trackers.log(record["step"], record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a metrics.jsonl back (for plots, summaries and tests)."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _format_value(value) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress lines for a loop of `total` steps, printed by rank 0 at most every `every_s` seconds.

    The rate is measured from the first `update` on, so set-up time does not distort the ETA.
    """

    def __init__(self, total: int, desc: str = "", every_s: float = 5.0, start: int = 0,
                 unit: str = "step", stream=None, clock=time.monotonic):
        self.total, self.desc, self.every_s, self.unit = total, desc, every_s, unit
        self.done = start
        self._start_done = start
        self._clock = clock
        self._t0 = clock()
        self._last_print = None
        self._stream = stream
        self.enabled = get_rank() == 0

    def line(self, **metrics) -> str:
        elapsed = self._clock() - self._t0
        counted = self.done - self._start_done
        rate = counted / elapsed if elapsed > 0 and counted > 0 else float("nan")
        eta = (self.total - self.done) / rate if rate == rate and rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.unit} {self.done}/{self.total} ({pct:.0f}%)".strip()]
        if rate == rate:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta)}")
        if metrics:
            parts.append(" ".join(f"{k} {_format_value(v)}" for k, v in metrics.items()))
        return " | ".join(parts)

    def update(self, n: int = 1, **metrics) -> str | None:
        """Advance by n; print (and return) a line when due or at the end, else return None."""
        self.done += n
        now = self._clock()
        due = self._last_print is None or now - self._last_print >= self.every_s or self.done >= self.total
        if not (due and self.enabled):
            return None
        self._last_print = now
        text = self.line(**metrics)
        print(text, file=self._stream or sys.stdout, flush=True)
        return text
