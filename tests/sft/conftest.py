"""Shared set-up of the SFT loop tests: a small arithmetic SFT set, held-out problems and a
byte-level BPE tokenizer trained on them (built once per session, no downloads), and helpers to
run train.py in process, as a subprocess or under torchrun, and to read what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_sft_worker.py"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run these tests' tiny models on one intra-op thread (subprocesses get OMP_NUM_THREADS=1).

    Their matrices are far too small to gain from a second thread, and on a machine busy with
    other jobs OpenMP's spinning barriers made a 2-thread step 15x slower than a 1-thread one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class SFTFiles:
    tok: Path       # tokenizer folder
    data: Path      # SFT conversations (prompt + completion), clean worked examples
    heldout: Path   # held-out problems (prompt + answer)


@pytest.fixture(scope="session")
def sft_files(tmp_path_factory) -> SFTFiles:
    from data.tasks import arithmetic_problems, pretraining_corpus, write_jsonl
    from data.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("sft_data")
    rows = pretraining_corpus("arithmetic", 200, seed=1, carry_bug=0.0, wrong_answer=0.0, missing_tags=0.0,
                              digits=2)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], d / "sft.jsonl")
    write_jsonl(arithmetic_problems(20, seed=0, digits=2, split="test"), d / "heldout.jsonl")
    Tokenizer.train([r["text"] for r in rows], vocab_size=360).save(d / "tok")
    return SFTFiles(d / "tok", d / "sft.jsonl", d / "heldout.jsonl")


def sft_flags(files: SFTFiles, out, *extra) -> list[str]:
    """train.py flags of a short SFT run of the tiny preset (a few seconds on 2 cores)."""
    return ["--stage", "sft", "--preset", "tiny", "--tokenizer", str(files.tok), "--chat-template", "r1-zero",
            "--data", str(files.data), "--out", str(out), "--max-steps", "6", "--warmup-steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "256", "--lr", "3e-3",
            "--log-every-s", "60", *map(str, extra)]


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}
    env.pop("KERNELS_BACKEND", None)
    return env


def run_worker(flags: list[str], *worker_flags, ranks: int = 1, timeout: float = 240, env: dict | None = None):
    """Run train.py through tests/sft/_sft_worker.py (fault injection flags first), in one process
    or under torchrun with `ranks` gloo processes; returns the CompletedProcess."""
    cmd = [str(WORKER), *map(str, worker_flags), "train.py", *flags]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *cmd]
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=_env(env))


def losses(run_dir) -> dict[int, float]:
    """step -> logged loss of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def final_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    """The fp32 weights of the checkpoint of `step`, from its HF folder (whole tensors whatever
    the number of ranks that wrote it)."""
    from safetensors.torch import load_file

    hf = Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "hf"
    out = {}
    for f in sorted(hf.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {hf}"
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in a)
