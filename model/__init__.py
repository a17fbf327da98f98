"""DeepSeek-V3 (MLA, DeepSeekMoE, MTP, YaRN) and dense Qwen2/Llama/Qwen3 networks in plain PyTorch,
Hugging Face checkpoint I/O and FSDP wrapping.

Public API:

    from model import ModelConfig, Transformer, load_pretrained, save_pretrained
    m = Transformer(ModelConfig.from_preset("tiny"))        # random init; or load_pretrained(dir)
    logits = m(input_ids)                                    # [B, T] -> [B, T, V]
    h = m.forward_hidden(input_ids, position_ids=None, cu_seqlens=None)   # [B, T, D], final norm applied
    m.output_weight                                          # [V, D] (lm_head, or the tied embedding)
    cache = m.make_cache(max_batch_size, max_seq_len)        # static KV cache (model/cache.py)
    logits = m(ids, position_ids, cache=cache, slots=slots)  # KV-cached prefill / decode
    h, (mtp, metrics) = m(input_ids, return_hidden=True, with_mtp_loss=True)  # + weighted MTP loss
    from model.stats import count_params, flops_per_token   # ParamCount; 6N + attention FLOPs

Files: config.py (ModelConfig), rope.py, layers.py (RMSNorm, MLP), attention.py (GQA, MLA),
moe.py (DeepSeekMoE), cache.py (KVCache), mtp.py, transformer.py (Block, Transformer),
checkpoint.py (HF folders), stats.py (parameter and FLOP counts), parallel.py (FSDP2), build.py
(the model and tokenizer a training stage starts from).
"""
from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]
