"""Sampling as a tensor-parallel group: the N ranks that hold one model between them
(model/tensor_parallel.py) must run every forward together, so they sample one batch: the union of
their requests.

    outs = generate_as_group(sampler, prompts, params)   # this rank's prompts -> this rank's completions

Each rank passes its own requests (as many as it has; none is fine). They are gathered in rank
order, every rank adds the same requests to its engine in the same order, and since every rank
draws from the same gathered logits (the vocabulary-parallel head) with the same seeds, every
engine makes the same decisions (admission, pages, preemption, stops) and samples the same tokens:
the group decodes as one. Each rank then returns the completions of its own requests. A request
without a seed gets one on its own rank before the gather, so the group agrees on it. A bad request
on any rank fails the call on every rank (after the gather, naming the rank), instead of leaving
the others waiting in a collective. Samplers sized by each rank's own prompts agree on the longest
max_seq_len of the group (the shorter ones are resized); other settings must be equal.
"""
from __future__ import annotations

import dataclasses

import torch

from runtime.distributed import Subgroup, all_gather_object
from sampling.types import Completion, SamplingParams


def generate_as_group(sampler, prompts: list[list[int]], params: list[SamplingParams],
                      group: Subgroup) -> list[list[Completion]]:
    """sampler.generate over the union of the group's requests; this rank's completions."""
    params = [p if p.seed is not None else dataclasses.replace(p, seed=int(torch.randint(0, 2**40, (1,)).item()))
              for p in params]
    error = None
    try:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            sampler.engine.check(p, sp, where=f"prompt {i}")
    except (ValueError, TypeError) as e:
        error = str(e)
    e = sampler.engine
    shape = (e.max_batch_size, e.page_size, e.sync_every, e.static, e.compile,
             sampler._engine_options["cache_tokens"], sampler._engine_options["cache_gib"])
    parts = all_gather_object((prompts, params, error, sampler.max_seq_len, shape), group=group)
    bad = [(r, part[2]) for r, part in enumerate(parts) if part[2] is not None]
    if bad:
        r, err = bad[0]
        raise ValueError(f"tensor-parallel rank {r} of ranks {list(group.ranks)}: {err}")
    shapes = {part[4] for part in parts}
    if len(shapes) > 1:
        raise ValueError(f"the samplers of tensor-parallel ranks {list(group.ranks)} are built differently "
                         f"(max_batch_size, page_size, sync_every, static, compile, cache_tokens, cache_gib: "
                         f"{[part[4] for part in parts]}); build them with the same settings")
    longest = max(part[3] for part in parts)   # sized by each rank's own prompts: the group takes the longest
    if longest > sampler.max_seq_len:
        sampler.resize(longest)
    every_prompt = [p for part in parts for p in part[0]]
    every_param = [sp for part in parts for sp in part[1]]
    outs = sampler.generate_local(every_prompt, every_param)
    start = sum(len(part[0]) for part in parts[:group.rank])
    return outs[start:start + len(prompts)]
