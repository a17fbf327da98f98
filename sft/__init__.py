"""Supervised fine-tuning (pretraining the tiny base, the cold start, distillation), one loop.

    sft.packing   documents with next-token targets, packing with per-document positions and
                  cu_seqlens, padding, over-long policies
    sft.data      rows -> documents: raw text (pretrain) or chat-rendered conversations with
                  assistant-only targets (sft), EOS included
    sft.loop      train_sft (torchrun train.py --stage pretrain|sft)
"""
