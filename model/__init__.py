"""DeepSeek-V3 (MLA, DeepSeekMoE, MTP, YaRN) and dense Qwen2/Llama/Qwen3 networks in plain PyTorch, Hugging Face checkpoint I/O and FSDP wrapping.

Not built yet: the model issue adds ModelConfig, Transformer, load_pretrained and save_pretrained here.
"""
