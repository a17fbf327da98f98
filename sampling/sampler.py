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
  (counted in `stats.prefill_tokens`). The prompts admitted together are prefilled in one forward
  as right-padded rows (up to PREFILL_TOKENS padded tokens a call), the head applied to each
  prompt's last position only.
- Continuous batching: every decode step advances all active slots by one token; a finished
  sequence frees its slot and the next waiting sample takes it at once. Requests beyond
  max_batch_size wait in a FIFO queue. The running samples always sit in slots 0..A-1: when one
  finishes, the sample in the highest slot moves into its slot (a copy of that sample's cached
  positions, once), so every decode step reads the cache as a view of consecutive slots instead of
  gathering B × positions entries per layer.
- Seeds: each sample draws from its own torch.Generator seeded with (request seed, sample index),
  so a seeded request gives the same completion alone or batched with others (up to the float
  rounding of batched matmuls). A draw is an inverse-CDF draw: one uniform u per token from the
  sample's generator, and the token is the first whose cumulative mass exceeds u times the total
  (searchsorted over the row's running sum of exp(logits - max)). One random number per token
  instead of one per vocabulary entry: the draw costs a few passes over [B, V] whatever B is.
  The running sum is fp32 accumulated in fp64 per element (torch's CPU cumsum) or fp32 (GPU), so a
  token's probability is honoured to about 1e-7 of the row's mass.
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
    text: str | None = None  # decoded, when the sampler has a tokenizer; without the stop token


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
    uniforms: deque = field(default_factory=deque)  # this sample's next U[0, 1) draws

    def uniform(self) -> float:
        """The next U[0, 1) number of this sample's stream (drawn from its generator in blocks)."""
        if not self.uniforms:
            self.uniforms.extend(torch.rand(_UNIFORM_BLOCK, generator=self.generator, dtype=torch.float64).tolist())
        return self.uniforms.popleft()


_UNIFORM_BLOCK = 64  # uniforms drawn per generator call; part of what a seed reproduces
PREFILL_TOKENS = 8192  # padded prompt tokens per batched prefill call (bounds its activations)


def _truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Mask logits [B, V] (already temperature-scaled) outside top-k, top-p and min-p, per row.

    The per-row settings come as host lists, so deciding which filters run needs no device sync;
    a value that switches a filter off (top_k 0, top_p 1, min_p 0) leaves its row untouched.
    """
    B, V = logits.shape
    dev = logits.device
    if any(k > 0 for k in top_k):
        k = torch.tensor([min(k, V) if k > 0 else V for k in top_k], device=dev)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(m > 0 for m in min_p):
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=dev).unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if any(p < 1 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token if the mass before it is < top_p (the first token is always kept)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= torch.tensor(top_p, device=dev).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from running masses cdf [B, V] (non-decreasing, unnormalised) with
    uniforms u [B] in [0, 1): the first v with cdf[v] > u · cdf[-1].

    Tokens of zero mass are never drawn (their cdf equals their predecessor's). The target is
    kept strictly below the total, where float rounding of u · total could otherwise reach it.
    """
    total = cdf[:, -1]
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)


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
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attn_len: int) -> torch.Tensor:
        """The decode step over the active rows: ids, pos [A, 1], row a in slot a (the cache read as
        views of slots 0..A-1) -> logits [A, V] fp32."""
        h = self.model(ids, position_ids=pos, cache=self.cache, slots=None, attn_len=attn_len, return_hidden=True)
        return self.model.lm_head(h[:, -1]).float()

    def _static_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The fixed-shape decode step over all slots: ids, pos [max_batch_size, 1] -> [max_batch_size, V]."""
        h = self.model(ids, position_ids=pos, cache=self.cache, slots=None, attn_len=self.max_seq_len + 1,
                       return_hidden=True)
        return self.model.lm_head(h[:, -1]).float()

    # -- sampling ----------------------------------------------------------------------------------
    def _draw(self, logits: torch.Tensor, reqs: list[_Request]) -> tuple[list[int], list[float]]:
        """Sample one token per row of logits [B, V] for reqs (one per row): (token ids, logprobs).

        The logprob is log softmax(logits / T) at the token, before truncation (T = 1 for greedy
        rows). Per-row settings are read on the host, so rows that share them cost a few whole-
        batch passes over [B, V] (scale, max, exp, running sum, searchsorted, gather) and no syncs.
        """
        B, V = logits.shape
        dev = logits.device
        temps = [r.params.temperature for r in reqs]
        if all(t == temps[0] for t in temps):
            scaled = logits if temps[0] in (0.0, 1.0) else logits / temps[0]
        else:
            scaled = logits / torch.tensor([t if t > 0 else 1.0 for t in temps], device=dev).unsqueeze(1)
        greedy = [i for i, t in enumerate(temps) if t == 0]
        truncated = [i for i, r in enumerate(reqs) if r.params.temperature > 0 and
                     (r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0)]
        m = scaled.amax(dim=-1, keepdim=True)  # [B, 1]
        mass = (scaled - m).exp_()  # [B, V] unnormalised probabilities (row max 1)
        if len(greedy) == B:
            total = mass.sum(-1)  # [B]
            tokens = scaled.argmax(-1)
        else:
            cdf = mass.cumsum_(-1)  # [B, V] running mass, in place
            total = cdf[:, -1]
            u = torch.tensor([reqs[i].uniform() if temps[i] > 0 else 0.0 for i in range(B)],
                             dtype=torch.float64, device=dev)
            tokens = _inverse_cdf(cdf, u)  # greedy and truncated rows are overwritten below
            if greedy:
                g = torch.tensor(greedy, device=dev)
                tokens[g] = scaled[g].argmax(-1)
            if truncated:
                t = torch.tensor(truncated, device=dev)
                sub = _truncate(scaled[t], [reqs[i].params.top_k for i in truncated],
                                [reqs[i].params.top_p for i in truncated], [reqs[i].params.min_p for i in truncated])
                tokens[t] = _inverse_cdf((sub - m[t]).exp_().cumsum_(-1), u[t])
        logp = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - (m.squeeze(1) + total.log())  # [B]
        return tokens.tolist(), logp.tolist()

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
        slot_prompt = [-1] * self.max_batch_size  # which prompt's tokens a slot holds in positions < P
        prefill_logits: dict[int, torch.Tensor] = {}  # prompt -> last-position logits [V]
        active: list[_Request] = []  # the running samples; active[i].slot == i

        def settle(rows: list[_Request]) -> list[_Request]:
            """Record the finished rows' completions and compact the rest into slots 0..A-1."""
            for r in rows:
                if r.finish:
                    text = None
                    if self.tokenizer is not None:  # the text leaves out the stop token (the ids keep it)
                        ended = r.finish == "stop" and r.tokens and r.tokens[-1] in r.stop_ids
                        text = self.tokenizer.decode(r.tokens[:-1] if ended else r.tokens)
                    results[r.group][r.index] = Completion(r.tokens, r.logprobs, r.finish, text)
            return self._compact(rows, slot_prompt)

        while queue or active:
            # admit waiting samples into the free slots A, A+1, ...
            admitted: list[_Request] = []
            while queue and len(active) + len(admitted) < self.max_batch_size:
                r = queue.popleft()
                r.slot = len(active) + len(admitted)
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
                for g in {r.group for r in admitted}:
                    if not any(q.group == g for q in queue):
                        prefill_logits.pop(g, None)
                active = settle(active + admitted)
            if active:
                active = settle(self._decode_step(active))
        return results

    def _compact(self, rows: list[_Request], slot_prompt: list[int]) -> list[_Request]:
        """The unfinished rows, moved so that they fill slots 0..A-1 (rows[i].slot == i on entry).

        Each unfinished row in a slot ≥ A moves into a slot < A that a finished row left: its
        positions 0..pos-1 are copied once (model.cache.KVCache.copy_slots). The decode step then
        reads the cache rows as a view of consecutive slots, not a gathered copy every step.
        """
        running = [r for r in rows if r.finish is None]
        A = len(running)
        holes = [r.slot for r in rows if r.finish is not None and r.slot < A]
        movers = [r for r in running if r.slot >= A]
        for hole, r in zip(holes, movers):
            self.cache.copy_slots(r.slot, [hole], r.pos)
            slot_prompt[hole] = r.group  # the copied positions start with the prompt
            r.slot = hole
        running.sort(key=lambda r: r.slot)
        return running

    def _decode_step(self, active: list[_Request]) -> list[_Request]:
        """Advance every active row (active[i] in slot i) by one token; returns the same rows."""
        t0 = time.perf_counter()
        A = len(active)
        ids = torch.tensor([[r.tokens[-1]] for r in active], device=self.device)  # [A, 1]
        pos = torch.tensor([[r.pos] for r in active], device=self.device)  # [A, 1]
        if self.static:
            # fixed shapes for torch.compile / CUDA graphs: all slots, idle ones writing to the scratch position
            B = self.max_batch_size
            ids = torch.cat([ids, ids.new_zeros(B - A, 1)])
            pos = torch.cat([pos, pos.new_full((B - A, 1), self.max_seq_len)])
            logits = self._step(ids, pos)[:A]
        else:
            logits = self._forward(ids, pos, max(r.pos for r in active) + 1)
        self.stats.decode_steps += 1
        toks, lps = self._draw(logits, active)
        self.stats.decode_s += time.perf_counter() - t0
        for r, t, lp in zip(active, toks, lps):
            r.pos += 1
            self._append(r, t, lp)
        return active

    def _prefill(self, groups: list[int], slots: list[int], prompts, prefill_logits) -> None:
        """One forward over the prompts of `groups` (right-padded to the longest) into `slots`; the
        logits at each prompt's last position go to prefill_logits."""
        lens = [len(prompts[g]) for g in groups]
        L = max(lens)
        ids = torch.zeros(len(groups), L, dtype=torch.long)
        for i, g in enumerate(groups):
            ids[i, :lens[i]] = torch.tensor(prompts[g])
        ids = ids.to(self.device)
        pos = torch.arange(L, device=self.device).expand(len(groups), L)
        h = self.model(ids, position_ids=pos, cache=self.cache, slots=torch.tensor(slots, device=self.device),
                       attn_len=L, return_hidden=True)
        last = h[torch.arange(len(groups), device=self.device), torch.tensor(lens, device=self.device) - 1]
        logits = self.model.lm_head(last).float()
        for i, g in enumerate(groups):
            prefill_logits[g] = logits[i]
        self.stats.prefill_tokens += sum(lens)
        self.stats.prefill_calls += 1

    def _admit(self, admitted: list[_Request], prompts, slot_prompt, prefill_logits) -> None:
        """Put each admitted sample's prompt into its slot: prefill once per prompt, copy for the rest."""
        t0 = time.perf_counter()
        by_group: dict[int, list[_Request]] = {}
        for r in admitted:
            by_group.setdefault(r.group, []).append(r)
        # prompts needing a prefill: no slot still holds their tokens, or their logits were dropped
        need = [g for g in by_group if g not in prefill_logits or g not in slot_prompt]
        # prefill into the first admitted slot of each group: prompts batched as right-padded rows
        # (shortest first, at most PREFILL_TOKENS padded tokens a call). Exact: a real token attends
        # only to earlier positions of its own slot, never to the padding after it, and the padding
        # written into the cache past the prompt is overwritten by the decode steps before any
        # query can see it (decode attends to positions <= its own).
        need.sort(key=lambda g: len(prompts[g]))
        chunk: list[int] = []
        for k, g in enumerate(need):
            chunk.append(g)
            nxt = len(prompts[need[k + 1]]) if k + 1 < len(need) else None
            if nxt is None or nxt * (len(chunk) + 1) > PREFILL_TOKENS:
                self._prefill(chunk, [by_group[c][0].slot for c in chunk], prompts, prefill_logits)
                for c in chunk:
                    slot_prompt[by_group[c][0].slot] = c
                chunk = []
        for g, rs in by_group.items():
            src = next(s for s in range(self.max_batch_size) if slot_prompt[s] == g)
            dst = [r.slot for r in rs if r.slot != src]
            if dst:
                self.cache.copy_slots(src, torch.tensor(dst, device=self.device), len(prompts[g]))
                for s in dst:
                    slot_prompt[s] = g
        self.stats.prefill_s += time.perf_counter() - t0
