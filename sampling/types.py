"""What callers of the sampler and the rollout engine pass in and get back."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


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
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded, when the sampler has a tokenizer; without the stop token
    # 1 for a sampled token, 0 for one the caller added with Engine.extend (its logprob is 0.0);
    # None when every token was sampled
    sampled_mask: list[int] | None = None


@dataclass
class SamplerStats:
    prefill_tokens: int = 0      # tokens run through the model by prefills (prompts, extensions, recomputes)
    prefill_calls: int = 0
    decode_steps: int = 0        # decode forwards (one token for every row of the batch)
    generated_tokens: int = 0    # sampled tokens kept (rolled-back tokens past a stop string are not)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    host_reads: int = 0          # device -> host reads of sampled tokens (one per decode window)
    preemptions: int = 0         # sequences whose pages were taken back to make room (recomputed later)
    row_steps: int = 0           # sum over decode steps of the rows decoded (row_steps / decode_steps: rows in flight)
    peak_rows: int = 0           # most rows in one decode step
    peak_pages: int = 0          # most pages in use at once (the scratch page not counted)
    shared_pages: int = field(default=0)  # pages a fork took by reference instead of a copy (summed)

    @property
    def mean_rows(self) -> float:
        return self.row_steps / self.decode_steps if self.decode_steps else 0.0
