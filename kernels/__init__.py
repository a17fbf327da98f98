"""Triton kernels, each with a plain-torch twin (the spec, the CPU path and the test oracle): fused token log-probs, the GRPO per-token objective, flash attention, RMSNorm.

Not built yet: the kernels issue adds token_logprobs, grpo_token_loss, flash_attention and rms_norm here.
"""
