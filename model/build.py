"""Building the model and tokenizer a stage starts from (`--model DIR` or `--preset NAME`).

Shared by every loop (sft/, rl/, the eval and generate stages), so it lives below them.

- `--model DIR`: a Hugging Face folder (config.json + safetensors). The model is built on the meta
  device, checked against the checkpoint (every missing, unexpected or mis-shaped tensor is named,
  with its file, before anything is allocated), wrapped for activation checkpointing and sharded
  with FSDP2 when asked, and only then allocated: each rank allocates its own shards and reads
  only its own rows of each tensor, in the target dtype (model.checkpoint.load_into). No rank ever
  holds the whole model, and nothing is built in fp32 to be cast later.
- `--preset NAME`: a fresh, randomly initialised model of a named size (model.config.PRESETS);
  the tokenizer sets the vocabulary size and the bos/eos/pad ids. Every rank builds the whole
  model from the same seed before sharding, so FSDP shards one and the same model and a 2-rank
  run starts where a 1-process run does (presets are the small models of the CPU recipe).
- `--max-position-embeddings`, `--rope-theta`, `--rope-scaling` override the checkpoint's (or the
  preset's) length and rope, for fine-tuning past the length it was trained for; the exported
  config.json carries the new values.

Precision: `--param-dtype` (param_dtype_of) is what the parameters compute in; the training loops
keep fp32 master weights and let FSDP2's policy cast (model/parallel.py); a frozen model (the GRPO
reference) is stored in the compute dtype itself. `--export-dtype` (export_dtype_of) is what the
checkpoints' Hugging Face folders are written in: the source checkpoint's own dtype by default.
(The tokenizer itself is data/'s: data.tokenizer.load_tokenizer.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import PRESETS, ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
    config_overrides(args)                       # unreadable --rope-scaling and the like
    check_lora_targets(args)                     # --lora-*: values, targets and --lora-init's adapter
    param_dtype_of(getattr(args, "param_dtype", "auto"),
                   torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def check_lora_targets(args, sampling: bool = False) -> None:
    """The --lora-* flags (model.lora.check_lora_flags), then the targets (or --lora-init's adapter)
    against the model they will adapt, built on the meta device from its config alone: a pattern
    that matches nothing, or an adapter made for another base, fails here, before the run directory
    is touched (ValueError naming the pattern or the tensor)."""
    from model.lora import adapter_updates, apply_lora, check_lora_flags, lora_settings
    from model.transformer import Transformer

    check_lora_flags(args, sampling)
    settings = lora_settings(args)
    if settings is None or (getattr(args, "model", None) is None and getattr(args, "preset", None) is None):
        return
    with torch.device("meta"):
        model = Transformer(model_config(args))
    apply_lora(model, **settings)
    if getattr(args, "lora_init", None) is not None:
        adapter_updates(model, args.lora_init)


def config_overrides(args) -> dict:
    """ModelConfig overrides from --max-position-embeddings, --rope-theta and --rope-scaling (JSON, or
    'none' to remove the checkpoint's); ValueError naming the flag for a value that cannot be read."""
    out = {}
    if getattr(args, "max_position_embeddings", None) is not None:
        if args.max_position_embeddings < 1:
            raise ValueError(f"--max-position-embeddings {args.max_position_embeddings}: expected >= 1")
        out["max_position_embeddings"] = args.max_position_embeddings
    if getattr(args, "rope_theta", None) is not None:
        if not args.rope_theta > 0:
            raise ValueError(f"--rope-theta {args.rope_theta}: expected a positive number")
        out["rope_theta"] = float(args.rope_theta)
    text = getattr(args, "rope_scaling", None)
    if text is not None:
        if text.strip().lower() == "none":
            out["rope_scaling"] = None
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--rope-scaling {text!r}: not JSON ({e.msg}); expected e.g. "
                                 f'{{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}') from None
            if not isinstance(value, dict):
                raise ValueError(f"--rope-scaling {text!r}: expected a JSON object")
            out["rope_scaling"] = value
    return out


def model_config(args, tok=None) -> ModelConfig:
    """The ModelConfig a stage will build (the checkpoint's or the preset's, with the flags'
    overrides), read without loading any weight: what flag checks compare lengths against."""
    from model.checkpoint import read_config

    overrides = config_overrides(args)
    if getattr(args, "model", None) is not None:
        return read_config(args.model, overrides)[0]
    return preset_config(args.preset, tok, **overrides)


def check_length(config: ModelConfig, tokens: int, what: str, source: str) -> None:
    """Refuse to train on (or sample) positions past the model's length: `tokens` positions of
    `what` against config.max_position_embeddings, naming both and the flags that extend it."""
    if tokens > config.max_position_embeddings:
        raise ValueError(f"{what} needs {tokens} positions but the model ({source}) has max_position_embeddings "
                         f"{config.max_position_embeddings}; to train past its length pass --max-position-embeddings "
                         f"{tokens} or more (and usually --rope-theta or --rope-scaling)")


def param_dtype_of(flag: str, device: torch.device) -> torch.dtype:
    """--param-dtype: auto is bf16 on CUDA and fp32 on CPU; a dtype the device cannot compute in
    (bf16 on a GPU older than Ampere) is refused, naming the GPU."""
    if flag == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if flag not in DTYPES:
        raise ValueError(f"--param-dtype {flag!r}: expected auto, {', '.join(DTYPES)}")
    dtype = DTYPES[flag]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--param-dtype bf16: {torch.cuda.get_device_name(device)} cannot compute in bf16 "
                         f"(compute capability {torch.cuda.get_device_capability(device)}); use --param-dtype fp32")
    return dtype


def export_dtype_of(args) -> torch.dtype:
    """--export-dtype: auto is the --model checkpoint's own floating dtype (by bytes; bf16 for an
    FP8 checkpoint), fp32 for a --preset."""
    flag = getattr(args, "export_dtype", "auto")
    if flag != "auto":
        return DTYPES[flag]
    if getattr(args, "model", None) is None:
        return torch.float32
    from model.checkpoint import checkpoint_dtype
    return checkpoint_dtype(args.model)


def build_model(args, tok, device="cpu", dtype=torch.float32, seed: int | None = None, *,
                fsdp: dict | None = None, activation_checkpointing: bool = False, compile: bool = False,
                lora: bool = False, **overrides):
    """The model of `args.model` (a folder) or `args.preset` (fresh weights seeded with `seed`, or
    args.seed), its parameters stored in `dtype` on `device` (see the module docstring).

    activation_checkpointing wraps every block (model.parallel.apply_activation_checkpointing),
    compile then compiles each block's forward (model.parallel.apply_compile); fsdp, when given, is apply_fsdp's keyword arguments (param_dtype, reduce_dtype, mesh): the
    model is sharded before any weight is allocated. `overrides` are ModelConfig fields, on top of
    the flags' (config_overrides).

    lora: give the model the adapters of the --lora-* flags (model/lora.py; nothing when they are
    off), before activation checkpointing and FSDP see the module tree. The frozen base is then
    stored in the dtype it computes in (`dtype` stays the adapters' master dtype, fp32), and the
    adapters are filled once the weights are in place: from --lora-init's PEFT adapter, or seeded
    with args.seed (model.lora.init_adapters), the same on every rank and any world size.
    """
    from model.checkpoint import load_into, plan_load, read_config
    from model.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp
    from model.transformer import Transformer

    model_dir, preset = getattr(args, "model", None), getattr(args, "preset", None)
    if (model_dir is None) == (preset is None):
        raise ValueError("give exactly one of --model DIR and --preset NAME")
    from model.lora import apply_lora, init_adapters, load_adapter_weights, lora_settings

    settings = lora_settings(args) if lora else None
    frozen_dtype = (fsdp or {}).get("param_dtype") or dtype   # what a frozen base computes in
    overrides = {**config_overrides(args), **overrides}
    if model_dir is not None:
        config, raw = read_config(model_dir, overrides)
        if tok is not None and tok.vocab_size > config.vocab_size:
            raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; they do not belong together")
        with torch.device("meta"):
            model = Transformer(config)
        model.to(dtype)
        if settings is not None:
            _store_frozen_in(model, frozen_dtype)
        plan = plan_load(model_dir, model, raw)
    else:
        config = preset_config(preset, tok, **overrides)
        seed = getattr(args, "seed", 0) if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Transformer(config)
        model.to(device=device, dtype=dtype)
        if settings is not None:
            _store_frozen_in(model, frozen_dtype)
    if settings is not None:
        apply_lora(model, **settings)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp is not None:
        apply_fsdp(model, **fsdp)
    if model_dir is not None:
        model.to_empty(device=device)
        load_into(model, plan)
    if settings is not None:
        if getattr(args, "lora_init", None) is not None:
            load_adapter_weights(model, args.lora_init)
        else:
            init_adapters(model, getattr(args, "seed", 0))
    return model


def _store_frozen_in(model, dtype: torch.dtype) -> None:
    """A LoRA model's base weights in the dtype they compute in (they are never updated, so they
    need no fp32 master); the MoE router's stay fp32 (model/parallel.py)."""
    from model.moe import Router

    routers = {id(t) for m in model.modules() if isinstance(m, Router) for t in [*m.parameters(), *m.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in routers and t.dtype != dtype:
            t.data = t.data.to(dtype)


def build_sampling_model(args, tok, device="cpu", dtype=torch.float32):
    """The model a sampling-only stage (eval, generate, serve) samples from: build_model's, with
    --lora-init's adapter folded into the weights for good (model.lora.fold_adapters)."""
    from model.lora import fold_adapters

    return fold_adapters(build_model(args, tok, device=device, dtype=dtype, lora=True))


def build_tensor_parallel_model(args, tok, tp, device="cpu", dtype=torch.float32):
    """This rank's tensor-parallel share (model/tensor_parallel.py) of the model build_model would
    give, for sampling alone (evaluation, generation): a --model folder is read tensor by tensor,
    keeping only this rank's slices (--lora-init's adapter merged into each weight as it is read);
    a --preset is built whole on the CPU (seeded the same on every rank), cut, and dropped."""
    from model.tensor_parallel import load_tensor_parallel, share_of

    model_dir = getattr(args, "model", None)
    if model_dir is None:
        return share_of(build_sampling_model(args, tok, device="cpu", dtype=torch.float32), tp, dtype, device)
    from model.checkpoint import read_config
    overrides = config_overrides(args)
    config, _ = read_config(model_dir, overrides)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; they do not belong together")
    return load_tensor_parallel(model_dir, tp, dtype, device, overrides, adapter=getattr(args, "lora_init", None))


# --compile auto: the widths and run lengths where compiling was measured to pay for itself
COMPILE_MIN_HIDDEN_CPU = 512
COMPILE_MIN_STEPS = 20


def compile_enabled(flag: str, device: torch.device, config: ModelConfig, max_steps: int) -> bool:
    """--compile: on, off, or auto. auto compiles runs of at least COMPILE_MIN_STEPS steps, on CUDA
    whatever the width (fused elementwise kernels; a block compiles in well under a minute against
    steps of seconds), on the CPU only for models at least COMPILE_MIN_HIDDEN_CPU wide.

    Measured on a 2-core CPU: a 100M Qwen2 (hidden 768, 12 layers) compiles its training and
    no-grad graphs in about 30 s from a cold cache (every block shares them) and then saves 3-4 s of
    a 46-55 s GRPO step of 5184 tokens (the train pass 22-23 s against 25-27 s eager), so it pays
    back within about 10 steps (20: twice that). The tiny recipe's model (hidden 128) gains 3% of
    a 158 ms SFT micro-batch for a 7 s warm-up: about 1500 micro-batches to break even, so its
    recipes stay eager."""
    if flag in ("on", "off"):
        return flag == "on"
    if flag != "auto":
        raise ValueError(f"--compile {flag!r}: expected auto, on or off")
    if max_steps < COMPILE_MIN_STEPS:
        return False
    return device.type == "cuda" or config.hidden_size >= COMPILE_MIN_HIDDEN_CPU


def build_trained_model(args, tok, info, device):
    """The model a training loop trains, as both loops build it: fp32 master weights computing in
    --param-dtype, sharded with FSDP2 before any weight is allocated when there are several ranks or
    a lower compute precision (model.parallel.training_fsdp; a one-process run then gets a one-rank
    process group), activation checkpointing wrapped in first when asked. Prints the summary line.
    Blocks are compiled when --compile says so (compile_enabled).
    Returns (model, info (with its process group), param_dtype, fsdp options or None, compiled)."""
    from model.parallel import training_fsdp
    from runtime.distributed import ensure_process_group, print0

    param_dtype = param_dtype_of(args.param_dtype, device)
    fsdp = training_fsdp(param_dtype, info.world_size)
    if fsdp is not None:
        info = ensure_process_group(info)
    compiled = compile_enabled(getattr(args, "compile", "off"), device, model_config(args, tok), args.max_steps)
    model = build_model(args, tok, device=device, fsdp=fsdp, activation_checkpointing=args.activation_checkpointing,
                        compile=compiled, lora=True)
    print0(model_summary(model) + f"; computing in {str(param_dtype).removeprefix('torch.')}"
           + (f"; {lora_summary(model)}" if getattr(model, "lora", None) else "")
           + (", sharded over FSDP2" if fsdp is not None else "")
           + (", activation checkpointing" if args.activation_checkpointing else "")
           + (", compiled blocks" if compiled else ""))
    return model, info, param_dtype, fsdp, compiled


def lora_summary(model) -> str:
    from model.lora import lora_layers

    o, n = model.lora, len(lora_layers(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"LoRA rank {o['rank']}, alpha {o['alpha']:g}{', rsLoRA' if o['rslora'] else ''} on {n} layers "
            f"({', '.join(o['targets'])}): {trainable / 1e6:.3f}M trainable parameters, the base frozen")


def model_summary(model) -> str:
    from model.stats import count_params

    c = model.config
    counts = count_params(model)
    return (f"model {c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
            f"{counts.total / 1e6:.2f}M parameters ({counts.active / 1e6:.2f}M active per token)")


def save_model_fn(model, tok, dtype: torch.dtype | None = None, base_model: str | None = None):
    """The callback runtime.checkpoint calls to write the HF folder of a checkpoint, tensor by
    tensor from rank 0 (gathered one at a time when sharded), in `dtype` (None: as stored). A LoRA
    model's folder holds the merged weights, and its adapters go beside it in PEFT's format:
    `<checkpoint>/adapter/` (adapter_config.json naming `base_model`, adapter_model.safetensors)."""
    from model.checkpoint import save_pretrained
    from model.lora import save_adapter

    def save(path):
        save_pretrained(model, path, tokenizer=tok, dtype=dtype)
        if getattr(model, "lora", None):
            save_adapter(model, Path(path).parent / "adapter", base_model=base_model)
    return save
