"""Building the model and tokenizer a training stage starts from (`--model DIR` or `--preset NAME`).

Shared by every loop (sft/, rl/, the eval and generate stages), so it lives below them.

- `--model DIR`: a Hugging Face folder (config.json + safetensors) loaded with load_pretrained.
- `--preset NAME`: a fresh, randomly initialised model of a named size (model.config.PRESETS);
  the tokenizer sets the vocabulary size and the bos/eos/pad ids.
(The tokenizer itself is data/'s: data.tokenizer.load_tokenizer.)
  Every rank initialises from the same seed, so FSDP shards one and the same model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.config import PRESETS, ModelConfig


def preset_config(name: str, tok=None, **overrides) -> ModelConfig:
    """A preset's config; `tok` (any object with vocab_size, bos_id, eos_id, pad_id) sets the vocabulary."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    if tok is not None:
        overrides = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                     "pad_token_id": tok.pad_id, **overrides}
    return ModelConfig.from_preset(name, **overrides)


def check_model_flags(args) -> None:
    """--model / --preset / --tokenizer of a training stage: exactly one model source, and folders
    that hold what they must (ValueError naming the flag). Reads nothing but the file system."""
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need((args.model is None) != (args.preset is None), "give exactly one of --model DIR and --preset NAME")
    if args.preset is not None:
        need(args.preset in PRESETS, f"--preset {args.preset!r}: unknown; known presets: {', '.join(sorted(PRESETS))}")
    if args.model is not None:
        need(Path(args.model).is_dir(), f"--model {args.model}: no such directory")
    tokenizer = args.tokenizer or args.model
    need(tokenizer is not None, "no tokenizer: give --tokenizer DIR (or --model DIR holding tokenizer files)")
    need((Path(tokenizer) / "tokenizer.json").is_file(), f"--tokenizer {tokenizer}: no tokenizer.json there")


def build_model(args, tok, device="cpu", dtype=torch.float32, seed: int | None = None,
                **overrides):
    """The model of `args.model` (a folder) or `args.preset` (fresh weights seeded with `seed`, or args.seed)."""
    from model.checkpoint import load_pretrained
    from model.transformer import Transformer

    model_dir, preset = getattr(args, "model", None), getattr(args, "preset", None)
    if (model_dir is None) == (preset is None):
        raise ValueError("give exactly one of --model DIR and --preset NAME")
    if model_dir is not None:
        model = load_pretrained(model_dir, dtype=dtype, device=device, config_overrides=overrides or None)
        if tok is not None and tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}; they do not belong together")
        return model
    config = preset_config(preset, tok, **overrides)
    seed = getattr(args, "seed", 0) if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(config)
    return model.to(device=device, dtype=dtype)


def model_summary(model) -> str:
    from model.stats import count_params

    c = model.config
    counts = count_params(model)
    return (f"model {c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
            f"{counts.total / 1e6:.2f}M parameters ({counts.active / 1e6:.2f}M active per token)")


def save_model_fn(model, tok):
    """The callback runtime.checkpoint calls to write the HF folder of a checkpoint."""
    from model.checkpoint import save_pretrained

    def save(path):
        save_pretrained(model, path, tokenizer=tok)
    return save
