"""In-process KV-cached sampler over the rollout engine: a paged cache (MLA latent pages for
DeepSeek-V3 models, k/v per KV head for GQA) whose prompt pages a request's samples share,
continuous batching, pause / extend / resume, a device-side decode loop, exact per-token logprobs.
See sampling/sampler.py and sampling/engine.py.

    from sampling import Sampler, SamplingParams
    s = Sampler(model, max_batch_size=64, max_seq_len=4096, tokenizer=tok)
    outs = s.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=0))
    outs[i][j]  # Completion(token_ids, logprobs, finish_reason, text)
"""
from sampling.engine import Engine, Event
from sampling.sampler import Completion, Sampler, SamplerStats, SamplingParams, engine_options

__all__ = ["Sampler", "SamplingParams", "Completion", "SamplerStats", "Engine", "Event", "engine_options"]
