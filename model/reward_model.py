"""Sequence-classification reward models: Hugging Face's Qwen2ForSequenceClassification /
LlamaForSequenceClassification (and the other *ForSequenceClassification of the decoder families
model/ reads) on our model code.

    rm = load_reward_model("path/to/rm", dtype=torch.float32, device="cpu")   # eval mode, frozen
    r = rm.rewards(input_ids, lengths)     # [B] fp32: the score of each row's last real token

Such a checkpoint is the decoder (`model.*`, as in the causal LM) plus `score.weight`
[num_labels, D], a linear head without bias in place of lm_head. Its scalar reward (num_labels 1)
is the head applied to the final normalised hidden state of the sequence's last non-pad token,
which is what transformers returns as `logits[:, 0]` for a right-padded batch whose padding is the
pad token; here the caller passes each row's real length, so padding needs no special id.

A folder whose checkpoint has no `score.weight` (a causal LM, say) is refused, naming the folder
and the tensor it lacks; so is a head of more than one label (a classifier, not a reward model).
Sharding: `fsdp` is model.parallel.apply_fsdp's keyword arguments, applied on the meta device
before anything is allocated, so each rank reads only its rows (model/checkpoint.load_into).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer


class RewardModel(Transformer):
    """The decoder and a `score` head [num_labels, D]: no lm_head, no MTP modules."""

    def __init__(self, config: ModelConfig, num_labels: int = 1):
        super().__init__(config.replace(tie_word_embeddings=False, num_nextn_predict_layers=0))
        del self.lm_head
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    def tie_weights(self) -> None:   # nothing is shared: the score head is its own
        pass

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids [B, T] -> per-position scores [B, T, num_labels] (fp32)."""
        h = self._hidden(input_ids, position_ids, None, None, None, None)   # [B, T, D]
        return self.score(h).float()

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, lengths: list[int] | torch.Tensor) -> torch.Tensor:
        """[B] rewards: label 0's score at position lengths[b] - 1 of each right-padded row."""
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        if lengths.min() < 1 or lengths.max() > input_ids.shape[1]:
            raise ValueError(f"rewards: lengths must be in 1..{input_ids.shape[1]}, got {lengths.tolist()}")
        scores = self(input_ids)                                   # [B, T, L]
        return scores[torch.arange(input_ids.shape[0], device=input_ids.device), lengths - 1, 0]


def score_head(path) -> tuple[int, int]:
    """(num_labels, hidden) of the folder's score.weight; ValueError naming the folder when it has none."""
    from model.checkpoint import _checkpoint_files
    files, located = _checkpoint_files(Path(path))
    if "score.weight" not in located:
        heads = [n for n in located if not n.startswith("model.")]
        raise ValueError(f"{path}: not a sequence-classification reward model: its checkpoint has no 'score.weight' "
                         f"(the reward head of *ForSequenceClassification); tensors outside the decoder: "
                         f"{', '.join(sorted(heads)[:6]) or 'none'}")
    shape = located["score.weight"].shape("score.weight")
    if len(shape) != 2 or shape[0] != 1:
        raise ValueError(f"{path}: score.weight has shape {list(shape)}; a reward model has one label "
                         f"([1, hidden_size])")
    return shape[0], shape[1]


def load_reward_model(path, dtype: torch.dtype = torch.float32, device="cpu", fsdp: dict | None = None,
                      config_overrides: dict | None = None) -> RewardModel:
    """The reward model of checkpoint folder `path`, in `dtype` on `device`, eval mode, frozen."""
    from model.checkpoint import load_into, plan_load, read_config
    from model.parallel import apply_fsdp

    num_labels, hidden = score_head(path)
    config, raw = read_config(path, config_overrides)
    if hidden != config.hidden_size:
        raise ValueError(f"{path}: score.weight is [1, {hidden}] but config.json's hidden_size is {config.hidden_size}")
    with torch.device("meta"):
        model = RewardModel(config, num_labels)
    model.to(dtype)
    plan = plan_load(path, model, raw)
    if fsdp is not None:
        apply_fsdp(model, **fsdp)
    model.to_empty(device=device)
    load_into(model, plan)
    return model.requires_grad_(False).eval()
