"""The rollout engine: sequences that decode step by step over a paged KV cache, and can pause at a
stop, take new tokens and go on from their own cache.

    eng = Engine(model, max_batch_size=64, max_seq_len=4096, tokenizer=tok)   # model in eval mode
    ids = eng.add(prompt_ids, SamplingParams(n=8, max_new_tokens=256, stop=["</code>"]), pause=True)
    while eng.has_work():
        for ev in eng.step():            # Event(seq, kind, token_ids, logprobs, completion)
            if ev.kind == "paused":      # stopped at a stop token or string; its pages are kept
                eng.extend(ev.seq, observation_ids)   # prefilled into its cache, then it decodes on
            elif ev.kind == "finished":
                ...ev.completion
    eng.abort(seq)                       # drop a sequence in any state

`Sampler.generate` (sampling/sampler.py) is a loop over this. Requests may be added between steps,
while others decode: each step first admits what waits (as rows and pages allow), then decodes every
running row.

Memory. The cache is a pool of fixed-size pages (model/paged_cache.py) holding `cache_tokens`
positions (default max_batch_size × max_seq_len, what slots of max_seq_len would hold). A sequence
holds pages only for the positions it has written, plus those of the current decode window. The n
samples of a request share the prompt's full pages: the prompt is prefilled once, into its first
sample, and the others fork it (the partly filled last page is copied). While some of a request's
samples still wait for a row, a prefix holder keeps the prompt's pages and its last logits, so they
join later without a prefill. One page more, the scratch page, takes the writes of padding: the
padded tail of a batched prefill and the rows that pad a compiled step's batch.

Admission and preemption. A waiting sequence is admitted when a row is free and the pool has the
pages its context and one decode window need. When a window needs pages the pool does not have,
prefix holders go first, then the youngest sequence (running or paused) is preempted: its pages are
freed and it is queued first again with the tokens it has; on its re-admission its whole context is
prefilled again (recompute, as vLLM preempts) and it draws on from the same counter of its
uniform stream, so a seeded output does not change (sampling/draw.py). Preemptions are counted.

The decode window. The host builds the batch's tensors (tokens, positions, block tables, sampling
settings, stop ids, the step at which each row reaches its limit) and the device then runs
`sync_every` steps without reading anything back: forward over the paged cache, the draw
(sampling/draw.py), stop detection; a row that finishes is frozen (it keeps feeding its last token
at the same position, which rewrites the same cache entry) and emits nothing more. The host reads
the window's tokens and log-probs once, checks stop strings (tokens past a stop string are rolled
back: the sequence's position returns to the stop, and the stale cache entries past it are never
visible, since a query sees positions up to its own), and turns them into events. The pages of a
window are allocated before it starts, so a window never allocates.

Compiled decode (`compile=True`; the default None compiles where compile_by_default says it was
measured to win): the step (forward + draw + stop detection) is torch.compile'd
with fixed shapes per bucket: the batch padded to a power of two with scratch rows, the block tables
to a power-of-two width, attention over the whole width (positions beyond a row's own are masked),
so a run compiles one graph per (batch bucket, width bucket).

Contexts. A sequence's context is its prompt followed by its tokens (sampled ones and extended
ones). A running sequence has the cache of all its context but the last token, which is the next
input (`cached == len(context) - 1`). Admission prefills context[cached:] and draws the next token
from the last position's logits: a new sample (cached 0), a preempted one (cached 0, its tokens
kept) and a paused one that was extended (cached at its stop) go through the same path.

Letters: B rows of a decode step, V vocab, W block-table width (pages), Ps page size.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.paged_cache import OutOfPages
from sampling.draw import RowParams, draw, sample_key
from sampling.types import Completion, SamplerStats, SamplingParams

PAGE_SIZE = 16          # positions per page
PREFILL_TOKENS = 8192   # padded tokens per batched prefill call (bounds its activations)
# host reads every this many decode steps (CPU: measured in bench/sampler.py; GPU: the host must
# not wait on the device every step)
SYNC_EVERY = {"cpu": 4, "cuda": 8}


@dataclass
class Event:
    """What one step did to one sequence: the tokens it sampled in that step (after any roll-back),
    and, when it paused or finished, its completion so far."""

    seq: int
    kind: str  # "tokens" | "paused" | "finished"
    token_ids: list[int]
    logprobs: list[float]
    completion: Completion | None = None


@dataclass(frozen=True)
class SeqInfo:
    """Engine.info: tokens after the prompt (sampled and extended), how many were sampled, room for
    more tokens of any kind (max_seq_len and the max_total budget), tokens it may still sample, and
    whether it stopped at a stop token it sampled (an end of sequence, not a stop string)."""
    tokens: int
    sampled: int
    room: int
    can_sample: int
    at_stop_token: bool


@dataclass
class _Seq:
    id: int
    request: int
    index: int                    # sample index within the request's n
    prompt: list[int]
    params: SamplingParams
    key: int                      # the uniform stream's key
    stop_ids: list[int]
    pause: bool
    order: int                    # admission order (preemption takes the youngest)
    tokens: list[int] = field(default_factory=list)       # after the prompt: sampled and extended
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)         # 1 sampled, 0 extended
    n_sampled: int = 0
    stop_from: int = 0            # stop strings are looked for in tokens[stop_from:] (past the last extension)
    cached: int = 0               # positions whose keys are in its pages
    state: str = "waiting"        # waiting | running | paused | finished
    finish: str | None = None
    max_total: int | None = None  # tokens after the prompt, sampled and extended together (None: no bound)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def context(self) -> list[int]:
        return self.prompt + self.tokens

    def remaining(self, max_seq_len: int) -> int:
        """Tokens it may still sample: its max_new_tokens budget, the room left in max_seq_len and
        in its max_total budget."""
        left = min(self.params.max_new_tokens - self.n_sampled, max_seq_len - self.length)
        return left if self.max_total is None else min(left, self.max_total - len(self.tokens))


class Engine:
    def __init__(self, model, max_batch_size: int, max_seq_len: int, tokenizer=None, dtype=None,
                 cache_tokens: int | None = None, page_size: int = PAGE_SIZE, sync_every: int | None = None,
                 static: bool = False, compile: bool | None = None, cache_gib: float | None = None):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"Engine: max_batch_size and max_seq_len must be >= 1, got {max_batch_size}, "
                             f"{max_seq_len}")
        if page_size < 1:
            raise ValueError(f"Engine: page_size must be >= 1, got {page_size}")
        self.model = model
        self.max_batch_size, self.max_seq_len, self.page_size = max_batch_size, max_seq_len, page_size
        self.tokenizer, self.dtype = tokenizer, dtype
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.sync_every = sync_every if sync_every is not None else SYNC_EVERY.get(self.device.type, 8)
        if self.sync_every < 1:
            raise ValueError(f"Engine: sync_every must be >= 1, got {self.sync_every}")
        self.bytes_per_token = model.make_paged_cache(1, 1, 1, 1, dtype=dtype, device=self.device).bytes_per_token
        if cache_tokens is not None and cache_gib is not None:
            raise ValueError("Engine: give the cache budget as cache_tokens or cache_gib, not both")
        if cache_gib is not None:
            if not cache_gib > 0:
                raise ValueError(f"Engine: cache_gib must be > 0, got {cache_gib}")
            cache_tokens = int(cache_gib * 2**30) // self.bytes_per_token
        self.cache_tokens = max_batch_size * max_seq_len if cache_tokens is None else cache_tokens
        if self.cache_tokens < page_size:
            raise ValueError(f"Engine: the cache budget of {self.cache_tokens} tokens is less than one page "
                             f"({page_size} positions)")
        self.num_pages = -(-self.cache_tokens // page_size)       # usable pages (rounded up); +1 scratch page
        self.cache_bytes = (self.num_pages + 1) * page_size * self.bytes_per_token
        eos = getattr(model.config, "eos_token_ids", []) or []
        if not eos and tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            eos = [tokenizer.eos_id]
        self.default_stop_ids = list(eos)
        if compile is None:
            compile = compile_by_default(model.config, self.device)
        self.compile, self.static = compile, static or compile
        # the MoE dispatch reads its per-expert counts on the host (model/moe.py): a graph break there
        fullgraph = not getattr(model.config, "n_routed_experts", 0)
        # one graph per (batch, table width) bucket, powers of two: measured faster on the CPU than
        # one dynamic-shape graph (0.98 / 1.20 / 0.98 x the GEMM floor at batch 1 / 8 / 32 against
        # 1.05 / 1.19 / 1.30); dynamo's recompile limit is raised to the number of buckets
        self._step_fn = (torch.compile(self._decode_one, fullgraph=fullgraph, dynamic=False) if compile
                         else self._decode_one)
        pages = -(-max_seq_len // page_size)
        self._buckets = (_pow2(max_batch_size).bit_length()) * (_pow2(pages).bit_length()) + 1
        self.forward_model = model    # what decode and prefill call; Sampler may swap in a hook-free view
        self.stats = SamplerStats()
        self.cache = None
        self.seqs: dict[int, _Seq] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self._prefix: dict[int, torch.Tensor] = {}   # request -> last-position logits [V] (pages: ("prefix", r))
        self._next_seq = self._next_request = self._order = 0

    # -- memory ------------------------------------------------------------------------------------
    def _ensure_cache(self):
        if self.cache is None:
            self.cache = self.model.make_paged_cache(self.num_pages + 1, self.page_size, self.max_seq_len,
                                                     self.max_batch_size, dtype=self.dtype, device=self.device)
            self.scratch = self.cache.pool.ensure("scratch", 1)[0]
        return self.cache

    def release(self) -> None:
        """Free the cache (training can use the memory). Only when no sequence holds pages."""
        busy = [s.id for s in self.seqs.values() if s.state in ("running", "paused") and s.cached]
        if busy:
            raise RuntimeError(f"Engine.release: sequences {busy[:8]} still hold pages; finish or abort them first")
        self.cache = None
        self._prefix.clear()
        for s in self.seqs.values():
            s.cached = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def pages_used(self) -> int:
        """Pages held now, the scratch page included."""
        return 0 if self.cache is None else self.num_pages + 1 - self.cache.pool.free_pages

    # -- requests ----------------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams, where: str = "the prompt") -> None:
        """Refuse a request that can never run here, naming what is wrong (nothing is allocated)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{where}: params must be SamplingParams, got {type(params).__name__}")
        self._check_ids(prompt, f"{where}: prompt", "the prompt is empty")
        need = len(prompt) + params.max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"{where} has {len(prompt)} tokens; with max_new_tokens="
                             f"{params.max_new_tokens} it needs {need} positions but max_seq_len is "
                             f"{self.max_seq_len} (prompts may be at most {self.max_seq_len - params.max_new_tokens} "
                             f"tokens)")
        pages = -(-need // self.page_size)
        if pages > self.num_pages:
            raise ValueError(f"{where}: a sequence of {need} tokens (prompt {len(prompt)} + max_new_tokens "
                             f"{params.max_new_tokens}) needs {pages} pages of {self.page_size} but the cache budget "
                             f"is {self.num_pages} pages ({self.num_pages * self.page_size} tokens)")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop strings {params.stop} need the sampler's tokenizer")
        stops = params.stop_token_ids or []
        if any(not 0 <= t < self.vocab_size for t in stops):
            raise ValueError(f"{where}: stop_token_ids {stops} are outside the vocabulary (0..{self.vocab_size - 1})")

    def _check_ids(self, ids: list[int], what: str, empty: str) -> None:
        if not ids:
            raise ValueError(f"{what.split(':')[0]}: {empty}")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{what} token ids span {lo}..{hi} but the vocabulary has {self.vocab_size} ids")

    def add(self, prompt: list[int], params: SamplingParams, pause: bool = False,
            max_total: int | None = None) -> list[int]:
        """Queue a request's n samples; returns their sequence ids. pause=True: at a stop token or
        stop string a sample pauses (keeping its pages) instead of finishing. max_total bounds the
        tokens after the prompt, sampled and extended together (a multi-turn rollout's budget; its
        max_new_tokens still counts sampled tokens only): a sample reaching it finishes "length"."""
        self.check(prompt, params)
        if max_total is not None and max_total < 1:
            raise ValueError(f"Engine.add: max_total must be >= 1, got {max_total}")
        request = self._next_request
        self._next_request += 1
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**40, (1,)).item())
        stop = list(params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids)
        ids = []
        for j in range(params.n):
            s = _Seq(self._next_seq, request, j, list(prompt), params, sample_key(seed, j), stop, pause, order=-1,
                     max_total=max_total)
            self._next_seq += 1
            self.seqs[s.id] = s
            self.waiting.append(s.id)
            ids.append(s.id)
        return ids

    def has_work(self) -> bool:
        """Sequences waiting or running (paused ones wait for the caller)."""
        return bool(self.waiting or self.running)

    def _get(self, seq: int, what: str) -> _Seq:
        s = self.seqs.get(seq)
        if s is None:
            raise KeyError(f"{what}: unknown sequence {seq}")
        return s

    def extend(self, seq: int, token_ids: list[int]) -> None:
        """Append token_ids to a paused sequence and resume it: they are prefilled into its own cache
        at its next step and it samples on from there (its max_new_tokens counts sampled tokens only)."""
        s = self._get(seq, "extend")
        if s.state != "paused":
            raise ValueError(f"extend: sequence {seq} is {s.state}; only a paused sequence can be extended")
        self._check_ids(token_ids, "extend:", f"no token ids for sequence {seq}")
        if len(token_ids) + 1 > self.info(seq).room:
            raise ValueError(f"extend: sequence {seq} has {s.length} tokens; {len(token_ids)} more leave no room to "
                             f"sample within max_seq_len {self.max_seq_len}"
                             + (f" and its budget of {s.max_total} tokens" if s.max_total is not None else ""))
        s.tokens += list(token_ids)
        s.logprobs += [0.0] * len(token_ids)
        s.mask += [0] * len(token_ids)
        s.stop_from = len(s.tokens)
        s.state, s.finish = "waiting", None
        self.waiting.appendleft(seq)

    def resume(self, seq: int) -> None:
        """Let a paused sequence sample on with nothing added (its stop was not the caller's
        business): stop strings are looked for only in what it samples from here."""
        s = self._get(seq, "resume")
        if s.state != "paused":
            raise ValueError(f"resume: sequence {seq} is {s.state}; only a paused sequence can be resumed")
        if s.remaining(self.max_seq_len) < 1:
            raise ValueError(f"resume: sequence {seq} has no tokens left to sample; finish it")
        s.stop_from = len(s.tokens)
        s.state, s.finish = "waiting", None
        self.waiting.appendleft(seq)

    def info(self, seq: int) -> "SeqInfo":
        """Where a sequence stands (for loops that extend or resume paused sequences)."""
        s = self._get(seq, "info")
        room = self.max_seq_len - s.length
        room = room if s.max_total is None else min(room, s.max_total - len(s.tokens))
        at_token = bool(s.tokens) and s.tokens[-1] in s.stop_ids and s.mask[-1] == 1
        return SeqInfo(len(s.tokens), s.n_sampled, room, s.remaining(self.max_seq_len), at_token)

    def finish(self, seq: int) -> Completion:
        """End a paused sequence: its completion (finish_reason "stop"); its pages are freed."""
        s = self._get(seq, "finish")
        if s.state != "paused":
            raise ValueError(f"finish: sequence {seq} is {s.state}; only a paused sequence can be finished")
        s.state = "finished"
        self._free(s)
        return self._completion(s)

    def abort(self, seq: int) -> None:
        """Drop a sequence in any state: its pages are freed and it never yields an event again."""
        s = self._get(seq, "abort")
        if s.state == "waiting":
            self.waiting.remove(seq)
        elif s.state == "running":
            self.running.remove(seq)
        self._free(s)
        del self.seqs[seq]
        self._drop_prefix_if_done([s.request])

    def pop(self, seq: int) -> None:
        """Forget a finished sequence (its completion was delivered)."""
        s = self._get(seq, "pop")
        if s.state != "finished":
            raise ValueError(f"pop: sequence {seq} is {s.state}")
        del self.seqs[seq]

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit what waits (prefill + first draw), then run one decode window over the running rows."""
        self._ensure_cache()
        events: list[Event] = []
        self._admit(events)
        if self.running:
            self._decode_window(events)
        return events

    # -- bookkeeping -------------------------------------------------------------------------------
    def _free(self, s: _Seq) -> None:
        if self.cache is not None:
            self.cache.pool.free(s.id)
        s.cached = 0

    def _waiting_fresh(self) -> set[int]:
        """The requests that have samples waiting for their first row (one pass over the queue)."""
        return {self.seqs[i].request for i in self.waiting if self._fresh(self.seqs[i])}

    def _drop_prefix_if_done(self, requests, waiting: set[int] | None = None) -> None:
        """Free the prefix holders of `requests` none of whose samples waits for them any more."""
        waiting = self._waiting_fresh() if waiting is None else waiting
        for r in set(requests) & set(self._prefix):
            if r not in waiting:
                del self._prefix[r]
                if self.cache is not None:
                    self.cache.pool.free(("prefix", r))

    @staticmethod
    def _fresh(s: _Seq) -> bool:
        return not s.tokens and s.cached == 0

    def _completion(self, s: _Seq) -> Completion:
        text = None
        if self.tokenizer is not None:  # the text leaves out the stop token (the ids keep it)
            ended = s.finish == "stop" and s.tokens and s.tokens[-1] in s.stop_ids and s.mask[-1] == 1
            text = self.tokenizer.decode(s.tokens[:-1] if ended else s.tokens)
        mask = None if all(s.mask) else list(s.mask)
        return Completion(list(s.tokens), list(s.logprobs), s.finish or "stop", text, mask)

    def _accept(self, s: _Seq, token: int, logprob: float) -> bool:
        """Append one sampled token; True when the sequence stops or reaches its limit with it."""
        s.tokens.append(token)
        s.logprobs.append(logprob)
        s.mask.append(1)
        s.n_sampled += 1
        self.stats.generated_tokens += 1
        if token in s.stop_ids:
            s.finish = "stop"
        elif s.params.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(s.tokens[max(s.stop_from, len(s.tokens) - 64):])  # a stop spans few tokens
            if any(x in tail for x in s.params.stop):
                s.finish = "stop"
        if s.finish is None and s.remaining(self.max_seq_len) <= 0:
            s.finish = "length"
        return s.finish is not None

    def _settle(self, s: _Seq, new_tokens: list[int], new_lps: list[float], events: list[Event]) -> None:
        """After s took new tokens: pause, finish or keep it running, and record its event."""
        if s.finish is None:
            events.append(Event(s.id, "tokens", new_tokens, new_lps))
            return
        if s.finish == "stop" and s.pause:
            s.state = "paused"
            events.append(Event(s.id, "paused", new_tokens, new_lps, self._completion(s)))
        else:
            s.state = "finished"
            self._free(s)
            events.append(Event(s.id, "finished", new_tokens, new_lps, self._completion(s)))

    def _note_pages(self) -> None:
        self.stats.peak_pages = max(self.stats.peak_pages, self.pages_used - 1)

    # -- admission ---------------------------------------------------------------------------------
    def _admit(self, events: list[Event]) -> None:
        pool, Ps = self.cache.pool, self.page_size
        free = pool.free_pages
        prefill: list[_Seq] = []              # sequences whose context[cached:] is prefilled now
        leaders: dict[int, _Seq] = {}         # request -> its sample prefilled now (others fork it)
        forks: list[tuple[_Seq, object]] = []  # (sample, source: a leader's id or ("prefix", r))
        admitted: list[_Seq] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            s = self.seqs[self.waiting[0]]
            if self._fresh(s) and (s.request in leaders or s.request in self._prefix):
                shared = len(s.prompt) // Ps
                need = pool.pages_for(len(s.prompt) + self.sync_every) - shared
                src = leaders[s.request].id if s.request in leaders else ("prefix", s.request)
            else:
                need = pool.pages_for(s.length + self.sync_every) - len(pool.tables.get(s.id, ()))
                src = None
            # headroom: one free page for every row in flight after this one, for the pages their
            # decode windows will ask for (otherwise admission runs ahead and preemption recomputes)
            rows = len(self.running) + len(admitted)
            if need + rows > free and rows:
                break   # wait for pages to be freed (the first sequence is always let in: it fits alone)
            self.waiting.popleft()
            free -= need
            s.order, self._order = self._order, self._order + 1
            admitted.append(s)
            if src is not None:
                forks.append((s, src))
            else:
                prefill.append(s)
                if self._fresh(s):
                    leaders[s.request] = s
        if not admitted:
            return
        t0 = time.perf_counter()
        back: set[int] = set()   # admitted sequences the pool could not take after all: they wait again
        for s in prefill:
            if not self._pages(s, s.length, preempt=not self.running):
                back.add(s.id)
        for s, src in forks:
            if src in back or not self._fork(s, src):
                back.add(s.id)
        if back:
            for s in reversed([x for x in admitted if x.id in back]):
                s.state = "waiting"
                self.waiting.appendleft(s.id)
            admitted = [x for x in admitted if x.id not in back]
            prefill = [x for x in prefill if x.id not in back]
            leaders = {r: x for r, x in leaders.items() if x.id not in back}
            forks = [(x, src) for x, src in forks if x.id not in back]
            if not admitted:
                return
        logits: dict[int, torch.Tensor] = {}  # seq id -> [V] logits of its context's last position
        self._prefill(prefill, logits)
        for s, src in forks:
            logits[s.id] = logits[src] if not isinstance(src, tuple) else self._prefix[s.request]
        self.cache.apply_copies()
        # prefix holders for requests whose samples still wait for a row
        waiting = self._waiting_fresh()
        for r, lead in leaders.items():
            if r in waiting:
                try:
                    self.cache.pool.fork(lead.id, ("prefix", r), len(lead.prompt))
                    self.cache.apply_copies()
                    self._prefix[r] = logits[lead.id]
                except OutOfPages:
                    pass  # they will prefill the prompt again
        self._drop_prefix_if_done({s.request for s in admitted}, waiting)
        # the first token of every admitted sequence, in one draw
        rp = RowParams.build([s.params for s in admitted], [s.key for s in admitted], self.vocab_size, self.device)
        counter = torch.tensor([s.n_sampled for s in admitted], device=self.device)
        toks, lps = draw(torch.stack([logits[s.id] for s in admitted]), rp, counter)
        self._note_pages()
        self.stats.prefill_s += time.perf_counter() - t0
        for s, t, lp in zip(admitted, toks.tolist(), lps.tolist()):
            s.cached = s.length
            s.state = "running"
            self._accept(s, t, lp)
            self._settle(s, [t], [lp], events)
            if s.state == "running":
                self.running.append(s.id)

    def _fork(self, s: _Seq, src) -> bool:
        """Start s on the prompt pages of src (a leader's id or a prefix holder); False when the
        pool has no page for the copy of a partly filled last page."""
        try:
            self.cache.pool.fork(src, s.id, len(s.prompt))
        except OutOfPages:
            return False
        self.stats.shared_pages += len(s.prompt) // self.page_size
        return True

    def _prefill(self, seqs: list[_Seq], logits: dict) -> None:
        """context[cached:] of each sequence through the model into its pages (right-padded rows, at
        most PREFILL_TOKENS padded tokens a call, shortest first); last-position logits to `logits`.

        Exact: a real token attends only to earlier positions of its own sequence, never to the
        padding after it; padding writes land past the row's context, in its own last page (where
        decode overwrites them before any query can see them) or in the scratch page."""
        if not seqs:
            return
        seqs = sorted(seqs, key=lambda s: s.length - s.cached)
        chunk: list[_Seq] = []
        for k, s in enumerate(seqs):
            chunk.append(s)
            nxt = seqs[k + 1].length - seqs[k + 1].cached if k + 1 < len(seqs) else None
            if nxt is None or nxt * (len(chunk) + 1) > PREFILL_TOKENS:
                self._prefill_call(chunk, logits)
                chunk = []

    def _prefill_call(self, seqs: list[_Seq], logits: dict) -> None:
        pieces = [s.context()[s.cached:] for s in seqs]
        starts = [s.cached for s in seqs]
        L = max(map(len, pieces))
        # a row's table may hold pages past its context (a decode window's, kept after a roll-back to a stop)
        W = max(self.cache.pool.pages_for(max(a + L for a in starts)),
                max(len(self.cache.pool.tables[s.id]) for s in seqs))
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        tables = torch.full((len(seqs), W), self.scratch, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, pieces)):
            ids[i, :len(p)] = torch.tensor(p)
            t = self.cache.pool.tables[s.id]
            tables[i, :len(t)] = torch.tensor(t)
        pos = (torch.tensor(starts)[:, None] + torch.arange(L)[None, :])
        dev = self.device
        h = self.forward_model(ids.to(dev), position_ids=pos.to(dev), cache=self.cache, slots=tables.to(dev),
                               attn_len=max(a + L for a in starts), return_hidden=True)
        last = torch.tensor([len(p) - 1 for p in pieces], device=dev)
        out = self.forward_model.lm_head(h[torch.arange(len(seqs), device=dev), last]).float()
        for i, s in enumerate(seqs):
            logits[s.id] = out[i]
        self.stats.prefill_tokens += sum(map(len, pieces))
        self.stats.prefill_calls += 1

    # -- pages and preemption ----------------------------------------------------------------------
    def _pages(self, s: _Seq, length: int, preempt: bool) -> bool:
        """Give s pages for positions 0..length-1. When the pool is short and `preempt`, take pages
        back (prefix holders first, then the youngest sequence holding pages, running or paused)
        until s fits or s itself is the youngest, which is then preempted. False if s has no pages."""
        pool = self.cache.pool
        while True:
            try:
                pool.ensure(s.id, length)
                return True
            except OutOfPages:
                if not preempt:
                    return False
                if self._prefix:
                    r = next(iter(self._prefix))
                    del self._prefix[r]
                    pool.free(("prefix", r))
                    continue
                holders = [x for x in self.seqs.values() if x.state in ("running", "paused") and pool.tables.get(x.id)]
                victim = max(holders, key=lambda x: x.order, default=None)
                if victim is None or victim is s or (s.state == "running" and victim.order < s.order):
                    if s.state == "running":
                        self._preempt(s)
                    return False
                self._preempt(victim)

    def _preempt(self, s: _Seq) -> None:
        """Take s's pages back; it waits again (first in line) with its tokens, to be recomputed."""
        if s.state == "running":
            self.running.remove(s.id)
        self._free(s)
        self.stats.preemptions += 1
        if s.state == "running":
            s.state = "waiting"
            self.waiting.appendleft(s.id)
        # a paused sequence stays paused; its extension (or finish) recomputes its cache

    # -- decode ------------------------------------------------------------------------------------
    def _decode_window(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        rows = [self.seqs[i] for i in self.running]
        k = min(self.sync_every, max(s.remaining(self.max_seq_len) for s in rows))
        # pages for the window: a row feeds positions up to (length - 1) + min(k - 1, remaining)
        for s in sorted(rows, key=lambda s: s.order):   # the oldest first; the youngest give way
            if s.state == "running":
                self._pages(s, s.length - 1 + min(k, s.remaining(self.max_seq_len) + 1), preempt=True)
        rows = [self.seqs[i] for i in self.running]   # preemption may have taken some
        if not rows:
            return
        self._note_pages()
        B = len(rows)
        pool, dev = self.cache.pool, self.device
        W = max(len(pool.tables[s.id]) for s in rows)
        Bp, Wp = B, W
        if self.static:   # fixed shapes per bucket
            Bp = min(_pow2(B), max(self.max_batch_size, B))
            Wp = min(_pow2(W), max(pool.pages_for(self.max_seq_len), W))
        tables = torch.full((Bp, Wp), self.scratch, dtype=torch.long)
        for i, s in enumerate(rows):
            t = pool.tables[s.id]
            tables[i, :len(t)] = torch.tensor(t)
        pad = Bp - B
        nstop = max(1, max(len(s.stop_ids) for s in rows))
        stops = torch.full((Bp, nstop), -1, dtype=torch.long)
        for i, s in enumerate(rows):
            if s.stop_ids:
                stops[i, :len(s.stop_ids)] = torch.tensor(s.stop_ids)
        ids = torch.tensor([s.tokens[-1] for s in rows] + [0] * pad, device=dev)
        pos = torch.tensor([s.length - 1 for s in rows] + [0] * pad, device=dev)
        counter = torch.tensor([s.n_sampled for s in rows] + [0] * pad, device=dev)
        limit = torch.tensor([s.n_sampled + s.remaining(self.max_seq_len) for s in rows] + [0] * pad, device=dev)
        done = torch.tensor([False] * B + [True] * pad, device=dev)
        params = [s.params for s in rows] + [_PAD_PARAMS] * pad
        rp = RowParams.build(params, [s.key for s in rows] + [0] * pad, self.vocab_size, dev)
        tables, stops = tables.to(dev), stops.to(dev)
        attn_len = Wp * self.page_size if self.static else min(W * self.page_size, max(s.length for s in rows) - 1 + k)
        out_tok, out_lp = [], []
        with torch._dynamo.config.patch(recompile_limit=max(8, self._buckets)):
            for _ in range(k):
                ids, pos, counter, done, tok, lp = self._step_fn(ids, pos, counter, done, limit, stops, tables, rp,
                                                                 attn_len)
                out_tok.append(tok)
                out_lp.append(lp)
        got = torch.cat([torch.stack(out_tok, 1).double(), torch.stack(out_lp, 1).double()], 1)[:B].tolist()
        self.stats.decode_steps += k
        self.stats.row_steps += k * B
        self.stats.peak_rows = max(self.stats.peak_rows, B)
        self.stats.host_reads += 1
        self.stats.decode_s += time.perf_counter() - t0
        for s, row in zip(rows, got):
            new_t, new_lp = [], []
            for t, lp in zip(row[:k], row[k:]):
                if t < 0:
                    break
                new_t.append(int(t))
                new_lp.append(lp)
                if self._accept(s, int(t), lp):
                    break   # tokens past a stop (a stop string the device cannot see) are rolled back
            s.cached = s.length - 1
            self._settle(s, new_t, new_lp, events)
        self.running = [s.id for s in rows if s.state == "running"]

    def _decode_one(self, ids, pos, counter, done, limit, stops, tables, rp: RowParams, attn_len: int):
        """One decode step on the device: feed ids at pos [B], draw, detect stops; finished rows are
        frozen and emit -1. Returns (ids, pos, counter, done, token, logprob) for the next step."""
        model = self.forward_model
        h = model(ids[:, None], position_ids=pos[:, None], cache=self.cache, slots=tables, attn_len=attn_len,
                  return_hidden=True, check_inputs=False)
        logits = model.lm_head(h[:, -1]).float()
        tok, lp = draw(logits, rp, counter)
        live = ~done
        tok = torch.where(live, tok, torch.full_like(tok, -1))
        counter = counter + live.long()
        hit = (tok[:, None] == stops).any(-1) | (counter >= limit)
        ids = torch.where(live, tok, ids)
        pos = pos + live.long()
        return ids, pos, counter, done | (live & hit), tok, lp


def compile_by_default(config, device: torch.device) -> bool:
    """compile=None (auto): the compiled decode step on the CPU for models at least 512 wide, where
    bench/sampler.py measured it to win (a 100M Qwen2, 768 wide: about 0.75-0.85x the eager step
    at batch 1, 8 and 32, for a warm-up of about 30 s per batch bucket from a cold cache; tiny
    models would pay the warm-up for nothing). Off on CUDA until bench/gpu_check.sh measures it."""
    return device.type == "cpu" and getattr(config, "hidden_size", 0) >= 512


_PAD_PARAMS = SamplingParams(temperature=0.0)   # the rows padding a compiled step's batch


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
