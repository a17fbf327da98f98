"""Turning documents into training batches: loss masks, packing into token budgets, padding.

A document is a token sequence with a per-token flag saying whether the model is trained to
predict that token (`Document(ids, train)`): for a conversation the assistant's tokens (the
reasoning, the answer and the end-of-turn/EOS token: masking EOS is the known cause of distilled
models that never stop), for raw text (pretraining) every token after the first.

Next-token targets: position t of a document predicts ids[t + 1], so the target at t is
ids[t + 1] when train[t + 1], else IGNORE; the last position of every document has no target (it
must never predict the first token of the next packed document).

Packing (`pack`) fills rows of exactly `seq_len` tokens with whole documents in order (next-fit:
a document that does not fit starts a new row; the tail of a row is padding). In a packed row
each document keeps its own positions (position ids restart at 0) and attends only to itself: the
row's `cu_seqlens` (int32, cumulative document lengths, padding as one more segment) go to the
attention kernel's varlen path. The model runs `Batch.documents_only()`: the rows end to end
without their padding tails, which carry no target and would only cost work. The batch keeps its
documents' lengths on the host (`doc_lengths`), so `Batch.max_seqlen`, the longest document, is a
Python int the attention kernels take instead of reading cu_seqlens back from the GPU in every
layer. Without packing (`pad_batch`) each document is its own row, right-padded to the longest in
the batch (causal attention makes right padding harmless).

Over-long documents (more than seq_len tokens) are dropped or truncated to seq_len, by flag; the
counts are returned so the caller reports them (never a silent change of the data).

Letters: B rows, L tokens per row, N documents.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100  # target id that contributes no loss


@dataclass
class Document:
    ids: list[int]
    train: list[bool]  # train[t]: ids[t] is a target (predicted from ids[:t])

    def __post_init__(self):
        assert len(self.ids) == len(self.train), f"{len(self.ids)} ids but {len(self.train)} mask flags"

    @property
    def num_targets(self) -> int:
        return sum(self.train[1:])


@dataclass
class Batch:
    """input_ids, targets, position_ids: [B, L] int64; cu_seqlens: per row, int32 [segments + 1]
    (None when rows are not packed). targets are IGNORE where no loss is taken. doc_lengths: packed,
    each row's documents' token counts, host ints (the padding tail is not a document)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: list[torch.Tensor] | None = None
    num_docs: int = 0
    row_used: list[int] | None = None  # packed: tokens of documents in each row (the rest is padding)
    doc_lengths: list[list[int]] | None = None

    @property
    def max_seqlen(self) -> int | None:
        """The longest document of a packed batch (a Python int; None when not packed): the
        max_seqlen of documents_only()'s cu_seqlens. (flat_cu_seqlens() also has the padding tails
        as segments, which can be longer.)"""
        if self.doc_lengths is None:
            return None
        return max((n for row in self.doc_lengths for n in row), default=0)

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def flat_cu_seqlens(self) -> torch.Tensor:
        """The rows laid end to end as one [1, B*L] sequence: cumulative segment lengths over all rows."""
        assert self.cu_seqlens is not None, "flat_cu_seqlens needs a packed batch"
        L = self.input_ids.shape[1]
        parts = [self.cu_seqlens[0]] + [cu[1:] + i * L for i, cu in enumerate(self.cu_seqlens) if i > 0]
        return torch.cat(parts).to(torch.int32)

    def documents_only(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed rows laid end to end without their padding tails, what the model needs to run:
        (input_ids [1, N], position_ids [1, N], targets [N], cu_seqlens int32 [docs + 1]) with N the
        documents' tokens. Padding has no target and attends only to itself, so leaving it out
        changes no loss or gradient; it only saves the work (a third of a 2048-token row's slots
        for documents of 16-512 tokens)."""
        assert self.doc_lengths is not None and self.row_used is not None, "documents_only needs a packed batch"
        L = self.input_ids.shape[1]
        real = torch.arange(L, device=self.input_ids.device)[None, :] < torch.tensor(self.row_used, device=self.input_ids.device)[:, None]
        bounds = [0]
        for n in (n for row in self.doc_lengths for n in row):  # host ints: nothing read back from the device
            bounds.append(bounds[-1] + n)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=self.input_ids.device)
        return self.input_ids[real][None], self.position_ids[real][None], self.targets[real], cu_seqlens

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.targets.to(device), self.position_ids.to(device),
                     None if self.cu_seqlens is None else [c.to(device) for c in self.cu_seqlens], self.num_docs,
                     self.row_used, self.doc_lengths)


@dataclass
class LengthReport:
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    empty: int = 0  # documents with no target token (nothing to learn; skipped)
    messages: list[str] = field(default_factory=list)


def targets_of(doc: Document) -> list[int]:
    """Per-position next-token targets of one document (IGNORE where no loss)."""
    out = [doc.ids[t + 1] if doc.train[t + 1] else IGNORE for t in range(len(doc.ids) - 1)]
    return out + [IGNORE]


def fit_lengths(docs: list[Document], seq_len: int, overlong: str = "drop") -> tuple[list[Document], LengthReport]:
    """Apply the over-long policy ("drop" | "truncate" | "error") and skip documents without targets."""
    if overlong not in ("drop", "truncate", "error"):
        raise ValueError(f"overlong policy {overlong!r}: expected 'drop', 'truncate' or 'error'")
    report, kept = LengthReport(), []
    for i, d in enumerate(docs):
        if len(d.ids) > seq_len:
            if overlong == "error":
                raise ValueError(f"document {i} has {len(d.ids)} tokens, more than seq_len {seq_len} "
                                 f"(use --overlong drop or truncate)")
            if overlong == "drop":
                report.dropped += 1
                continue
            d = Document(d.ids[:seq_len], d.train[:seq_len])
            report.truncated += 1
        if d.num_targets == 0:
            report.empty += 1
            continue
        kept.append(d)
    report.kept = len(kept)
    return kept, report


def pack(docs: list[Document], seq_len: int, pad_id: int = 0) -> Batch:
    """Pack documents (each at most seq_len tokens) into rows of seq_len tokens, next-fit, in order."""
    rows: list[list[Document]] = [[]]
    used = 0
    for d in docs:
        assert 0 < len(d.ids) <= seq_len, f"document of {len(d.ids)} tokens does not fit seq_len {seq_len}"
        if used + len(d.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(d)
        used += len(d.ids)
    if not rows[-1]:
        rows.pop()
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    cu_seqlens, row_used, doc_lengths = [], [], []
    for b, row in enumerate(rows):
        start, bounds = 0, [0]
        for d in row:
            n = len(d.ids)
            input_ids[b, start:start + n] = torch.tensor(d.ids)
            targets[b, start:start + n] = torch.tensor(targets_of(d))
            position_ids[b, start:start + n] = torch.arange(n)
            start += n
            bounds.append(start)
        if start < seq_len:  # the padding tail is a segment of its own, attending only to itself
            position_ids[b, start:] = torch.arange(seq_len - start)
            bounds.append(seq_len)
        cu_seqlens.append(torch.tensor(bounds, dtype=torch.int32))
        row_used.append(start)
        doc_lengths.append([len(d.ids) for d in row])
    return Batch(input_ids, targets, position_ids, cu_seqlens, num_docs=len(docs), row_used=row_used,
                 doc_lengths=doc_lengths)


def pad_batch(docs: list[Document], pad_id: int = 0) -> Batch:
    """One row per document, right-padded to the longest."""
    L = max(len(d.ids) for d in docs)
    B = len(docs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    for b, d in enumerate(docs):
        input_ids[b, :len(d.ids)] = torch.tensor(d.ids)
        targets[b, :len(d.ids)] = torch.tensor(targets_of(d))
    position_ids = torch.arange(L).expand(B, L).clone()
    return Batch(input_ids, targets, position_ids, None, num_docs=B)


def split_documents(docs: list[Document], parts: int) -> list[list[Document]]:
    """Split a step's documents into `parts` contiguous groups of near-equal token counts (micro-batches
    or ranks). Every group is non-empty when len(docs) >= parts."""
    total = sum(len(d.ids) for d in docs)
    groups, acc, k = [[] for _ in range(parts)], 0, 0
    for i, d in enumerate(docs):
        remaining_docs, remaining_groups = len(docs) - i, parts - k
        if k < parts - 1 and groups[k] and (acc >= total * (k + 1) / parts or remaining_docs <= remaining_groups - 1):
            k += 1
        groups[k].append(d)
        acc += len(d.ids)
    return groups
