"""In-process KV-cached sampler: prefill, static-cache decode, MLA latent cache, shared-prefix groups, continuous batching, exact logprobs.

Not built yet: the sampling issue adds Sampler and SamplingParams here.
"""
