"""Data layer: tokenizer (over `tokenizers`), chat templates, JSONL/Parquet data sets with resumable
iteration, and the synthetic verifiable tasks of the CPU recipe."""
