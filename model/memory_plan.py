"""The memory planner: per-GPU bytes of an SFT or GRPO run
as the code runs it, from the config alone (a 32B or 671B config.json needs no weights):

    python -m model.stats plan (--model DIR | --preset NAME) --stage sft|grpo --gpus N --gpu-mem-gib G \
        --micro-batch-tokens T [--activation-checkpointing] [--param-dtype bf16|fp32] [--seq-len S]
        [--rollout-batch R] [--group-size G] [--prompt-len P] [--max-new-tokens M] [--beta B] [--rollout-tp K]
        [--device cpu]

prints a table of the parts, then one JSON line (every part, each phase, total_bytes, fits); a plan
that does not fit says what to change (exit status 1), a bad flag exits with status 2. What each
part is, and which code it follows, is in `plan_memory`'s docstring.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field

from kernels.logprobs import TILE_ELEMENTS, VOCAB_BLOCK
from model.config import PRESETS, ModelConfig
from model.counts import block_params, count_params


# ---- the planner ----------------------------------------------------------------------------

GiB = 1 << 30
# sampling.engine.PREFILL_TOKENS: padded prompt tokens per batched prefill call. model/ sits below
# sampling/ and cannot import it; tests/model/test_stats.py holds the two equal.
PREFILL_TOKENS = 8192
PAGE_SIZE = 16   # sampling.engine.PAGE_SIZE, held equal by the same test
# "The rest" on a GPU: an allowance, not a computation (the planner's stated assumptions).
GPU_OVERHEAD_GIB = 1.5   # CUDA context (~0.5 GiB), NCCL communicator buffers, cuBLAS/Triton workspaces
GPU_MARGIN = 0.10        # caching-allocator fragmentation and stream-held blocks, share of the computed peak
# FSDP2 keeps at most this many blocks' parameters unsharded in a training pass: the block computing, the
# one prefetched (implicitly in forward, explicitly in backward), and the flat all-gather output that the
# prefetched one is copied out of.
IN_FLIGHT_BLOCKS = 3
PHASES = ("train", "step", "rollout", "ref_pass")   # what does not overlap; "always" is under all of them


@dataclass(frozen=True)
class PlanSettings:
    """What a run does that decides its memory (the train.py flags of the same names).

    micro_batch_tokens: tokens of one forward/backward (grpo: --micro-batch-tokens, sequences packed
    whole, a longer one alone; sft: --micro-batch-size x --seq-len). rollout_batch is train.py's
    --sampler-batch-size (sequences decoded at once, the KV cache's slots); prompt_len the longest
    prompt in tokens. rollout_tp is train.py's --rollout-tp (rollouts with the model split over groups of
    that many ranks, model/tensor_parallel.py). device "cpu"
    models the CPU run: the kernels' torch twins, no CUDA allowance.
    """
    stage: str
    gpus: int
    micro_batch_tokens: int
    gpu_mem_gib: float
    device: str = "gpu"
    param_dtype: str = "bf16"
    activation_checkpointing: bool = False
    seq_len: int | None = None
    no_sync_accumulation: bool = False
    rollout_batch: int = 64
    group_size: int = 8
    prompt_len: int = 512
    max_new_tokens: int = 256
    beta: float = 0.0
    rollout_tp: int = 1
    overhead_gib: float | None = None   # None: GPU_OVERHEAD_GIB on gpu, 0 on cpu
    margin: float | None = None         # None: GPU_MARGIN on gpu, 0 on cpu

    def replace(self, **changes) -> "PlanSettings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Part:
    name: str
    phases: tuple[str, ...]   # ("always",) or a subset of PHASES
    bytes: int
    label: str


@dataclass
class MemoryPlan:
    """Per-GPU bytes of a run: `parts`, the phases they live in, the allowance for the rest."""
    config: ModelConfig
    settings: PlanSettings
    parts: list[Part]
    rest_fixed: int
    margin: float
    notes: list[str] = field(default_factory=list)

    def part(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def phase_bytes(self, phase: str) -> int:
        return sum(p.bytes for p in self.parts if "always" in p.phases or phase in p.phases)

    @property
    def phases(self) -> dict[str, int]:
        """Each phase that occurs: what persists plus what that phase adds."""
        used = [ph for ph in PHASES if any(ph in p.phases for p in self.parts)]
        return {ph: self.phase_bytes(ph) for ph in used}

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def computed_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def rest_bytes(self) -> int:
        return self.rest_fixed + round(self.margin * self.computed_bytes)

    @property
    def total_bytes(self) -> int:
        return self.computed_bytes + self.rest_bytes

    @property
    def gpu_mem_bytes(self) -> int:
        return round(self.settings.gpu_mem_gib * GiB)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_mem_bytes

    def to_json(self) -> dict:
        s = self.settings
        run = ("rollout_batch", "group_size", "prompt_len", "max_new_tokens", "beta", "rollout_tp") \
            if s.stage == "grpo" else ("seq_len", "no_sync_accumulation")
        return {"stage": s.stage, "gpus": s.gpus, "device": s.device, "param_dtype": s.param_dtype,
                "micro_batch_tokens": s.micro_batch_tokens, "activation_checkpointing": s.activation_checkpointing,
                **{k: getattr(s, k) for k in run}, "params": count_params(self.config).total,
                "parts": {**{p.name: p.bytes for p in self.parts}, "rest": self.rest_bytes},
                "phases": self.phases, "peak_phase": self.peak_phase, "rest_bytes": self.rest_bytes,
                "total_bytes": self.total_bytes, "gpu_mem_bytes": self.gpu_mem_bytes, "fits": self.fits,
                "advice": advice(self)}


# -- parameters by FSDP2 group (model/parallel.apply_fsdp) ----------------------------------------

@dataclass(frozen=True)
class _Layout:
    blocks: list[tuple[int, int]]  # per main layer: (parameters less the router, router parameters)
    root: int                      # embedding, untied head, final norm, MTP modules less their routers
    mtp: int                       # the MTP modules' own parameters (never run by the training loops)
    routers: int                   # every Router.weight (main layers and MTP): fp32 in every copy
    buffers: int                   # e_score_correction_bias [E] per DeepSeek-V3 MoE layer: fp32, whole on every rank
    largest: int                   # elements of the largest parameter

    @property
    def total(self) -> int:
        return sum(a + r for a, r in self.blocks) + self.root + (self.routers - sum(r for _, r in self.blocks))

    def copy_bytes(self, b: int) -> int:
        """One whole copy of the parameters in dtype size b, the routers in fp32."""
        return b * (self.total - self.routers) + 4 * self.routers

    def block_bytes(self, b: int) -> int:
        return max((b * a + 4 * r for a, r in self.blocks), default=0)


def _layout(c: ModelConfig) -> _Layout:
    D, E = c.hidden_size, c.n_routed_experts
    blocks, mtp, mtp_routers, buffers = [], 0, 0, 0
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        total, _ = block_params(c, i)
        moe = c.is_moe_layer(i)
        router, bias = (E * D, E if c.router_correction_bias else 0) if moe else (0, 0)
        buffers += bias
        if i < c.num_hidden_layers:
            blocks.append((total - router - bias, router))
        else:  # an MTP module: its block, enorm, hnorm, shared_head.norm and eh_proj (model/mtp.py)
            mtp += total - bias + 3 * D + 2 * D * D
            mtp_routers += router
    root = c.vocab_size * D * (1 if c.tie_word_embeddings else 2) + D + mtp - mtp_routers
    largest = max(c.vocab_size * D, c.intermediate_size * D, c.moe_intermediate_size * D,
                  c.num_attention_heads * max(c.head_dim or 0, c.qk_head_dim, c.v_head_dim) * D)
    return _Layout(blocks, root, mtp, sum(r for _, r in blocks) + mtp_routers, buffers, largest)


def tp_share_elements(c: ModelConfig, k: int) -> tuple[int, int]:
    """(elements in the compute dtype, fp32 elements) of one rank's tensor-parallel share of the model
    over k ranks, following model/tensor_parallel.py's plan: heads (q/k/v, MLA's q_b_proj or q_proj
    and kv_b_proj, o_proj), MLP rows and the vocabulary (embedding and head, ceil(V / k) rows) split,
    routed experts divided, norms, MLA's latent projections and the routers (fp32) whole, no MTP
    modules. tests/model/test_stats.py holds it equal to the share's module tree."""
    D, L = c.hidden_size, c.num_hidden_layers
    rows = -(-c.vocab_size // k)
    low = rows * D * (1 if c.tie_word_embeddings else 2) + D      # embedding, head, final norm
    fp32 = 0
    for i in range(L):
        low += 2 * D                                               # the block's two norms
        H = c.num_attention_heads
        if c.is_mla:
            Dqk, C, R = c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
            bias = 1 if c.attention_bias else 0
            if c.q_lora_rank is None:
                low += D * H * Dqk // k
            else:
                Cq = c.q_lora_rank
                low += D * Cq + bias * Cq + Cq + Cq * H * Dqk // k
            low += D * (C + R) + bias * (C + R) + C + C * H * (c.qk_nope_head_dim + c.v_head_dim) // k
            low += H * c.v_head_dim * D // k + bias * D
        else:
            Dh, Kv = c.head_dim, c.num_key_value_heads
            qkv = (H + 2 * Kv) * Dh
            low += qkv * D // k + (qkv // k if c.attention_bias else 0) + H * Dh * D // k + (D if c.o_bias else 0)
            low += 2 * Dh if c.qk_norm else 0
        if c.is_moe_layer(i):
            E, Im = c.n_routed_experts, c.moe_intermediate_size
            low += E // k * 3 * D * Im + 3 * D * Im * c.n_shared_experts // k
            fp32 += E * D + (E if c.router_correction_bias else 0)  # router weight and balancing bias
        else:
            I = c.intermediate_size
            low += 3 * D * I // k + (2 * I // k + D if c.mlp_bias else 0)
    return low, fp32


# -- bytes per token ---------------------------------------------------------------------------------

def kv_cache_bytes_per_token(c: ModelConfig, b: int) -> int:
    """Bytes one cached position takes over all main layers (model/cache.py): the MLA latent
    kv_lora_rank + qk_rope_head_dim, or k and v of every kv head."""
    width = c.kv_lora_rank + c.qk_rope_head_dim if c.is_mla else 2 * c.num_key_value_heads * c.head_dim
    return c.num_hidden_layers * width * b


def _norm(rows_dim: int, b: int, cpu: bool, storage: int | None = None) -> int:
    """Bytes per row an RMSNorm keeps for backward. The Triton kernel (GPU) keeps its input and rstd;
    the torch twin (CPU) keeps x in fp32 (the input's own storage when it is fp32, which may be a wider
    tensor it is a view of), x·rstd in fp32 and rstd."""
    storage = rows_dim if storage is None else storage
    if not cpu:
        return storage * b + 4
    return (4 * storage if b == 4 else 4 * rows_dim) + 4 * rows_dim + 4


def layer_activation_bytes(c: ModelConfig, layer_idx: int, b: int, cpu: bool) -> int:
    """Bytes per token one decoder layer keeps for its backward in a training forward (no checkpointing):
    the tensors autograd saves, each storage once, parameters aside (tests/model/test_stats.py counts
    them on tiny models). b: compute dtype size; cpu: the kernels' torch twins (SDPA attention, the
    RMSNorm twin) instead of the Triton kernels. Rope's cos/sin tables are counted here only in a
    low-precision dtype (each call casts its own copy); fp32 tables are shared by all layers (head)."""
    D, H = c.hidden_size, c.num_attention_heads
    R = c.rope_dim
    s = _norm(D, b, cpu) + D * b                       # input_layernorm; its output feeds q/k/v
    if c.is_mla:
        Dn, Dv, C, Dqk = c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_head_dim
        if c.q_lora_rank is not None:                  # q_a output (norm input), q_a_layernorm output
            s += _norm(c.q_lora_rank, b, cpu) + c.q_lora_rank * b
        s += _norm(C, b, cpu, storage=C + R) + C * b   # c_kv is a view of kv_a's [C + R] output
        if cpu:  # SDPA pads the narrower of Dqk, Dv; o is copied by the reshape before o_proj
            Dp = max(Dqk, Dv)
            v = H * Dp if Dv < Dp else H * (Dn + Dv)   # padded copy, or a view of kv_b's output
            s += (2 * H * Dp + v + H * Dp + H * Dv) * b + 4 * H
        else:    # flash attention keeps q, k (concatenated), v (a view of kv_b's output), o and lse
            s += (2 * H * Dqk + H * (Dn + Dv) + H * Dv) * b + 4 * H
    else:
        K, Dh = c.num_key_value_heads, c.head_dim
        if c.qk_norm:
            s += H * _norm(Dh, b, cpu) + K * _norm(Dh, b, cpu)
        s += (H * Dh + 2 * K * Dh + H * Dh) * b + 4 * H  # q, k (after rope), v, o; lse
        if cpu:
            s += H * Dh * b                            # SDPA's output and o_proj's contiguous copy
    if b != 4:
        s += 2 * R * b                                 # cos and sin cast per apply_rope call (q and k)
    s += _norm(D, b, cpu)                              # post_attention_layernorm
    if not c.is_moe_layer(layer_idx):                  # its output, then gate out, silu(gate), up out, product
        return s + D * b + 4 * c.intermediate_size * b
    if b == 4 or c.n_shared_experts:                   # its output, kept by an fp32 router's matmul or the
        s += D * b                                     # shared experts' (a low-precision router keeps its copy)
    E, K, I = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    s += (4 * D if b != 4 else 0) + 4 * E + 4 * (K + 1) + 8 * K   # router: fp32 input, scores, weights
    s += (2 * K * D + 3 * K * I + K) * b + 16 * K      # GroupedSwiGLU: xs, g, u, hw, w; index_add source
    return s + 4 * I * c.n_shared_experts * b           # shared experts (an MLP)


def head_activation_bytes(c: ModelConfig, tokens: int, n_targets: int, b: int, cpu: bool,
                          checkpointing: bool = False, grpo: bool = False) -> int:
    """Bytes a training forward of `tokens` tokens keeps outside the layers: the final norm, the
    hidden rows of the n_targets scored tokens (kernels.token_logprobs keeps them, and lse and E[z] in
    fp32), token ids and targets (int64) and the row selection (sft: a bool mask; grpo: int64 rows),
    and the fp32 cos/sin tables when every layer shares them (fp32 compute, or checkpointed inputs)."""
    shared_rope = 4 * c.rope_dim if (b == 4 or checkpointing) else 0
    ints = 8 * tokens + 8 * n_targets + (8 * n_targets if grpo else tokens)
    return tokens * (_norm(c.hidden_size, b, cpu) + shared_rope) + n_targets * (c.hidden_size * b + 8) + ints


def _nograd_layer_bytes(c: ModelConfig, b: int, cpu: bool) -> int:
    """Estimate, per token, of the largest layer's live tensors in a no-grad forward (prefill, the
    reference's log-prob pass): the residual and its norm, then the larger of attention's projections
    and the FFN's intermediates."""
    D, H = c.hidden_size, c.num_attention_heads
    base = 2 * D * b + (8 * D if cpu else 0)
    if c.is_mla:
        attn = H * (3 * c.qk_head_dim + c.qk_nope_head_dim + 2 * c.v_head_dim) * b
    else:
        attn = 3 * (H + c.num_key_value_heads) * c.head_dim * b
    ffn = 3 * c.intermediate_size * b
    if c.n_routed_experts:
        K, I = c.num_experts_per_tok, c.moe_intermediate_size
        ffn = max(ffn, K * (2 * D + 3 * I) * b + 3 * I * c.n_shared_experts * b + 4 * c.n_routed_experts)
    return base + max(attn, ffn)


def _grad_layer_bytes(c: ModelConfig, b: int) -> int:
    """Estimate, per token, of one layer's backward working set: gradients of the residual stream and
    of the larger of attention's and the FFN's intermediates."""
    D, H = c.hidden_size, c.num_attention_heads
    kv_heads, Dv = (H, c.v_head_dim) if c.is_mla else (c.num_key_value_heads, c.head_dim)
    attn = 2 * H * c.qk_head_dim + 2 * kv_heads * Dv          # dq, do; dk, dv
    ffn = 3 * c.intermediate_size
    if c.n_routed_experts:
        K, I = c.num_experts_per_tok, c.moe_intermediate_size
        ffn = max(ffn, K * (2 * D + 3 * I) + 3 * I * c.n_shared_experts)
    return (2 * D + max(attn, ffn)) * b


def _logprob_backward_bytes(n: int, c: ModelConfig, b: int, cpu: bool) -> int:
    """kernels.logprobs' backward over n target rows: fp32 accumulators for d_hidden [n, D] and
    d_weight [V, D], the fp32 logits tile [C, Vb] (its default size); in low precision also dz in the
    inputs' dtype, one product's fp32 temporaries (CPU: the tile's operands upcast) and the final casts."""
    D, V = c.hidden_size, c.vocab_size
    Vb = min(V, VOCAB_BLOCK)
    C = min(max(n, 1), max(1, TILE_ELEMENTS // Vb))
    out = 4 * n * D + 4 * V * D + 4 * C * Vb
    if b != 4:
        out += b * C * Vb + b * (n + V) * D + 4 * max(C, Vb) * D + (4 * C * Vb if cpu else 0)
    return out


def _logprob_forward_bytes(n: int, c: ModelConfig, b: int, cpu: bool) -> int:
    """The no-grad forward: the fp32 logits tile (CPU, low precision: its operands upcast), the
    per-row state and outputs."""
    Vb = min(c.vocab_size, VOCAB_BLOCK)
    C = min(max(n, 1), max(1, TILE_ELEMENTS // Vb))
    return 4 * C * Vb + (4 * (C + Vb) * c.hidden_size if cpu and b != 4 else 0) + 24 * n


# -- the plan ----------------------------------------------------------------------------------------

def _check(s: PlanSettings) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)
    need(s.stage in ("sft", "pretrain", "grpo"), f"--stage {s.stage!r}: expected sft, pretrain or grpo")
    need(s.device in ("gpu", "cpu"), f"--device {s.device!r}: expected gpu or cpu")
    need(s.param_dtype in ("bf16", "fp32"), f"--param-dtype {s.param_dtype!r}: expected bf16 or fp32")
    need(s.gpus >= 1, f"--gpus {s.gpus}: expected >= 1 (the ranks FSDP2 shards over)")
    need(s.gpu_mem_gib > 0, f"--gpu-mem-gib {s.gpu_mem_gib}: expected a positive size in GiB")
    need(s.micro_batch_tokens >= 1, f"--micro-batch-tokens {s.micro_batch_tokens}: expected >= 1")
    need(s.seq_len is None or s.seq_len >= 2, f"--seq-len {s.seq_len}: expected >= 2")
    for flag, value in (("--rollout-batch", s.rollout_batch), ("--group-size", s.group_size),
                        ("--prompt-len", s.prompt_len), ("--max-new-tokens", s.max_new_tokens),
                        ("--rollout-tp", s.rollout_tp)):
        need(value >= 1, f"{flag} {value}: expected >= 1")
    need(s.gpus % s.rollout_tp == 0, f"--rollout-tp {s.rollout_tp}: expected a divisor of --gpus {s.gpus}")
    need(s.beta >= 0, f"--beta {s.beta}: expected >= 0")
    need(s.overhead_gib is None or s.overhead_gib >= 0, f"--overhead-gib {s.overhead_gib}: expected >= 0")
    need(s.margin is None or s.margin >= 0, f"--margin {s.margin}: expected >= 0")


def plan_memory(config: ModelConfig, s: PlanSettings) -> MemoryPlan:
    """Per-GPU bytes of an SFT or GRPO run, following what the code allocates:

    always  weights: fp32 master weights sharded on dim 0 over the ranks (model.parallel.apply_fsdp;
            FSDP2 whenever there are several ranks or a bf16 compute dtype, training_fsdp), plus the
            unsharded router bias buffers and the rope tables; optimizer: AdamW's exp_avg and exp_avg_sq
            in fp32 (runtime/optim.py), sharded likewise; reference (GRPO, beta > 0): a second model
            stored in the compute dtype (routers fp32), sharded likewise (rl/loop.py).
    train   gradients: fp32 shards, reduce-scattered every micro-batch (--no-sync-accumulation adds the
            unsharded fp32 accumulators); activations: what autograd keeps per layer for T tokens
            (layer_activation_bytes; with --activation-checkpointing each block's input [T, D]),
            plus the head (final norm, the target rows of the hidden states); FSDP2's gathered
            parameters: the root (embeddings, head, final norm, MTP modules) stays unsharded from
            forward to backward, IN_FLIGHT_BLOCKS blocks at a time; backward transients: the larger
            of the log-prob backward (kernels.logprobs: fp32 d_weight [V, D] and d_hidden, one tile;
            logits [T, V] never exist) and the last block's backward (its recompute under
            checkpointing, the head's unsharded gradients held to the end of the backward, one block's
            unsharded gradients and the fp32 reduce-scatter buffers).
    step    the gradients and AdamW's temporaries (foreach on GPU: one fp32 copy of the shards).
    rollout the whole model gathered in the compute dtype on every rank (model.parallel.gathered;
            with --rollout-tp K this rank's tensor-parallel share instead, tp_share_elements, plus the
            one whole tensor being cut at a time, the largest), the rollout engine's KV cache at its default
            budget, rollout_batch x (prompt + max_new_tokens) positions in pages and a scratch page
            (sampling/engine.py, model/paged_cache.py), and the
            prefill/decode working set; the cache is released before training, so this phase and
            the train phase never overlap, and gradients do not exist (set to None after each step).
    ref_pass (beta > 0) the reference gathered for its no-grad log-prob pass, with that pass's tensors.

    The peak is the largest phase; "the rest" (CUDA context, NCCL, fragmentation) is an allowance:
    overhead_gib plus margin x the peak. MTP modules are never run by the loops: they have weights
    (gathered with the root) but no gradients or optimizer state. Activations are those of eager
    blocks: a block compiled with torch.compile keeps what AOT autograd's min-cut partitioner
    chooses, which recomputes cheap elementwise ops and so usually keeps less (this is then an upper
    estimate). Not planned: held-out evaluation during training, checkpoint export, and the no-grad
    pass over the gathered policy that --mu > 1 / --recompute-old-logp adds (smaller than a rollout).
    """
    _check(s)
    c, cpu = config, s.device == "cpu"
    b = 2 if s.param_dtype == "bf16" else 4
    N = s.gpus
    fsdp = N > 1 or b != 4           # model.parallel.training_fsdp
    shard = N if fsdp else 1
    lay = _layout(c)
    P, P_train = lay.total, lay.total - lay.mtp
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    grpo = s.stage == "grpo"
    notes = []

    # tokens of one micro-batch, and the rows of them that have a target
    if grpo:
        seq = s.prompt_len + s.max_new_tokens
        T = seq * max(1, s.micro_batch_tokens // seq)   # sequences packed whole; a longer one alone
        n_targets = T * s.max_new_tokens // seq         # only completion tokens are scored
        length = seq + 1
    else:
        T = max(s.micro_batch_tokens, s.seq_len or 0)
        n_targets = T
        length = s.seq_len or T
    if length - (1 if grpo else 0) > c.max_position_embeddings:
        notes.append(f"{length - (1 if grpo else 0)} positions exceed the model's max_position_embeddings "
                     f"{c.max_position_embeddings}: train.py refuses them unless --max-position-embeddings is raised")
    rope_tables = 2 * max(length, c.max_position_embeddings) * (c.rope_dim // 2) * 4   # cos, sin fp32

    def sharded(n_bytes):
        return -(-n_bytes // shard)

    where = f"sharded /{shard}" if fsdp else "one process, not sharded"
    parts = [Part("weights", ("always",), sharded(4 * P) + 4 * lay.buffers + rope_tables,
                  f"weights: fp32 master, {where}"),
             Part("optimizer", ("always",), sharded(8 * P_train),
                  f"optimizer: AdamW exp_avg + exp_avg_sq fp32, {where}")]
    if grpo and s.beta > 0:
        dt = "bf16" if b == 2 else "fp32"
        parts.append(Part("reference", ("always",), sharded(lay.copy_bytes(b)) + 4 * lay.buffers + rope_tables,
                          f"reference model (beta {s.beta:g}): {dt}, {where}"))

    # train: gradients, activations, FSDP2's gathered parameters, backward transients
    grads = sharded(4 * P_train)
    label = f"gradients: fp32, {where}"
    if s.no_sync_accumulation and fsdp:
        grads += 4 * P_train
        label += " + unsharded fp32 accumulators (--no-sync-accumulation)"
    parts.append(Part("gradients", ("train", "step"), grads, label))
    per_layer = [layer_activation_bytes(c, i, b, cpu) for i in range(L)]
    head = head_activation_bytes(c, T, n_targets, b, cpu, s.activation_checkpointing, grpo)
    if s.activation_checkpointing:
        acts, how = L * T * D * b + head, "checkpointed: each block's input"
    else:
        acts, how = T * sum(per_layer) + head, "stored per layer"
    parts.append(Part("activations", ("train",), acts, f"activations: {T} tokens x {L} layers, {how}"))
    if fsdp:
        parts.append(Part("train_gathered", ("train",), b * lay.root + IN_FLIGHT_BLOCKS * lay.block_bytes(b),
                          f"FSDP2 gathered params: root (embeddings, head, norm{', MTP' if lay.mtp else ''}) + "
                          f"{IN_FLIGHT_BLOCKS} blocks"))
    lp_back = _logprob_backward_bytes(n_targets, c, b, cpu)
    block_back = T * _grad_layer_bytes(c, b)
    if s.activation_checkpointing:
        block_back += T * max(per_layer)                   # the block being recomputed
    if fsdp:   # the head's unsharded grads wait for the root's reduce-scatter; one block's grads, fp32 RS buffers
        bb = lay.block_bytes(b)
        block_back += b * (V * D + D) + bb + lay.block_bytes(4) + sharded(lay.block_bytes(4))
    else:
        block_back += 4 * lay.largest                      # a weight's gradient before it is accumulated
    parts.append(Part("backward_transient", ("train",), max(lp_back, block_back),
                      "backward transients: " + ("log-prob grads (fp32 d_weight [V, D], d_hidden, tile)"
                                                 if lp_back >= block_back else
                                                 "last block's backward" + (" + its recompute"
                                                                            if s.activation_checkpointing else ""))))
    step = sharded(4 * P_train) if not cpu else 2 * 4 * -(-lay.largest // shard)
    parts.append(Part("step_transient", ("step",), step,
                      "optimizer step temporaries (" + ("foreach: one fp32 copy of the shards)" if not cpu
                                                        else "per-parameter loop: two copies of the largest)")))

    if grpo:
        K = s.rollout_tp
        if K > 1:
            from model.tensor_parallel import check_tensor_parallel
            check_tensor_parallel(c, K)          # a head or expert count that does not split: named
            low, fp32 = tp_share_elements(c, K)
            parts.append(Part("rollout_weights", ("rollout",), b * low + 4 * fp32 + b * lay.largest,
                              f"rollout weights: tensor-parallel share /{K} {'bf16' if b == 2 else 'fp32'} "
                              f"+ the one whole tensor being cut"))
        else:
            parts.append(Part("rollout_weights", ("rollout",), lay.copy_bytes(b) if fsdp else 0,
                              f"gathered rollout weights: whole model {'bf16' if b == 2 else 'fp32'}"
                              if fsdp else "gathered rollout weights: none (one unsharded process)"))
        kv_split = 1 if c.is_mla else K   # GQA: kv heads split over the group; MLA: every rank keeps the latent
        # the rollout engine's default budget: rollout_batch x (prompt + max_new_tokens) positions in
        # pages of PAGE_SIZE, and one scratch page (sampling/engine.py)
        positions = (-(-s.rollout_batch * (s.prompt_len + s.max_new_tokens) // PAGE_SIZE) + 1) * PAGE_SIZE
        per_pos = kv_cache_bytes_per_token(c, b)
        parts.append(Part("kv_cache", ("rollout",), positions * per_pos // kv_split,
                          f"KV cache: {s.rollout_batch} rows x {s.prompt_len + s.max_new_tokens} positions in pages "
                          f"of {PAGE_SIZE} x {per_pos / 1024:.1f} KiB"
                          + (f" / {kv_split} (kv heads split)" if kv_split > 1 else "")))
        groups = -(-s.rollout_batch // s.group_size)     # a group's samples share one prefilled prompt
        Tp = max(s.prompt_len, min(PREFILL_TOKENS, groups * s.prompt_len))
        prefill = Tp * _nograd_layer_bytes(c, b, cpu) + Tp * s.prompt_len * (1 if cpu else 1 + b)
        decode = s.rollout_batch * V * (b + 12)
        what = f"prefill of {Tp} tokens" if prefill >= decode else f"decode logits of {s.rollout_batch} rows"
        parts.append(Part("rollout_working", ("rollout",), max(prefill, decode), f"rollout working set: {what}"))
        if s.beta > 0:
            parts.append(Part("ref_gathered", ("ref_pass",), lay.copy_bytes(b) if fsdp else 0,
                              "reference gathered for its no-grad log-prob pass"))
            work = T * (_nograd_layer_bytes(c, b, cpu) + D * b) + n_targets * D * b \
                + _logprob_forward_bytes(n_targets, c, b, cpu)
            parts.append(Part("ref_working", ("ref_pass",), work, f"reference pass working set: {T} tokens"))
        notes.append(f"--rollout-batch {s.rollout_batch} is train.py's --sampler-batch-size; "
                     f"--prompt-len {s.prompt_len} is the longest prompt (an assumption when not given)")
    notes.append("activations are counted for eager blocks; torch.compile'd blocks (--compile) usually keep less")
    if lay.mtp:
        notes.append("MTP modules are gathered with the root but never run by the SFT/GRPO loops "
                     "(no gradients, no optimizer state)")
    if cpu:
        notes.append("RSS can exceed these live bytes by what glibc keeps of freed heap memory (below its dynamic "
                     "mmap threshold); MALLOC_MMAP_THRESHOLD_=65536 returns it (bench/planner_check.py)")
    fixed = GPU_OVERHEAD_GIB if not cpu else 0.0
    fixed = fixed if s.overhead_gib is None else s.overhead_gib
    margin = (GPU_MARGIN if not cpu else 0.0) if s.margin is None else s.margin
    return MemoryPlan(c, s, parts, round(fixed * GiB), margin, notes)


def advice(plan: MemoryPlan) -> list[str]:
    """What to change when `plan` does not fit: each single change that helps, with the total it gives."""
    if plan.fits:
        return []
    s, c, limit = plan.settings, plan.config, plan.gpu_mem_bytes
    grpo = s.stage == "grpo"

    def total(**changes) -> int:
        return plan_memory(c, s.replace(**changes)).total_bytes

    def gib(n: int) -> str:
        return f"{n / GiB:.1f} GiB"

    out, fitting = [], False
    n = s.gpus
    while n < (1 << 16) and total(gpus=n) > limit:
        n *= 2
    if total(gpus=n) <= limit:
        out.append(f"more GPUs: --gpus {n} gives {gib(total(gpus=n))} per GPU")
        fitting = True
    else:
        out.append(f"more GPUs alone do not fit: at --gpus {n} the unsharded parts still need {gib(total(gpus=n))}")
    if not s.activation_checkpointing:
        t = total(activation_checkpointing=True)
        out.append(f"--activation-checkpointing gives {gib(t)}" + ("" if t <= limit else " (still over)"))
        fitting |= t <= limit
    if plan.peak_phase != "rollout":
        lo = s.prompt_len + s.max_new_tokens if grpo else 2
        tokens = s.micro_batch_tokens
        while tokens > lo:
            tokens = max(lo, tokens // 2)
            change = {"micro_batch_tokens": tokens} if grpo else {"micro_batch_tokens": tokens,
                                                                 "seq_len": min(s.seq_len or tokens, tokens)}
            if total(**change) <= limit:
                where = ("" if grpo else " (train.py: --micro-batch-size x --seq-len <= that"
                         + (f", --seq-len {change['seq_len']}" if s.seq_len and change["seq_len"] < s.seq_len else "")
                         + ")")
                out.append(f"smaller micro-batches: --micro-batch-tokens {tokens}{where} gives {gib(total(**change))}")
                fitting = True
                break
        else:
            what = (f"one sequence of --prompt-len + --max-new-tokens = {lo} tokens alone gives" if grpo
                    else f"{lo} tokens give")
            floor = total(micro_batch_tokens=lo) if grpo else total(micro_batch_tokens=lo, seq_len=lo)
            out.append(f"smaller micro-batches do not fit: {what} {gib(floor)}")
    if grpo and plan.peak_phase == "rollout":
        for k in (2, 4, 8):
            try:
                fits_with_k = k > s.rollout_tp and total(rollout_tp=k) <= limit
            except ValueError:   # k does not divide the GPUs or the model's heads / experts
                continue
            if fits_with_k:
                out.append(f"tensor-parallel rollouts: --rollout-tp {k} gives {gib(total(rollout_tp=k))}")
                fitting = True
                break
        r = s.rollout_batch
        while r > 1:
            r //= 2
            if total(rollout_batch=r) <= limit:
                out.append(f"fewer sequences decoded at once: --rollout-batch {r} (train.py --sampler-batch-size {r}) "
                           f"gives {gib(total(rollout_batch=r))}")
                fitting = True
                break
        else:
            out.append(f"fewer sequences decoded at once do not fit: --rollout-batch 1 gives "
                       f"{gib(total(rollout_batch=1))}")
    if not fitting:
        out.append(f"no single change above fits: combine them, or use GPUs with more memory (this plan needs "
                   f"{gib(plan.total_bytes)} per GPU)")
    return out


def format_plan(plan: MemoryPlan) -> str:
    """The readable table: each part and the phase it lives in, the phases, the allowance, the verdict."""
    c, s = plan.config, plan.settings

    def gib(n: int) -> str:
        return f"{n / GiB:.2f}"

    counts = count_params(c)
    ranks = f"{s.gpus} GPU{'s' if s.gpus > 1 else ''}" if s.device == "gpu" else \
        f"{s.gpus} CPU process{'es' if s.gpus > 1 else ''}"
    lines = [f"model {c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
             f"{counts.total / 1e9:.2f}B parameters",
             f"{s.stage} on {ranks}, {s.param_dtype} compute, micro-batches of {s.micro_batch_tokens} tokens"
             + (", activation checkpointing" if s.activation_checkpointing else "") + "; bytes per GPU:",
             f"  {'part':<82}{'GiB':>9}  phase"]
    for p in plan.parts:
        lines.append(f"  {p.label:<82}{gib(p.bytes):>9}  {'/'.join(p.phases)}")
    phases = plan.phases
    lines.append("  phases (what persists + what each adds; they do not overlap): "
                 + ", ".join(f"{k} {gib(v)}" for k, v in phases.items()))
    lines.append(f"  the rest: {plan.rest_fixed / GiB:.1f} GiB + {plan.margin:.0%} of the peak = "
                 f"{gib(plan.rest_bytes)} GiB (CUDA context, NCCL buffers, allocator fragmentation: an allowance, "
                 f"not computed)")
    lines.append(f"  total: {gib(plan.total_bytes)} GiB per GPU at the {plan.peak_phase} peak, of "
                 f"{s.gpu_mem_gib:g} GiB: {'fits' if plan.fits else 'does NOT fit'}")
    lines += [f"  note: {n}" for n in plan.notes]
    if not plan.fits:
        lines.append("  to make it fit:")
        lines += [f"    - {a}" for a in advice(plan)]
    return "\n".join(lines)


# -- the command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.stats", description="Model statistics: the memory planner.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("plan", help="per-GPU memory of an SFT or GRPO run (a table, then one JSON line)",
                       description="Per-GPU bytes of an SFT or GRPO run of train.py, from config.json alone.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = q.add_argument_group("model (one of)")
    g.add_argument("--model", help="a Hugging Face folder: only its config.json is read")
    g.add_argument("--preset", help=f"a preset ({', '.join(sorted(PRESETS))})")
    g.add_argument("--vocab-size", type=int,
                   help="--preset only: the vocabulary (train.py takes it from the tokenizer)")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="as train.py's: the model's new length")
    g = q.add_argument_group("the run")
    g.add_argument("--stage", required=True, choices=("sft", "pretrain", "grpo"))
    g.add_argument("--gpus", type=int, required=True, help="ranks in all (--nnodes x --nproc_per_node)")
    g.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB (H100 80GB: 79)")
    g.add_argument("--micro-batch-tokens", type=int, required=True,
                   help="tokens per forward/backward (sft: --micro-batch-size x --seq-len)")
    g.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: the CPU run (torch twins of the kernels, no CUDA allowance)")
    g.add_argument("--param-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype; auto: bf16 on gpu, fp32 on cpu")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--seq-len", type=int, default=None, help="sft: the longest document (a micro-batch holds it whole)")
    g.add_argument("--no-sync-accumulation", action="store_true", help="sft: unsharded gradients across micro-batches")
    g = q.add_argument_group("grpo")
    g.add_argument("--rollout-batch", "--sampler-batch-size", dest="rollout_batch", type=int, default=None,
                   help="sequences decoded at once (train.py --sampler-batch-size; default 64)")
    g.add_argument("--group-size", type=int, default=None, help="samples per prompt, prefilled once (default 8)")
    g.add_argument("--prompt-len", type=int, default=None, help="tokens of the longest prompt (default 512)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="completion budget (default 256)")
    g.add_argument("--beta", type=float, default=None, help="KL weight; > 0 keeps a reference model (default 0)")
    g.add_argument("--rollout-tp", type=int, default=None,
                   help="what-if: tensor-parallel rollouts over K GPUs (issue 18, not built; default 1)")
    g = q.add_argument_group("the rest (an allowance)")
    g.add_argument("--overhead-gib", type=float, default=None,
                   help=f"fixed per-GPU allowance (default {GPU_OVERHEAD_GIB} on gpu, 0 on cpu)")
    g.add_argument("--margin", type=float, default=None,
                   help=f"allowance as a share of the peak (default {GPU_MARGIN} on gpu, 0 on cpu)")
    return p


def _config_of(args) -> ModelConfig:
    if (args.model is None) == (args.preset is None):
        raise ValueError("give exactly one of --model DIR and --preset NAME")
    overrides = {}
    if args.max_position_embeddings is not None:
        if args.max_position_embeddings < 1:
            raise ValueError(f"--max-position-embeddings {args.max_position_embeddings}: expected >= 1")
        overrides["max_position_embeddings"] = args.max_position_embeddings
    if args.model is not None:
        if args.vocab_size is not None:
            raise ValueError("--vocab-size applies to --preset only (a --model folder's config.json has its own)")
        from model.checkpoint import read_config   # reads config.json, never the weights
        return read_config(args.model, overrides)[0]
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}: unknown; known presets: {', '.join(sorted(PRESETS))}")
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    return ModelConfig.from_preset(args.preset, **overrides)


def settings_of(args) -> PlanSettings:
    """PlanSettings from the parsed flags (ValueError naming a flag that does not apply)."""
    grpo_only = {"--rollout-batch": args.rollout_batch, "--group-size": args.group_size,
                 "--prompt-len": args.prompt_len, "--max-new-tokens": args.max_new_tokens, "--beta": args.beta,
                 "--rollout-tp": args.rollout_tp}
    if args.stage != "grpo":
        given = [f for f, v in grpo_only.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only --stage grpo has rollouts and a reference model")
    else:
        if args.seq_len is not None:
            raise ValueError("--seq-len: --stage grpo's sequences are --prompt-len + --max-new-tokens tokens")
        if args.no_sync_accumulation:
            raise ValueError("--no-sync-accumulation: only the SFT loop uses it (GRPO reduce-scatters every "
                             "micro-batch)")
    dtype = args.param_dtype if args.param_dtype != "auto" else ("bf16" if args.device == "gpu" else "fp32")
    d = PlanSettings
    return PlanSettings(
        stage="sft" if args.stage == "pretrain" else args.stage, gpus=args.gpus,
        micro_batch_tokens=args.micro_batch_tokens, gpu_mem_gib=args.gpu_mem_gib, device=args.device,
        param_dtype=dtype, activation_checkpointing=args.activation_checkpointing, seq_len=args.seq_len,
        no_sync_accumulation=args.no_sync_accumulation,
        rollout_batch=d.rollout_batch if args.rollout_batch is None else args.rollout_batch,
        group_size=d.group_size if args.group_size is None else args.group_size,
        prompt_len=d.prompt_len if args.prompt_len is None else args.prompt_len,
        max_new_tokens=d.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        beta=d.beta if args.beta is None else args.beta,
        rollout_tp=d.rollout_tp if args.rollout_tp is None else args.rollout_tp,
        overhead_gib=args.overhead_gib, margin=args.margin)


def main(argv: list[str] | None = None) -> int:
    """`python -m model.stats plan ...`: the table, then one JSON line. Exit status 0 when the plan fits,
    1 when it does not (the table says what to change), 2 for a bad flag or an unreadable config."""
    args = _parser().parse_args(argv)
    try:
        plan = plan_memory(_config_of(args), settings_of(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m model.stats plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    print(json.dumps(plan.to_json()))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
