"""LoRA: low-rank adapters on chosen linear layers, applied from outside the model (like FSDP).

    from model.lora import apply_lora, init_adapters, lora_parameters, sampling_weights, save_adapter
    apply_lora(model, targets=["q_proj", "v_proj"], rank=16, alpha=32)   # base weights frozen
    init_adapters(model, seed=0)         # A kaiming-uniform, B = 0: the base exactly, on every rank
    opt = AdamW(lora_parameters(model))                                   # state for the adapters only
    with sampling_weights(model):        # gathered (FSDP2) and W + s B A in the weights, for a sampler
        ...                              # on exit the weights are what they were, bit for bit
    with adapters_disabled(model): ...   # the base alone (a LoRA policy's GRPO reference)
    save_pretrained(model, "hf/")        # model.checkpoint: the merged model (adapters="drop": the base)
    save_adapter(model, "adapter/")      # PEFT's layout: adapter_config.json + adapter_model.safetensors
    load_adapter(model, "adapter/")      # a PEFT adapter (made by peft or by us) onto our model
    fold_adapters(model)                 # merge for good, plain nn.Linear again (sampling-only stages)

In the stages (model.build): `--lora-rank N` (with --lora-alpha, --lora-targets, --lora-dropout,
--lora-rslora) or `--lora-init DIR` makes build_model apply the adapters after the meta model is
checked against the checkpoint and before activation checkpointing and FSDP2 see the module tree;
the frozen base is stored in its compute dtype (bf16 on GPU) beside fp32 adapter masters, and the
adapters are filled once the base is loaded (seeded, or from the adapter folder; sharded adapters
take their own rows). Rollouts merge the adapters into the gathered weights
(model.tensor_parallel.TensorParallelRollout.weights, via sampling_weights) or into each whole
tensor before it is cut for --rollout-tp (merge_into); checkpoints write the merged model in hf/
and the adapter in adapter/, and their resumable state holds the adapters, not the frozen base
(runtime/checkpoint.py).

A LoRA layer (Hu et al. 2021) adds a trained low-rank update to a frozen weight W [out, in]:

    y = x W^T + b + s * dropout(x) A^T B^T        A [r, in] ~ kaiming-uniform, B [out, r] = 0
    s = alpha / r   (rsLoRA, Kalajievo 2023: s = alpha / sqrt(r), for ranks where alpha / r fades)

so training starts from the base model exactly. Each targeted nn.Linear becomes a LoRALinear in
place (its class is swapped and lora_A / lora_B registered beside weight / bias): the base's state
dict names do not move, so checkpoint loading, FSDP2 wrapping, activation checkpointing and the
tensor-parallel plan see the same module tree, and the adapter's names are the module's name plus
`.lora_A.weight` / `.lora_B.weight`, which are PEFT's own (PEFT prefixes `base_model.model.`).
The adapters are fp32 whatever the base's dtype: frozen bf16 weights beside fp32 adapters.

Targets are module names' last parts: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, and MLA's q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj (and o_proj). A target
that matches no linear layer is refused, naming it and listing the names it could match. Routed
experts are never targets: their projections are nn.Linear modules here, but the MoE's sorted
dispatch runs their weights through one grouped kernel (model/moe.py GroupedSwiGLU) rather than
each module's forward, so an adapter there would be skipped in training, and transformers fuses
routed experts into 3-D parameters that PEFT cannot target anyway. The dense MLPs and the shared
experts (`mlp.shared_experts.gate_proj` ...) are targets.

Merging. MLA's absorbed decode reads kv_b_proj.weight directly, not through the layer's forward,
and model.parallel.decode_view builds plain modules over the weights, so a sampler must see
W + s B A as the weight: `merged(model)` writes it into each base weight (the product in fp32,
cast to the weight's dtype). On exit the original comes back by copy, never by subtraction (which
in bf16 would drift a little every rollout). An unsharded model keeps a copy of each adapted weight
for that; an FSDP2 model inside `gathered` keeps none, since its unsharded weights are copies
all-gathered from the sharded masters and dropped when the context ends.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj",
                   "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter: y = base(x) + scaling * dropout(x) A^T B^T (unless merged)."""

    lora_A: nn.Parameter   # [r, in]
    lora_B: nn.Parameter   # [out, r]

    @classmethod
    def convert(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        linear.__class__ = cls
        dev = linear.weight.device
        linear.rank, linear.alpha, linear.rslora = rank, alpha, rslora
        linear.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        linear.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=torch.float32, device=dev))
        linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=torch.float32, device=dev))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(linear.lora_A, a=math.sqrt(5))   # as PEFT and nn.Linear initialise
        linear.merged = False
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)     # [..., r]
        return y + (self.scaling * F.linear(a, self.lora_B)).to(y.dtype)           # [..., out]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


def _routed_expert(name: str) -> bool:
    """A routed expert's projection (`...mlp.experts.3.gate_proj`): never a target (module docstring)."""
    return ".mlp.experts." in name


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def apply_lora(model: nn.Module, targets=None, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               rslora: bool = False) -> dict[str, LoRALinear]:
    """Give every nn.Linear whose name ends in one of `targets` an adapter and freeze everything
    else; returns {name: layer}. targets None (or "all-linear"): every DEFAULT_TARGETS name this
    model has (the attention's and the dense MLPs', MLA's included). ValueError for a given target
    that matches nothing, naming it and the linear layers' names it could match."""
    if rank < 1 or not alpha > 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA: rank must be >= 1, alpha > 0 and dropout in [0, 1), got {rank}, {alpha}, {dropout}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and not name.endswith("lm_head") and not _routed_expert(name)}
    kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
    if targets is None or targets == "all-linear":
        targets = [t for t in DEFAULT_TARGETS if t in kinds]
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not targets:
        raise ValueError(f"--lora-targets: no target given; this model's linear layers are named {', '.join(kinds)}")
    chosen = {}
    for t in targets:
        hits = {n: m for n, m in linears.items() if n == t or n.endswith("." + t)}
        if not hits:
            raise ValueError(f"--lora-targets: {t!r} matches no linear layer of this {getattr(model, 'config', None) and model.config.model_type} "
                             f"model; its linear layers are named {', '.join(kinds)}")
        chosen.update(hits)
    model.requires_grad_(False)
    for m in chosen.values():
        LoRALinear.convert(m, rank, alpha, dropout, rslora)
    model.lora = dict(targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
    return lora_layers(model)


@contextlib.contextmanager
@torch.no_grad()
def merged(model: nn.Module):
    """Inside: every LoRA layer's weight is W + s B A and its forward uses it alone. On exit the
    original weights are copied back exactly (a no-op for a model without adapters).

    An FSDP2 model must be inside model.parallel.gathered: its weights are then the unsharded
    copies FSDP all-gathered from the sharded masters, thrown away when the context ends, so they
    are merged in place and nothing is kept (no second copy of the model in memory); the masters
    are never touched. A sharded (DTensor) weight outside gathered is refused."""
    from model.parallel import is_sharded
    from torch.distributed.tensor import DTensor

    layers = list(lora_layers(model).values())
    transient = is_sharded(model)
    kept = []
    try:
        for m in layers:
            if isinstance(m.weight, DTensor):
                raise RuntimeError("lora.merged: the weights are still sharded; merge inside "
                                   "model.parallel.gathered(model)")
            if not transient:
                kept.append(m.weight.detach().clone())
            m.weight.copy_(merge_into(m, m.weight))
            m.merged = True
        yield model
    finally:
        for m, w in zip(layers, kept):
            m.weight.copy_(w)
        for m in layers:
            m.merged = False


@contextlib.contextmanager
def sampling_weights(model: nn.Module):
    """What a sampler reads: the model gathered (model.parallel.gathered, a no-op unsharded) with
    its adapters merged into the weights, so MLA's absorbed decode and model.parallel.decode_view
    (which builds plain modules over the weights) sample from base + adapter, never the base alone."""
    from model.parallel import gathered

    with gathered(model), merged(model):
        yield model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: the model computes as its base (every adapter's term left out), e.g. the frozen GRPO
    reference of a LoRA policy without a second copy of the model."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise RuntimeError("lora.adapters_disabled: the adapters are merged into the weights (inside lora.merged)")
    try:
        for m in layers:
            m.merged = True     # the forward's adapter term is skipped; the weights are the base's
        yield model
    finally:
        for m in layers:
            m.merged = False


def _full(t: torch.Tensor) -> torch.Tensor:
    """t whole (a DTensor all-gathered: a collective every rank takes part in), fp32."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.float()


def weight_deltas(model: nn.Module) -> dict[str, LoRALinear]:
    """{state-dict name of a LoRA layer's weight: the layer}: the weights a reader of whole tensors
    (a Hugging Face export, the tensor-parallel redistribution) must merge with merge_into."""
    return {f"{name}.weight": m for name, m in lora_layers(model).items()}


def merge_into(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """The whole `weight` of `layer` (as read: gathered, maybe cast) plus its adapter's update,
    added in fp32 and cast back to weight's dtype. Gathers the adapter when it is sharded: every
    rank calls it for the same layers in the same order."""
    a, b = _full(layer.lora_A), _full(layer.lora_B)
    delta = layer.scaling * (b @ a)
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _set_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into p, a plain parameter or this rank's shard of a DTensor (sliced
    here, as FSDP2 shards, with no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        local = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local.to(p.to_local().device))
    else:
        p.copy_(value.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A from kaiming-uniform (as PEFT and nn.Linear initialise), B = 0, drawn from one generator
    seeded with `seed` in module order: the same adapters on every rank and any world size, sharded
    or not, so training starts from the base exactly and a 2-rank run from a 1-process run's start."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        a = torch.empty(tuple(m.lora_A.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        _set_whole(m.lora_A, a)
        _set_whole(m.lora_B, torch.zeros(tuple(m.lora_B.shape)))


# ---- PEFT's adapter format ---------------------------------------------------------------------------

def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for the adapters of `model` (apply_lora's settings)."""
    opts = getattr(model, "lora", None)
    if opts is None:
        raise ValueError("the model has no LoRA adapters (model.lora.apply_lora)")
    layers = lora_layers(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": opts["rank"], "lora_alpha": opts["alpha"], "lora_dropout": opts["dropout"],
            "use_rslora": opts["rslora"], "target_modules": kinds, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "modules_to_save": None, "inference_mode": True, "use_dora": False}


def save_adapter(model: nn.Module, path, base_model: str | None = None) -> Path:
    """Write the adapters as PEFT writes them (keys base_model.model.<name>.lora_A.weight, ...).
    Sharded adapters (FSDP2) are gathered one at a time: every rank calls it, rank 0 writes."""
    from safetensors.torch import save_file
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    path = Path(path)
    tensors = {}
    for name, m in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _full(m.lora_A).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _full(m.lora_B).contiguous().cpu()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    return path


def read_adapter_config(path) -> dict:
    """apply_lora's settings (targets, rank, alpha, dropout, rslora) from the PEFT adapter folder
    `path`; FileNotFoundError / ValueError naming the file for what is not a LoRA adapter here."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"--lora-init {path}: no {f.name} (a PEFT adapter folder holds {ADAPTER_CONFIG} "
                                    f"and {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not JSON ({e.msg}, line {e.lineno})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load here")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{config_file}: target_modules as a regular expression ({targets!r}) is not supported; "
                         f"give a list of module names")
    for key in ("use_dora", "modules_to_save", "target_parameters", "layers_to_transform"):
        if cfg.get(key):
            raise ValueError(f"{config_file}: {key} = {cfg[key]!r} is not supported here (plain LoRA on linear "
                             f"layers only)")
    return {"targets": targets, "rank": cfg.get("r", 8), "alpha": cfg.get("lora_alpha", 8),
            "dropout": cfg.get("lora_dropout", 0.0), "rslora": bool(cfg.get("use_rslora", False))}


def read_adapter_tensors(model: nn.Module, path) -> dict[str, torch.Tensor]:
    """The tensors of the PEFT adapter in folder `path`, checked against the LoRA layers apply_lora
    gave `model` (a meta model will do: only names and shapes are read), keyed by PEFT's names.
    ValueError naming the tensor when the adapter was made for another base (a name or a shape
    this model does not have)."""
    from safetensors.torch import load_file
    weights_file = Path(path) / ADAPTER_WEIGHTS
    tensors = load_file(str(weights_file))
    want = {f"{PEFT_PREFIX}{name}.{part}.weight": tuple(getattr(m, part).shape)
            for name, m in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise ValueError(f"{weights_file}: tensor {unknown[0]!r} names no LoRA layer of this model (made for another "
                         f"base?); {len(unknown)} such tensor(s)")
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ValueError(f"{weights_file}: no tensor {missing[0]!r} for a target layer of this model "
                         f"({len(missing)} missing)")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_file}: tensor {key!r} has shape {list(tensors[key].shape)} but this model's "
                             f"layer needs {list(shape)} (an adapter for another base)")
    return {k: t.float() for k, t in tensors.items()}


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path) -> None:
    """Fill the adapters apply_lora made (from read_adapter_config(path)) with the tensors of the
    PEFT adapter in folder `path` (read_adapter_tensors); sharded adapters take this rank's rows."""
    tensors = read_adapter_tensors(model, path)
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            _set_whole(getattr(m, part), tensors[f"{PEFT_PREFIX}{name}.{part}.weight"])


def adapter_updates(model: nn.Module, path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{weight name: (A, B, scaling)} of the PEFT adapter in `path` for `model` (adapted by
    apply_lora(**read_adapter_config(path)), maybe on the meta device): for loaders that merge
    while reading whole tensors (model.tensor_parallel.load_tensor_parallel)."""
    tensors = read_adapter_tensors(model, path)
    return {f"{name}.weight": (tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"],
                               tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"], m.scaling)
            for name, m in lora_layers(model).items()}


@torch.no_grad()
def fold_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight for good and turn the layer back into a plain
    nn.Linear (sampling-only stages: nothing to restore, no adapter term left in the forward).
    An unsharded model only."""
    for m in lora_layers(model).values():
        m.weight.copy_(merge_into(m, m.weight))
        for key in ("lora_A", "lora_B"):
            del m._parameters[key]
        del m.lora_dropout
        m.__class__ = nn.Linear
    if hasattr(model, "lora"):
        del model.lora
    return model


def load_adapter(model: nn.Module, path) -> dict[str, LoRALinear]:
    """Apply the PEFT adapter in folder `path` to `model` (its config's targets, rank, alpha, rsLoRA)
    and load its weights; ValueError naming the tensor when the adapter was made for another base."""
    apply_lora(model, **read_adapter_config(path))
    load_adapter_weights(model, path)
    return lora_layers(model)


# ---- the --lora-* flags ----------------------------------------------------------------------------------

def lora_settings(args) -> dict | None:
    """apply_lora's keyword arguments from the --lora-* flags (--lora-init: the adapter's own
    config), or None when the run trains every weight (--lora-rank 0 and no --lora-init)."""
    init = getattr(args, "lora_init", None)
    if init is not None:
        return read_adapter_config(init)
    rank = getattr(args, "lora_rank", 0) or 0
    if rank <= 0:
        return None
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * rank
    return {"targets": args.lora_targets, "rank": rank, "alpha": alpha, "dropout": args.lora_dropout,
            "rslora": bool(args.lora_rslora)}


def check_lora_flags(args, sampling: bool = False) -> None:
    """The --lora-* flags: values in range, no --lora-rank beside --lora-init (the adapter sets its
    own), an adapter folder that is one; ValueError naming the flag. `sampling`: a stage that only
    samples (eval, generate, serve) takes --lora-init alone."""
    rank = getattr(args, "lora_rank", 0) or 0
    if sampling and rank:
        raise ValueError(f"--lora-rank {rank} trains adapters; --stage {getattr(args, 'stage', None)} only samples: "
                         f"give --lora-init ADAPTER_DIR to sample base + adapter")
    if rank < 0:
        raise ValueError(f"--lora-rank {rank}: expected >= 1 (0: no LoRA, every weight trained)")
    init = getattr(args, "lora_init", None)
    if init is not None and rank:
        raise ValueError(f"--lora-init {init} sets the rank, alpha and targets from its adapter_config.json; "
                         f"leave out --lora-rank")
    if rank == 0 and init is None:
        given = [f for f in ("lora_alpha", "lora_targets") if getattr(args, f, None) not in (None, "all-linear")]
        if given or getattr(args, "lora_rslora", False) or getattr(args, "lora_dropout", 0.0):
            raise ValueError("--lora-alpha / --lora-targets / --lora-dropout / --lora-rslora need --lora-rank N "
                             "(LoRA is off without it)")
        return
    settings = lora_settings(args)
    if not settings["alpha"] > 0:
        raise ValueError(f"--lora-alpha {settings['alpha']}: expected > 0")
    if not 0 <= settings["dropout"] < 1:
        raise ValueError(f"--lora-dropout {settings['dropout']}: expected a probability in [0, 1)")
