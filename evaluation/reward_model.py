"""Reward-model rewards: `--reward rm:DIR` scores completions with a sequence-classification reward
model (model/reward_model.py) in the scoring process, in batches.

    python train.py --stage grpo ... --reward accuracy,format:0.2,rm:RM_DIR:0.5 --rm-normalize batch

DeepSeek-R1's last RL stage (section 2.3.4) mixes reasoning prompts scored by rules with general
prompts scored by reward models "to capture human preferences in complex and nuanced scenarios".
Each completion is scored as the conversation the reward model was trained on: the prompt as a user
turn and the completion as the assistant turn, rendered with the reward model's own chat template
(its tokenizer folder), as TRL scores with a reward model. The reward is the score head at the last
token. Normalisation (--rm-normalize): none (the raw score), sigmoid (into 0..1, a Bradley-Terry
model's win probability against a zero-score answer), or batch (z-scored over the completions of the
call; GRPO's group advantages then see scores on the scale of the rule rewards).

Batches: completions sorted by length and cut into micro-batches of at most --rm-micro-batch-tokens
padded tokens; conversations longer than the reward model's context keep their last tokens (the
answer's end is what the head reads). Under FSDP the reward model is sharded like the reference
model and gathered once for the whole call (model.parallel.gathered), so ranks may score different
numbers of completions; every rank must call it the same number of times (GRPO scores each rollout
round on every rank).

The reward runs in the scoring process (`in_parent = True`: verify.pool does not send it to a
worker). Rows can say which rewards apply to them: see rl/rollout.py's `reward_kind` routing.
"""
from __future__ import annotations

import math

import torch

PREFIX = "rm:"
NORMALIZE = ("none", "sigmoid", "batch")


def is_reward_model(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


class RewardModelReward:
    in_parent = True
    timeout_reward = None

    def __init__(self, spec: str, model, tok, normalize: str = "none", micro_batch_tokens: int = 8192,
                 max_len: int | None = None):
        if normalize not in NORMALIZE:
            raise ValueError(f"--rm-normalize {normalize!r}: expected one of {', '.join(NORMALIZE)}")
        if tok.chat_template is None:
            raise ValueError(f"--reward {spec}: the reward model's tokenizer has no chat template to render "
                             f"(prompt, completion) conversations with")
        self.spec, self.__name__ = spec, spec
        self.model, self.tok, self.normalize = model, tok, normalize
        self.micro_batch_tokens = micro_batch_tokens
        self.max_len = max_len or model.config.max_position_embeddings
        self.device = next(model.parameters()).device

    def conversation_ids(self, prompt: str, completion: str) -> list[int]:
        from data.chat import render
        text = render([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                      self.tok.chat_template, **self.tok.special_tokens)
        ids = self.tok.encode(text)
        return ids[-self.max_len:]

    def raw_scores(self, ids: list[list[int]]) -> list[float]:
        from model.parallel import gathered
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        chunks, rows, width = [], [], 0
        for i in order:   # shortest first, at most micro_batch_tokens padded tokens a forward
            w = max(width, len(ids[i]))
            if rows and (len(rows) + 1) * w > self.micro_batch_tokens:
                chunks.append(rows)
                rows, w = [], len(ids[i])
            rows.append(i)
            width = w
        if rows:
            chunks.append(rows)
        out = [0.0] * len(ids)
        with torch.no_grad(), gathered(self.model):
            for rows in chunks:
                width = max(len(ids[i]) for i in rows)
                batch = torch.zeros(len(rows), width, dtype=torch.long)    # right-padded [b, T]
                for j, i in enumerate(rows):
                    batch[j, :len(ids[i])] = torch.tensor(ids[i])
                r = self.model.rewards(batch.to(self.device), [len(ids[i]) for i in rows]).tolist()
                for i, v in zip(rows, r):
                    out[i] = float(v)
        return out

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        prompts = kwargs.get("prompts") or kwargs.get("prompt")
        if prompts is None:
            raise ValueError(f"reward {self.spec}: needs the prompts (the `prompts` column) to score conversations")
        scores = self.raw_scores([self.conversation_ids(_text(p), c) for p, c in zip(prompts, completions)])
        if self.normalize == "sigmoid":
            return [1.0 / (1.0 + math.exp(-s)) for s in scores]
        if self.normalize == "batch" and scores:
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
            return [(s - mean) / (std + 1e-6) for s in scores]
        return scores


REWARD_KINDS = ("verifiable", "open")


def route(name: str, values: list, rows: list[dict]) -> list:
    """Per-row routing by the optional `reward_kind` column, as R1's final RL mixes its prompts:
    rows of kind "verifiable" keep the rule rewards (and rule-checked judges), rows of kind "open"
    the reward models (rm:DIR); the other rewards give such a row None (no signal, left out of the
    weighted sum). Rows without the column keep every reward."""
    kind = "open" if name.startswith("rm:") else "verifiable"
    out = []
    for i, (v, row) in enumerate(zip(values, rows)):
        want = row.get("reward_kind")
        if want is not None and want not in REWARD_KINDS:
            raise ValueError(f"row {i + 1}: reward_kind {want!r}; expected verifiable or open (or no reward_kind: "
                             f"every reward)")
        out.append(v if want is None or want == kind else None)
    return out


def _text(prompt) -> str:
    if isinstance(prompt, list):   # a messages column: the user turns
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    return str(prompt)


def check_reward_model_flags(args) -> None:
    """--reward rm:DIR: a folder holding a score head and a tokenizer with a chat template (ValueError naming it)."""
    from pathlib import Path

    from data.tokenizer import load_tokenizer
    from model.reward_model import score_head
    specs = [n for n in _names(args.reward) if is_reward_model(n)]
    if getattr(args, "rm_normalize", "none") not in NORMALIZE:
        raise ValueError(f"--rm-normalize {args.rm_normalize!r}: expected one of {', '.join(NORMALIZE)}")
    for spec in specs:
        folder = Path(spec[len(PREFIX):])
        if not (folder / "config.json").is_file():
            raise ValueError(f"--reward {spec}: {folder} is not a checkpoint folder (no config.json)")
        score_head(folder)
        if load_tokenizer(None, folder).chat_template is None:
            raise ValueError(f"--reward {spec}: {folder}'s tokenizer has no chat template to render (prompt, "
                             f"completion) conversations with")


def make_reward_models(args, device, fsdp: dict | None = None) -> dict:
    """{spec: RewardModelReward} of the run's --reward rm:DIR specs ({} without any)."""
    from data.tokenizer import load_tokenizer
    from model.reward_model import load_reward_model
    out = {}
    for spec in (n for n in _names(args.reward) if is_reward_model(n)):
        folder = spec[len(PREFIX):]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_reward_model(folder, dtype=dtype, device=device, fsdp=fsdp)
        out[spec] = RewardModelReward(spec, model, load_tokenizer(None, folder), normalize=args.rm_normalize,
                                      micro_batch_tokens=args.micro_batch_tokens)
    return out


def _names(spec: str) -> list[str]:
    from evaluation.remote import reward_names
    return reward_names(spec)
