"""--stage pass-rate: each prompt's pass rate (samples meeting --keep-if out of --gen-n), computed by
hand from the scores; the band's rows in kept.jsonl unchanged with their columns; a kill -9 mid-run
and --resume give the files of an uninterrupted run; bad flags fail before anything is written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
PARITY = "tests.rl._grpo_worker:token_parity"   # 1 for an even token-id sum: pass rates spread over 0..1


def _assets(tmp_path):
    tok = Tokenizer.train([f"What is {i} + {i + 1}? <think>{2 * i + 1}</think>" for i in range(50)], vocab_size=300)
    tok.save(tmp_path / "tok")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1),
                                        "source": "synthetic"}) + "\n" for i in range(12)))
    return data


def _command(tmp_path, data, out, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--stage", "pass-rate", "--preset", "tiny", "--tokenizer",
            str(tmp_path / "tok"), "--chat-template", "r1-zero", "--data", str(data), "--gen-n", "4",
            "--gen-batch-prompts", "2", "--gen-max-new-tokens", "8", "--gen-temperature", "1.0", "--reward",
            f"{PARITY},format", "--keep-if", f"{PARITY}>=1", "--pass-rate-min", "0.25", "--pass-rate-max", "0.75",
            "--reward-workers", "1", "--seed", "3", "--out", str(tmp_path / out), *map(str, extra)]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _done(run):
    p = run / "progress.json"
    return json.loads(p.read_text())["prompts_done"] if p.exists() else 0


def test_kill_9_then_resume_gives_the_uninterrupted_pass_rates_and_band(tmp_path):
    data = _assets(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    victim = subprocess.Popen(_command(tmp_path, data, "run"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _done(run) < 4:
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "two batches were not recorded within 240 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    at_kill = _done(run)
    assert 4 <= at_kill < 12 and not (run / "kept.jsonl").exists()
    resumed = subprocess.run(_command(tmp_path, data, "run", "--resume"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at prompt {at_kill}/12" in resumed.stdout
    ref = subprocess.run(_command(tmp_path, data, "ref"), cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    for name in ("pass_rates.jsonl", "kept.jsonl"):
        assert _rows(run / name) == _rows(tmp_path / "ref" / name), name

    source = _rows(data)
    rates = _rows(run / "pass_rates.jsonl")
    assert [r["id"] for r in rates] == [s["id"] for s in source]
    for r, s in zip(rates, source):
        assert {k: r[k] for k in s} == s                               # every column, unchanged
        assert r["samples"] == 4 and r["pass_rate"] == r["passes"] / 4
        assert 0.0 <= r["mean_scores"][PARITY] <= 1.0 and r["passes"] == round(4 * r["mean_scores"][PARITY])
    assert len({r["pass_rate"] for r in rates}) > 1                    # the parity reward spreads them
    kept = _rows(run / "kept.jsonl")
    assert kept == [r for r in rates if 0.25 <= r["pass_rate"] <= 0.75]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prompts"] == 12 and summary["kept"] == len(kept) and sum(summary["histogram"].values()) == 12


def test_bad_pass_rate_flags_fail_before_anything_is_written(tmp_path, capsys):
    data = _assets(tmp_path)
    argv = _command(tmp_path, data, "bad")[2:]
    i = argv.index("--pass-rate-min")
    argv[i + 1] = "0.9"
    assert train.main(argv) == 2
    assert "--pass-rate-min 0.9 / --pass-rate-max 0.75: expected 0 <= min <= max <= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
