"""Supervised fine-tuning loop (pretraining the tiny base, the cold start, distillation): packing, assistant-only loss, FSDP2, checkpoints and exact resume.

Not built yet: the SFT issue adds the loop here.
"""
