"""LoRA: low-rank adapters on chosen linear layers, applied from outside the model (like FSDP).

    from model.lora import apply_lora, lora_parameters, merged, save_adapter, load_adapter
    apply_lora(model, targets=["q_proj", "v_proj"], rank=16, alpha=32)   # base weights frozen
    opt = AdamW(lora_parameters(model))                                   # state for the adapters only
    with merged(model):          # W + s * B @ A in place, for a sampler that reads weights (MLA decode)
        ...                      # on exit every base weight is restored bit for bit (kept, not un-merged)
    save_adapter(model, "adapter/")      # PEFT's layout: adapter_config.json + adapter_model.safetensors
    load_adapter(model, "adapter/")      # a PEFT adapter (made by peft or by us) onto our model

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
experts are stacked 3-D weights here (model/moe.py), not linear layers, so they are not targets;
a shared expert's MLP is (`mlp.shared_experts.gate_proj` ...).

Merging. MLA's absorbed decode reads kv_b_proj.weight directly, not through the layer's forward,
so a sampler must see W + s B A as the weight: `merged(model)` writes it into each base weight (the
product in fp32, cast to the weight's dtype), keeps the original, and on exit copies the original
back. Restoring by subtraction in bf16 would drift a little every rollout; the copy is exact.
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

    def delta(self) -> torch.Tensor:
        """s * B @ A [out, in], fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)     # [..., r]
        return y + (self.scaling * F.linear(a, self.lora_B)).to(y.dtype)           # [..., out]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               rslora: bool = False) -> dict[str, LoRALinear]:
    """Give every nn.Linear whose name ends in one of `targets` an adapter and freeze everything
    else; returns {name: layer}. ValueError for a target that matches nothing, naming it and the
    linear layers' names it could match."""
    if rank < 1 or not alpha > 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA: rank must be >= 1, alpha > 0 and dropout in [0, 1), got {rank}, {alpha}, {dropout}")
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and not name.endswith("lm_head")}
    kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
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
    original weights are copied back exactly (a no-op for a model without adapters)."""
    layers = list(lora_layers(model).values())
    kept = []
    try:
        for m in layers:
            kept.append(m.weight.detach().clone())
            m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
            m.merged = True
        yield model
    finally:
        for m, w in zip(layers, kept):
            m.weight.copy_(w)
            m.merged = False


def save_merged(model: nn.Module, path, tokenizer=None, **kwargs) -> Path:
    """The merged model (W + s B A) as a Hugging Face folder (model.checkpoint.save_pretrained; no
    adapter files in it, which transformers with peft installed would pick up)."""
    from model.checkpoint import save_pretrained
    with merged(model):
        return save_pretrained(model, path, tokenizer, **kwargs)


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
    """Write the adapters as PEFT writes them (keys base_model.model.<name>.lora_A.weight, ...)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    return path


def load_adapter(model: nn.Module, path) -> dict[str, LoRALinear]:
    """Apply the PEFT adapter in folder `path` to `model` (its config's targets, rank, alpha, rsLoRA)
    and load its weights; ValueError naming the tensor when the adapter was made for another base."""
    from safetensors.torch import load_file
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"--lora-init {path}: no {f.name} (a PEFT adapter folder holds {ADAPTER_CONFIG} "
                                    f"and {ADAPTER_WEIGHTS})")
    cfg = json.loads(config_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load here")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{config_file}: target_modules as a regular expression ({targets!r}) is not supported; "
                         f"give a list of module names")
    rank = cfg.get("r", 8)
    apply_lora(model, targets, rank=rank, alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
               rslora=bool(cfg.get("use_rslora", False)))
    layers = lora_layers(model)
    tensors = load_file(str(weights_file))
    want = {}
    for name, m in layers.items():
        for part, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            want[f"{PEFT_PREFIX}{name}.{part}.weight"] = p
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise ValueError(f"{weights_file}: tensor {unknown[0]!r} names no LoRA layer of this model (made for another "
                         f"base?); {len(unknown)} such tensor(s)")
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ValueError(f"{weights_file}: no tensor {missing[0]!r} for a target layer of this model "
                         f"({len(missing)} missing)")
    with torch.no_grad():
        for key, p in want.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{weights_file}: tensor {key!r} has shape {list(t.shape)} but this model's layer "
                                 f"needs {list(p.shape)} (an adapter for another base)")
            p.copy_(t.to(p.dtype))
    return layers
