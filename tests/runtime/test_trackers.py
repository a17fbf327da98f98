"""--report-to wandb,tensorboard (runtime/trackers.py) and --log-rollouts-every (rl/loop.py): a GRPO
run's metrics read back from both trackers' own files equal metrics.jsonl, the rollout table has its
fields, a failing tracker is dropped with one warning while metrics.jsonl stays complete, and a
missing package or an unknown tracker is refused naming what to install or what exists."""
import glob
import json
import struct

import pytest

import train
from runtime.metrics import MetricsWriter
from runtime.trackers import Trackers, parse_report_to
from tests.rl._grpo_worker import grpo_argv, make_model_dir, write_prompts

wandb = pytest.importorskip("wandb", reason="wandb is a tracker of the test extra")
pytest.importorskip("tensorboard", reason="tensorboard is a tracker of the test extra")

ROLLOUT_FIELDS = {"step", "id", "sample", "prompt", "completion", "rewards", "reward", "advantage", "num_tokens",
                  "finish_reason"}


def wandb_history(run_dir) -> tuple[list[dict], dict]:
    """The history rows and the config of a wandb offline run, read from its transaction log (a
    LevelDB-style log of protobuf Records after a 7-byte header; 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path, = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        space = block - pos % block
        if space < 7:
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:          # zero padding to the end of the block
            pos += space
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    records = [pb.Record.FromString(c) for c in chunks]
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    return history, config


def test_grpo_run_reports_to_wandb_and_tensorboard_and_writes_rollouts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "prompts.jsonl", 16)
    run = tmp_path / "run"
    assert train.main(grpo_argv(tmp_path / "model", tmp_path / "prompts.jsonl", run, "--report-to",
                                "wandb,tensorboard", "--log-rollouts-every", 1, "--log-rollouts-n", 3)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    keys = ("loss", "reward/mean", "grad_norm", "kl", "lr")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in keys:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        for s, r in zip(scalars, rows):   # tensorboard stores float32
            assert s.value == pytest.approx(r[key], rel=1e-6, abs=1e-30), key
    assert {"config/text_summary", "rollouts/text_summary"} <= set(events.Tags()["tensors"])   # flags; the table

    history, config = wandb_history(run)
    assert [h["_step"] for h in history] == [1, 2]
    for h, r in zip(history, rows):
        assert all(h[k] == r[k] for k in keys), (h, r)
    assert config["lr"] == 1e-3 and config["report_to"] == "wandb,tensorboard"      # the run's config.json
    assert all(h["rollouts/_type"] == "table-file" and h["rollouts/nrows"] == 3 for h in history)
    assert (run / "wandb_id").read_text().strip() in glob.glob(str(run / "wandb" / "offline-run-*"))[0]

    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 1, 1, 2, 2, 2]
    for r in rollouts:
        assert set(r) == ROLLOUT_FIELDS
        assert set(r["rewards"]) == {"tests.rl._grpo_worker:token_parity", "format"}
        assert r["finish_reason"] in ("stop", "length") and r["num_tokens"] > 0 and isinstance(r["completion"], str)
        assert r["prompt"].startswith("What is") and r["reward"] == sum(r["rewards"].values())
    assert [r["sample"] for r in rollouts[:3]] == [0, 1, 2]


class _Broken:
    name = "broken"

    def log(self, step, row):
        if step >= 2:
            raise OSError("No space left on device")

    def close(self):
        pass


class _Kept:
    name = "kept"

    def __init__(self):
        self.rows = []

    def log(self, step, row):
        self.rows.append(row)

    def close(self):
        self.rows.append("closed")


def test_a_failing_tracker_is_reported_once_and_dropped(tmp_path, capsys):
    kept = _Kept()
    with MetricsWriter(tmp_path / "metrics.jsonl", trackers=Trackers([_Broken(), kept])) as metrics:
        for step in range(1, 5):
            metrics.log(step, loss=1.0 / step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]      # metrics.jsonl is complete
    assert [r["step"] for r in kept.rows[:-1]] == [1, 2, 3, 4] and kept.rows[-1] == "closed"
    out = capsys.readouterr().out
    assert out.count("warning: broken failed") == 1 and "No space left on device" in out


def test_unknown_trackers_and_missing_packages_are_refused(monkeypatch):
    assert parse_report_to("none") == [] and parse_report_to("tensorboard,wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="'mlflow' is not a tracker; expected none or a comma-separated list of wandb"):
        parse_report_to("wandb,mlflow")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report-to wandb: the wandb package is not installed; pip install -e \".\[track\]\""):
        parse_report_to("wandb")
