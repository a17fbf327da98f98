"""The rollout engine: greedy parity with transformers over the paged cache at sync_every 1 and 8,
pause / extend / resume against one uninterrupted forward, requests added mid-decode, seeded
sampling unchanged by batch mates, read interval and preemption, shared prompt pages, bad input."""
import pytest
import torch

from sampling import Sampler, SamplingParams
from sampling.engine import Engine
from tests.sampling.test_sampler import PROMPTS, pair  # noqa: F401  (pair: the transformers / ours fixture)


def _hf_greedy(hf, prompt, n):
    return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()


def _run(engine, seqs):
    """Step until every seq in `seqs` has finished (a paused one is finished there); their completions."""
    out = {}
    while len(out) < len(seqs):
        for ev in engine.step():
            if ev.kind == "finished":
                out[ev.seq] = ev.completion
            elif ev.kind == "paused":
                out[ev.seq] = engine.finish(ev.seq)
    return out


@pytest.mark.parametrize("sync_every", [1, 8])
def test_greedy_matches_transformers_over_pages(pair, sync_every):
    name, hf, ours = pair
    # page size 4: every prompt spans pages, some end mid-page
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, page_size=4, sync_every=sync_every, verbose=False)
    outs = s.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=13, stop_token_ids=[]))
    for p, o in zip(PROMPTS, outs):
        assert o[0].token_ids == _hf_greedy(hf, p, 13), (name, sync_every)
        assert o[0].finish_reason == "length"
    assert s.stats.host_reads == -(-12 // sync_every)  # 12 decode steps after the first token


@pytest.mark.parametrize("pair", ["qwen2", pytest.param("deepseek_v3", marks=pytest.mark.slow)], indirect=True)
def test_compiled_bucketed_decode_matches_transformers(pair):
    """torch.compile'd decode step, one graph per bucket (qwen2 here ~20 s of compiling; the MLA +
    MoE model, with its graph break at the expert dispatch, ~40 s: run with -m slow)."""
    name, hf, ours = pair
    for sync_every in (1, 8):   # the same graphs: the read interval changes only the host loop
        s = Sampler(ours, max_batch_size=8, max_seq_len=64, page_size=8, sync_every=sync_every, compile=True,
                    verbose=False)
        outs = s.generate(PROMPTS[:3], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[]))
        for p, o in zip(PROMPTS, outs):
            assert o[0].token_ids == _hf_greedy(hf, p, 10), (name, sync_every)


def test_static_buckets_equal_exact_shapes(pair):
    """static=True pads the batch to a power of two with scratch rows and the block tables to a
    power-of-two width (what the compiled step runs, here eager): the same tokens and logprobs."""
    name, _, ours = pair
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=9, stop_token_ids=[], seed=5)
    a = Sampler(ours, max_batch_size=8, max_seq_len=64, page_size=4, verbose=False).generate(PROMPTS[:2], params)
    b = Sampler(ours, max_batch_size=8, max_seq_len=64, page_size=4, static=True, verbose=False).generate(
        PROMPTS[:2], params)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert x.token_ids == y.token_ids, name
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-4


class _DigitsTokenizer:
    """Decodes ids as space-separated numbers: a stop string is a number's text."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def _logprobs_by_recompute(model, prompt, tokens, T):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0].float()
    logp = torch.log_softmax(logits / T, -1)[len(prompt) - 1:-1]
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("sync_every", [1, 8])
def test_pause_at_stop_string_extend_and_resume_equals_one_forward(pair, sync_every):
    name, _, ours = pair
    T = 0.9
    tok = _DigitsTokenizer()
    prompt = PROMPTS[1]
    probe = Engine(ours, max_batch_size=4, max_seq_len=80, tokenizer=tok, page_size=4, sync_every=sync_every)
    params = SamplingParams(temperature=T, max_new_tokens=30, stop_token_ids=[], seed=3)
    free_run = _run(probe, probe.add(prompt, params))
    first = next(iter(free_run.values())).token_ids
    stop_at = 5                        # the 6th sampled token's text is the stop string (or an earlier match)
    eng = Engine(ours, max_batch_size=4, max_seq_len=80, tokenizer=tok, page_size=4, sync_every=sync_every)
    (seq,) = eng.add(prompt, SamplingParams(temperature=T, max_new_tokens=30, stop_token_ids=[], seed=3,
                                            stop=[str(first[stop_at])]), pause=True)
    paused = None
    while paused is None:
        for ev in eng.step():
            assert ev.kind != "finished"
            if ev.kind == "paused":
                paused = ev.completion
    cut = next(i for i in range(len(first)) if str(first[stop_at]) in tok.decode(first[:i + 1]))
    assert paused.token_ids == first[:cut + 1]          # tokens read past the stop were rolled back
    assert eng.stats.generated_tokens == cut + 1
    assert eng.seqs[seq].state == "paused"
    extension = [17, 3, 99, 4, 150]
    eng.extend(seq, extension)
    done = _run(eng, [seq])[seq]
    assert done.token_ids[:cut + 1 + 5] == first[:cut + 1] + extension
    assert done.sampled_mask == [1] * (cut + 1) + [0] * 5 + [1] * (len(done.token_ids) - cut - 6)
    assert done.finish_reason == "length" and sum(done.sampled_mask) == 30
    # every sampled token's logprob equals one uninterrupted forward over the same ids
    ref = _logprobs_by_recompute(ours, prompt, done.token_ids, T)
    sampled = torch.tensor(done.sampled_mask, dtype=torch.bool)
    assert (ref[sampled] - torch.tensor(done.logprobs)[sampled]).abs().max() < 1e-5, name
    assert all(lp == 0.0 for lp, m in zip(done.logprobs, done.sampled_mask) if not m)


def test_greedy_resume_after_extend_equals_recompute(pair):
    name, _, ours = pair
    eng = Engine(ours, max_batch_size=4, max_seq_len=80, page_size=4, sync_every=4)
    first = _run(eng, eng.add(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])))
    stop = next(iter(first.values())).token_ids[2]
    (seq,) = eng.add(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop]), pause=True)
    while eng.seqs[seq].state != "paused":
        eng.step()
    eng.extend(seq, [8, 9, 10, 11, 12])
    done = _run(eng, [seq])[seq]
    ids = PROMPTS[0] + done.token_ids[:8]
    for t, m in zip(done.token_ids[8:], done.sampled_mask[8:]):   # greedy continuation by recompute
        with torch.no_grad():
            nxt = int(ours(torch.tensor([ids]))[0, -1].argmax())
        assert t == nxt, name
        ids.append(t)
        if t == stop:
            break


def test_requests_added_mid_decode_match_alone(pair):
    name, _, ours = pair
    pa = SamplingParams(n=2, temperature=1.0, max_new_tokens=20, stop_token_ids=[], seed=11)
    pb = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=12, stop_token_ids=[], seed=12)

    def alone(prompt, params):
        e = Engine(ours, max_batch_size=8, max_seq_len=64, page_size=4, sync_every=2)
        return [c.token_ids for _, c in sorted(_run(e, e.add(prompt, params)).items())]

    eng = Engine(ours, max_batch_size=8, max_seq_len=64, page_size=4, sync_every=2)
    a = eng.add(PROMPTS[1], pa)
    got = {}
    for _ in range(3):          # A decodes a few windows before B arrives
        for ev in eng.step():
            assert ev.kind != "finished"
    assert eng.stats.decode_steps == 6
    b = eng.add(PROMPTS[3], pb)
    while len(got) < 5:
        for ev in eng.step():
            if ev.kind == "finished":
                got[ev.seq] = ev.completion.token_ids
    assert eng.stats.peak_rows == 5    # B joined the running batch
    assert [got[i] for i in a] == alone(PROMPTS[1], pa), name
    assert [got[i] for i in b] == alone(PROMPTS[3], pb), name


def test_seeded_output_unchanged_by_sync_every_and_preemption(pair):
    name, _, ours = pair
    params = [SamplingParams(n=4, temperature=1.0, max_new_tokens=L, stop_token_ids=[], seed=20 + L)
              for L in (24, 9, 17, 30)]
    roomy = Sampler(ours, max_batch_size=16, max_seq_len=64, page_size=4, sync_every=1, verbose=False)
    ref = roomy.generate(PROMPTS, params)
    assert roomy.stats.preemptions == 0
    # 24 pages of 4: the 16 rows cannot all grow to their lengths at once
    tight = Sampler(ours, max_batch_size=16, max_seq_len=64, page_size=4, sync_every=8, cache_tokens=96,
                    verbose=False)
    got = tight.generate(PROMPTS, params)
    assert tight.stats.preemptions > 0
    assert tight.stats.peak_pages <= 24
    for r, g in zip(ref, got):
        for x, y in zip(r, g):
            assert x.token_ids == y.token_ids, name
            assert x.finish_reason == y.finish_reason == "length"   # never a truncated "stop"
            assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-4


def test_samples_share_the_prompt_pages(pair):
    _, _, ours = pair
    prompt = list(range(1, 22))                       # 21 tokens: 5 full pages of 4 and one partial
    s = Sampler(ours, max_batch_size=8, max_seq_len=64, page_size=4, sync_every=1, verbose=False)
    s.generate([prompt], SamplingParams(n=8, temperature=1.0, max_new_tokens=2, stop_token_ids=[], seed=0))
    assert s.stats.prefill_tokens == 21 and s.stats.prefill_calls == 1
    assert s.stats.shared_pages == 7 * 5              # 7 forks, 5 full pages each by reference
    # at the peak: the 5 shared pages once, and each of the 8 samples' own last page (22 positions of 4)
    assert s.stats.peak_pages == 5 + 8


def test_waiting_samples_join_from_the_prefix_holder_without_a_prefill(pair):
    """n = 6 samples with 2 rows: the later four fork the prompt from the prefix holder."""
    name, _, ours = pair
    prompt = list(range(1, 11))
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=5, stop_token_ids=[], seed=4)
    narrow = Sampler(ours, max_batch_size=2, max_seq_len=32, page_size=4, verbose=False)
    a = narrow.generate([prompt], params)[0]
    assert narrow.stats.prefill_tokens == 10
    wide = Sampler(ours, max_batch_size=8, max_seq_len=32, page_size=4, verbose=False)
    b = wide.generate([prompt], params)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b], name
    assert narrow.engine.pages_used == 1   # only the scratch page is left


def test_bad_requests_are_refused_before_anything_is_allocated(pair):
    _, _, ours = pair
    eng = Engine(ours, max_batch_size=4, max_seq_len=64, page_size=4, cache_tokens=32)
    with pytest.raises(ValueError, match=r"needs 10 pages of 4 but the cache budget is 8 pages \(32 tokens\)"):
        eng.add([1] * 30, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_seq_len is 64"):
        eng.add([1] * 30, SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="token ids span 0..500 but the vocabulary has 211"):
        eng.add([0, 500], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="stop strings"):
        eng.add([1], SamplingParams(max_new_tokens=2, stop=["x"]))
    for field, kwargs in [("top_p", dict(top_p=1.5)), ("top_p", dict(top_p=0.0)), ("temperature", dict(temperature=-1)),
                          ("max_new_tokens", dict(max_new_tokens=0)), ("min_p", dict(min_p=1.0)),
                          ("top_k", dict(top_k=-2))]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**kwargs)
    assert eng.cache is None and not eng.seqs            # nothing queued, nothing allocated
    with pytest.raises(KeyError, match="unknown sequence 7"):
        eng.extend(7, [1])
    (seq,) = eng.add([1, 2], SamplingParams(temperature=0, max_new_tokens=2, stop_token_ids=[]))
    with pytest.raises(ValueError, match="is waiting; only a paused sequence can be extended"):
        eng.extend(seq, [1])
    _run(eng, [seq])
    with pytest.raises(ValueError, match="is finished; only a paused sequence can be extended"):
        eng.extend(seq, [1])
    eng.pop(seq)
    with pytest.raises(KeyError, match="unknown sequence"):
        eng.extend(seq, [1])


def test_abort_frees_pages_in_any_state(pair):
    _, _, ours = pair
    eng = Engine(ours, max_batch_size=2, max_seq_len=64, page_size=4)
    ids = eng.add(PROMPTS[1], SamplingParams(n=4, temperature=1.0, max_new_tokens=20, stop_token_ids=[], seed=1))
    eng.step()
    states = sorted(eng.seqs[i].state for i in ids)
    assert states == ["running", "running", "waiting", "waiting"]
    for i in ids:
        eng.abort(i)
    assert not eng.has_work() and eng.pages_used == 1   # the scratch page


def test_decode_through_the_paged_attention_kernel_matches_transformers(pair, monkeypatch):
    """The CUDA decode path, here under Triton's interpreter: each decode step writes its keys into
    the pages and attends with kernels.paged_decode_attention reading them in place (GQA k/v pages;
    MLA's latent pages with the absorbed query). Greedy tokens equal transformers generate."""
    import model.paged_cache as paged
    from kernels.paged_attention import paged_decode_attention_triton

    name, hf, ours = pair
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return paged_decode_attention_triton(*args, **kwargs)

    monkeypatch.setattr(paged, "use_decode_kernel", lambda position_ids: True)
    monkeypatch.setattr(paged, "paged_decode_attention", kernel)
    s = Sampler(ours, max_batch_size=4, max_seq_len=48, page_size=4, sync_every=4, verbose=False)
    outs = s.generate(PROMPTS[:3], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[]))
    assert calls, "the kernel was not called"
    for p, o in zip(PROMPTS, outs):
        assert o[0].token_ids == _hf_greedy(hf, p, 6), name
