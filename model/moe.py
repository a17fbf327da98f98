"""DeepSeekMoE: fine-grained routed experts plus shared experts, with auxiliary-loss-free balancing;
Qwen3-MoE is the same layer with other settings (below).

Letters: B batch, T tokens per sequence, N = B·T tokens, D model dim, E routed experts,
K experts per token (top-k), G expert groups, I expert intermediate dim, A = N·K assignments.

The layer (DeepSeek-V3 report, eqs. 12-16), for a token's input u_t (the residual u_t itself is
added by the Block, not here):

    s_{i,t}  = sigmoid(u_tᵀ e_i)                      (V3; V2 uses softmax over the E experts)
    g'_{i,t} = s_{i,t}  if s_{i,t} + b_i ∈ TopK({s_{j,t} + b_j}, K)  else 0
    g_{i,t}  = g'_{i,t} / Σ_j g'_{j,t} · routed_scaling_factor    (the division only if norm_topk_prob)
    h_t      = Σ_shared FFN_s(u_t) + Σ_i g_{i,t} FFN_i(u_t)

`e_i` are the rows of `gate.weight` [E, D]; `b` is `gate.e_score_correction_bias` [E]: it changes
only *which* experts are chosen, never the combine weights (those are the unbiased scores). After
each optimizer step, `b_i += γ · sign(mean_load − load_i)` (γ = config.bias_update_speed) with the
loads counted since the last update and summed over ranks: `update_moe_biases(model)`.

Group-limited routing (n_group > 1): the E experts form G groups of E/G; a group's score is the sum
of its two best biased scores (V3; V2's softmax routing uses the group's best score); only the
best topk_group groups stay eligible, then the top-K is taken among their experts.

The optional sequence-wise balance loss (V3 eqs. 17-20), per sequence of T tokens:

    L_bal = α Σ_i f_i P_i,   f_i = E/(K·T) Σ_t 1(token t chose i),   P_i = 1/T Σ_t s'_{i,t},
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}

averaged over the B sequences of the batch (rows of a [B, T, D] input; a [N, D] input is one
sequence). α = config.aux_loss_alpha; `moe.aux_loss` after a training forward, `moe_aux_loss(model)`
sums the layers'.

Qwen3-MoE is the same layer with other settings (model/config.py): softmax scores over all E
experts, plain top-K (no correction bias, no groups), the combine weights renormalised only with
norm_topk_prob, no shared expert. Its optional balance loss is Switch Transformer's over the
batch's N tokens (config.output_router_logits, weight α = config.router_aux_loss_coef):

    L_switch = α · E Σ_i f_i P_i,   f_i = 1/N Σ_t 1(token t chose i),   P_i = 1/N Σ_t s_{i,t}

taken per layer and averaged over the MoE layers (transformers pools every layer's tokens into one
f and P instead; the two agree when the layers route alike).

Dispatch: the A (token, expert) assignments are sorted by expert, the tokens gathered into one
contiguous [A, D] buffer, each expert runs on its contiguous slice (a loop over experts, not over
tokens), and the weighted outputs are scatter-added back. `moe_forward_reference` is the plain
per-expert masking loop it is tested against. `MoE.static_dispatch = True` swaps in a fixed-shape
dense path (all experts on all tokens) so that a decode step compiles with fullgraph=True.

Departures from transformers' DeepseekV3MoE: experts stay a ModuleList of per-expert MLPs (the
on-disk checkpoint names, no fused [E, 2I, D] tensors); the router keeps fp32 even when the model is
cast to bf16 (transformers does this at load time with `_keep_in_fp32_modules_strict`).

Notes: the sorted path runs the experts' weights through GroupedSwiGLU, not through each MLP's
forward, so forward hooks on single experts do not fire. Activation checkpointing re-runs the
forward and so counts each training token's loads twice; the bias step depends only on the sign of
mean − load, which a uniform factor leaves unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from model.config import ModelConfig
from model.layers import MLP
from runtime.distributed import all_reduce

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Routing:
    """The router's decision for N tokens.

    topk_idx [N, K] int64: the chosen experts; topk_weight [N, K]: their combine weights g (router
    dtype, differentiable w.r.t. gate.weight); scores [N, E]: the unbiased scores s (sigmoid or
    softmax), used by the balance loss.
    """
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    scores: torch.Tensor


class Router(nn.Module):
    """The gate: scores, bias-corrected group-limited top-K selection, combine weights.

    weight [E, D] (HF `mlp.gate.weight`) and the persistent buffer e_score_correction_bias [E]
    (HF `mlp.gate.e_score_correction_bias`) are kept in fp32 or wider: `module.to(torch.bfloat16)`
    leaves them fp32, since bf16 would round the logits that decide the top-K and swallow the small
    γ steps of the bias update. The logits are computed in the weight's dtype.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.init_std = config.initializer_range
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size, dtype=torch.float32))
        # DeepSeek-V3's selection bias; Qwen3-MoE selects on the scores alone (no such tensor on disk)
        self.register_buffer("e_score_correction_bias", torch.empty(self.n_experts, dtype=torch.float32)
                             if config.router_correction_bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.init_std)
        if self.e_score_correction_bias is not None:
            with torch.no_grad():
                self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        # Casts to fp16/bf16 are undone for the router's own tensors; device moves and fp64 pass.
        def keep_fp32(t):
            out = fn(t)
            if out.dtype in _LOW_PRECISION and t.dtype not in _LOW_PRECISION:
                out = out.to(torch.float32)
            return out
        return super()._apply(keep_fp32, recurse)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> Routing for the N tokens."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Router: expected input [N, {self.weight.shape[1]}], got {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):  # an autocast region must not lower it
            logits = F.linear(x.to(self.weight.dtype), self.weight)  # [N, E]
            scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        topk_idx = self.select(scores.detach())  # [N, K]
        weight = scores.gather(1, topk_idx)  # [N, K]: unbiased scores of the chosen experts
        if self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(topk_idx, weight * self.routed_scaling_factor, scores)

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [N, E] -> topk_idx [N, K]: top-K of the biased scores within the best topk_group groups."""
        n, e = scores.shape
        bias = self.e_score_correction_bias
        choice = scores if bias is None else scores + bias  # [N, E]
        if self.n_group > 1:
            grouped = choice.view(n, self.n_group, e // self.n_group)  # [N, G, E/G]
            if self.scoring_func == "sigmoid":
                group_score = grouped.topk(min(2, e // self.n_group), dim=-1).values.sum(dim=-1)  # [N, G]
            else:
                group_score = grouped.amax(dim=-1)  # [N, G]
            best = group_score.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)  # [N, E]
        return choice.topk(self.top_k, dim=-1).indices


class MoE(nn.Module):
    """DeepSeekMoE (or Qwen3-MoE) feed-forward: x [B, T, D] or [N, D] -> the same shape (without the residual).

    Children (HF names under `model.layers.{i}.mlp.`): `gate` (Router), `experts.{e}` (MLP with
    gate_proj/up_proj/down_proj [I, D]/[I, D]/[D, I]), `shared_experts` (one MLP of intermediate
    n_shared_experts·I; absent when n_shared_experts is 0).

    After each forward: `last_load` [E] int64, tokens routed to each expert (detached, this rank).
    In training (`self.training`): loads also accumulate for `update_bias()`, and `aux_loss` holds
    the sequence-wise balance loss when config.aux_loss_alpha > 0 (else None).
    """

    def __init__(self, config: ModelConfig, layer_idx: int | None = None):
        super().__init__()
        if config.n_routed_experts <= 0 or config.moe_intermediate_size <= 0:
            raise ValueError(f"MoE (layer {layer_idx}): config needs n_routed_experts > 0 and "
                             f"moe_intermediate_size > 0, got {config.n_routed_experts} and "
                             f"{config.moe_intermediate_size}")
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.bias_update_speed = config.bias_update_speed
        self.aux_loss_alpha = config.aux_loss_alpha
        # Qwen3-MoE's Switch loss, weighted so that the layers' terms sum to the mean over layers
        self.switch_loss_coef = (config.router_aux_loss_coef / max(config.num_moe_layers, 1)
                                 if config.output_router_logits else 0.0)
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.n_experts))
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.last_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self._load_since_update: torch.Tensor | None = None  # [E] int64, training forwards only
        # Fixed shapes instead of the sorted dispatch (see _run_dense): set it on the layers of a model
        # whose decode step is compiled with torch.compile(fullgraph=True) or captured in a CUDA graph.
        self.static_dispatch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size or x.dim() not in (2, 3):
            raise ValueError(f"MoE (layer {self.layer_idx}): expected input [B, T, {self.hidden_size}] or "
                             f"[N, {self.hidden_size}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.hidden_size)  # [N, D]
        routing = self.gate(x2)
        out = self.shared_experts(x2) if self.shared_experts is not None else torch.zeros_like(x2)
        if self.static_dispatch:
            out, counts = self._run_dense(out, x2, routing)
        else:
            x_sorted, token_of, order, counts = self._dispatch(x2, routing.topk_idx)
            w_sorted = routing.topk_weight.reshape(-1)[order].to(x.dtype)  # [A]
            y_sorted = self._run_experts(x_sorted, w_sorted, counts.tolist())  # [A, D], weighted by g
            out = self._combine(out, y_sorted, token_of)  # [N, D]
        self._record(routing, counts, x)
        return out.view(x.shape)

    # ---- dispatch / experts / combine ---------------------------------------------------------
    # Expert parallelism slots in between _dispatch and _combine: after _dispatch, an all-to-all
    # would send each expert's contiguous slice of x_sorted (sizes from `counts`) to the rank that
    # holds the expert, _run_experts would run only the local experts, and a second all-to-all
    # would bring the outputs back in the same order before _combine.

    def _dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor):
        """Group the A = N·K (token, expert) assignments by expert.

        x [N, D], topk_idx [N, K] -> x_sorted [A, D] (expert 0's tokens first, then expert 1's, ...),
        token_of [A] (the token of each sorted row), order [A] (its index in topk_idx.view(-1)),
        counts [E] int64 (rows per expert).
        """
        flat = topk_idx.reshape(-1)  # [A]
        order = flat.argsort(stable=True)  # [A]: stable, so ties keep token order (deterministic)
        token_of = order // self.top_k  # [A]
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        return x.index_select(0, token_of), token_of, order, counts

    def _run_experts(self, x_sorted: torch.Tensor, w_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted [A, D] grouped by expert (counts[e] rows each), w_sorted [A] -> g · FFN_e(x) [A, D]."""
        weights = [p for expert in self.experts for p in (expert.gate_proj.weight, expert.up_proj.weight,
                                                           expert.down_proj.weight)]
        return GroupedSwiGLU.apply(x_sorted, w_sorted, counts, *weights)

    @staticmethod
    def _combine(out: torch.Tensor, y_sorted: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
        """out [N, D] += the weighted expert outputs y_sorted [A, D], each added to its token's row.

        index_add_ is deterministic on CPU; on CUDA it uses atomics (the order of a token's K adds
        may vary between runs).
        """
        return out.index_add_(0, token_of, y_sorted)

    def _run_dense(self, out: torch.Tensor, x: torch.Tensor, routing: Routing):
        """The routed part with no data-dependent shapes: every expert runs on all N tokens and is
        weighted by the dense combine matrix (g on each token's K experts, 0 elsewhere).

        out [N, D] (the shared experts' output), x [N, D] -> (out + Σ_e g_e · FFN_e(x) [N, D],
        counts [E]). E/K times the FLOPs of the sorted dispatch: meant for decode steps, where N is
        small and every expert's weights are read anyway; the sorted path is the one to train with.
        """
        n, e = x.shape[0], self.n_experts
        dense = x.new_zeros(n, e).scatter(1, routing.topk_idx, routing.topk_weight.to(x.dtype))  # [N, E]
        for j, expert in enumerate(self.experts):
            out = out + dense[:, j:j + 1] * expert(x)  # [N, D]
        flat = routing.topk_idx.reshape(-1)  # [A]
        counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        return out, counts

    # ---- balancing ----------------------------------------------------------------------------
    def _record(self, routing: Routing, counts: torch.Tensor, x: torch.Tensor):
        self.last_load = counts.detach()
        self.aux_loss = None
        if not self.training:
            return
        self._load_since_update = counts if self._load_since_update is None else self._load_since_update + counts
        if self.aux_loss_alpha > 0:
            b = x.shape[0] if x.dim() == 3 else 1
            self.aux_loss = sequence_balance_loss(routing.scores, routing.topk_idx, b, self.aux_loss_alpha)
        if self.switch_loss_coef > 0:
            switch = switch_balance_loss(routing.scores, counts, self.switch_loss_coef)
            self.aux_loss = switch if self.aux_loss is None else self.aux_loss + switch

    def update_bias(self, group=None):
        """b += γ·sign(mean_load − load) from the loads counted since the last call (summed over the
        ranks of `group` when torch.distributed is initialised), then reset the count. Call after
        optimizer.step(); every rank must call it (it all-reduces). No-op when γ is 0."""
        _update_biases([self], group)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, experts={self.n_experts}, top_k={self.top_k}"


class GroupedSwiGLU(torch.autograd.Function):
    """All routed experts on expert-sorted rows, forward and backward by hand:

        y_a = w_a · W_down,e (silu(W_gate,e x_a) ⊙ W_up,e x_a)      for the rows a of expert e

    xs [A, D] (expert 0's rows first), w [A] combine weights, counts (python ints, rows per expert),
    then the experts' weights gate_0 [I, D], up_0 [I, D], down_0 [D, I], gate_1, ... -> y [A, D].

    Why by hand: autograd over per-expert module calls pays, per layer, a concatenation of the
    outputs, another of the input gradients, and a fresh [A, ·] tensor for every elementwise step.
    Here each GEMM writes its expert's slice of one preallocated buffer, the elementwise steps run
    once over all A rows, and w is applied on the narrower [A, I] side. Saved for backward:
    xs, w, g = W_gate x, u = W_up x and hw = w · silu(g) ⊙ u ([A, I] each); silu is recomputed. Tested equal (values and
    every gradient) to the module-by-module loop `moe_forward_reference`.
    """

    @staticmethod
    def forward(ctx, xs, w, counts, *weights):
        a, i = xs.shape[0], weights[0].shape[0]
        experts = list(zip(_spans(counts), _triples(weights)))
        g, u = xs.new_empty(a, i), xs.new_empty(a, i)  # [A, I]
        for (s, e), (wg, wu, _) in experts:  # an expert without rows multiplies [0, D] matrices
            torch.mm(xs[s:e], wg.t(), out=g[s:e])
            torch.mm(xs[s:e], wu.t(), out=u[s:e])
        hw = F.silu(g).mul_(u).mul_(w.unsqueeze(1))  # [A, I]: w · silu(g) ⊙ u
        y = xs.new_empty(a, weights[2].shape[0])  # [A, D]
        for (s, e), (_, _, wd) in experts:
            torch.mm(hw[s:e], wd.t(), out=y[s:e])
        ctx.save_for_backward(xs, w, g, u, hw, *weights)
        ctx.counts = counts
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xs, w, g, u, hw, *weights = ctx.saved_tensors
        experts = list(zip(_spans(ctx.counts), _triples(weights)))
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_gate, need_up, need_down = (ctx.needs_input_grad[3 + k::3] for k in range(3))
        dy = dy.contiguous()  # [A, D]
        dhw = torch.empty_like(g)  # [A, I]: dL/d(w · silu(g) ⊙ u)
        d_down = []
        for ((s, e), (_, _, wd)), need in zip(experts, need_down):
            torch.mm(dy[s:e], wd, out=dhw[s:e])
            d_down.append(torch.mm(dy[s:e].t(), hw[s:e]) if need else None)  # [D, I]
        # With h = silu(g) ⊙ u:  dw = Σ_I dhw ⊙ h,  du = w·dhw ⊙ silu(g),  dg = w·dhw ⊙ u ⊙ silu'(g).
        # Ordered so that each [A, I] pass does one of these products (they are memory-bound).
        silu = F.silu(g)  # [A, I]
        t = dhw * u  # [A, I]
        dw = torch.linalg.vecdot(t, silu) if need_w else None  # [A]
        w1 = w.unsqueeze(1)  # [A, 1]
        du = dhw.mul_(w1).mul_(silu)  # [A, I], in dhw's buffer
        dg = torch.ops.aten.silu_backward.grad_input(t.mul_(w1), g, grad_input=silu)  # t ⊙ silu'(g), in silu's
        dxs = torch.empty_like(xs) if need_x else None  # [A, D]
        grads = []
        for ((s, e), (wg, wu, _)), ng, nu, dd in zip(experts, need_gate, need_up, d_down):
            if dxs is not None:
                torch.mm(dg[s:e], wg, out=dxs[s:e]).addmm_(du[s:e], wu)
            grads += [torch.mm(dg[s:e].t(), xs[s:e]) if ng else None,  # [I, D]
                      torch.mm(du[s:e].t(), xs[s:e]) if nu else None, dd]
        return (dxs, dw, None, *grads)


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    """Row ranges [start, end) of each expert in the sorted buffer."""
    spans, start = [], 0
    for n in counts:
        spans.append((start, start + n))
        start += n
    return spans


def _triples(weights):
    """(gate, up, down) weight of each expert from the flat list."""
    return zip(weights[0::3], weights[1::3], weights[2::3])


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_seq: int, alpha: float) -> torch.Tensor:
    """V3 eqs. 17-20: α · mean over sequences of Σ_i f_i P_i.

    scores [N, E] unbiased router scores, topk_idx [N, K], N = n_seq·T tokens in sequence order.
    f_i = E/(K·T) · (tokens of the sequence choosing i), P_i = mean over its tokens of s_i / Σ_j s_j.
    Differentiable through P (f is a count). Balanced routing gives Σ_i f_i P_i = 1.
    """
    n, e = scores.shape
    k = topk_idx.shape[1]
    if n % n_seq:
        raise ValueError(f"sequence_balance_loss: {n} tokens do not split into {n_seq} sequences")
    t = n // n_seq
    p = (scores / scores.sum(dim=-1, keepdim=True)).view(n_seq, t, e).mean(dim=1)  # [B, E]
    chosen = topk_idx.reshape(n_seq, t * k)  # [B, T·K]
    f = torch.zeros(n_seq, e, dtype=scores.dtype, device=scores.device)
    f.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=scores.dtype)).mul_(e / (k * t))  # [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


def switch_balance_loss(scores: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Switch Transformer's balance loss over N tokens: α · E Σ_i f_i P_i with f_i the share of the
    tokens that chose expert i (counts [E] of the top-K assignments / N) and P_i the mean score of
    expert i (scores [N, E], softmax over the E experts). Differentiable through P (f is a count);
    balanced routing gives K."""
    n, e = scores.shape
    f = counts.to(scores.dtype) / max(n, 1)  # [E]
    return alpha * e * (f * scores.mean(dim=0)).sum()


@torch.no_grad()
def _update_biases(moes: list[MoE], group=None):
    """One all-reduce for all layers' loads [L, E], then each layer's sign step (see MoE.update_bias)."""
    moes = [m for m in moes if m.bias_update_speed != 0]
    if not moes:
        return
    bias0 = moes[0].gate.e_score_correction_bias
    load = torch.stack([m._load_since_update if m._load_since_update is not None
                        else torch.zeros(m.n_experts, dtype=torch.int64, device=bias0.device)
                        for m in moes])  # [L, E]
    all_reduce(load, "sum", group)
    for m, l in zip(moes, load):
        m._load_since_update = None
        if l.sum() == 0:
            continue  # nothing routed since the last update (e.g. a step without forward)
        bias = m.gate.e_score_correction_bias
        l = l.to(bias.dtype)
        bias.add_(torch.sign(l.mean() - l), alpha=m.bias_update_speed)


# ---- model-level helpers (what training loops call) --------------------------------------------

def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE modules of `model`, in module order (the same on every rank)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_moe_biases(model: nn.Module, group=None):
    """Aux-loss-free balancing step for every MoE layer of `model`; call after optimizer.step() on
    every rank. The loads of all layers travel in one all-reduce."""
    _update_biases(moe_layers(model), group)


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the layers' sequence-wise balance losses from the last training forward, or None
    when no layer computed one (eval mode, or aux_loss_alpha = 0)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load_stats(model: nn.Module) -> dict[str, float]:
    """Expert load of the last forward, for metrics.jsonl.

    "moe/layer{i}/max_load_ratio": max over experts / mean over experts of the tokens routed in layer
    i (1.0 is perfectly balanced, E/K the worst); "moe/imbalance": the mean of those ratios over the
    layers. Counts are this rank's. Empty dict when no MoE layer has run.
    """
    stats, ratios = {}, []
    for j, m in enumerate(moe_layers(model)):
        if m.last_load is None:
            continue
        load = m.last_load.double()
        ratio = (load.max() / load.mean()).item() if load.sum() > 0 else 1.0
        stats[f"moe/layer{m.layer_idx if m.layer_idx is not None else j}/max_load_ratio"] = ratio
        ratios.append(ratio)
    if ratios:
        stats["moe/imbalance"] = sum(ratios) / len(ratios)
    return stats


def moe_forward_reference(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """The plain per-expert loop the sorted dispatch must equal (routed part only).

    x [N, D]; for each expert e: the tokens that chose it, y[token] += g · FFN_e(x[token]).
    """
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(routing.topk_idx == e)  # [n_e], [n_e]
        if token.numel():
            w = routing.topk_weight[token, slot].to(x.dtype).unsqueeze(1)  # [n_e, 1]
            y = y.index_add(0, token, w * expert(x[token]))
    return y
