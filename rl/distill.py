"""On-policy distillation: the student samples, a frozen teacher scores every sampled token.

    python train.py --stage grpo --variant opd --teacher TEACHER_DIR --model STUDENT_DIR --data prompts.jsonl
    python train.py --stage grpo --teacher TEACHER_DIR --distill-coef 0.5 ...        # beside the GRPO objective

The objective is the per-token reverse KL from the student pi to the teacher q on the student's own
samples y ~ pi (Agarwal et al. 2024, GKD with on-policy data; the "on-policy distillation" recipes
of Qwen3 and Thinking Machines, 2025): KL(pi || q) = E_{y~pi} sum_t [log pi(y_t | y_<t) -
log q(y_t | y_<t)]. Its policy gradient, with each token's own term as its reward (no credit to the
tokens before it: discount 0), is that of a per-token advantage

    A_it = log q(y_it | y_i<t) - log pi_old(y_it | y_i<t)        (sg: no gradient through either)

fed to the same clipped policy loss as GRPO (rl/loss.py policy_loss, kernels.grpo_token_loss): at
the first update of a rollout batch the ratio is 1, so the gradient is -(1/N) sum_it m_it A_it
grad log pi(y_it), which descends the sampled reverse KL; later updates (mu > 1) clip it as PPO does.
`--variant opd` trains on A_it alone (rewards are still scored, for the metrics); `--distill-coef c`
adds c * A_it to GRPO's per-sequence advantages A_i. The teacher's log-probs are those of
kernels.token_logprobs (rl.loop.sequence_logprobs: the [B, T, V] logits never exist at once) at the
rollout temperature, like the student's, so both sides of the estimate see the same distribution.

The teacher needs the student's tokenizer (the log-probs are of the same token ids): a teacher whose
vocabulary size or tokenizer differs is refused at start, naming both files. It is built like the
reference model (sharded by FSDP2 when the policy is, stored in the compute dtype, never trained).
Metrics: distill/reverse_kl (the token mean of log pi_old - log q over the trained tokens, every
rank together) and distill/teacher_logp (the token mean of log q).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def distill_advantages(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor,
                       advantages: torch.Tensor | None = None, coef: float = 1.0) -> torch.Tensor:
    """Per-token advantages [N, T]: coef * (teacher_logp - student_logp) on the masked tokens (0
    elsewhere), plus the per-sequence advantages [N] when given (GRPO with a distillation term)."""
    if teacher_logp.shape != student_logp.shape or mask.shape != student_logp.shape:
        raise ValueError(f"distill_advantages: teacher_logp {tuple(teacher_logp.shape)}, student_logp "
                         f"{tuple(student_logp.shape)} and mask {tuple(mask.shape)} must have one shape [N, T]")
    per_token = coef * (teacher_logp.detach().float() - student_logp.detach().float()) * (mask != 0)
    if advantages is not None:
        per_token = per_token + advantages.detach().float()[:, None]
    return per_token


def reverse_kl_sums(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """[sum of m (log pi - log q), sum of m log q, sum of m] over this rank's tokens (all-reduce, then divide)."""
    m = (mask != 0).float()
    return [float(((student_logp.float() - teacher_logp.float()) * m).sum()), float((teacher_logp.float() * m).sum()),
            float(m.sum())]


def check_teacher(args) -> None:
    """--teacher DIR beside the student: a checkpoint folder with the student's vocabulary and
    tokenizer (ValueError naming the files otherwise); --variant opd and --distill-coef need it."""
    teacher = getattr(args, "teacher", None)
    if teacher is None:
        if args.variant == "opd" or args.distill_coef:
            raise ValueError(f"{'--variant opd' if args.variant == 'opd' else '--distill-coef'} needs --teacher DIR, "
                             f"the model the student is distilled from")
        return
    if args.distill_coef < 0:
        raise ValueError(f"--distill-coef {args.distill_coef}: expected >= 0")
    if args.variant != "opd" and not args.distill_coef:
        raise ValueError("--teacher is used by --variant opd or --distill-coef C > 0; give one of them")
    folder = Path(teacher)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--teacher {folder}: no config.json; expected a Hugging Face checkpoint folder")
    teacher_vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
    student = Path(args.model) if args.model is not None else None
    student_tok = Path(args.tokenizer) if args.tokenizer else student
    if student is not None and (student / "config.json").is_file():
        student_vocab = json.loads((student / "config.json").read_text()).get("vocab_size")
        if student_vocab != teacher_vocab:
            raise ValueError(f"--teacher {folder / 'config.json'} has vocab_size {teacher_vocab} but the student's "
                             f"{student / 'config.json'} has {student_vocab}: on-policy distillation scores the "
                             f"student's token ids with the teacher, so they need one vocabulary")
    if student_tok is not None and (folder / "tokenizer.json").is_file() and (student_tok / "tokenizer.json").is_file():
        a = json.loads((folder / "tokenizer.json").read_text())
        b = json.loads((student_tok / "tokenizer.json").read_text())
        if a.get("model", {}).get("vocab") != b.get("model", {}).get("vocab") or \
                [t.get("content") for t in a.get("added_tokens", [])] != [t.get("content") for t in b.get("added_tokens", [])]:
            raise ValueError(f"--teacher {folder / 'tokenizer.json'} is not the student's tokenizer "
                             f"({student_tok / 'tokenizer.json'}): on-policy distillation needs one tokenizer")
