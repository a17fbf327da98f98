"""Rows to documents: what `--stage pretrain` and `--stage sft` train on.

- pretrain: a row's `text` column (raw text), as [bos] + ids + [eos]; every token after the first
  is a target. The EOS is trained on too, so a pretrained model learns to stop.
- sft: a row's conversation (`messages`, or `prompt` + `completion`; see data.datasets
  .load_conversations), rendered with the chat template and tokenized once; the targets are the
  assistant messages' tokens, reasoning, answer and end-of-turn/EOS token included (data.chat
  .encode_chat builds that mask).

`load_documents` reads a JSONL/Parquet file into documents and reports what it dropped; errors
name the file and row.
"""
from __future__ import annotations

from data.chat import encode_chat
from data.datasets import iter_jsonl, load_conversations, read_rows
from data.tokenizer import Tokenizer
from sft.packing import Document


def text_document(tok: Tokenizer, text: str) -> Document:
    ids = tok.encode(text)
    if tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    if tok.eos_id is not None:
        ids = ids + [tok.eos_id]
    return Document(ids, [False] + [True] * (len(ids) - 1))


def conversation_document(tok: Tokenizer, messages: list[dict], template: str | None = None) -> Document:
    enc = encode_chat(tok, messages, template=template, training=True)
    return Document(enc.ids, enc.assistant_mask)


def load_documents(path, tok: Tokenizer, stage: str, template: str | None = None,
                   text_column: str = "text") -> list[Document]:
    """All documents of a data file for `stage` ('pretrain' or 'sft'), in file order."""
    if stage == "pretrain":
        docs = []
        rows = iter_jsonl(path) if str(path).endswith((".jsonl", ".json")) else read_rows(path)
        for i, row in enumerate(rows, 1):
            if text_column not in row or not isinstance(row[text_column], str):
                raise ValueError(f"{path} row {i}: pretraining needs a string column {text_column!r}; "
                                 f"the row has columns {sorted(row)}")
            docs.append(text_document(tok, row[text_column]))
        if not docs:
            raise ValueError(f"{path}: no rows")
        return docs
    if stage == "sft":
        docs = []
        for i, row in enumerate(load_conversations(path), 1):
            try:
                docs.append(conversation_document(tok, row["messages"], template))
            except ValueError as e:
                raise ValueError(f"{path} row {i}: {e}") from e
        return docs
    raise ValueError(f"stage {stage!r}: expected 'pretrain' or 'sft'")
