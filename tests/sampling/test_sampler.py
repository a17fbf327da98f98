"""Sampler: greedy parity with transformers, cache vs recompute, seeds, truncation statistics,
shared prefill and continuous batching shown by counters, memory and bad input."""
import math

import pytest
import torch

from model.checkpoint import load_pretrained
from model.config import ModelConfig
from sampling import Sampler, SamplingParams

CONFIGS = {
    "qwen2": dict(model_type="qwen2", vocab_size=211, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, attention_bias=True, max_position_embeddings=256),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=211, hidden_size=72, intermediate_size=100,
                        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6, q_lora_rank=24,
                        kv_lora_rank=20, qk_nope_head_dim=14, qk_rope_head_dim=6, v_head_dim=10,
                        n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=40,
                        first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=256),
    # Qwen3-MoE: q/k norms, head_dim 16 apart from hidden / heads, softmax top-2 of 6 experts, layer 1 dense
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=211, hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, n_routed_experts=6,
                      num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[1],
                      max_position_embeddings=256),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model) with the same random weights (std 0.3, so logits are far from ties)."""
    import transformers
    cfg = ModelConfig(**CONFIGS[request.param])
    d = cfg.to_hf_config()
    cls = getattr(transformers, d["architectures"][0])
    conf_cls = getattr(transformers, cls.__name__.replace("ForCausalLM", "Config"))
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = cls(conf_cls(**d))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    hf.eval()
    ours = load_pretrained(path).eval()
    return request.param, hf, ours


PROMPTS = [[5, 6, 7], list(range(1, 14)), [42], [9, 8, 7, 6, 5, 4, 3]]


def test_greedy_matches_transformers_generate(pair):
    name, hf, ours = pair
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, verbose=False)
    outs = s.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[]))
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o[0].token_ids == ref, name
        assert o[0].finish_reason == "length"


def test_cached_decode_logprobs_equal_full_recompute(pair):
    name, _, ours = pair
    T = 0.7
    s = Sampler(ours, max_batch_size=5, max_seq_len=64, verbose=False)  # fewer slots than samples: slots get reused
    outs = s.generate(PROMPTS, SamplingParams(n=3, temperature=T, top_k=20, max_new_tokens=12, stop_token_ids=[],
                                              seed=1))
    for p, group in zip(PROMPTS, outs):
        for c in group:
            full = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(ours(full)[0].float() / T, -1)  # untruncated, temperature-scaled
            ref = logp[len(p) - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs)).abs().max() < 1e-4, name


@pytest.mark.slow  # about a minute of compilation on 2 cores; tests/model/test_cache.py compiles a decode step in CI
@pytest.mark.parametrize("pair", ["qwen2"], indirect=True)  # the MLA decode compiles in tests/model/test_cache.py
def test_static_compiled_decode_equals_dynamic(pair):
    _, _, ours = pair
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=8, stop_token_ids=[], seed=3)
    dyn = Sampler(ours, max_batch_size=4, max_seq_len=32, verbose=False).generate(PROMPTS[:2], params)
    comp = Sampler(ours, max_batch_size=4, max_seq_len=32, compile=True, verbose=False).generate(PROMPTS[:2], params)
    for a, b in zip(dyn, comp):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-4


def test_seeds_reproducible_and_independent_of_batch_mates(pair):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, verbose=False)
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, stop_token_ids=[], seed=7)
    alone = s.generate([PROMPTS[1]], p)[0]
    again = s.generate([PROMPTS[1]], p)[0]
    others = [SamplingParams(n=3, temperature=1.0, max_new_tokens=6, stop_token_ids=[], seed=s_) for s_ in (1, 2)]
    batched = s.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others[0], p, others[1]])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in again] == [c.token_ids for c in batched]
    assert alone[0].token_ids != alone[1].token_ids  # the n samples differ


class FixedLogitsModel(torch.nn.Module):
    """A 'model' whose next-token logits are always `logits`; enough of the interface for the sampler."""

    def __init__(self, logits):
        super().__init__()
        # hidden state 1.0 everywhere and a [V, 1] head whose column is `logits`
        self.lm_head = torch.nn.Linear(1, len(logits), bias=False)
        self.lm_head.weight.data.copy_(logits[:, None])
        self.lm_head.requires_grad_(False)
        self.config = type("Config", (), {"vocab_size": len(logits), "eos_token_ids": []})()

    def make_paged_cache(self, num_pages, page_size, max_seq_len, max_batch_size, dtype=None, device=None):
        from model.paged_cache import PagePool
        cache = type("Cache", (), {"bytes_per_token": 4, "apply_copies": lambda self: None})()
        cache.pool = PagePool(num_pages, page_size)
        return cache

    def forward(self, ids, position_ids=None, cache=None, slots=None, attn_len=None, return_hidden=False,
                check_inputs=True):
        h = torch.ones(ids.shape[0], ids.shape[1], 1)
        return h if return_hidden else self.lm_head(h)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


def _expected(kind, value):
    p = torch.softmax(LOGITS, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if kind == "top_k":
        keep = torch.arange(len(p)) < value
    elif kind == "top_p":  # smallest prefix (probabilities are sorted here) whose mass reaches value
        before = torch.cumsum(p, 0) - p
        keep = before < value
    elif kind == "min_p":
        keep = p >= value * p.max()
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def chi_square_pvalue(observed, expected):
    """P(chi2_{k-1} >= statistic): the regularised upper incomplete gamma Q((k-1)/2, stat/2)."""
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(observed) - 1), dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def test_chi_square_pvalue_matches_closed_form():
    # 2 degrees of freedom: survival function exp(-x/2)
    obs, exp = torch.tensor([30.0, 50.0, 20.0], dtype=torch.float64), torch.full((3,), 100 / 3, dtype=torch.float64)
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert abs(chi_square_pvalue(obs, exp) - math.exp(-stat / 2)) < 1e-12


@pytest.mark.parametrize("kind,value", [("top_k", 3), ("top_p", 0.7), ("min_p", 0.2), ("none", None)])
def test_truncated_sampling_frequencies_chi_square(kind, value):
    model = FixedLogitsModel(LOGITS)
    params = SamplingParams(n=20000, temperature=1.0, max_new_tokens=1, stop_token_ids=[], seed=11,
                            **({kind: value} if kind != "none" else {}))
    s = Sampler(model, max_batch_size=20000, max_seq_len=4, verbose=False)
    out = s.generate([[0]], params)[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=len(LOGITS)).double()
    exp = _expected(kind, value) * 20000
    assert counts[exp == 0].sum() == 0  # nothing outside the truncated support
    support = exp > 0
    assert chi_square_pvalue(counts[support], exp[support]) > 1e-3
    # logprobs are the untruncated distribution's
    lp = torch.log_softmax(LOGITS, -1)
    assert all(abs(c.logprobs[0] - lp[c.token_ids[0]].item()) < 1e-6 for c in out[:50])


def test_shared_prefill_counts_each_prompt_once(pair):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=32, max_seq_len=64, verbose=False)
    prompts = PROMPTS
    s.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=5, stop_token_ids=[], seed=0))
    assert s.stats.prefill_tokens == sum(len(p) for p in prompts)
    assert s.stats.prefill_calls == 1  # the four prompts were admitted together: one padded forward


def test_batched_prefill_equals_one_prompt_at_a_time(pair, monkeypatch):
    """Prompts of lengths 1-13 prefilled as right-padded rows of one forward give the same greedy
    tokens and logprobs as prefilling each prompt alone (calls of one row: PREFILL_TOKENS = 1)."""
    import sampling.engine as engine_mod
    name, _, ours = pair
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, verbose=False)
    batched = s.generate(PROMPTS, params)
    assert s.stats.prefill_calls == 1
    monkeypatch.setattr(engine_mod, "PREFILL_TOKENS", 1)
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, verbose=False)
    alone = s.generate(PROMPTS, params)
    assert s.stats.prefill_calls == len(PROMPTS)
    for b, a in zip(batched, alone):
        assert b[0].token_ids == a[0].token_ids, name
        assert max(abs(x - y) for x, y in zip(b[0].logprobs, a[0].logprobs)) < 1e-5, name


def test_continuous_batching_decode_steps_bound(pair):
    _, _, ours = pair
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (11,), generator=gen).tolist()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    params = [SamplingParams(temperature=1.0, max_new_tokens=L, stop_token_ids=[], seed=i) for i, L in enumerate(lengths)]
    B = 4
    s = Sampler(ours, max_batch_size=B, max_seq_len=64, verbose=False)
    outs = s.generate(prompts, params)
    assert [len(o[0].token_ids) for o in outs] == lengths
    assert s.stats.decode_steps <= math.ceil(sum(lengths) / B) + max(lengths)
    # without refilling freed slots, the batches of 4 would take the sum of each batch's longest
    waves = sum(max(lengths[i:i + B]) for i in range(0, len(lengths), B))
    assert s.stats.decode_steps < waves


def test_stop_tokens_kept_and_finish_reason(pair):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=4, max_seq_len=64, verbose=False)
    greedy = s.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[]))[0][0]
    stop = greedy.token_ids[3]
    out = s.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))[0][0]
    first = greedy.token_ids.index(stop)
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"


def test_cache_memory_reported_and_released(pair, capsys):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=3, max_seq_len=40)
    # 3 x 40 tokens in pages of 16 (8 pages, rounded up), and the scratch page
    assert s.cache_bytes == (8 + 1) * 16 * s.bytes_per_token
    assert f"{s.cache_bytes / 2**20:.1f} MiB" in capsys.readouterr().out
    s.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=0))
    assert s.cache is not None
    s.release()
    assert s.cache is None


def test_prompt_too_long_is_a_clear_error(pair):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=2, max_seq_len=16, verbose=False)
    with pytest.raises(ValueError, match=r"prompt 1 has 13 tokens.*max_seq_len is 16.*at most 8 tokens"):
        s.generate([[1], list(range(1, 14))], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="stop strings"):
        s.generate([[1]], SamplingParams(max_new_tokens=2, stop=["x"]))


class _DigitsTokenizer:
    """Decodes ids as space-separated numbers; enough tokenizer for the sampler's text."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def test_text_leaves_out_the_stop_token_that_the_ids_keep(pair):
    _, _, ours = pair
    s = Sampler(ours, max_batch_size=4, max_seq_len=64, tokenizer=_DigitsTokenizer(), verbose=False)
    greedy = s.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[]))[0][0]
    assert greedy.text == " ".join(map(str, greedy.token_ids))  # no stop: every token's text
    stop = greedy.token_ids[3]
    out = s.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))[0][0]
    assert out.token_ids[-1] == stop and out.text == " ".join(map(str, out.token_ids[:-1]))
