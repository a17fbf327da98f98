"""In-process KV-cached sampler: prefill, then decode with a static cache (MLA latent cache for
DeepSeek-V3 models, k/v per KV head for GQA), shared-prefix groups, continuous batching, exact
per-token logprobs. See sampling/sampler.py.

    from sampling import Sampler, SamplingParams
    s = Sampler(model, max_batch_size=64, max_seq_len=4096, tokenizer=tok)
    outs = s.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seed=0))
    outs[i][j]  # Completion(token_ids, logprobs, finish_reason, text)
"""
from sampling.sampler import Completion, Sampler, SamplerStats, SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion", "SamplerStats"]
