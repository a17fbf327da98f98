"""Packed sequences: one row of 3 documents with cu_seqlens and restarting positions gives the same
logits and gradients as three separate forwards (dense GQA and MLA+MoE); max_seqlen (given, or found
once per forward) reaches every layer's attention, which then reads nothing back to the host.
(The MTP loss over packed documents: tests/model/test_mtp.py.)"""
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


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "deepseek_v3-moe", "qwen3_moe"])
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


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_max_seqlen_reaches_every_attention_call_which_reads_nothing_back(kind, monkeypatch):
    # the GPU path of attention (Triton, interpreted): with max_seqlen every layer's call copies
    # nothing to the host, forward or backward; without it the forward finds it once and hands it on
    import model.attention as attention
    from tests.kernels.test_max_seqlen import host_reads

    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    config = tiny_config(kind)
    model = random_model(config, seed=5)
    _, ids, cu, pos = _packed(config.vocab_size)
    model.zero_grad()
    default = model(ids, position_ids=pos, cu_seqlens=cu)
    default.square().mean().backward()
    default_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    seen, real = [], attention.flash_attention

    def guarded(*args, **kwargs):
        seen.append(kwargs.get("max_seqlen"))
        with host_reads(allowed=False):
            return real(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attention", guarded)
    for given in (None, 15):  # found by the forward's check; given (an upper bound)
        model.zero_grad()
        seen.clear()
        out = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=given)
        with host_reads(allowed=False):
            out.square().mean().backward()
        assert seen == [given or max(LENGTHS)] * config.num_hidden_layers
        assert torch.equal(out, default)
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, default_grads[n]), (given, n)
    with pytest.raises(ValueError, match="max_seqlen 8 is shorter than the longest packed document"):
        model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=8)


def test_without_max_seqlen_cu_seqlens_is_read_back_once_per_forward_not_per_layer(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or real(self))
    counts = {}
    for layers in (1, 3):
        model = random_model(tiny_config("qwen2", num_hidden_layers=layers), seed=1)
        _, ids, cu, pos = _packed(model.config.vocab_size)
        reads.clear()
        with torch.no_grad():
            model(ids, position_ids=pos, cu_seqlens=cu)
        counts[layers] = len(reads)
    assert counts[1] == counts[3] <= 2  # the forward's input checks; none in the layers
