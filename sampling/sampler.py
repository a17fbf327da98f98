"""In-process KV-cached sampler: `generate()` over the rollout engine (sampling/engine.py).

GRPO spends most of its time generating. We generate from the policy's own weights in the
training process: no second engine, no weight synchronisation.

    s = Sampler(model, max_batch_size=64, max_seq_len=4096, tokenizer=tok)
    outs = s.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=0))
    outs[i][j] -> Completion(token_ids, logprobs, finish_reason)

What generate does: every request's n samples are added to the engine, which then steps until all
have finished. The engine (see its docstring) keeps the cache in pages, prefills a prompt once for
its n samples (they share its pages), admits waiting samples as rows and pages free up (continuous
batching), decodes `sync_every` steps on the device between host reads, and preempts the youngest
sequence when the pages run out. What that means for the results:

- Seeds: each sample draws its t-th token with a uniform that is a hash of (its key, t), its key
  coming from (request seed, sample index) (sampling/draw.py): a seeded request gives the same
  completion alone or batched with others, at any sync_every and under preemption (up to the float
  rounding of batched matmuls). A request without a seed gets a random one.
- Logprobs: of each sampled token under the temperature-scaled distribution *before* top-k /
  top-p / min-p truncation, log softmax(logits / T), what GRPO's importance ratio compares with
  the trainer's recomputation; under T = 1 for greedy decoding (T = 0).
- Stops: a sample ends at a token in stop_token_ids (the token is kept: training must see EOS), at
  a stop string in its decoded text (needs the tokenizer; the tokens up to the one completing the
  string are kept, any read past it are rolled back), or after max_new_tokens ("length").
- Memory: the cache holds `cache_tokens` positions (default max_batch_size × max_seq_len) in pages,
  printed at construction; `release()` frees it between rollouts.

The decode forward runs on `decode_view(model)`: for an FSDP2 model inside model.parallel.gathered,
a plain module tree over the gathered weights, so the per-step forward runs no FSDP hooks. A
tensor-parallel share of a model (model/tensor_parallel.py, which sets `model.tp`) samples with the
other ranks of its group: each rank passes its own prompts and gets its own completions, and the
group decodes the union of their requests as one batch (sampling/group.py).
"""
from __future__ import annotations

import contextlib

import torch

from model.parallel import decode_view
from sampling.engine import PAGE_SIZE, Engine
from sampling.group import generate_as_group
from sampling.types import Completion, SamplerStats, SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion", "SamplerStats", "engine_options"]


def engine_options(args) -> dict:
    """Sampler keyword arguments from the --sampler-cache-tokens, --sampler-cache-gib,
    --sampler-sync-every and --sampler-compile flags (unset: the engine's defaults), checked:
    ValueError naming the flag."""
    tokens, gib, sync, comp = (getattr(args, f"sampler_{k}", None)
                               for k in ("cache_tokens", "cache_gib", "sync_every", "compile"))
    if tokens is not None and gib is not None:
        raise ValueError("give the KV cache budget as --sampler-cache-tokens or --sampler-cache-gib, not both")
    if tokens is not None and tokens < PAGE_SIZE:
        raise ValueError(f"--sampler-cache-tokens {tokens}: expected at least one page ({PAGE_SIZE} tokens)")
    if gib is not None and not gib > 0:
        raise ValueError(f"--sampler-cache-gib {gib}: expected > 0")
    if sync is not None and sync < 1:
        raise ValueError(f"--sampler-sync-every {sync}: expected >= 1")
    if comp not in (None, "auto", "on", "off"):
        raise ValueError(f"--sampler-compile {comp!r}: expected auto, on or off")
    return dict(cache_tokens=tokens, cache_gib=gib, sync_every=sync,
                compile={"on": True, "off": False}.get(comp))


class Sampler:
    def __init__(self, model, max_batch_size: int, max_seq_len: int, tokenizer=None, dtype=None,
                 static: bool = False, compile: bool | None = None, verbose: bool = True,
                 cache_tokens: int | None = None, page_size: int = PAGE_SIZE, sync_every: int | None = None,
                 cache_gib: float | None = None):
        self.model = model
        self.max_batch_size, self.max_seq_len, self.tokenizer = max_batch_size, max_seq_len, tokenizer
        self._engine_options = dict(tokenizer=tokenizer, dtype=dtype, cache_tokens=cache_tokens, page_size=page_size,
                                    sync_every=sync_every, static=static, compile=compile, cache_gib=cache_gib)
        self.engine = Engine(model, max_batch_size, max_seq_len, **self._engine_options)
        self.bytes_per_token, self.cache_bytes = self.engine.bytes_per_token, self.engine.cache_bytes
        self.group = getattr(model, "tp", None)   # a tensor-parallel share samples with its group
        self._view = None
        if verbose:
            e = self.engine
            print(f"sampler: KV cache {e.num_pages} pages x {page_size} positions ({e.cache_tokens} tokens, rows of "
                  f"up to {max_seq_len}) x {self.bytes_per_token} B/token = {self.cache_bytes / 2**20:.1f} MiB")

    def resize(self, max_seq_len: int) -> None:
        """Take sequences of up to max_seq_len positions from now on: the engine is rebuilt (its
        cache is allocated at the next generate; the counters carry over). Between generate calls."""
        if self.engine.seqs:
            raise RuntimeError("Sampler.resize: the engine still holds sequences")
        stats = self.engine.stats
        self.engine.release()
        self.max_seq_len = max_seq_len
        self.engine = Engine(self.model, self.max_batch_size, max_seq_len, **self._engine_options)
        self.engine.stats = stats
        self.bytes_per_token, self.cache_bytes = self.engine.bytes_per_token, self.engine.cache_bytes

    @property
    def stats(self) -> SamplerStats:
        return self.engine.stats

    @stats.setter
    def stats(self, value: SamplerStats) -> None:
        self.engine.stats = value

    @property
    def cache(self):
        return self.engine.cache

    def release(self) -> None:
        """Free the KV cache (training can use the memory); the next generate allocates it again."""
        self.engine.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[Completion]]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        if self.group is not None and self.group.size > 1:
            return generate_as_group(self, prompts, params, self.group)
        for i, (p, sp) in enumerate(zip(prompts, params)):   # every request checked before any is queued
            self.engine.check(p, sp, where=f"prompt {i}")
        return self.generate_local(prompts, params)

    @torch.no_grad()
    def generate_local(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[Completion]]:
        """generate on this rank's engine alone, requests already checked (a group's union, for
        sampling/group.py)."""
        seqs: list[list[int]] = []
        with self.driving() as engine:
            try:
                for p, sp in zip(prompts, params):
                    seqs.append(engine.add(p, sp))
                where = {s: (i, j) for i, ids in enumerate(seqs) for j, s in enumerate(ids)}
                results: list[list[Completion | None]] = [[None] * sp.n for sp in params]
                while engine.has_work():
                    for ev in engine.step():
                        if ev.kind == "finished" and ev.seq in where:
                            i, j = where[ev.seq]
                            results[i][j] = ev.completion
                            engine.pop(ev.seq)
                return results
            except BaseException:
                for s in [s for ids in seqs for s in ids]:
                    if s in engine.seqs:
                        engine.abort(s)
                raise

    @contextlib.contextmanager
    def driving(self):
        """The engine, set up to step: the model in eval mode and decode running on its hook-free
        view (restored on exit). For loops that drive the engine themselves (multi-turn rollouts:
        evaluation/tool_rollout.py); generate is one."""
        was_training = self.model.training
        self.model.eval()
        engine = self.engine
        self._view = engine.forward_model = decode_view(self.model, self._view)
        try:
            with torch.no_grad():
                yield engine
        finally:
            engine.forward_model = self.model
            self.model.train(was_training)
