"""Packed sequences: one row of 3 documents with cu_seqlens and restarting positions gives the same
logits and gradients as three separate forwards (dense GQA and MLA+MoE). (The MTP loss over packed
documents: tests/model/test_mtp.py.)"""
import pytest
import torch

from tests.model.conftest import random_model, tiny_config

LENGTHS = (6, 1, 9)


def _packed(vocab):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(docs)[None]                                                  # [1, total]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]                    # restarts per document
    return docs, ids, cu, pos


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "deepseek_v3-moe"])
def test_packed_forward_equals_separate_forwards(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=3)
    docs, ids, cu, pos = _packed(config.vocab_size)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, cu_seqlens=cu)[0]                  # [total, V]
        default_pos = model(ids, cu_seqlens=cu)[0]                               # positions derived from cu
        separate = torch.cat([model(d[None])[0] for d in docs])
        unpacked = model(ids)[0]                                                 # one long document
    assert (packed - separate).abs().max().item() <= 1e-5
    assert torch.equal(packed, default_pos)
    # without cu_seqlens the later documents see the earlier ones: the mask matters
    assert (unpacked[LENGTHS[0]:] - separate[LENGTHS[0]:]).abs().max().item() > 1e-3


def test_packed_gradients_equal_separate_gradients():
    config = tiny_config("qwen2")
    model = random_model(config, seed=4)
    docs, ids, cu, pos = _packed(config.vocab_size)
    model.zero_grad()
    model(ids, position_ids=pos, cu_seqlens=cu).square().mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(LENGTHS)
    for d in docs:  # the packed mean over total tokens is the sum of per-document sums / total
        (model(d[None]).square().sum() / (total * config.vocab_size)).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-6), n


def test_packed_input_errors():
    config = tiny_config("qwen2")
    model = random_model(config)
    _, ids, cu, _ = _packed(config.vocab_size)
    with pytest.raises(ValueError, match=r"ending at total = 15; got input_ids \(1, 15\), cu_seqlens \[0, 6, 7, 16\]"):
        model(ids[:, :-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"need input_ids of shape \[1, total\]"):
        model(ids.expand(2, -1), cu_seqlens=cu)
