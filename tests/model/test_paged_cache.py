"""Paged KV cache (model/paged_cache.py): prefill + decode through pages equals full recomputes
(GQA and MLA + MoE, pages crossed mid-prompt and mid-decode, stale pages ignored); forks share a
prompt's full pages and copy its partly filled last one; the pool's counts and errors."""
import pytest
import torch

from model.paged_cache import OutOfPages, PagedKVCache, PagePool
from tests.model.conftest import random_model, tiny_config

TOL = 1e-5
KINDS = ["qwen2", "qwen3", "deepseek_v3", "deepseek_v3-moe", "qwen3_moe"]


def _last_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


def _cache(model, pages=32, page_size=4, max_seq_len=40):
    return PagedKVCache(model.config, num_pages=pages, page_size=page_size, max_seq_len=max_seq_len,
                        max_batch_size=8)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_through_pages_equals_recompute(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=5)
    g = torch.Generator().manual_seed(0)
    cache = _cache(model)
    # garbage first, in pages that the real sequences then reuse without clearing
    cache.pool.ensure("junk", 40)
    with torch.no_grad():
        junk = torch.randint(0, config.vocab_size, (1, 40), generator=g)
        model(junk, torch.arange(40)[None], cache=cache, slots=cache.block_table(["junk"]))
    cache.pool.free("junk")
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (6, 9, 1)]
    seqs = [list(p) for p in prompts]
    names = ["a", "b", "c"]
    for name, p in zip(names, prompts):
        cache.pool.ensure(name, len(p) + 7)          # pages for the prompt and 7 decoded tokens
    T = max(map(len, prompts))
    ids = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    table = cache.block_table(names)
    with torch.no_grad():
        logits = model(ids, torch.arange(T).expand(3, T), cache=cache, slots=table)
    for i, s in enumerate(seqs):
        assert (logits[i, len(s) - 1] - _last_logits(model, s)).abs().max().item() <= TOL
    nxt = [int(logits[i, len(p) - 1].argmax()) for i, p in enumerate(prompts)]
    lengths = torch.tensor([len(p) for p in prompts])
    for _ in range(6):
        for i in range(3):
            seqs[i].append(nxt[i])
        with torch.no_grad():
            out = model(torch.tensor(nxt)[:, None], lengths[:, None], cache=cache, slots=table,
                        attn_len=int(lengths.max()) + 1)[:, 0]
        for i, s in enumerate(seqs):
            err = (out[i] - _last_logits(model, s)).abs().max().item()
            assert err <= TOL, f"{kind} row {i} at length {len(s)}: {err:.2e}"
        lengths += 1
        nxt = out.argmax(-1).tolist()


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_forks_share_full_prompt_pages_and_copy_the_last_one(kind):
    config = tiny_config(kind)
    model = random_model(config, seed=6)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (10,), generator=g).tolist()   # 2 full pages of 4 + 2
    cache = _cache(model)
    pool = cache.pool
    pool.ensure("p", len(prompt))
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(10)[None], cache=cache, slots=cache.block_table(["p"]))
    first = int(logits[0, -1].argmax())
    samples = ["s0", "s1", "s2"]
    for s in samples:
        pool.fork("p", s, len(prompt))
    pool.free("p")
    cache.apply_copies()
    full = pool.tables["s0"][:2]
    assert all(pool.tables[s][:2] == full for s in samples) and all(pool.refcount[p] == 3 for p in full)
    lasts = [pool.tables[s][2] for s in samples]
    assert len(set(lasts)) == 3 and all(pool.refcount[p] == 1 for p in lasts)
    assert pool.free_pages == pool.num_pages - 2 - 3     # the prompt's own last page went back
    # each sample continues differently from the shared prompt
    seqs = [prompt + [first], prompt + [(first + 1) % config.vocab_size], prompt + [(first + 2) % config.vocab_size]]
    for s in samples:
        pool.ensure(s, 14)
    table = cache.block_table(samples)
    pos = torch.full((3, 1), 10)
    for _ in range(4):
        with torch.no_grad():
            out = model(torch.tensor([q[-1] for q in seqs])[:, None], pos, cache=cache, slots=table,
                        attn_len=int(pos.max()) + 1)[:, 0]
        for i, q in enumerate(seqs):
            assert (out[i] - _last_logits(model, q)).abs().max().item() <= TOL, (kind, i, len(q))
        for i, q in enumerate(seqs):
            q.append(int(out[i].argmax()))
        pos += 1
    for s in samples:
        pool.free(s)
    assert pool.free_pages == pool.num_pages and not any(pool.refcount)


def test_pool_counts_and_errors():
    pool = PagePool(num_pages=5, page_size=4)
    assert pool.ensure("a", 9) == [0, 1, 2] and pool.free_pages == 2
    assert pool.ensure("a", 12) == [0, 1, 2]                      # still covered: nothing taken
    with pytest.raises(OutOfPages, match="3 pages needed, 2 free of 5"):
        pool.ensure("b", 12)
    assert "b" in pool.tables and pool.tables["b"] == [] and pool.free_pages == 2   # nothing changed
    pool.fork("a", "c", 8)                                         # two full pages, no copy
    assert pool.tables["c"] == [0, 1] and pool.copies == [] and pool.refcount[:3] == [2, 2, 1]
    pool.free("a")
    assert pool.refcount[:3] == [1, 1, 0] and pool.free_pages == 3
    with pytest.raises(ValueError, match="already holds pages"):
        pool.fork("c", "c", 4)
    with pytest.raises(ValueError, match="does not hold 12 positions"):
        pool.fork("c", "d", 12)
    with pytest.raises(ValueError, match="num_pages and page_size"):
        PagePool(0, 4)


def test_bad_block_tables_are_refused_by_name():
    model = random_model(tiny_config("qwen2"), seed=7)
    cache = _cache(model, pages=4, page_size=4, max_seq_len=16)
    ids = torch.zeros(2, 3, dtype=torch.long)
    pos = torch.arange(3).expand(2, 3)
    with pytest.raises(ValueError, match=r"block tables \[B = 2, W\]"):
        model(ids, pos, cache=cache, slots=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="position 5 does not fit the block tables"):
        model(ids, pos + 3, cache=cache, slots=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="span pages 0..9; the pool has 4"):
        model(ids, pos, cache=cache, slots=torch.tensor([[0], [9]]))
