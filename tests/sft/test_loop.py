"""sft/loop.py: packed loss = token-weighted mean over the same documents unpacked, exact resume after
kill -9 mid-save, non-finite steps skipped then stopped, bad input and bad flags refused early."""
from __future__ import annotations

import json
import random

import pytest
import torch

import sft.loop
import train
from model.build import preset_config
from model.transformer import Transformer
from runtime.checkpoint import latest_checkpoint, list_checkpoints
from runtime.train_step import NonFiniteError
from sft.loop import batch_loss_sum, micro_batches
from sft.packing import Document, pack, pad_batch
from tests.sft.conftest import final_weights, losses, run_worker, sft_flags


# ----------------------------------------------------------------------------- packing equality

def _random_docs(n: int, vocab: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(2, 40)
        prompt = rng.randint(1, length - 1)  # the first `prompt` tokens carry no loss
        docs.append(Document([rng.randrange(vocab) for _ in range(length)], [False] * prompt + [True] * (length - prompt)))
    return docs


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    nll, _ = batch_loss_sum(model, batch)
    nll.backward()
    return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the SDPA fast path and the attention twin
def test_packed_loss_equals_token_weighted_mean_of_unpacked(backend, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    model = Transformer(preset_config("tiny", vocab_size=61))
    docs = _random_docs(9, 61, seed=3)
    packed = pack(docs, seq_len=64)
    padded = pad_batch(docs)
    assert packed.input_ids.shape[0] < len(docs) and packed.num_targets == padded.num_targets
    assert packed.num_targets == sum(d.num_targets for d in docs)

    nll_packed, g_packed = _loss_and_grads(model, packed)
    nll_padded, g_padded = _loss_and_grads(model, padded)
    per_doc = [_loss_and_grads(model, pad_batch([d]))[0] for d in docs]
    mean_packed = nll_packed / packed.num_targets
    mean_of_docs = sum(per_doc) / sum(d.num_targets for d in docs)  # token-weighted mean
    assert abs(float(mean_packed / mean_of_docs) - 1) <= 1e-5
    assert abs(float(nll_packed / nll_padded) - 1) <= 1e-5
    for name, g in g_packed.items():
        rel = float((g - g_padded[name]).norm() / g_padded[name].norm().clamp_min(1e-12))
        assert rel <= 1e-4, f"gradient of {name}: packed vs padded differ by {rel:.2e}"


def test_micro_batches_cover_the_step_documents_once():
    docs = _random_docs(7, 50, seed=1)
    mbs = micro_batches(docs, micro_batch_size=3, seq_len=64, packing=True, pad_id=0)
    assert [b.num_docs for b in mbs] == [3, 3, 1]
    assert sum(b.num_targets for b in mbs) == sum(d.num_targets for d in docs)


# ----------------------------------------------------------------------------- in-process runs

def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_loss_does_not_depend_on_micro_batching_or_packing(sft_files, tmp_path):
    # the step loss is the mean NLL over the step's targets whatever the split into micro-batches
    runs = {"packed_mb2": ["--micro-batch-size", "2"], "packed_mb4": ["--micro-batch-size", "4"],
            "padded_mb1": ["--micro-batch-size", "1", "--no-packing"]}
    got = {}
    for name, extra in runs.items():
        assert train.main(sft_flags(sft_files, tmp_path / name, "--max-steps", "3", *extra)) == 0
        got[name] = losses(tmp_path / name)
    ref = got["packed_mb2"]
    assert sorted(ref) == [1, 2, 3] and ref[3] < ref[1]
    for name, values in got.items():
        for step, loss in values.items():
            assert abs(loss / ref[step] - 1) <= 1e-5, f"{name} step {step}: {loss} vs {ref[step]}"


class _NaNAt:
    """Stands in for sft.loop.batch_loss_sum: a NaN loss on the micro-batches of the given steps."""

    def __init__(self, steps, micro_batches_per_step):
        self.steps, self.per_step, self.calls = set(steps), micro_batches_per_step, 0
        self.real = sft.loop.batch_loss_sum

    def __call__(self, model, batch):
        step = self.calls // self.per_step + 1
        self.calls += 1
        nll, extra = self.real(model, batch)
        return (nll * float("nan") if step in self.steps else nll), extra


def test_a_nonfinite_step_is_skipped_counted_and_logged(sft_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft.loop, "batch_loss_sum", _NaNAt({2}, micro_batches_per_step=2))
    out = tmp_path / "run"
    assert train.main(sft_flags(sft_files, out, "--max-steps", "4")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
    assert [r["skipped_total"] for r in rows] == [0, 1, 1, 1]
    assert "step 2: non-finite loss" in capsys.readouterr().out
    assert _summary(out)["skipped_steps"] == 1
    w = final_weights(out, 4)
    assert all(torch.isfinite(t).all() for t in w.values())


def test_nonfinite_steps_in_a_row_stop_the_run_keeping_finite_checkpoints(sft_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft.loop, "batch_loss_sum", _NaNAt({3, 4, 5, 6}, micro_batches_per_step=2))
    out = tmp_path / "run"
    code = train.main(sft_flags(sft_files, out, "--max-nonfinite", "2", "--save-every", "1", "--keep-last", "10"))
    assert code == 3
    assert "stopped at step 4" in capsys.readouterr().out
    summary = _summary(out)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 2 and "diverging" in summary["stopped"]
    # steps 1, 2 updated; step 3 skipped (weights unchanged, saved); step 4 was the second skip in a row
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    for step in (1, 2, 3):
        sd = torch.load(out / "checkpoints" / f"step-{step:08d}" / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in sd.values()), step
    assert torch.equal(final_weights(out, 2)["model.norm.weight"], final_weights(out, 3)["model.norm.weight"])


def test_nonfinite_weights_are_never_checkpointed(sft_files, tmp_path, monkeypatch):
    real_step, calls = sft.loop.optimizer_step, [0]

    def poisoning_step(model, *a, **k):  # the second update leaves a NaN in a weight
        result = real_step(model, *a, **k)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")
        return result
    monkeypatch.setattr(sft.loop, "optimizer_step", poisoning_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="model.norm.weight.*checkpoint not written"):
        train.main(sft_flags(sft_files, out, "--max-steps", "4", "--save-every", "1"))
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ----------------------------------------------------------------------------- exact resume

def test_kill_9_during_saves_then_resume_ends_bitwise_equal(sft_files, tmp_path):
    ref, run = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert train.main(sft_flags(sft_files, ref, "--save-every", "2")) == 0  # in process, also one thread

    # killed after step 4's model, optimizer and HF files are written, before its COMPLETE marker
    p = run_worker(sft_flags(sft_files, run, "--save-every", "2"), "--kill-at-save", 4, "--kill-point", "hf")
    assert p.returncode == -9, p.stderr[-3000:]
    assert latest_checkpoint(run).name == "step-00000002"
    assert [d.name.startswith(".tmp-step-00000004-") for d in (run / "checkpoints").glob(".tmp-*")] == [True]

    # resumed from step 2, then killed again just before step 6's directory is renamed into place
    p = run_worker(sft_flags(sft_files, run, "--save-every", "2", "--resume"), "--kill-at-save", 6,
                   "--kill-point", "rename")
    assert p.returncode == -9, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step-00000002" in p.stdout
    assert latest_checkpoint(run).name == "step-00000004"

    p = run_worker(sft_flags(sft_files, run, "--save-every", "2", "--resume"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step-00000004" in p.stdout and "removed stale temporary directory" in p.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert losses(run) == losses(ref) and len(losses(ref)) == 6
    a = torch.load(ref / "checkpoints" / "step-00000006" / "model.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "step-00000006" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input

def test_conversation_without_assistant_turn_names_file_and_row(sft_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = sft_files.data.read_text().splitlines()[:5]
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "What is 1 + 1?"}]})
    bad.write_text("\n".join(lines) + "\n")
    flags = sft_flags(sft_files, tmp_path / "run")
    flags[flags.index("--data") + 1] = str(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl:3: the conversation has no assistant message"):
        train.main(flags)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_documents_are_dropped_or_truncated_and_counted(sft_files, tmp_path, policy, capsys):
    from data.chat import encode_chat
    from data.datasets import load_conversations
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(sft_files.tok)
    lengths = [len(encode_chat(tok, r["messages"], template="r1-zero", training=True).ids)
               for r in load_conversations(sft_files.data)]
    seq_len = sorted(lengths)[len(lengths) // 2]  # about half the documents are longer
    over = sum(n > seq_len for n in lengths)
    out = tmp_path / policy
    assert train.main(sft_flags(sft_files, out, "--max-steps", "1", "--warmup-steps", "0", "--seq-len", seq_len,
                                "--overlong", policy)) == 0
    summary = _summary(out)
    key, other = ("dropped_overlong", "truncated_overlong") if policy == "drop" else ("truncated_overlong", "dropped_overlong")
    assert over > 0 and summary[key] == over and summary[other] == 0
    assert summary["documents"] == len(lengths) - (over if policy == "drop" else 0)
    said = "dropped" if policy == "drop" else "truncated"
    assert f"{over} {said}" in capsys.readouterr().out


def test_overlong_error_policy_names_the_document(sft_files, tmp_path):
    with pytest.raises(ValueError, match=r"document \d+ has \d+ tokens, more than seq_len 32"):
        train.main(sft_flags(sft_files, tmp_path / "run", "--seq-len", "32", "--overlong", "error"))


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge-nonexistent"], "unknown; known presets"),
    (["--warmup-steps", "10", "--max-steps", "5"], "--warmup-steps 10: expected between 0 and --max-steps"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0"),
    (["--max-nonfinite", "0"], "--max-nonfinite 0"),
    (["--lr", "-1"], "--lr -1"),
    (["--eval-data", "no/such/file.jsonl"], "--eval-data no/such/file.jsonl: no such file"),
    (["--rollout-tp", "2"], "--rollout-tp 2: tensor-parallel sampling applies to the grpo, eval and generate"),
])
def test_bad_flags_are_refused_before_anything_is_written(sft_files, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert train.main(sft_flags(sft_files, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resuming_with_a_different_model_config_is_refused(sft_files, tmp_path):
    out = tmp_path / "run"
    assert train.main(sft_flags(sft_files, out, "--max-steps", "1", "--warmup-steps", "0")) == 0
    flags = sft_flags(sft_files, out, "--max-steps", "2", "--warmup-steps", "0", "--resume")
    flags[flags.index("--preset") + 1] = "tiny-moe"
    with pytest.raises(ValueError, match="does not match the model.*in the model but not in the checkpoint"):
        train.main(flags)


# ----------------------------------------------------------------------------- the accuracy acceptance

def _run_script(tmp_path, *flags):
    import subprocess
    import sys

    from tests.sft.conftest import ROOT, _env
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "sft_arithmetic.py"), "--out", str(tmp_path), *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
    result = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
    return p, result


def test_arithmetic_sft_script_smoke(tmp_path):
    # the acceptance run's whole path at toy size: data, tokenizer, SFT, held-out greedy evaluation
    p, result = _run_script(tmp_path, "--smoke", "--threads", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert result["smoke"] and result["steps"] == 8 and result["eval_problems"] == 8
    assert 0.0 <= result["greedy_accuracy"] <= 1.0
    first = losses(tmp_path / "run")[1]
    assert result["final_loss"] < 0.7 * first, (first, result["final_loss"])


@pytest.mark.slow
def test_arithmetic_sft_reaches_80_percent_greedy_on_200_held_out_problems(tmp_path):
    p, result = _run_script(tmp_path, "--threads", "1")
    assert result is not None, p.stderr[-3000:]
    assert result["eval_problems"] >= 200
    assert result["greedy_accuracy"] >= 0.80, result
    assert p.returncode == 0, p.stderr[-3000:]


def test_sft_on_tool_using_traces_trains_the_model_turns_only(sft_files, tmp_path):
    """--stage sft on conversations with tool turns (the generate stage's traces under --tools): the
    run trains, and the tokens it trains on are the assistant turns' (the tool's output, rendered
    inline by the r1-zero template, is masked out)."""
    from data.chat import encode_chat
    from data.tasks import write_jsonl
    from data.tokenizer import load_tokenizer

    rows = []
    for i in range(40):
        a, b = 10 + i, 20 + i
        rows.append({"messages": [
            {"role": "user", "content": f"What is {a} * {b}?"},
            {"role": "assistant", "content": f"<think>I use the calculator.\n```calculator\n{a} * {b}\n```\n"},
            {"role": "tool", "content": f"```output\n{a * b}\n```\n"},
            {"role": "assistant", "content": f"So it is {a * b}.</think> <answer>{a * b}</answer>"}]})
    data = write_jsonl(rows, tmp_path / "tool_sft.jsonl")
    tok = load_tokenizer(sft_files.tok)
    enc = encode_chat(tok, rows[0]["messages"], template="r1-zero")
    trained = tok.decode([t for t, m in zip(enc.ids, enc.assistant_mask) if m])
    assert "```calculator\n10 * 20\n```\n" in trained and "```output" not in trained and "200\n```" not in trained
    flags = sft_flags(sft_files, tmp_path / "run", "--max-steps", "3", "--warmup-steps", "0")
    flags[flags.index("--data") + 1] = str(data)
    assert train.main(flags) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
