import pytest
import torch

from sft.packing import IGNORE, Document, fit_lengths, pack, pad_batch, split_documents, targets_of


def doc(ids, train=None):
    return Document(list(ids), list(train) if train is not None else [False] + [True] * (len(ids) - 1))


def test_targets_shift_and_mask():
    d = Document([5, 6, 7, 8], [False, False, True, True])
    # position t predicts ids[t+1] when train[t+1]; the last position predicts nothing
    assert targets_of(d) == [IGNORE, 7, 8, IGNORE]


def test_pack_rows_positions_and_cu_seqlens():
    docs = [doc([1, 2, 3]), doc([4, 5]), doc([6, 7, 8, 9]), doc([10])]
    b = pack(docs, seq_len=6, pad_id=0)
    # next-fit: [1,2,3,4,5] | [6,7,8,9,10]
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert [c.tolist() for c in b.cu_seqlens] == [[0, 3, 5, 6], [0, 4, 5, 6]]
    # no target crosses a document boundary; the single-token doc has none
    assert b.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE], [7, 8, 9, IGNORE, IGNORE, IGNORE]]
    assert b.num_targets == 2 + 1 + 3
    assert b.flat_cu_seqlens().tolist() == [0, 3, 5, 6, 10, 11, 12]


def test_pack_exact_fit_has_no_padding_segment():
    b = pack([doc([1, 2]), doc([3, 4])], seq_len=4)
    assert [c.tolist() for c in b.cu_seqlens] == [[0, 2, 4]]


def test_pad_batch():
    b = pad_batch([doc([1, 2, 3]), doc([4, 5])], pad_id=9)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert b.targets.tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert b.cu_seqlens is None


def test_overlong_policies_are_counted():
    docs = [doc(range(1, 9)), doc([1, 2]), Document([1, 2], [True, False])]
    kept, rep = fit_lengths(docs, 4, "drop")
    assert (rep.kept, rep.dropped, rep.truncated, rep.empty) == (1, 1, 0, 1)
    kept, rep = fit_lengths(docs, 4, "truncate")
    assert (rep.kept, rep.truncated) == (2, 1) and kept[0].ids == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="document 0 has 8 tokens, more than seq_len 4"):
        fit_lengths(docs, 4, "error")


@pytest.mark.parametrize("n,parts", [(8, 4), (5, 4), (4, 4), (9, 2), (1, 1)])
def test_split_documents_contiguous_nonempty(n, parts):
    docs = [doc(range(1, 2 + (7 * i) % 5)) for i in range(n)]
    groups = split_documents(docs, parts)
    assert len(groups) == parts and all(groups)
    assert [d for g in groups for d in g] == docs


def test_documents_only_drops_padding_tails():
    docs = [doc([1, 2, 3]), doc([4, 5]), doc([6, 7, 8, 9]), doc([10])]
    b = pack(docs, seq_len=6, pad_id=0)
    ids, pos, targets, cu = b.documents_only()
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]
    assert cu.tolist() == [0, 3, 5, 9, 10] and cu.dtype == torch.int32
    assert targets.tolist() == [2, 3, IGNORE, 5, IGNORE, 7, 8, 9, IGNORE, IGNORE]
    # an exactly full row has no padding segment to drop
    full = pack([doc([1, 2]), doc([3, 4])], seq_len=4)
    assert full.documents_only()[3].tolist() == [0, 2, 4]


def test_packed_batch_carries_max_seqlen_on_the_host(monkeypatch):
    docs = [doc([1, 2, 3]), doc([4, 5]), doc([6, 7, 8, 9]), doc([10])]
    b = pack(docs, seq_len=6)
    assert b.doc_lengths == [[3, 2], [4, 1]]
    assert b.max_seqlen == 4 and type(b.max_seqlen) is int        # the padding tails (1 token each) are no documents
    assert pack([doc([1, 2]), doc([3, 4, 5])], seq_len=10).max_seqlen == 3  # though the tail of 5 is longer
    assert pad_batch(docs).max_seqlen is None
    moved = b.to("cpu")
    assert moved.max_seqlen == 4
    # documents_only's cu_seqlens come from those host lengths: no tensor is read back (a sync on a GPU)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("documents_only read a tensor back"))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("documents_only read a tensor back"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("documents_only read a tensor back"))
    ids, pos, targets, cu = moved.documents_only()
    monkeypatch.undo()
    assert cu.tolist() == [0, 3, 5, 9, 10] and ids.shape == (1, 10)
    assert (cu[1:] - cu[:-1]).max().item() == b.max_seqlen
