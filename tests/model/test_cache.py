"""KV cache: prefill + decode through the cache equals full recomputes (GQA and MLA, prompts of
different lengths in different slots, stale entries ignored), copy_slots for shared prompts, the
sizes, errors, and a decode step that compiles with fullgraph=True."""
import pytest
import torch

from model.cache import KVCache
from tests.model.conftest import random_model, tiny_config

TOL = 1e-5
KINDS = ["qwen2", "qwen3", "deepseek_v3", "deepseek_v3-moe", "qwen3_moe"]


def _last_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_equals_recompute(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (4, 9, 1)]
    slots = torch.tensor([2, 0, 3])  # rows go to non-trivial slots; slot 1 stays unused
    cache = model.make_cache(max_batch_size=4, max_seq_len=24)
    # leave garbage in the cache first: a slot reused without clearing must not see it
    with torch.no_grad():
        junk = torch.randint(0, config.vocab_size, (3, 20), generator=g)
        model(junk, torch.arange(20).expand(3, 20), cache=cache, slots=slots)
    # one right-padded prefill call: pads land beyond each prompt and are overwritten by the decode
    T = max(map(len, prompts))
    ids = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    with torch.no_grad():
        logits = model(ids, torch.arange(T).expand(3, T), cache=cache, slots=slots)
    seqs = [list(p) for p in prompts]
    lengths = torch.tensor([len(p) for p in prompts])
    nxt = [int(logits[i, len(p) - 1].argmax()) for i, p in enumerate(prompts)]
    for i, s in enumerate(seqs):
        assert (logits[i, len(s) - 1] - _last_logits(model, s)).abs().max().item() <= TOL
    for _ in range(5):  # decode: every row at its own position
        for i in range(3):
            seqs[i].append(nxt[i])
        with torch.no_grad():
            out = model(torch.tensor(nxt)[:, None], lengths[:, None], cache=cache, slots=slots)[:, 0]  # [3, V]
        for i, s in enumerate(seqs):
            err = (out[i] - _last_logits(model, s)).abs().max().item()
            assert err <= TOL, f"{kind} row {i} at length {len(s)}: {err:.2e}"
        lengths += 1
        nxt = out.argmax(-1).tolist()


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_copy_slots_then_different_continuations(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=6)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (7,), generator=g).tolist()
    cache = model.make_cache(max_batch_size=5, max_seq_len=16)
    with torch.no_grad():
        model(torch.tensor([prompt]), torch.arange(7)[None], cache=cache, slots=torch.tensor([4]))
    cache.copy_slots(4, torch.tensor([0, 1, 3]), length=7)
    slots = torch.tensor([0, 1, 3])
    seqs = [list(prompt) for _ in range(3)]
    nxt = [5, 17, 200]  # a different token in each copy
    for step in range(3):
        for i in range(3):
            seqs[i].append(nxt[i])
        pos = torch.full((3, 1), 7 + step)
        with torch.no_grad():
            out = model(torch.tensor(nxt)[:, None], pos, cache=cache, slots=slots)[:, 0]
        for i, s in enumerate(seqs):
            assert (out[i] - _last_logits(model, s)).abs().max().item() <= TOL
        nxt = out.argmax(-1).tolist()
    # the source slot is untouched by its copies' decoding
    with torch.no_grad():
        again = model(torch.tensor([[9]]), torch.tensor([[7]]), cache=cache, slots=torch.tensor([4]))[0, 0]
    assert (again - _last_logits(model, prompt + [9])).abs().max().item() <= TOL


def test_attn_len_limits_the_attended_positions():
    config = tiny_config("qwen2")
    model = random_model(config, seed=7)
    seq = torch.randint(0, config.vocab_size, (6,), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(max_batch_size=1, max_seq_len=64)
    with torch.no_grad():
        full = model(seq[None], torch.arange(6)[None], cache=cache)
        short = model(seq[None], torch.arange(6)[None], cache=cache, attn_len=8)
        ref = model(seq[None])
    assert (full - ref).abs().max().item() <= TOL and (short - ref).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="attn_len 65 is outside 1..max_seq_len"):
        model(seq[None], torch.arange(6)[None], cache=cache, attn_len=65)


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_default_slots_are_the_first_rows(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=12)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(5).expand(2, 5)
    a, b = model.make_cache(3, 8), model.make_cache(3, 8)
    with torch.no_grad():
        la = model(ids, pos, cache=a)                                  # slots=None: rows are slots 0, 1
        lb = model(ids, pos, cache=b, slots=torch.tensor([0, 1]))
        da = model(ids[:, :1], torch.full((2, 1), 5), cache=a)
        db = model(ids[:, :1], torch.full((2, 1), 5), cache=b, slots=torch.tensor([0, 1]))
    assert torch.equal(la, lb) and torch.equal(da, db)
    for x, y in zip(a.layers[0], b.layers[0]):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="batch 4 exceeds the cache's max_batch_size 3"):
        model(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long), cache=a)


def test_sizes():
    gqa = tiny_config("qwen2")  # 2 layers, 2 kv heads of 12 dims, k and v
    cache = KVCache(gqa, max_batch_size=3, max_seq_len=10, dtype=torch.float32)
    assert cache.bytes_per_token == 2 * 2 * 2 * 12 * 4
    assert cache.nbytes == cache.bytes_per_token * 3 * 10
    mla = tiny_config("deepseek_v3")  # 2 layers, latent 20 + rope key 6, nothing per head
    cache = KVCache(mla, max_batch_size=3, max_seq_len=10, dtype=torch.bfloat16)
    assert cache.bytes_per_token == 2 * (20 + 6) * 2
    assert cache.nbytes == cache.bytes_per_token * 30
    model = random_model(gqa)
    made = model.make_cache(2, 8)
    assert made.dtype == torch.float32 and made.layers[0][0].shape == (2, 8, 2, 12)


def test_cache_input_errors():
    model = random_model(tiny_config("qwen2"))
    cache = model.make_cache(max_batch_size=2, max_seq_len=8)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="needs position_ids"):
        model(ids, cache=cache)
    with pytest.raises(ValueError, match=r"position 8 does not fit the cache \(max_seq_len 8\)"):
        model(ids, torch.tensor([[6, 7, 8]]), cache=cache)
    with pytest.raises(ValueError, match="slots span 2..2; the cache has max_batch_size 2"):
        model(ids, torch.tensor([[0, 1, 2]]), cache=cache, slots=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"slots must be \[B\] = \[1\], got \(2,\)"):
        model(ids, torch.tensor([[0, 1, 2]]), cache=cache, slots=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model(ids, torch.tensor([[0, 1, 2]]), cache=cache, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="copy_slots: length 9"):
        cache.copy_slots(0, [1], 9)


# MLA's absorbed decode compiles too; it is marked slow only to keep CI time down (compiling takes
# 20-40 s on 2 cores). MoE layers do not compile fullgraph: their dispatch reads per-expert counts.
@pytest.mark.parametrize("kind", ["qwen2", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_decode_step_compiles_fullgraph(kind):
    torch._dynamo.reset()
    config = tiny_config(kind, num_hidden_layers=1)
    model = random_model(config, seed=8)
    cache = model.make_cache(max_batch_size=2, max_seq_len=16)
    slots = torch.tensor([1, 0])
    prompt = torch.randint(0, config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(prompt, torch.arange(3).expand(2, 3), cache=cache, slots=slots)

    def decode(ids, pos):  # ids, pos [B, 1] -> next-token logits [B, V]
        return model(ids, pos, cache=cache, slots=slots)[:, -1]

    step = torch.compile(decode, fullgraph=True, dynamic=False)
    seqs = prompt.tolist()
    nxt = logits[:, -1].argmax(-1)
    with torch.no_grad():
        for p in range(3, 6):
            for i in range(2):
                seqs[i].append(int(nxt[i]))
            out = step(nxt[:, None], torch.full((2, 1), p))
            for i in range(2):
                assert (out[i] - _last_logits(model, seqs[i])).abs().max().item() <= TOL
            nxt = out.argmax(-1)
