"""The decoder-only Transformer of every model family in model/ (its layers: model/block.py).

Letters: B batch, T tokens, D model dim, V vocab, N slots of a KV cache, L cache positions.

    h_0 = Emb(x)
    h_l = h'_l + FFN_l(RMSNorm(h'_l)),  h'_l = h_{l-1} + Attn_l(RMSNorm(h_{l-1}))     (pre-norm)
    logits = W_out RMSNorm(h_n)

Attn is GQA (qwen2, llama, qwen3, qwen3_moe) or MLA (deepseek_v3), FFN a SwiGLU MLP or the MoE
layer of model/moe.py (DeepSeekMoE, or Qwen3-MoE's settings of it; `config.is_moe_layer(i)`). The module tree is Hugging Face's checkpoint layout, so the state
dict names are the on-disk names: `model.embed_tokens`, `model.layers.{i}.{input_layernorm,
self_attn.*, post_attention_layernorm, mlp.*}`, `model.norm`, `lm_head`; DeepSeek-V3's MTP modules
follow the main layers in `model.layers` (model/mtp.py), as in the published checkpoints.

Construction and weights: `Transformer(config)` builds and initialises (normal(0,
initializer_range) for linear and embedding weights, zero biases, unit norms; `init_weights()`).
Nothing in the constructor needs real storage, so a loader can build on the meta device and fill
tensor by tensor:

    with torch.device("meta"):
        m = Transformer(config)
    m.to_empty(device="cuda")   # re-ties shared weights (tie_weights) after allocation
    ... copy every state_dict tensor in ...

Shared weights: with `tie_word_embeddings`, lm_head.weight *is* model.embed_tokens.weight (one
Parameter; both names appear in state_dict()); each MTP module's `embed_tokens` and
`shared_head.head` are the main embedding and output head. `tie_weights()` re-establishes these
after anything that replaces Parameters (to_empty does it itself).

Rope tables are not buffers: `self.rope` (model.rope.RotaryEmbedding) computes them per device.
"""
from __future__ import annotations

import torch
from torch import nn

from model.block import Block
from model.cache import KVCache
from model.paged_cache import PagedKVCache
from model.config import ModelConfig
from model.layers import RMSNorm
from model.mtp import MTPLayer, mtp_loss
from model.rope import RotaryEmbedding


class Decoder(nn.Module):
    """The `model.` prefix of the checkpoint: embed_tokens, layers (main blocks, then MTP modules), norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        layers = [Block(config, i) for i in range(n)]
        layers += [MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. `logits = model(input_ids)`; see `forward_hidden` for every argument."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.extra.get("use_sliding_window"):
            raise ValueError(f"{config.model_type} config has use_sliding_window=true: sliding-window "
                             f"attention is not supported (every layer attends to all earlier positions)")
        self.config = config
        # lm_head is registered first so that named_parameters(), which lists a shared Parameter once
        # under the first name it meets, calls the output head "lm_head.weight" (not the MTP alias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model = Decoder(config)
        self.rope = RotaryEmbedding(config)
        self.init_weights()
        self.tie_weights()

    # ---- structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The main blocks (model.layers[:num_hidden_layers])."""
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp(self) -> nn.ModuleList:
        """The MTP modules (model.layers[num_hidden_layers:]; empty without MTP)."""
        return self.model.layers[self.config.num_hidden_layers:]

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def output_weight(self) -> torch.Tensor:
        """W_out [V, D]: lm_head.weight (the embedding itself when tie_word_embeddings)."""
        return self.lm_head.weight

    def tie_weights(self) -> None:
        """Make shared weights one Parameter again: lm_head ← embedding (if tied), MTP embed/head ← main."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.mtp:
            layer.embed_tokens.weight = self.model.embed_tokens.weight
            layer.shared_head.head.weight = self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh-model values: normal(0, initializer_range) for linear/embedding weights, zero biases,
        ones for norms, and each other module's own reset_parameters() (e.g. the MoE router)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, attn_len: int | None = None,
                return_hidden: bool = False, with_mtp_loss: bool = False,
                target_mask: torch.Tensor | None = None, max_seqlen: int | None = None,
                check_inputs: bool = True):
        """input_ids [B, T] -> logits [B, T, V] in the model's dtype; arguments as forward_hidden.

        check_inputs=False skips the input checks and their device sync (ids, positions and block
        tables read on the host): for callers that built the inputs themselves, like the sampler's
        decode loop, which must not wait on the device every step.

        return_hidden=True returns forward_hidden's h [B, T, D] instead (no [B, T, V] logits).
        with_mtp_loss=True returns (logits or h, (mtp_loss, metrics)) with the weighted MTP loss
        of model.mtp.mtp_loss (target_mask as there): the form to use on an FSDP2-wrapped model,
        whose root all-gathers its parameters (embedding, final norm, head, which the MTP modules
        share) around `forward` only, so a separate mtp_loss call may find them sharded.
        """
        h = self._hidden(input_ids, position_ids, cu_seqlens, cache, slots, attn_len, max_seqlen, check_inputs)
        out = h if return_hidden else self.lm_head(h)
        if not with_mtp_loss:
            return out
        return out, self.mtp_loss(h, input_ids, position_ids, cu_seqlens, target_mask)

    def forward_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, cache: KVCache | None = None,
                       slots: torch.Tensor | None = None, attn_len: int | None = None,
                       max_seqlen: int | None = None) -> torch.Tensor:
        """The final normalised hidden states h [B, T, D] (logits = h @ output_weight.T).

        It goes through `self(..., return_hidden=True)`, so module hooks (FSDP2's all-gather of the
        root's parameters) run as for any forward.

        - input_ids [B, T] int64.
        - position_ids [B, T]: default 0..T-1 per row (or restarting per document with cu_seqlens).
          Right-padded batches need nothing: attention is causal, so padding at the end never
          reaches the real tokens.
        - cu_seqlens int32 [ndocs + 1]: packed documents in one row (B = 1), attending only within
          themselves (kernels.flash_attention's varlen path).
        - max_seqlen: with cu_seqlens, the longest document as a Python int (the packer knows it on
          the host; an upper bound works). It goes to every layer's attention, so that no kernel
          copies cu_seqlens to the host. Without it the forward's input check (one copy to the host
          per forward, checking cu_seqlens) finds it and hands that on; the check also refuses a
          max_seqlen below the longest document. Under torch.compile, where the check is skipped,
          a missing max_seqlen is found by each layer again.
        - cache, slots [B] int64, attn_len: the KV-cached path (model/cache.py). slots=None means
          row b is slot b (read as views: cheaper than a gather when a batch fills slots 0..B-1).
          position_ids is then required; row b writes its keys at (slots[b], position_ids[b]) and
          attends over cache positions 0..attn_len-1 (default max_seq_len) up to its own position.
          For a static decode step keep B and attn_len fixed.
        """
        return self(input_ids, position_ids, cu_seqlens, cache, slots, attn_len, return_hidden=True,
                    max_seqlen=max_seqlen)

    def _hidden(self, input_ids, position_ids, cu_seqlens, cache, slots, attn_len, max_seqlen=None,
                check_inputs=True) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a KV cache")
            if position_ids is None:
                raise ValueError("the KV-cached forward needs position_ids [B, T] (where each token goes in its slot)")
        if cu_seqlens is not None and not torch.compiler.is_compiling():
            max_seqlen = self._check_packed(input_ids, cu_seqlens, max_seqlen)
        if position_ids is None:
            position_ids = self._default_positions(B, T, cu_seqlens, device)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if check_inputs and not torch.compiler.is_compiling():
            self._check_inputs(input_ids, position_ids, cache, slots)

        cos, sin = self.rope(position_ids)  # [B, T, R/2] each, fp32
        step = cache.step(slots, position_ids, attn_len) if cache is not None else None
        h = self.model.embed_tokens(input_ids)  # [B, T, D]
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, step, max_seqlen)
        return self.model.norm(h)

    def _check_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> int:
        """Packed documents: input_ids [1, total] and cu_seqlens rising from 0 and ending at total,
        checked with one copy to the host, which also yields the longest document. Returns the
        max_seqlen every layer's attention gets: the one given (it must cover the longest), else
        the longest."""
        B, T = input_ids.shape
        ok = B == 1 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
        if ok:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            first, last, shortest, longest = torch.stack(
                [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
            ok = first == 0 and last == T and shortest >= 0
        if not ok:
            raise ValueError(f"packed documents need input_ids of shape [1, total] and cu_seqlens [ndocs + 1] rising "
                             f"from 0 and ending at total = {T}; got input_ids {tuple(input_ids.shape)}, cu_seqlens "
                             f"{cu_seqlens.tolist() if cu_seqlens.numel() < 20 else tuple(cu_seqlens.shape)}")
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest packed document ({longest} tokens)")
        return longest if max_seqlen is None else max_seqlen

    def _default_positions(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
        if cu_seqlens is None:
            return torch.arange(T, device=device).expand(B, T)
        if B != 1:
            raise ValueError(f"packed documents (cu_seqlens) need input_ids of shape [1, total], got batch {B}")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])  # [T]: each token's document start
        return (torch.arange(T, device=device) - starts)[None]

    def _check_inputs(self, input_ids, position_ids, cache, slots) -> None:
        """User-facing checks (one device sync): ids in vocab, positions non-negative and within
        the cache, slots within the cache."""
        V = self.config.vocab_size
        B = input_ids.shape[0]
        paged = isinstance(cache, PagedKVCache)   # its slots are block tables, checked by the cache
        if slots is not None and not paged and slots.shape != (B,):
            raise ValueError(f"slots must be [B] = [{B}], got {tuple(slots.shape)}")
        extremes = [input_ids.min(), input_ids.max(), position_ids.min(), position_ids.max()]
        if slots is not None and not paged:
            extremes += [slots.min(), slots.max()]
        lo, hi, pmin, pmax, *slot_span = torch.stack([e.long() for e in extremes]).tolist()
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids out of range: ids span {lo}..{hi} (max id {hi}) but vocab_size is {V} "
                             f"(valid ids 0..{V - 1})")
        if pmin < 0:
            raise ValueError(f"position_ids must be ≥ 0, got {pmin}")
        if paged:
            cache.check_call(B, pmax, slots)
        elif cache is not None:
            if pmax >= cache.max_seq_len:
                raise ValueError(f"position {pmax} does not fit the cache (max_seq_len {cache.max_seq_len})")
            if slots is None and B > cache.max_batch_size:
                raise ValueError(f"batch {B} exceeds the cache's max_batch_size {cache.max_batch_size}")
            if slots is not None and (slot_span[0] < 0 or slot_span[1] >= cache.max_batch_size):
                raise ValueError(f"slots span {slot_span[0]}..{slot_span[1]}; the cache has max_batch_size "
                                 f"{cache.max_batch_size}")
        self.rope.ensure(pmax + 1, input_ids.device)

    # ---- KV cache ---------------------------------------------------------------------------------
    def make_paged_cache(self, num_pages: int, page_size: int, max_seq_len: int, max_batch_size: int,
                         dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> PagedKVCache:
        """A paged KV cache for this model (dtype/device default to the embedding's); see model/paged_cache.py."""
        w = self.model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        self.rope.ensure(max_seq_len, device)
        return PagedKVCache(self.config, num_pages, page_size, max_seq_len, max_batch_size, dtype, device)

    def make_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """A static KV cache for this model (dtype/device default to the embedding's); see model/cache.py."""
        w = self.model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        self.rope.ensure(max_seq_len, device)
        return KVCache(self.config, max_batch_size, max_seq_len, dtype, device)

    # ---- multi-token prediction -----------------------------------------------------------------
    def mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None, target_mask: torch.Tensor | None = None):
        """The weighted multi-token-prediction loss (model/mtp.py) from the main model's final hidden
        states: returns (loss, metrics). See model.mtp.mtp_loss. On an FSDP2-wrapped model use
        forward(..., with_mtp_loss=True) instead (the shared embedding and head are gathered there)."""
        return mtp_loss(self, hidden, input_ids, position_ids, cu_seqlens, target_mask)
