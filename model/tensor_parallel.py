"""Tensor parallelism for sampling: the model split over the N ranks of a group, built from the FSDP
shards (or a checkpoint) for the duration of a rollout, so that no rank holds the whole model.

Letters: N ranks of the tensor-parallel group, r this rank's place in it, H query heads, K kv heads,
D model dim, I an MLP's intermediate dim, E routed experts, V vocabulary, Vs = ceil(V / N).

The plan (Megatron-LM's split, as torchtitan and gpt-fast apply it; every piece head- or row-aligned):

    attention  q/k/v (GQA) and q_proj or q_b_proj, kv_b_proj (MLA): column-parallel, rank r holds
               heads r·H/N .. (r+1)·H/N - 1 (and the matching kv heads); o_proj row-parallel (its
               input columns of those heads), the partial outputs summed over the group.
               MLA's shared latent (q_a_proj, kv_a_proj_with_mqa, their norms) stays replicated:
               every rank computes it and keeps the whole latent cache.
    dense MLP  gate/up column-parallel (I/N rows each), down_proj row-parallel, summed.
    MoE        the router replicated (every rank routes every token the same way); rank r holds the
               routed experts r·E/N .. (r+1)·E/N - 1 whole and runs them on the tokens routed to them;
               the shared experts are split like a dense MLP; one sum over the group combines both.
    embedding  vocabulary-parallel: rank r holds rows r·Vs .. (r+1)·Vs - 1, looks up the ids it owns
               (zeros elsewhere), summed over the group (exact: each sum has one non-zero term).
    head       vocabulary-parallel: rank r computes logits for its rows, the group gathers them, so
               every rank holds the logits over the whole vocabulary, bit for bit the same: the
               softmax, the log-probs and the draw are over all V, identical on every rank.
    norms      replicated. MTP modules are left out (decoding never runs them).

The local model is an ordinary Transformer built from `local_config` (H/N heads, K/N kv heads, I/N
intermediate): its attention, MLP and KV cache take their local sizes from it, so the paged cache
of the rollout engine is split by heads (GQA) with no change to the engine. Only four kinds of
module differ: RowParallelLinear, VocabParallelEmbedding, VocabParallelHead and
TensorParallelMoE, whose sums and gathers go through runtime.distributed (functional collectives,
so a compiled decode step traces them). The local model's parameter names are the full model's,
with the same layout, so `plan` maps each to the tensor and slice it comes from.

Weights by redistribution (`TensorParallelRollout.weights()`): for each tensor of the FSDP model in
turn, its DTensor shards (cast to the compute dtype first, as FSDP2's mixed precision gathers them)
are redistributed to Replicate (one all-gather of that tensor only), this rank keeps its slice,
and the whole tensor is freed before the next: no rank ever holds more than its share of the model
plus one whole weight tensor. The local tensors are freed when the context
exits, before training resumes. `load_tensor_parallel(path, ...)` builds the same local model
straight from a checkpoint folder for evaluation alone (no FSDP), reading each tensor once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import MLP
from model.moe import GroupedSwiGLU, MoE, Router
from model.rope import RotaryEmbedding
from runtime.distributed import Subgroup, group_all_gather, group_all_reduce

COLUMN = ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")  # split on dim 0
ROW = ("o_proj", "down_proj")                                                           # split on dim 1
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def check_tensor_parallel(config: ModelConfig, n: int, flag: str = "--rollout-tp") -> None:
    """ValueError, naming the count, when `config` cannot be split over n ranks head- and row-aligned."""
    if n < 1:
        raise ValueError(f"{flag} {n}: expected >= 1")
    if n == 1:
        return
    counts = [("num_attention_heads", config.num_attention_heads)]
    if not config.is_mla:
        counts.append(("num_key_value_heads", config.num_key_value_heads))
    layers = range(config.num_hidden_layers)
    if any(not config.is_moe_layer(i) for i in layers):
        counts.append(("intermediate_size", config.intermediate_size))
    if any(config.is_moe_layer(i) for i in layers):
        counts.append(("n_routed_experts", config.n_routed_experts))
        if config.n_shared_experts:
            counts.append(("moe_intermediate_size x n_shared_experts",
                           config.moe_intermediate_size * config.n_shared_experts))
    bad = [f"{name} = {value}" for name, value in counts if value % n]
    if bad:
        raise ValueError(f"{flag} {n}: the model cannot be split over {n} ranks: {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not divisible by {n}")


def local_config(config: ModelConfig, n: int) -> ModelConfig:
    """The config of one rank's share: H/N query heads, K/N kv heads (GQA), I/N dense intermediate,
    no MTP modules. Vocabulary and MoE sizes stay global (those modules are replaced whole)."""
    check_tensor_parallel(config, n)
    kv = config.num_key_value_heads // n if not config.is_mla else config.num_attention_heads // n
    return config.replace(num_attention_heads=config.num_attention_heads // n, num_key_value_heads=kv,
                          intermediate_size=config.intermediate_size // n if config.intermediate_size % n == 0
                          else config.intermediate_size, num_nextn_predict_layers=0, mtp_loss_weight=0.0)


# ---- the modules that differ ---------------------------------------------------------------------

class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r W_rᵀ + b: this rank's input columns W_r [out, in/N] of a linear layer whose input
    is split over the group (the heads of o_proj, the intermediate of down_proj); the bias (whole)
    is added once, after the sum."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = group_all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + Vs) of the embedding (the last rank's padded with zero rows past V): ids
    outside them look up zeros, and the sum over the group puts every id's row in place."""

    def __init__(self, vocab_size: int, dim: int, rank: int, size: int, group):
        super().__init__()
        self.rows = -(-vocab_size // size)
        self.start, self.vocab_size, self.group = rank * self.rows, vocab_size, group
        self.weight = nn.Parameter(torch.empty(self.rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        e = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return group_all_reduce(e, self.group)


class VocabParallelHead(nn.Module):
    """The output head, rows [start, start + Vs) of W_out: local logits [.., Vs], gathered over the
    group into [.., V] (rank order is vocabulary order; the padding past V is cut)."""

    def __init__(self, vocab_size: int, dim: int, rank: int, size: int, group):
        super().__init__()
        self.rows = -(-vocab_size // size)
        self.start, self.vocab_size, self.group = rank * self.rows, vocab_size, group
        self.weight = nn.Parameter(torch.empty(self.rows, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        local = F.linear(h.reshape(-1, h.shape[-1]), self.weight)            # [M, Vs]
        parts = group_all_gather(local, self.group)                          # [N, M, Vs]
        logits = parts.permute(1, 0, 2).reshape(local.shape[0], -1)[:, :self.vocab_size]  # [M, V]
        return logits.reshape(*lead, self.vocab_size)


class TensorParallelMoE(nn.Module):
    """DeepSeekMoE with the routed experts divided among the group: x [B, T, D] or [N, D] -> same.

    The router (replicated) chooses every token's experts as model.moe.MoE does; this rank runs its
    experts first .. first + E/N - 1 on the tokens routed to them (expert-sorted, GroupedSwiGLU) and
    its share of the shared experts (an MLP of I_s/N: its down projection's partial sum), and one sum
    over the group adds every rank's part. `static_dispatch` runs the local experts densely on all
    tokens (fixed shapes), as MoE's does."""

    def __init__(self, config: ModelConfig, layer_idx: int, rank: int, size: int, group):
        super().__init__()
        self.layer_idx, self.group = layer_idx, group
        self.hidden_size = config.hidden_size
        self.n_local = config.n_routed_experts // size
        self.first = rank * self.n_local
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(self.n_local))
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared // size) if shared else None
        self.static_dispatch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.hidden_size)                                 # [N, D]
        routing = self.gate(x2)
        out = self.shared_experts(x2) if self.shared_experts is not None else torch.zeros_like(x2)
        local = routing.topk_idx - self.first                                # [N, K]: local expert or outside
        mine = (local >= 0) & (local < self.n_local)
        weight = routing.topk_weight.to(x.dtype) * mine                      # [N, K]: 0 for others' experts
        if self.static_dispatch:
            dense = x2.new_zeros(x2.shape[0], self.n_local + 1)              # [N, E/N + 1]: the last column
            dense.scatter_add_(1, torch.where(mine, local, self.n_local), weight)  # takes others' weights (0)
            for j, expert in enumerate(self.experts):
                out = out + dense[:, j:j + 1] * expert(x2)
        else:
            flat = torch.where(mine, local, self.n_local).reshape(-1)        # [A]; others sort last
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=self.n_local + 1)[: self.n_local]
            n_mine = int(counts.sum())
            order = order[:n_mine]
            token_of = order // routing.topk_idx.shape[1]
            w_sorted = weight.reshape(-1)[order]
            weights = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
            y = GroupedSwiGLU.apply(x2.index_select(0, token_of), w_sorted, counts.tolist(), *weights)
            out = out.index_add_(0, token_of, y)
        return group_all_reduce(out, self.group).view(x.shape)


# ---- the local model and where each of its tensors comes from -----------------------------------

@dataclass(frozen=True)
class Piece:
    """One tensor of the local model: `source`, the full model's name it is cut from, split on `dim`
    into `parts` equal blocks (padded to equal, for the vocabulary) of which it is block `index`;
    dim None: the whole source tensor."""
    name: str
    source: str
    dim: int | None = None
    index: int = 0
    parts: int = 1


def build_local_model(config: ModelConfig, tp: Subgroup):
    """One rank's share of the model, on the meta device (nothing allocated): a Transformer of
    local_config(config, N) with the row-parallel, vocabulary-parallel and MoE modules in place.
    Its `config` is the local one with the whole vocabulary (its logits are over all of V)."""
    from model.transformer import Transformer

    n, r, group = tp.size, tp.rank, tp.group
    lc = local_config(config, n)
    with torch.device("meta"):
        m = Transformer(lc)
        for i, block in enumerate(m.layers):
            attn = block.self_attn
            attn.o_proj = RowParallelLinear(attn.o_proj.in_features, config.hidden_size,
                                            attn.o_proj.bias is not None, group)
            if isinstance(block.mlp, MoE):
                block.mlp = TensorParallelMoE(config, i, r, n, group)
            else:
                mlp = block.mlp
                mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, config.hidden_size,
                                                  mlp.down_proj.bias is not None, group)
        m.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, r, n, group)
        m.lm_head = VocabParallelHead(config.vocab_size, config.hidden_size, r, n, group)
    m.tie_weights()
    m.tp = tp
    return m.eval().requires_grad_(False)


def plan(local: nn.Module, tp: Subgroup) -> list[Piece]:
    """Where each tensor of `local` (build_local_model's; parameters and buffers) comes from."""
    n, r = tp.size, tp.rank
    pieces = []
    for name, _ in _tensors(local):
        parts = name.split(".")
        if name in VOCAB:
            pieces.append(Piece(name, name, 0, r, n))
        elif ".mlp.experts." in name:
            k = parts.index("experts") + 1
            module = local.get_submodule(".".join(parts[:k - 1]))
            parts[k] = str(module.first + int(parts[k]))
            pieces.append(Piece(name, ".".join(parts)))
        elif len(parts) >= 2 and parts[-2] in COLUMN:
            pieces.append(Piece(name, name, 0, r, n))
        elif len(parts) >= 2 and parts[-2] in ROW and parts[-1] == "weight":
            pieces.append(Piece(name, name, 1, r, n))
        else:
            pieces.append(Piece(name, name))
    return pieces


def cut(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The block of `full` that `piece` names (a view; the last vocabulary block padded with zeros)."""
    if piece.dim is None:
        return full
    size = full.shape[piece.dim]
    step = -(-size // piece.parts)
    start = min(piece.index * step, size)
    block = full.narrow(piece.dim, start, min(step, size - start))
    if block.shape[piece.dim] < step:   # the vocabulary's padding rows
        pad = list(block.shape)
        pad[piece.dim] = step - block.shape[piece.dim]
        block = torch.cat([block, block.new_zeros(pad)], dim=piece.dim)
    return block


def _tensors(module: nn.Module):
    """(name, tensor) of every parameter (a tied one once) and persistent buffer, in module order."""
    seen, out = set(), []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _keeps_fp32(name: str) -> bool:
    """The router's weight and balancing bias stay fp32 in every copy (model/moe.py, model/parallel.py)."""
    return ".mlp.gate." in name


def fill(local: nn.Module, pieces: list[Piece], read, order: list[str], dtype: torch.dtype,
         device: torch.device) -> int:
    """Allocate `local`'s tensors on `device` (in `dtype`; router tensors fp32) and fill them: for each
    source name of `order` in turn, `read(name)` gives the whole tensor (None: skip it), each piece
    cut from it is copied in, and the whole tensor is dropped. Every source in `order` is read even
    when this rank needs nothing of it (reading may be a collective). Returns the bytes allocated."""
    by_source: dict[str, list[Piece]] = {}
    for p in pieces:
        by_source.setdefault(p.source, []).append(p)
    missing = sorted(set(by_source) - set(order))
    if missing:
        raise KeyError(f"tensor-parallel weights: no source for {missing[:5]}")
    nbytes = 0
    for source in order:
        full = read(source, bool(by_source.get(source)))
        if full is not None:
            nbytes += _keep_pieces(local, full, by_source.get(source, []), dtype, device)
        del full   # no view of it outlives this step: the next whole tensor is read only once this one is gone
    _tie(local)
    return nbytes


def _keep_pieces(local: nn.Module, full: torch.Tensor, pieces: list[Piece], dtype, device) -> int:
    """Copy each piece's block of `full` into a tensor of its own in `local`; the bytes allocated."""
    nbytes = 0
    for p in pieces:
        t = torch.empty(cut(full, p).shape, dtype=torch.float32 if _keeps_fp32(p.name) else dtype, device=device)
        t.copy_(cut(full, p))
        _assign(local, p.name, t)
        nbytes += t.numel() * t.element_size()
    return nbytes


def _tie(local: nn.Module) -> None:
    """Tied embeddings: one tensor under both names (named_parameters lists it as lm_head.weight)."""
    if local.config.tie_word_embeddings:
        local.model.embed_tokens._parameters["weight"] = local.lm_head._parameters["weight"]


def _assign(root: nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, _, key = name.rpartition(".")
    module = root.get_submodule(module_name)
    kind = "_parameters" if key in module._parameters else "_buffers"
    getattr(module, kind)[key] = t


def release(local: nn.Module) -> None:
    """Return the local tensors' memory (every tensor back on the meta device)."""
    for module in local.modules():
        for kind in ("_parameters", "_buffers"):
            store = getattr(module, kind)
            for key, t in store.items():
                if t is not None and not t.is_meta:
                    store[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    _tie(local)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights a module holds now (parameters, a tied one once, and buffers; meta and
    FSDP-sharded tensors count their local storage)."""
    total = 0
    for _, t in _tensors(module):
        local = t.to_local() if hasattr(t, "to_local") else t
        if not local.is_meta:
            total += local.numel() * local.element_size()
    return total


# ---- the two sources: a (sharded) model in memory, a checkpoint folder --------------------------

class TensorParallelRollout:
    """The policy as rollouts sample it: `with rollout.weights() as policy:` yields the model itself
    under model.parallel.gathered (group of one rank: every rank holds the whole model), or the local
    share built from the model's current (FSDP) weights for this rank's tensor-parallel group.
    The local module tree is built once and reused, so a sampler bound to it keeps its compiled
    step; its tensors exist only inside the context. `weight_bytes` is what the last context held."""

    def __init__(self, model: nn.Module, tp: Subgroup, dtype: torch.dtype | None = None):
        check_tensor_parallel(model.config, tp.size)
        self.model, self.tp = model, tp
        self.dtype = dtype
        self.local = build_local_model(model.config, tp) if tp.size > 1 else None
        self.pieces = plan(self.local, tp) if self.local is not None else None
        self.weight_bytes = 0

    @contextlib.contextmanager
    def weights(self):
        from torch.distributed.tensor import DTensor

        from model.parallel import gathered

        from model.lora import merge_into, sampling_weights, weight_deltas

        if self.local is None:
            with sampling_weights(self.model):   # gathered, LoRA adapters merged into the weights
                self.weight_bytes = weight_bytes(self.model)
                yield self.model
            return
        # LoRA: each adapted weight is merged as it is read whole, before it is cut into shares
        deltas = weight_deltas(self.model)
        sources = {n: t for n, t in _tensors(self.model) if not n.endswith((".lora_A", ".lora_B"))}
        first = next(iter(sources.values()))
        device = (first.to_local() if hasattr(first, "to_local") else first).device
        dtype = self.dtype or _compute_dtype(self.model)

        def read(name, needed):
            full = read_whole(name, needed)
            return merge_into(deltas[name], full) if name in deltas and full is not None else full

        def read_whole(name, needed):
            t = sources[name]
            if not hasattr(t, "full_tensor"):
                return t if needed else None
            # gathered in the dtype it computes in (as FSDP2's mixed precision gathers it): the shard is
            # cast first, so the whole tensor in flight is half the fp32 master's size under bf16
            want = torch.float32 if _keeps_fp32(name) else dtype
            local = t.to_local()
            if local.is_floating_point() and local.dtype != want:
                t = DTensor.from_local(local.to(want), t.device_mesh, t.placements, run_check=False,
                                       shape=t.shape, stride=t.stride())
            return t.full_tensor()

        order = [n for n in sources if not _is_mtp(n, self.model.config)]
        try:
            self.weight_bytes = fill(self.local, self.pieces, read, order, dtype, device)
            self.local.rope = self.model.rope
            yield self.local
        finally:
            release(self.local)


def share_of(model: nn.Module, tp: Subgroup, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """This rank's share of an unsharded model in memory, as a lasting model (for sampling alone):
    its tensors are copies, so the caller may drop `model`."""
    check_tensor_parallel(model.config, tp.size)
    local = build_local_model(model.config, tp)
    sources = dict(_tensors(model))
    device = torch.device(device) if device is not None else next(iter(sources.values())).device
    fill(local, plan(local, tp), lambda name, needed: sources[name] if needed else None,
         [n for n in sources if not _is_mtp(n, model.config)], dtype or _compute_dtype(model), device)
    local.rope = RotaryEmbedding(local.config)
    return local.eval()


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: FSDP2's mixed-precision param_dtype, else its parameters'."""
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if state is not None:
            policy = state()._mp_policy
            if policy.param_dtype is not None:
                return policy.param_dtype
            break
    for name, t in model.named_parameters():
        if not _keeps_fp32(name):
            return t.dtype
    return torch.float32


def _is_mtp(name: str, config: ModelConfig) -> bool:
    parts = name.split(".")
    return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and int(parts[2]) >= config.num_hidden_layers)


def load_tensor_parallel(path, tp: Subgroup, dtype: torch.dtype = torch.float32, device="cpu",
                         config_overrides: dict | None = None, adapter=None):
    """This rank's share of the checkpoint folder `path` (build_local_model, in eval mode), read
    tensor by tensor: every name and shape is checked first (model.checkpoint.plan_load), then each
    tensor this rank needs is read whole into a buffer, cut, and dropped (experts of other ranks are
    not read). Peak memory: the share plus one whole tensor. `adapter`: a PEFT LoRA adapter folder
    (model/lora.py), merged into each adapted weight as it is read, before it is cut."""
    from model.checkpoint import plan_load, read_config, read_tensor
    from model.transformer import Transformer

    config, raw = read_config(path, config_overrides)
    check_tensor_parallel(config, tp.size)
    with torch.device("meta"):
        full = Transformer(config)
    full.to(dtype)
    load = plan_load(path, full, raw)
    updates = {}
    if adapter is not None:
        from model.lora import adapter_updates, apply_lora, read_adapter_config
        apply_lora(full, **read_adapter_config(adapter))
        updates = adapter_updates(full, adapter)
    stored = {name: file for file, names in load.by_file.items() for name in names}
    alias = {}
    if config.tie_word_embeddings and "lm_head.weight" not in stored:
        alias["lm_head.weight"] = "model.embed_tokens.weight"   # a tied head is stored as the embedding
    local = build_local_model(config, tp)
    pieces = plan(local, tp)

    def read(name, needed):
        if not needed:
            return None
        source = alias.get(name, name)
        t = read_tensor(load, stored[source], source, torch.float32 if _keeps_fp32(name) else dtype)
        if name in updates:
            a, b, scaling = updates[name]
            t = (t.float() + scaling * (b @ a)).to(t.dtype)
        return t

    fill(local, pieces, read, list(dict.fromkeys(p.source for p in pieces)), dtype, torch.device(device))
    local.rope = RotaryEmbedding(local.config)
    return local.eval()
