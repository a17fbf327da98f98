"""In-process KV-cached sampler: prefill, then decode with a preallocated static cache.

GRPO spends most of its time generating. We generate from the policy's own weights in the
training process: no second engine, no weight synchronisation.

    s = Sampler(model, max_batch_size=64, max_seq_len=4096, tokenizer=tok)
    outs = s.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=0))
    outs[i][j] -> Completion(token_ids, logprobs, finish_reason)

How it works
- The cache (model.make_cache) has `max_batch_size` slots of `max_seq_len` positions (+1 scratch
  position that idle rows write to). MLA models cache only the normalised KV latent and the rope
  key and decode with absorbed weights; GQA models cache k/v per KV head. Its size is
  max_batch_size x max_seq_len x per-token bytes, printed at construction; `release()` frees it
  between rollouts (it is allocated again on the next `generate`).
- Shared prefill (GRPO groups): a prompt is prefilled once into one slot; its n samples get the
  prompt's cache rows by copy (`cache.copy_slots`), and their first tokens are drawn from the same
  prefill logits. A sample admitted after the prompt's slot was reused is prefilled again
  (counted in `stats.prefill_tokens`).
- Continuous batching: every decode step advances all active slots by one token; a finished
  sequence frees its slot and the next waiting sample takes it at once. Requests beyond
  max_batch_size wait in a FIFO queue.
- Seeds: each sample draws from its own torch.Generator seeded with (request seed, sample index),
  so a seeded request gives the same completion alone or batched with others (up to the float
  rounding of batched matmuls). Sampling uses the exponential-race form of the categorical
  draw (argmax p / E, E ~ Exp(1)), which needs one noise vector per row.
- Logprobs: the log-probability of each sampled token under the temperature-scaled distribution
  *before* top-k / top-p / min-p truncation, log softmax(logits / T), which is what GRPO's
  importance ratio compares with the trainer's recomputation. For greedy decoding (T = 0) they are
  under T = 1.
- Stops: a sample ends at a token in stop_token_ids (the token is kept: training must see EOS),
  at a stop string in its decoded text (needs the tokenizer; the tokens up to the one completing
  the string are kept), or after max_new_tokens ("length").

Letters: B active rows, V vocab, P prompt length.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] | None = None  # None: the model's / tokenizer's EOS
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams: top_k must be >= 0 and min_p in [0, 1), got {self.top_k}, {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded, when the sampler has a tokenizer


@dataclass
class SamplerStats:
    prefill_tokens: int = 0  # prompt tokens run through the model
    prefill_calls: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class _Request:
    group: int  # prompt index
    index: int  # sample index within the prompt's n
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    pos: int = 0  # position of the next token to write
    finish: str | None = None


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, V] (already temperature-scaled) outside top-k, top-p and min-p, per row."""
    B, V = logits.shape
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep a token if the mass before it is < top_p (the first token is always kept)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, model, max_batch_size: int, max_seq_len: int, tokenizer=None, dtype=None,
                 static: bool = False, compile: bool = False, verbose: bool = True):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.cache = None
        self.stats = SamplerStats()
        # static=True decodes all max_batch_size slots every step with fixed shapes (idle slots write to
        # one scratch position past max_seq_len), so the step can be compiled (compile=True:
        # torch.compile(fullgraph=True); on GPU the stand-in for CUDA-graph capture). static=False
        # decodes only the active rows and attends only over positions in use: faster in eager mode.
        self.static = static or compile
        self._step = self._static_step
        if compile:
            self._step = torch.compile(self._static_step, fullgraph=True, dynamic=False)
        self.device = next(model.parameters()).device
        self.bytes_per_token = model.make_cache(1, 1, dtype=dtype, device=self.device).bytes_per_token
        # +1 position: the scratch position that idle rows write to in static mode
        self.cache_bytes = max_batch_size * (max_seq_len + 1) * self.bytes_per_token
        if verbose:
            print(f"sampler: KV cache {max_batch_size} slots x {max_seq_len} positions x "
                  f"{self.bytes_per_token} B/token = {self.cache_bytes / 2**20:.1f} MiB")
        eos = getattr(getattr(model, "config", None), "eos_token_ids", [])
        if not eos and tokenizer is not None and tokenizer.eos_id is not None:
            eos = [tokenizer.eos_id]
        self.default_stop_ids = list(eos)

    # -- memory ------------------------------------------------------------------------------------
    def _ensure_cache(self):
        if self.cache is None:
            self.cache = self.model.make_cache(self.max_batch_size, self.max_seq_len + 1, dtype=self.dtype,
                                               device=self.device)
        return self.cache

    def release(self) -> None:
        """Free the KV cache (training can use the memory); the next generate allocates it again."""
        self.cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # -- the model -------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attn_len: int) -> torch.Tensor:
        """Logits of the last position of each row: ids, pos [B, T]; slots [B] -> [B, V] fp32."""
        logits = self.model(ids, position_ids=pos, cache=self.cache, slots=slots, attn_len=attn_len)
        return logits[:, -1].float()

    def _static_step(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids, position_ids=pos, cache=self.cache, slots=slots, attn_len=self.max_seq_len + 1)
        return logits[:, -1].float()

    # -- sampling ----------------------------------------------------------------------------------
    def _draw(self, logits: torch.Tensor, reqs: list[_Request]) -> tuple[list[int], list[float]]:
        """Sample one token per row of logits [B, V] for reqs (one per row)."""
        temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=logits.device)
        greedy = temps == 0
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
        logp_full = torch.log_softmax(scaled, dim=-1)  # [B, V] untruncated, temperature-scaled
        tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        if bool(greedy.any()):
            tokens[greedy] = scaled[greedy].argmax(-1)
        if not bool(greedy.all()):
            idx = (~greedy).nonzero().squeeze(1)
            sub = _truncate(
                scaled[idx],
                torch.tensor([reqs[i].params.top_k for i in idx.tolist()], device=logits.device),
                torch.tensor([reqs[i].params.top_p for i in idx.tolist()], dtype=torch.float32, device=logits.device),
                torch.tensor([reqs[i].params.min_p for i in idx.tolist()], dtype=torch.float32, device=logits.device),
            )
            probs = torch.softmax(sub, dim=-1)
            # exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) iid is a draw from p; one
            # generator per request keeps a seeded request's draws independent of its batch mates
            noise = torch.stack([torch.empty(sub.shape[1], device="cpu").exponential_(generator=reqs[i].generator)
                                 for i in idx.tolist()]).to(logits.device)
            tokens[idx] = (probs / noise).argmax(-1)
        lp = logp_full.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return tokens.tolist(), lp.tolist()

    def _append(self, r: _Request, token: int, logprob: float) -> None:
        r.tokens.append(token)
        r.logprobs.append(logprob)
        self.stats.generated_tokens += 1
        if token in r.stop_ids:
            r.finish = "stop"
        elif r.params.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(r.tokens[-64:])  # a stop string spans few tokens
            if any(s in tail for s in r.params.stop):
                r.finish = "stop"
        if r.finish is None and len(r.tokens) >= r.params.max_new_tokens:
            r.finish = "length"

    # -- the public entry point --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[Completion]]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sp.max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={sp.max_new_tokens} it needs "
                                 f"{len(p) + sp.max_new_tokens} positions but max_seq_len is {self.max_seq_len} "
                                 f"(prompts may be at most {self.max_seq_len - sp.max_new_tokens} tokens)")
            if sp.stop and self.tokenizer is None:
                raise ValueError(f"prompt {i}: stop strings {sp.stop} need the sampler's tokenizer")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, params)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, params):
        self._ensure_cache()
        base_seed = int(torch.randint(0, 2**40, (1,)).item())  # for requests without a seed
        queue: deque[_Request] = deque()
        for g, (p, sp) in enumerate(zip(prompts, params)):
            stop = frozenset(sp.stop_token_ids if sp.stop_token_ids is not None else self.default_stop_ids)
            for j in range(sp.n):
                gen = torch.Generator(device="cpu")
                gen.manual_seed((sp.seed if sp.seed is not None else base_seed + g) * 1_000_003 + j)
                queue.append(_Request(g, j, sp, gen, stop))
        results: list[list[Completion | None]] = [[None] * sp.n for sp in params]
        free = list(range(self.max_batch_size))
        slot_prompt = [-1] * self.max_batch_size  # which prompt's tokens a slot holds in positions < P
        prefill_logits: dict[int, torch.Tensor] = {}  # prompt -> last-position logits [V]
        active: list[_Request] = []

        def finish(r: _Request):
            text = self.tokenizer.decode(r.tokens) if self.tokenizer is not None else None
            results[r.group][r.index] = Completion(r.tokens, r.logprobs, r.finish, text)
            free.append(r.slot)

        while queue or active:
            # admit waiting samples into free slots (a slot that still holds the sample's prompt first)
            admitted: list[_Request] = []
            while queue and free:
                r = queue.popleft()
                r.slot = next((s for s in free if slot_prompt[s] == r.group), free[0])
                free.remove(r.slot)
                if slot_prompt[r.slot] != r.group:
                    slot_prompt[r.slot] = -1  # about to be overwritten
                admitted.append(r)
            if admitted:
                self._admit(admitted, prompts, slot_prompt, prefill_logits)
                first = torch.stack([prefill_logits[r.group] for r in admitted])
                toks, lps = self._draw(first, admitted)
                for r, t, lp in zip(admitted, toks, lps):
                    r.pos = len(prompts[r.group])
                    self._append(r, t, lp)
                    if r.finish:
                        finish(r)
                    else:
                        active.append(r)
                for g in {r.group for r in admitted}:
                    if not any(q.group == g for q in queue):
                        prefill_logits.pop(g, None)
            if active:
                active = self._decode_step(active, finish)
        return results

    def _decode_step(self, active: list[_Request], finish) -> list[_Request]:
        """Advance every active row by one token; returns the rows still running."""
        t0 = time.perf_counter()
        if self.static:
            # fixed shapes for torch.compile / CUDA graphs: all slots, idle ones writing to the scratch position
            B = self.max_batch_size
            ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            pos = torch.full((B, 1), self.max_seq_len, dtype=torch.long, device=self.device)
            rows = torch.tensor([r.slot for r in active], device=self.device)
            ids[rows, 0] = torch.tensor([r.tokens[-1] for r in active], device=self.device)
            pos[rows, 0] = torch.tensor([r.pos for r in active], device=self.device)
            logits = self._step(ids, pos, torch.arange(B, device=self.device))[rows]
        else:
            ids = torch.tensor([[r.tokens[-1]] for r in active], device=self.device)
            pos = torch.tensor([[r.pos] for r in active], device=self.device)
            slots = torch.tensor([r.slot for r in active], device=self.device)
            logits = self._forward(ids, pos, slots, max(r.pos for r in active) + 1)
        self.stats.decode_steps += 1
        toks, lps = self._draw(logits, active)
        self.stats.decode_s += time.perf_counter() - t0
        still = []
        for r, t, lp in zip(active, toks, lps):
            r.pos += 1
            self._append(r, t, lp)
            if r.finish:
                finish(r)
            else:
                still.append(r)
        return still

    def _admit(self, admitted: list[_Request], prompts, slot_prompt, prefill_logits) -> None:
        """Put each admitted sample's prompt into its slot: prefill once per prompt, copy for the rest."""
        t0 = time.perf_counter()
        by_group: dict[int, list[_Request]] = {}
        for r in admitted:
            by_group.setdefault(r.group, []).append(r)
        # prompts needing a prefill: no slot still holds their tokens, or their logits were dropped
        need = [g for g in by_group if g not in prefill_logits or g not in slot_prompt]
        # prefill, one prompt at a time into the first admitted slot of its group (prompts differ in
        # length; one row each keeps it exact and simple)
        for g in need:
            slot = by_group[g][0].slot
            p = prompts[g]
            ids = torch.tensor([p], device=self.device)
            pos = torch.arange(len(p), device=self.device).unsqueeze(0)
            prefill_logits[g] = self._forward(ids, pos, torch.tensor([slot], device=self.device), len(p))[0]
            slot_prompt[slot] = g
            self.stats.prefill_tokens += len(p)
            self.stats.prefill_calls += 1
        for g, rs in by_group.items():
            src = next(s for s in range(self.max_batch_size) if slot_prompt[s] == g)
            dst = [r.slot for r in rs if r.slot != src]
            if dst:
                self.cache.copy_slots(src, torch.tensor(dst, device=self.device), len(prompts[g]))
                for s in dst:
                    slot_prompt[s] = g
        self.stats.prefill_s += time.perf_counter() - t0
