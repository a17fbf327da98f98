"""ModelConfig: one flat dataclass for every network in model/, grouped by subsystem.

`from_hf_config(d)` translates a Hugging Face `config.json` (model_type deepseek_v3, qwen2, llama,
qwen3, qwen3_moe) into it in one place; `to_hf_config()` writes it back so transformers can load what
`save_pretrained` writes. Presets (`tiny`, `tiny-moe`, ...) are plain dicts of overrides.

Rope settings: published checkpoints keep them under `rope_scaling` (with `rope_theta` beside);
transformers v5 writes `rope_parameters` (with `rope_theta` and `rope_type` inside). Both are read
into `rope_theta` plus `rope_scaling` (a dict whose `rope_type` is one of ROPE_TYPES, or None).

Which fields are used by which family:
- dense GQA (qwen2, llama, qwen3): hidden/intermediate sizes, heads, `head_dim`, `attention_bias`
  (q/k/v biases: always on for qwen2), `o_bias`, `mlp_bias`, `qk_norm` (qwen3).
- deepseek_v3: the `# mla`, `# moe` and `# mtp` groups; `rope_interleave` (DeepSeek's HF weights
  store the rope dimensions as interleaved pairs; Qwen/Llama use rotate-half).
- qwen3_moe: Qwen3's attention (q/k RMSNorm, GQA, its own head_dim) and the `# moe` group read
  from Qwen's keys: `num_experts` routed experts, softmax scores over all of them, top-k with or
  without `norm_topk_prob`, no shared expert and no correction bias; a layer is MoE unless it is in
  `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`. With
  `output_router_logits`, training adds the Switch load-balancing loss weighted by
  `router_aux_loss_coef` (model/moe.py switch_balance_loss), as transformers does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODEL_TYPES = ("deepseek_v3", "qwen2", "llama", "qwen3", "qwen3_moe")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass
class ModelConfig:
    # family
    model_type: str = "qwen2"
    # sizes
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    # dense GQA details
    attention_bias: bool = False  # biases on q/k/v projections (qwen2: True)
    o_bias: bool = False  # bias on the output projection (llama's attention_bias covers o_proj too)
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over each head's q and k
    # rope
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn"|"llama3"|"linear", ...} or None
    rope_interleave: bool = False  # deepseek_v3: rope dims stored as interleaved pairs
    # mla (deepseek_v3)
    q_lora_rank: int | None = None  # None: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # moe (deepseek_v3, qwen3_moe)
    n_routed_experts: int = 0  # 0: every layer dense
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0  # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"  # V3: sigmoid; V2: softmax
    n_group: int = 1  # group-limited routing: experts in n_group groups ...
    topk_group: int = 1  # ... tokens routed only within the best topk_group groups
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_speed: float = 0.0  # gamma of aux-loss-free balancing; 0 for inference
    aux_loss_alpha: float = 0.0  # sequence-wise auxiliary balance loss weight (0: off)
    decoder_sparse_step: int = 1  # qwen3_moe: layer i is MoE when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: list = field(default_factory=list)  # ... and i is not one of these
    output_router_logits: bool = False  # qwen3_moe: add the Switch balance loss in training ...
    router_aux_loss_coef: float = 0.0  # ... with this weight
    # mtp (deepseek_v3)
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.0  # weight of the next-next-token loss in training
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # HF keys we carry through untouched (e.g. torch_dtype), so a round trip loses nothing
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if self.model_type == "qwen3_moe":   # Qwen3's attention, softmax routing, no shared expert
            self.qk_norm, self.scoring_func = True, "softmax"
            if self.n_shared_experts or self.n_group != 1:
                raise ValueError(f"qwen3_moe has no shared experts and no expert groups (got n_shared_experts "
                                 f"{self.n_shared_experts}, n_group {self.n_group})")
            if self.decoder_sparse_step < 1:
                raise ValueError(f"decoder_sparse_step {self.decoder_sparse_step}: expected >= 1")
        if self.head_dim is None and self.model_type != "deepseek_v3":
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rt not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rt!r} is not supported; expected one of {ROPE_TYPES}")
            self.rope_scaling = {**self.rope_scaling, "rope_type": rt}
            self.rope_scaling.pop("type", None)
            if rt == "default":
                self.rope_scaling = None
        if self.is_mla:
            for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, k) <= 0:
                    raise ValueError(f"deepseek_v3 config needs {k} > 0, got {getattr(self, k)}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts "
                                 f"({self.n_routed_experts})")
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
            if self.bias_update_speed and not self.router_correction_bias:
                raise ValueError(f"bias_update_speed {self.bias_update_speed}: aux-loss-free balancing needs the "
                                 f"router's correction bias, which only deepseek_v3 has (not {self.model_type})")
            if self.scoring_func not in ("sigmoid", "softmax"):
                raise ValueError(f"scoring_func {self.scoring_func!r}: expected 'sigmoid' or 'softmax'")

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions rotated by RoPE per head: the decoupled rope key for MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.model_type == "qwen3_moe":
            return (self.n_routed_experts > 0 and layer_idx not in self.mlp_only_layers
                    and (layer_idx + 1) % self.decoder_sparse_step == 0)
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def router_correction_bias(self) -> bool:
        """Whether the MoE router carries DeepSeek-V3's e_score_correction_bias (aux-loss-free balancing)."""
        return self.model_type == "deepseek_v3"

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Translate a Hugging Face config dict. `source` names the file in error messages."""
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; expected one of {MODEL_TYPES}")

        def need(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{source}: missing config key {key!r} (model_type {mt})")
            return d[key]

        rope_theta, rope_scaling = _read_rope(d, source)
        kw = dict(
            model_type=mt,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            initializer_range=d.get("initializer_range", 0.02),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        if kw["hidden_act"] != "silu":
            raise ValueError(f"{source}: hidden_act {kw['hidden_act']!r} is not supported (only 'silu')")
        if mt == "qwen2":
            kw.update(attention_bias=True, head_dim=d.get("head_dim"))
        elif mt == "llama":
            bias = d.get("attention_bias", False)
            kw.update(attention_bias=bias, o_bias=bias, mlp_bias=d.get("mlp_bias", False), head_dim=d.get("head_dim"))
        elif mt == "qwen3":
            bias = d.get("attention_bias", False)  # Qwen3's attention_bias covers o_proj too
            kw.update(attention_bias=bias, o_bias=bias, head_dim=d.get("head_dim", 128), qk_norm=True)
        elif mt == "qwen3_moe":
            bias = d.get("attention_bias", False)
            sparse_step = d.get("decoder_sparse_step", 1)
            if not isinstance(sparse_step, int) or sparse_step < 1:
                raise ValueError(f"{source}: decoder_sparse_step {sparse_step!r}: expected an integer >= 1")
            only = d.get("mlp_only_layers") or []
            bad = [i for i in only if not isinstance(i, int) or not 0 <= i < kw["num_hidden_layers"]]
            if bad:
                raise ValueError(f"{source}: mlp_only_layers {only}: {bad[0]!r} is not a layer index "
                                 f"(0..{kw['num_hidden_layers'] - 1})")
            kw.update(attention_bias=bias, o_bias=bias, head_dim=d.get("head_dim", 128), qk_norm=True,
                      # published configs say num_experts; transformers v5 writes its alias num_local_experts
                      n_routed_experts=d.get("num_experts", d.get("num_local_experts")) or 0,
                      num_experts_per_tok=d.get("num_experts_per_tok") or 0,
                      moe_intermediate_size=d.get("moe_intermediate_size") or 0, scoring_func="softmax",
                      norm_topk_prob=d.get("norm_topk_prob", False), decoder_sparse_step=sparse_step,
                      mlp_only_layers=list(only), output_router_logits=bool(d.get("output_router_logits", False)),
                      router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
            if kw["n_routed_experts"]:
                for key in ("num_experts_per_tok", "moe_intermediate_size"):
                    need(key)
        elif mt == "deepseek_v3":
            kw.update(
                head_dim=None,
                rope_interleave=d.get("rope_interleave", True),
                attention_bias=d.get("attention_bias", False),
                q_lora_rank=d.get("q_lora_rank"),
                kv_lora_rank=need("kv_lora_rank"),
                qk_nope_head_dim=need("qk_nope_head_dim"),
                qk_rope_head_dim=need("qk_rope_head_dim"),
                v_head_dim=need("v_head_dim"),
                n_routed_experts=d.get("n_routed_experts") or 0,
                n_shared_experts=d.get("n_shared_experts") or 0,
                num_experts_per_tok=d.get("num_experts_per_tok") or 0,
                moe_intermediate_size=d.get("moe_intermediate_size") or 0,
                first_k_dense_replace=d.get("first_k_dense_replace") or 0,
                moe_layer_freq=d.get("moe_layer_freq", 1),
                scoring_func=d.get("scoring_func", "sigmoid"),
                n_group=d.get("n_group") or 1,
                topk_group=d.get("topk_group") or 1,
                norm_topk_prob=d.get("norm_topk_prob", True),
                routed_scaling_factor=d.get("routed_scaling_factor", 1.0),
                aux_loss_alpha=d.get("aux_loss_alpha", 0.0) if d.get("seq_aux", False) else 0.0,
                num_nextn_predict_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,
            )
            if kw["n_routed_experts"]:
                for key in ("num_experts_per_tok", "moe_intermediate_size"):
                    need(key)
        known = set(kw) | {"rope_parameters", "rope_scaling", "architectures", "model_type", "qk_head_dim", "num_experts",
                            "num_local_experts"}
        kw["extra"] = {k: v for k, v in d.items() if k not in known and k in _CARRIED_KEYS}
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """The config.json that transformers (v4.4x published layout, read by v5 too) loads."""
        arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
        d = dict(
            architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            rope_theta=self.rope_theta, rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        if self.model_type in ("qwen2", "llama", "qwen3", "qwen3_moe"):
            d["head_dim"] = self.head_dim
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("qwen3", "qwen3_moe"):
            d.update(attention_bias=self.attention_bias)
        if self.model_type == "qwen3_moe":
            d.update(num_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                     output_router_logits=self.output_router_logits, router_aux_loss_coef=self.router_aux_loss_coef)
        if self.model_type == "deepseek_v3":
            d.update(
                rope_interleave=self.rope_interleave, attention_bias=self.attention_bias,
                q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim, n_routed_experts=self.n_routed_experts,
                n_shared_experts=self.n_shared_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                first_k_dense_replace=self.first_k_dense_replace, moe_layer_freq=self.moe_layer_freq,
                scoring_func=self.scoring_func, topk_method="noaux_tc", n_group=self.n_group,
                topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                num_nextn_predict_layers=self.num_nextn_predict_layers,
            )
            if self.aux_loss_alpha:
                d.update(seq_aux=True, aux_loss_alpha=self.aux_loss_alpha)
        d.update(self.extra)
        return d

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# HF keys that are not architecture but should survive a load/save round trip
_CARRIED_KEYS = ("torch_dtype", "dtype", "transformers_version", "use_cache", "attention_dropout",
                 "use_sliding_window", "sliding_window", "max_window_layers", "pretraining_tp",
                 "topk_method", "ep_size")


def _read_rope(d: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict from either layout (v4 `rope_scaling` or v5 `rope_parameters`)."""
    params = d.get("rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        rt = params.get("rope_type", params.get("type", "default"))
        if rt == "default":
            return float(theta), None
        return float(theta), params
    theta = float(d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        rt = scaling.get("rope_type", scaling.get("type"))
        if rt is None:
            raise ValueError(f"{source}: rope_scaling has no 'rope_type' (or 'type') key: {scaling}")
        if rt == "default":
            return theta, None
        return theta, scaling
    return theta, None


# Presets: plain dicts of ModelConfig fields. vocab_size is usually overridden by the tokenizer's.
PRESETS: dict[str, dict] = {
    # a tiny dense Qwen2-style model (the recipe's student; the SFT tests' model)
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 attention_bias=True, tie_word_embeddings=True, max_position_embeddings=1024,
                 rope_theta=10000.0),
    # the tiny student with 8 heads of 16 (4 kv heads) instead of 4 of 32: the same parameters and
    # matrix FLOPs, but more attention patterns; it finds the digit-by-digit alignment of the
    # arithmetic traces in about half the SFT steps (scripts/sft_arithmetic.py)
    "tiny-sft": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                     attention_bias=True, tie_word_embeddings=True, max_position_embeddings=1024,
                     rope_theta=10000.0),
    # a tiny DeepSeek-V3-architecture model: MLA + DeepSeekMoE (+ one MTP module)
    "tiny-moe": dict(model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=384,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                     q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, rope_interleave=True, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, moe_intermediate_size=96, first_k_dense_replace=1,
                     n_group=2, topk_group=1, routed_scaling_factor=1.0, bias_update_speed=1e-3,
                     num_nextn_predict_layers=1, mtp_loss_weight=0.0, max_position_embeddings=1024),
    # a tiny Qwen3-MoE: q/k norms, softmax top-2 of 8 experts renormalised, the first layer dense,
    # Switch balance loss in training
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", vocab_size=512, hidden_size=128, intermediate_size=384,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True,
                           mlp_only_layers=[0], output_router_logits=True, router_aux_loss_coef=0.01,
                           tie_word_embeddings=True, max_position_embeddings=1024),
}
