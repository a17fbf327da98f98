"""paged_decode_attention: the Triton kernels (interpreter) and the torch twin against a float64
reference, the twin against the model's own paged read (PagedCacheStep.update + masked_attention),
bad input, and one compilation for every batch."""
import types

import pytest
import torch

from kernels import paged_attention as pa
from model.attention import masked_attention
from model.paged_cache import PagedCacheStep
from tests.kernels.test_compile_once import keys_by_kernel, launches  # noqa: F401  (launches: a fixture)


def reference(q, k_pages, v_pages, tables, lens, scale, v_dim=None):
    """float64, row by row and head by head, the pages gathered one position at a time."""
    B, H, _ = q.shape
    if k_pages.dim() == 3:
        k_pages = k_pages[:, :, None]                                          # [M, P, 1, C + R]
    P, Hkv = k_pages.shape[1], k_pages.shape[2]
    out = []
    for b in range(B):
        where = [(int(tables[b, p // P]), p % P) for p in range(int(lens[b]))]
        k = torch.stack([k_pages[m, s] for m, s in where]).double()            # [S_b, Hkv, Dqk]
        v = k[..., :v_dim] if v_pages is None else torch.stack([v_pages[m, s] for m, s in where]).double()
        heads = []
        for h in range(H):
            kv = h // (H // Hkv)
            p = torch.softmax(k[:, kv] @ q[b, h].double() * scale, dim=0)      # [S_b]
            heads.append(p @ v[:, kv])
        out.append(torch.stack(heads))
    return torch.stack(out)                                                    # [B, H, Dv]


def make_tables(lens, P, W, M, g):
    """Block tables [B, W] over a pool of M pages: each row's pages in random order, row 1 forked
    from row 0 (their full pages in common point at the same pages, as PagePool.fork leaves them),
    the entries past each row's pages pointing at random valid pages (other rows' included)."""
    fresh = iter(torch.randperm(M, generator=g).tolist())
    rows = []
    for b, n in enumerate(lens):
        pages = rows[0][: min(lens[0], n) // P] if b == 1 else []
        pages = pages + [next(fresh) for _ in range(-(-n // P) - len(pages))]
        rows.append(pages + torch.randint(0, M, (W - len(pages),), generator=g).tolist())
    return torch.tensor(rows, dtype=torch.long)


def make(case, dtype, seed):
    """(q, k_pages, v_pages, tables, lens, v_dim) of a case of CASES."""
    H, Hkv, dqk, dv, P, W, lens, mla = CASES[case]
    g = torch.Generator().manual_seed(seed)
    M = sum(-(-n // P) for n in lens) + 3
    q = torch.randn(len(lens), H, dqk, generator=g).to(dtype)
    if mla:  # one latent head [c_kv; k_pe], no v buffer; [M, P, C + R] as PagedKVCache keeps it
        k_pages, v_pages, v_dim = torch.randn(M, P, dqk, generator=g).to(dtype), None, dv
    else:
        k_pages = torch.randn(M, P, Hkv, dqk, generator=g).to(dtype)
        v_pages, v_dim = torch.randn(M, P, Hkv, dv, generator=g).to(dtype), None
    return q, k_pages, v_pages, make_tables(lens, P, W, M, g), torch.tensor(lens), v_dim


CASES = {
    # name: (H, Hkv, Dqk, Dv, P, W, lens, MLA form). Lengths: 1, a multiple of P, a full table,
    # rows sharing pages (row 1 forked from row 0) and rows shorter than their table
    "gqa_dh24": (4, 2, 24, 24, 4, 5, [13, 8, 1, 20], False),
    "mqa": (4, 1, 16, 32, 8, 3, [17, 16, 1], False),
    "mla_20+6": (4, 1, 26, 20, 4, 4, [9, 12, 1, 16], True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_and_twin_match_float64(case, dtype, rel_err, tol, poison):
    q, k_pages, v_pages, tables, lens, v_dim = make(case, dtype, seed=len(case) + (dtype == torch.float16))
    scale = 0.3
    ref = reference(q, k_pages, v_pages, tables, lens, scale, v_dim)
    twin = pa.paged_decode_attention_torch(q, k_pages, v_pages, tables, lens, scale, v_dim)
    # 16 positions a step over 4 splits: steps across pages, splits of one step, empty splits
    tri = pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, lens, scale, v_dim, num_splits=4, block_n=16)
    one = pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, lens, scale, v_dim, num_splits=1)
    for name, o in (("triton, 4 splits", tri), ("triton, 1 split", one), ("torch twin", twin)):
        assert o.dtype == dtype and o.shape == ref.shape
        assert rel_err(o, ref) <= tol[dtype], f"{name} vs float64: {rel_err(o, ref):.2e}"
    assert rel_err(tri, twin) <= tol[dtype]


@pytest.mark.parametrize("num_splits", [2, 3, 5, 8])
def test_long_context_over_many_splits(num_splits, rel_err, tol, poison):
    # 16 pages of 4 = 64 positions in 4 steps of 16: with 3 splits the last one sees no key at all,
    # with 5 and 8 several; the short rows leave most splits empty; int32 tables and lengths
    g = torch.Generator().manual_seed(num_splits)
    H, Hkv, D, P, W, lens = 4, 2, 24, 4, 16, [64, 1, 37, 16, 50]
    M = sum(-(-n // P) for n in lens) + 2
    q = torch.randn(len(lens), H, D, generator=g)
    k_pages, v_pages = torch.randn(M, P, Hkv, D, generator=g), torch.randn(M, P, Hkv, D, generator=g)
    tables, lens_t = make_tables(lens, P, W, M, g).int(), torch.tensor(lens, dtype=torch.int32)
    ref = reference(q, k_pages, v_pages, tables, lens_t, D ** -0.5)
    tri = pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, lens_t, num_splits=num_splits, block_n=16)
    assert rel_err(tri, ref) <= tol[torch.float32]
    assert rel_err(pa.paged_decode_attention_torch(q, k_pages, v_pages, tables, lens_t), ref) <= tol[torch.float32]


def test_default_splits_and_tiles(rel_err, tol, poison):
    # the launcher's own choice: one row over an MQA head has 1 program a split, so a table of
    # 512 positions gets 2 splits (2 SMs in the interpreter, 256 positions a split at least)
    g = torch.Generator().manual_seed(7)
    H, D, P, W, lens = 2, 16, 8, 64, [300]
    assert pa.num_splits_for(1, W * P, torch.device("cpu")) == 2
    q = torch.randn(1, H, D, generator=g).half()
    k_pages = torch.randn(W + 1, P, 1, D, generator=g).half()
    v_pages = torch.randn(W + 1, P, 1, D, generator=g).half()
    tables = make_tables(lens, P, W, W + 1, g)
    ref = reference(q, k_pages, v_pages, tables, torch.tensor(lens), D ** -0.5)
    tri = pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, torch.tensor(lens))
    assert rel_err(tri, ref) <= tol[torch.float16]


def test_num_splits_follows_host_sizes_only():
    cpu = torch.device("cpu")  # 2 SMs: 4 programs are two waves
    assert pa.num_splits_for(4, 10_000, cpu) == 1           # the rows and heads fill the machine
    assert pa.num_splits_for(1, 255, cpu) == 1               # too short to split
    assert pa.num_splits_for(1, 10_000, cpu) == 4            # enough splits for two waves
    assert pa.num_splits_for(3, 10_000, cpu) == 2
    assert pa._sm_count(cpu) == 2


def test_padding_entries_and_other_rows_do_not_change_a_row(poison):
    # entries past a row's pages name other pages, and the pool's unused pages change: no output moves
    q, k_pages, v_pages, tables, lens, _ = make("gqa_dh24", torch.float32, seed=5)
    P = k_pages.shape[1]
    other = tables.clone()
    for b, n in enumerate(lens.tolist()):
        other[b, -(-n // P):] = (other[b, -(-n // P):] + 1) % k_pages.shape[0]
    used = torch.zeros(k_pages.shape[0], dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        used[tables[b, : -(-n // P)]] = True
    k2, v2 = k_pages.clone(), v_pages.clone()
    k2[~used], v2[~used] = 1e4, -1e4
    # and within a row's last page, the offsets past its length
    for b, n in enumerate(lens.tolist()):
        if n % P:
            k2[tables[b, n // P], n % P:] = 1e4
    for fn, kw in ((pa.paged_decode_attention_triton, dict(num_splits=3, block_n=16)),
                   (pa.paged_decode_attention_torch, {})):
        a = fn(q, k_pages, v_pages, tables, lens, **kw)
        b = fn(q, k2, v2, other, lens, **kw)
        assert torch.equal(a, b), fn.__name__


def test_strided_inputs_and_rows_without_keys(rel_err, tol, poison):
    # tables and lengths as strided views (columns of wider tensors), an empty batch, and a row of
    # length 0 (outside the contract): o = 0 on both paths, over one split and several
    q, k_pages, v_pages, tables, lens, _ = make("mqa", torch.float32, seed=9)
    wide_tables = torch.stack([tables, tables], dim=-1)[..., 0]                # last-dim stride 2
    wide_lens = torch.stack([lens, lens], dim=-1)[:, 1]
    ref = reference(q, k_pages, v_pages, tables, lens, 16 ** -0.5)
    tri = pa.paged_decode_attention_triton(q, k_pages, v_pages, wide_tables, wide_lens, num_splits=2, block_n=16)
    assert rel_err(tri, ref) <= tol[torch.float32]
    none = pa.paged_decode_attention_triton(q[:0], k_pages, v_pages, tables[:0], lens[:0])
    assert none.shape == (0, 4, 32)
    zero = lens.clone()
    zero[1] = 0
    for o in (pa.paged_decode_attention_torch(q, k_pages, v_pages, tables, zero),
              *(pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, zero, num_splits=ns, block_n=16)
                for ns in (1, 2))):
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        assert rel_err(o[[0, 2]], ref[[0, 2]]) <= tol[torch.float32]


def test_mla_form_takes_both_page_layouts(poison):
    q, kv, _, tables, lens, v_dim = make("mla_20+6", torch.float32, seed=3)
    for fn in (pa.paged_decode_attention_triton, pa.paged_decode_attention_torch):
        flat = fn(q, kv, None, tables, lens, 0.25, v_dim)                       # [M, P, C + R]
        headed = fn(q, kv[:, :, None], None, tables, lens, 0.25, v_dim)         # [M, P, 1, C + R]
        assert torch.equal(flat, headed)


@pytest.mark.parametrize("mla", [False, True])
def test_twin_equals_the_model_paged_read(mla, rel_err):
    # what the model computes today for a decode step: PagedCacheStep.update writes each row's new
    # key at position seq_len - 1 and gathers the row's pages, masked_attention attends with the
    # position mask (attend_absorbed's form for MLA: kv and kv[..., :C])
    g = torch.Generator().manual_seed(11)
    P, W, lens, H = 4, 5, [13, 8, 1, 20], 4
    M = 22
    tables = make_tables(lens, P, W, M, g)
    pos = torch.tensor(lens)[:, None] - 1                                      # [B, T=1]
    if mla:
        C, R = 20, 6
        buffers = (torch.randn(M, P, C + R, generator=g),)
        new = (torch.randn(len(lens), 1, C + R, generator=g),)
    else:
        Hkv, D = 2, 24
        buffers = (torch.randn(M, P, Hkv, D, generator=g), torch.randn(M, P, Hkv, D, generator=g))
        new = tuple(torch.randn(len(lens), 1, Hkv, D, generator=g) for _ in range(2))
    q = torch.randn(len(lens), H, buffers[0].shape[-1], generator=g)
    visible = torch.arange(W * P)[None, None, :] <= pos[:, :, None]            # [B, 1, S], as PagedKVCache.step
    cache = types.SimpleNamespace(layers=[buffers], page_size=P)
    gathered = PagedCacheStep(cache, tables, pos, W * P, visible).update(0, *new)  # writes the new keys too
    if mla:
        kv = gathered[0][:, :, None]                                           # [B, S, 1, C + R]
        model = masked_attention(q[:, None], kv, kv[..., :C], visible, 0.3)[:, 0]
        twin = pa.paged_decode_attention_torch(q, buffers[0], None, tables, torch.tensor(lens), 0.3, v_dim=C)
    else:
        model = masked_attention(q[:, None], *gathered, visible, 0.3)[:, 0]
        twin = pa.paged_decode_attention_torch(q, *buffers, tables, torch.tensor(lens), 0.3)
    assert rel_err(twin, model) <= 1e-6


def test_public_function_follows_the_backend(monkeypatch):
    q, k_pages, v_pages, tables, lens, _ = make("mqa", torch.float32, seed=1)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    tri = pa.paged_decode_attention(q, k_pages, v_pages, tables, lens)
    assert torch.equal(tri, pa.paged_decode_attention_triton(q, k_pages, v_pages, tables, lens))
    monkeypatch.setenv("KERNELS_BACKEND", "auto")  # CPU tensors: the twin
    assert torch.equal(pa.paged_decode_attention(q, k_pages, v_pages, tables, lens),
                       pa.paged_decode_attention_torch(q, k_pages, v_pages, tables, lens))


def test_bad_input_raises_naming_the_tensor():
    q, k, v = torch.randn(2, 4, 8), torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    tables, lens = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.long)
    fn = pa.paged_decode_attention
    bad = [
        ((q[:, None], k, v, tables, lens), {}, r"q must be \[B, H, Dqk\]"),
        ((q, k[0], v, tables, lens), {}, r"k_pages must be \[M, P, Hkv, Dqk\]"),
        ((q, k[..., :6], v, tables, lens), {}, "k_pages' head dim 6 differs"),
        ((q[:, :3], k, v, tables, lens), {}, "multiple of k_pages' Hkv = 2"),
        ((q, k, v[:, :, :1], tables, lens), {}, r"v_pages must be \[M, P, Hkv, Dv\]"),
        ((q, k, v, tables, lens), dict(v_dim=4), "v_dim = 4 but v_pages"),
        ((q, k[:, :, :1], None, tables, lens), {}, "v_dim must be in 1..Dqk"),
        ((q, k[:, :, :1], None, tables, lens), dict(v_dim=9), "v_dim must be in 1..Dqk = 8"),
        ((q, k.half(), v, tables, lens), {}, "must share one of fp32/fp16/bf16"),
        ((q.double(), k.double(), v.double(), tables, lens), {}, "must share one of"),
        ((q, k, v, tables[:1], lens), {}, r"block_tables must be int32/int64 \[B = 2, W >= 1\]"),
        ((q, k, v, tables.float(), lens), {}, "block_tables must be"),
        ((q, k, v, tables[:, :0], lens), {}, "block_tables must be"),
        ((q, k, v, tables, lens[:1]), {}, r"seq_lens must be int32/int64 \[B = 2\]"),
        ((q, k, v, tables, lens[:, None]), {}, "seq_lens must be"),
    ]
    for args, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args, **kw)
    with pytest.raises(ValueError, match="k_pages must be"):  # the Triton entry point checks the same
        pa.paged_decode_attention_triton(q, k[0], v, tables, lens)
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        pa.paged_decode_attention_triton(q, k, v, tables, lens, num_splits=-1)


def test_compiles_once_for_every_batch_and_table_width(launches):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, P, M = 4, 2, 16, 4, 40
    k_pages, v_pages = torch.randn(M, P, Hkv, D, generator=g), torch.randn(M, P, Hkv, D, generator=g)
    per_batch = []
    # (rows, table width, splits): widths 1, 2, 3, 9 and 16 (the tables' row stride and W follow
    # it), one split (no combine) and several
    for B, W, ns in ((1, 1, None), (3, 2, 2), (2, 9, 3), (5, 3, 1), (2, 16, 5)):
        launches.clear()
        lens = torch.randint(1, W * P + 1, (B,), generator=g)
        tables = torch.randint(0, M, (B, W), generator=g)
        pa.paged_decode_attention_triton(torch.randn(B, H, D, generator=g), k_pages, v_pages, tables, lens,
                                         num_splits=ns)
        per_batch.append(keys_by_kernel(launches))
    for kernel in ("_paged_decode_split_kernel", "_paged_decode_combine_kernel"):
        seen = [k[kernel] for k in per_batch if kernel in k]
        assert len(seen) >= 3, kernel
        assert len(set().union(*(ck for ck, _ in seen))) == 1, f"{kernel}: compiled more than once"
        assert len(set().union(*(tk for _, tk in seen))) == 1, f"{kernel}: tuned more than once"


def test_compile_specs_cover_every_class_with_two_configurations():
    specs = pa.compile_specs()
    per = {}
    for s in specs:
        per.setdefault((s.name, s.dtype), []).append(s.config)
    assert {n for n, _ in per} == {f"paged_decode_{k}_{t}" for k in ("split", "combine")
                                   for t in ("128x128", "mla576x512", "64x64")}
    assert all(len(c) >= 2 and len(set(c)) == len(c) for c in per.values())
    mla = next(s for s in specs if s.name == "paged_decode_split_mla576x512")
    assert (mla.constexprs["BLOCK_D1"], mla.constexprs["BLOCK_D2"], mla.constexprs["SHARED_KV"]) == (512, 64, True)
