"""The OpenAI-compatible server, through the real `openai` client on loopback: greedy completions equal
the eval stage's, 32 concurrent requests (more than the engine's rows) each equal to its solo
answer, streaming equal to non-streaming, and bad requests answered 400 with a message."""
import json
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai", reason="the server's tests use the openai client (the test extra)")

from data.tokenizer import Tokenizer  # noqa: E402
from evaluation.eval_stage import sample_and_score  # noqa: E402
from evaluation.evaluate import MATH_INSTRUCTION  # noqa: E402
from model.build import preset_config  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from sampling.sampler import Sampler, SamplingParams  # noqa: E402
from serve.server import RunningServer  # noqa: E402
from serve.text import ChoiceText  # noqa: E402
from verify.pool import RewardPool  # noqa: E402

ROWS = [{"id": f"p{i}", "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    corpus = [f"What is {i} + {i + 1}? <think>{2 * i + 1} because {i} and {i + 1}</think> \\boxed{{{2 * i + 1}}}"
              for i in range(60)]
    return Tokenizer.train(corpus, vocab_size=300)


def make_model(tok):
    torch.manual_seed(0)
    return Transformer(preset_config("tiny", tok)).eval()


@pytest.fixture(scope="module")
def server(tok):
    sampler = Sampler(make_model(tok), max_batch_size=8, max_seq_len=512, tokenizer=tok, verbose=False)
    with RunningServer(sampler, tok, "tiny", max_len=512, stop_ids=[tok.eos_id], chat_template="r1-zero") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def chat(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(server.url.replace("/v1", "/health")) as r:
        assert json.load(r) == {"status": "ok"}


def test_greedy_chat_completions_equal_the_eval_stage(client, tok):
    rows = ROWS[:6]
    with RewardPool(num_workers=1, timeout_s=30) as pool:
        records = sample_and_score(rows, tok, pool, n=1, model=make_model(tok), temperature=0.0, top_p=1.0,
                                   max_new_tokens=24, template="r1-zero")
    for row, rec in zip(rows, records):
        r = chat(client, f"{row['problem']}\n{MATH_INSTRUCTION}", temperature=0, max_tokens=24)
        assert r.choices[0].message.content == rec["completion"]
        assert r.choices[0].finish_reason == rec["finish_reason"]
        assert r.usage.completion_tokens == rec["num_tokens"]


def test_32_concurrent_requests_each_equal_its_answer_alone(client, server, tok):
    """32 requests at once on an engine of 8 rows: they batch and queue; each seeded sample equals what
    the local sampler draws for it with the same seed (sampling/draw.py: the draw is per sample)."""
    prompts = [f"What is {i} + {i + 1}?" for i in range(32)]
    before = server.service.sampler.engine.stats.peak_rows

    def ask(i):
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=20, temperature=1.0,
                                         seed=100 + i, n=2)

    with ThreadPoolExecutor(32) as ex:
        got = list(ex.map(ask, range(32)))
    local = Sampler(make_model(tok), max_batch_size=8, max_seq_len=512, tokenizer=tok, verbose=False)
    want = local.generate([tok.encode(p) for p in prompts],
                          [SamplingParams(n=2, temperature=1.0, max_new_tokens=20, seed=100 + i,
                                          stop_token_ids=[tok.eos_id]) for i in range(32)])
    for r, comps in zip(got, want):
        assert [c.text for c in r.choices] == [text_of(tok, c) for c in comps]
        assert r.usage.completion_tokens == sum(len(c.token_ids) for c in comps)
    stats = server.service.stats()
    assert stats["engine"]["peak_rows"] == 8 >= before    # the requests shared decode steps, up to the 8 rows


def text_of(tok, completion):
    ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_gives_the_non_streamed_text(client, endpoint):
    for i, stop in enumerate([None, ["+"], ["1", "9 "]]):
        kw = dict(model="tiny", max_tokens=40, temperature=1.0, seed=7 + i, n=2, stop=stop)
        if endpoint == "chat":
            kw["messages"] = [{"role": "user", "content": f"What is {i} + 3?"}]
            whole = client.chat.completions.create(**kw)
            texts, reasons = [c.message.content for c in whole.choices], [c.finish_reason for c in whole.choices]
            stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        else:
            kw["prompt"] = f"What is {i} + 3?"
            whole = client.completions.create(**kw)
            texts, reasons = [c.text for c in whole.choices], [c.finish_reason for c in whole.choices]
            stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        parts, finish, used = ["", ""], [None, None], None
        for ev in stream:
            if ev.usage is not None:
                used = ev.usage
            for ch in ev.choices:
                parts[ch.index] += (ch.delta.content or "") if endpoint == "chat" else ch.text
                finish[ch.index] = ch.finish_reason or finish[ch.index]
        assert parts == texts and finish == reasons
        assert used.completion_tokens == whole.usage.completion_tokens
        for t in texts:
            assert not stop or not any(s in t for s in stop)   # the text ends before its stop string


def test_logprobs_are_the_sampled_tokens(client):
    r = client.completions.create(model="tiny", prompt="What is 2 + 3?", max_tokens=8, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1])
    c = chat(client, "What is 2 + 3?", max_tokens=8, temperature=0, logprobs=True)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens


@pytest.mark.parametrize("kw, message", [
    (dict(model="gpt-4"), "unknown model 'gpt-4'"),
    (dict(temperature=5), "'temperature' must be >= 0.0 and <= 2.0"),
    (dict(top_p=0), "'top_p' must be > 0.0"),
    (dict(n=0), "'n' must be >= 1"),
    (dict(max_tokens=10_000), "this model's context is 512 tokens"),
    (dict(logprobs=3), "'logprobs' 3 is not supported"),
    (dict(presence_penalty=0.5), "penalties are not applied"),
    (dict(seed=-1), "'seed' must be a non-negative integer"),
])
def test_bad_completion_requests_get_400(client, kw, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(**{"model": "tiny", "prompt": "1 + 1", "max_tokens": 4, **kw})


def test_bad_chat_requests_and_malformed_json_get_400(client, server):
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="unknown role 'robot'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        chat(client, "hi", logprobs=True, top_logprobs=2)
    req = urllib.request.Request(server.url + "/chat/completions", data=b'{"model": "tiny", "messages": [',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.post("/embeddings", body={"model": "tiny", "input": "x"}, cast_to=dict)


def test_api_key_is_required_when_set(tok):
    sampler = Sampler(make_model(tok), max_batch_size=2, max_seq_len=128, tokenizer=tok, verbose=False)
    with RunningServer(sampler, tok, "tiny", 128, [tok.eos_id], api_key="sesame") as srv:
        with openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=srv.url, api_key="sesame", max_retries=0) as good:
            assert good.completions.create(model="tiny", prompt="1 + 1", max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_goes_away_mid_stream_frees_its_sequences(server):
    body = json.dumps({"model": "tiny", "prompt": "What is 1 + 2?", "max_tokens": 400, "stream": True,
                       "temperature": 1.0, "stop": ["never appears \x00"]}).encode()
    host, port = server.host, server.port
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"200 OK" in s.recv(200)
    engine = server.service.sampler.engine
    for _ in range(200):
        if not server.service.loop.owner:
            break
        import time
        time.sleep(0.05)
    assert not server.service.loop.owner and not engine.running


def test_choice_text_holds_back_a_possible_stop_and_cuts_at_it(tok):
    ids = tok.encode("What is 12 + 13? <think>25 because</think>")
    out = ChoiceText(tok, stop=["</think>"], stop_ids=[tok.eos_id])
    sent = "".join(out.feed([t]) for t in ids) + out.finish()
    assert sent == out.text == tok.decode(ids).split("</think>")[0]
    plain = ChoiceText(tok, stop_ids=[tok.eos_id])
    assert "".join(plain.feed([t]) for t in ids + [tok.eos_id]) + plain.finish() == tok.decode(ids)
    padded = ChoiceText(tok)   # ids past the tokenizer's vocabulary (a padded embedding) decode to nothing
    assert padded.feed([ids[0], tok.vocab_size + 5, ids[1]]) + padded.finish() == tok.decode(ids[:2])


def test_stops_come_from_generation_config_then_config_then_tokenizer(tmp_path, tok):
    from serve.server import generation_stop_ids
    config = preset_config("tiny", tok)
    assert generation_stop_ids(None, config, tok) == [tok.eos_id]               # a preset: config.json's
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')   # a chat model's end of turn
    assert generation_stop_ids(tmp_path, config, tok) == [7, 9]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 4}')
    assert generation_stop_ids(tmp_path, config, tok) == [4]
    (tmp_path / "generation_config.json").write_text('{"do_sample": true}')
    assert generation_stop_ids(tmp_path, config.replace(eos_token_id=None), tok) == [tok.eos_id]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be an integer"):
        generation_stop_ids(tmp_path, config, tok)


def test_serve_flags_are_checked(tok):
    from recipes.flags import stage_args
    from serve.server import check_flags
    ok = dict(stage="serve", preset="tiny", tokenizer="tok")
    check_flags(stage_args(ok), 1)
    for extra, world, message in [({}, 2, "runs in one process"), ({"port": 70000}, 1, "--port 70000"),
                                  ({"preset": None}, 1, "exactly one of --model DIR and --preset NAME"),
                                  ({"serve_max_len": 1}, 1, "--serve-max-len 1")]:
        with pytest.raises(ValueError, match=message):
            check_flags(stage_args({**ok, **extra}), world)
