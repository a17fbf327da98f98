"""On-policy distillation (rl/distill.py): the per-token advantage and the loss against a by-hand
example (values and gradients), the teacher checks, and GRPO runs through train.py with --variant opd
(a teacher equal to the student gives a reverse KL of 0 and no gradient) and with --distill-coef.
Two ranks against one process: tests/rl/test_loss.py's SPLIT_CASES "opd" and "grpo_plus_distill"."""
import json
import shutil

import pytest
import torch

from rl.distill import distill_advantages, reverse_kl_sums
from rl.loss import policy_loss
from tests.rl._grpo_worker import grpo_argv, make_model_dir, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/rl/conftest.py


def test_per_token_advantages_and_the_loss_by_hand():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    teacher = torch.tensor([[-0.5, -2.5, -4.0], [-0.2, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = distill_advantages(teacher, student, mask)
    assert adv.tolist() == [[0.5, -0.5, 0.0], [0.0, 2.0, 0.0]]        # teacher - student, 0 off the mask
    with_seq = distill_advantages(teacher, student, mask, torch.tensor([1.0, -1.0]), coef=0.5)
    assert with_seq.tolist() == [[1.25, 0.75, 1.0], [-1.0, 0.0, -1.0]]
    assert reverse_kl_sums(teacher, student, mask) == pytest.approx([-0.5 + 0.5 + 0.0 - 2.0, -0.5 - 2.5 - 0.2 - 1.0, 4.0])

    # on-policy (ratio 1), token_mean: L = -(1/N) sum m_t A_t r_t, so dL/dlogp_t = -m_t A_t / N
    logp = student.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, None, adv, mask, agg="token_mean")
    assert loss.item() == pytest.approx(-(0.5 - 0.5 + 0.0 + 2.0) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.125, 0.125, 0.0], [0.0, -0.5, 0.0]]))
    assert metrics["tokens"].item() == 4.0
    # seq_mean_token_mean: each sequence's tokens over its own length, then over the sequences
    logp = student.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, None, adv, mask, agg="seq_mean_token_mean")
    loss.backward()
    assert loss.item() == pytest.approx(-((0.5 - 0.5) / 2 + (0.0 + 2.0) / 2) / 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.125, 0.125, 0.0], [0.0, -0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"or one per token, \[B, T\]"):
        policy_loss(student, None, torch.zeros(2, 2), mask)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    model, tok = make_model_dir(d / "student")
    write_prompts(d / "prompts.jsonl", 8)
    # a teacher with the student's tokenizer and other weights
    from model.checkpoint import save_pretrained
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(model, d / "teacher")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / "student" / f, d / "teacher" / f)
    return d


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_opd_from_the_student_itself_has_no_reverse_kl_and_no_gradient(dirs, tmp_path):
    import train
    assert train.main(grpo_argv(dirs / "student", dirs / "prompts.jsonl", tmp_path / "run", "--variant", "opd",
                                "--teacher", str(dirs / "student"), "--beta", "0", "--temperature", "1.0",
                                "--recompute-old-logp", "--max-steps", "1")) == 0
    (m,) = _metrics(tmp_path / "run")
    assert abs(m["distill/reverse_kl"]) < 1e-5 and m["grad_norm"] < 1e-4
    assert m["distill/teacher_logp"] < 0


def test_opd_and_grpo_with_a_distillation_term_train(dirs, tmp_path):
    import train
    assert train.main(grpo_argv(dirs / "student", dirs / "prompts.jsonl", tmp_path / "opd", "--variant", "opd",
                                "--teacher", str(dirs / "teacher"), "--beta", "0")) == 0
    for m in _metrics(tmp_path / "opd"):
        assert m["distill/reverse_kl"] > 0 and m["grad_norm"] > 0   # the teacher differs: a signal on every token
    assert train.main(grpo_argv(dirs / "student", dirs / "prompts.jsonl", tmp_path / "mix", "--teacher",
                                str(dirs / "teacher"), "--distill-coef", "0.5")) == 0
    assert all("distill/reverse_kl" in m and "reward/mean" in m for m in _metrics(tmp_path / "mix"))


def test_teacher_flags_are_checked_at_start(dirs, tmp_path):
    from recipes.flags import stage_args
    from rl.distill import check_teacher
    base = dict(stage="grpo", model=str(dirs / "student"))
    with pytest.raises(ValueError, match="--variant opd needs --teacher DIR"):
        check_teacher(stage_args(base, variant="opd"))
    with pytest.raises(ValueError, match="--teacher is used by --variant opd or --distill-coef"):
        check_teacher(stage_args(base, teacher=str(dirs / "teacher")))
    check_teacher(stage_args(base, teacher=str(dirs / "teacher"), variant="opd"))
    other = tmp_path / "other"
    shutil.copytree(dirs / "teacher", other)
    from data.tokenizer import Tokenizer
    student_vocab = json.loads((dirs / "student" / "config.json").read_text())["vocab_size"]
    Tokenizer.train(["an unrelated corpus of words"] * 4, vocab_size=student_vocab, min_frequency=1).save(other)
    with pytest.raises(ValueError, match="other/tokenizer.json is not the student's tokenizer"):
        check_teacher(stage_args(base, teacher=str(other), distill_coef=0.5))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": student_vocab + 64}))
    with pytest.raises(ValueError, match=f"has vocab_size {student_vocab + 64} but the student's .* has {student_vocab}"):
        check_teacher(stage_args(base, teacher=str(other), distill_coef=0.5))


@pytest.mark.distributed
def test_opd_on_two_ranks_with_the_teacher_sharded(dirs, tmp_path):
    """torchrun, 2 gloo ranks: the student and the teacher both sharded by FSDP2. The teacher equal to
    the student scores every sampled token as the student does (reverse KL 0 up to rounding, no
    gradient), and a different teacher trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for teacher, out in ((dirs / "student", tmp_path / "same"), (dirs / "teacher", tmp_path / "other")):
        argv = grpo_argv(dirs / "student", dirs / "prompts.jsonl", out, "--variant", "opd", "--teacher", str(teacher),
                         "--beta", "0", "--recompute-old-logp", "--max-steps", "1")
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(root / "train.py"), *argv], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (same,), (other,) = _metrics(tmp_path / "same"), _metrics(tmp_path / "other")
    assert abs(same["distill/reverse_kl"]) < 1e-5 and same["grad_norm"] < 1e-4
    assert other["distill/reverse_kl"] > 1e-3 and other["grad_norm"] > 0
