"""OpenAIClient against the stub server (tests/verify/stub_openai.py): answers parsed, headers sent,
every failure mode retried or not as documented and ending in APIError within its time bound, the
concurrency limit held across threads, and the disk cache answering repeats (and resumed runs)
without the network. Timeouts are 0.3 s and back-off 0.01 s, so each test takes about a second.
"""
import json
import pickle
import socket
import threading
import time

import pytest

from tests.verify.stub_openai import Reply, StubOpenAI, chat_completion
from verify.openai_client import APIError, ClientStats, OpenAIClient

TIMEOUT, BACKOFF = 0.3, 0.01
CHAT = "/chat/completions"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture
def stub():
    with StubOpenAI(content="4") as s:
        yield s


def client_for(url: str, **kwargs) -> OpenAIClient:
    kwargs = {"timeout_s": TIMEOUT, "retries": 2, "backoff_s": BACKOFF, "max_backoff_s": 0.05, **kwargs}
    return OpenAIClient(url, **kwargs)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- normal answers

def test_chat_returns_the_parsed_answer_and_sends_the_key(stub):
    with client_for(stub.url, api_key="sk-test") as client:
        r = client.chat(MESSAGES, model="teacher", n=3, temperature=0.6)
    assert r["object"] == "chat.completion" and r["model"] == "teacher"
    assert [c["message"]["content"] for c in r["choices"]] == ["4", "4", "4"]
    (request,) = stub.requests
    assert (request.method, request.path) == ("POST", CHAT)
    assert request.body == {"model": "teacher", "messages": MESSAGES, "n": 3, "temperature": 0.6}
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers["Content-Type"] == "application/json"
    assert client.stats.as_dict() == {"requests": 1, "cached": 0, "retries": 0, "failures": 0}

    with client_for(stub.url + "/") as client:   # no key: no header; a trailing slash is the same URL
        r = client.complete("2+2=", model="base", max_tokens=4)
    assert r["choices"][0]["text"] == "4"
    assert stub.requests[-1].path == "/completions" and "Authorization" not in stub.requests[-1].headers
    assert stub.requests[-1].body == {"model": "base", "prompt": "2+2=", "max_tokens": 4}


def test_utf8_bodies_round_trip(stub):
    stub.behave(lambda body: chat_completion(body["messages"][0]["content"][::-1]))
    with client_for(stub.url) as client:
        r = client.chat([{"role": "user", "content": "数学 ∑ é"}], model="m")
    assert r["choices"][0]["message"]["content"] == "é ∑ 学数"
    assert stub.bodies(CHAT)[0]["messages"][0]["content"] == "数学 ∑ é"


def test_models_and_get_are_never_cached(stub, tmp_path):
    with client_for(stub.url, cache_dir=tmp_path) as client:
        assert client.models() == ["stub-model"]
        assert client.get("/models")["data"][0]["id"] == "stub-model"
    assert stub.count("/models") == 2 and client.stats.cached == 0
    assert not list(tmp_path.rglob("*.json"))


def test_bad_arguments_are_named():
    for url in ("ftp://host/v1", "127.0.0.1:8000/v1", "http:///v1", "http://host:99999/v1", None):
        with pytest.raises(ValueError, match="base_url"):
            OpenAIClient(url)
    for kwargs, name in [({"timeout_s": 0}, "timeout_s"), ({"retries": -1}, "retries"),
                         ({"max_concurrency": 0}, "max_concurrency"), ({"backoff_s": -1}, "backoff_s")]:
        with pytest.raises(ValueError, match=name):
            OpenAIClient("http://127.0.0.1:1/v1", **kwargs)
    client = OpenAIClient("https://example.invalid/v1")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        client.post(CHAT, {"x": {1, 2}})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        client.post(CHAT, {"x": float("nan")})
    with pytest.raises(ValueError, match="must be a JSON object"):
        client.post(CHAT, [1, 2])
    with pytest.raises(ValueError, match="no cache_dir"):
        client.cache_path(CHAT, {})


# ----------------------------------------------------------------------------- retries and errors

def test_500s_then_ok_succeeds_after_two_retries(stub):
    stub.behave(["status:500", "status:502", "ok"])
    with client_for(stub.url) as client:
        r = client.chat(MESSAGES, model="m")
    assert r["choices"][0]["message"]["content"] == "4"
    assert stub.count(CHAT) == 3
    assert client.stats.as_dict() == {"requests": 3, "cached": 0, "retries": 2, "failures": 0}


@pytest.mark.parametrize("status", [408, 409, 429, 503])
def test_retried_statuses(stub, status):
    stub.behave([f"status:{status}", "ok"])
    with client_for(stub.url) as client:
        client.chat(MESSAGES, model="m")
    assert stub.count(CHAT) == 2 and client.stats.retries == 1


def test_400_fails_at_once_with_the_servers_message(stub):
    stub.behave(Reply(status=400, json={"error": {"message": "max_tokens is too large: 99999", "code": 400}}))
    with client_for(stub.url) as client:
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m", max_tokens=99999)
    e = info.value
    assert e.status == 400 and e.attempts == 1 and e.url == stub.url + CHAT
    assert "max_tokens is too large: 99999" in str(e) and "HTTP 400" in str(e) and stub.url + CHAT in str(e)
    assert json.loads(e.body)["error"]["code"] == 400
    assert stub.count(CHAT) == 1
    assert client.stats.as_dict() == {"requests": 1, "cached": 0, "retries": 0, "failures": 1}
    stub.behave("status:404")   # any other 4xx: also at once
    with client_for(stub.url) as client:
        with pytest.raises(APIError, match="HTTP 404"):
            client.chat(MESSAGES, model="m")
    assert stub.count(CHAT) == 2


def test_api_error_pickles_with_its_attributes():
    e = APIError("POST u failed", status=429, url="u", body="{}", attempts=4)
    back = pickle.loads(pickle.dumps(e))
    assert (str(back), back.status, back.url, back.body, back.attempts) == ("POST u failed", 429, "u", "{}", 4)


def test_error_body_is_truncated(stub):
    stub.behave(Reply(status=400, text="x" * 10_000))
    with client_for(stub.url) as client:
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m")
    assert 1000 <= len(info.value.body) <= 2000 and len(str(info.value)) < 500


def test_retry_after_is_honoured_and_capped(stub):
    stub.behave([Reply(status=429, headers={"Retry-After": "0.4"}), "ok"])
    with client_for(stub.url, max_backoff_s=5.0) as client:
        start = time.monotonic()
        client.chat(MESSAGES, model="m")
        assert time.monotonic() - start >= 0.4
    stub.behave([Reply(status=503, headers={"Retry-After": "3600"}), "ok"])
    with client_for(stub.url, max_backoff_s=0.05) as client:
        start = time.monotonic()
        client.chat(MESSAGES, model="m")
        assert time.monotonic() - start < 3.0


def test_hang_costs_at_most_the_timeout_per_attempt(stub):
    stub.behave("hang")
    with client_for(stub.url, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m")
        elapsed = time.monotonic() - start
    assert info.value.status is None and info.value.attempts == 3
    assert "TimeoutError" in str(info.value)
    assert stub.count(CHAT) == 3
    assert 3 * TIMEOUT <= elapsed < 3 * TIMEOUT + 2 * 0.05 + 1.5
    assert client.stats.as_dict() == {"requests": 3, "cached": 0, "retries": 2, "failures": 1}


def test_a_trickling_body_is_cut_at_the_deadline(stub):
    """Each byte comes within the socket timeout, so only the whole-response deadline stops it."""
    stub.behave("trickle")
    with client_for(stub.url, retries=0) as client:
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m")
        elapsed = time.monotonic() - start
    assert info.value.status is None and elapsed < TIMEOUT + 1.0


@pytest.mark.parametrize("mode,status", [("malformed", 200), (Reply(text="[1, 2]"), 200), ("close", None)])
def test_malformed_and_closed_fail_after_the_retries(stub, mode, status):
    stub.behave(mode)
    with client_for(stub.url, retries=3) as client:
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m")
    assert info.value.status == status and info.value.attempts == 4
    assert stub.count(CHAT) == 4 and client.stats.retries == 3 and client.stats.failures == 1
    if status is None:
        assert "RemoteDisconnected" in str(info.value)
    else:
        assert "not a JSON object" in str(info.value)


def test_malformed_then_ok_is_retried(stub):
    stub.behave(["malformed", "close", "ok"])
    with client_for(stub.url) as client:
        assert client.chat(MESSAGES, model="m")["choices"][0]["message"]["content"] == "4"
    assert stub.count(CHAT) == 3


def test_refused_connection_fails_quickly():
    with client_for(f"http://127.0.0.1:{free_port()}/v1", retries=2) as client:
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            client.chat(MESSAGES, model="m")
    assert time.monotonic() - start < 2.0
    assert info.value.status is None and info.value.attempts == 3
    assert "ConnectionRefusedError" in str(info.value)
    assert client.stats.requests == 3 and client.stats.failures == 1


# ----------------------------------------------------------------------------- concurrency

def by_index(body):
    """Requests "i": hang when i % 5 == 0, a 400 when i % 5 == 1, else answer "answer i" after 50 ms."""
    i = int(body["messages"][0]["content"])
    if i % 5 == 0:
        return "hang"
    if i % 5 == 1:
        return "status:400"
    time.sleep(0.05)
    return chat_completion(f"answer {i}")


def test_post_many_keeps_order_isolates_failures_and_respects_the_limit(stub):
    stub.behave(by_index)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(20)]
    with client_for(stub.url, retries=1, max_concurrency=4) as client:
        start = time.monotonic()
        results = client.post_many(CHAT, bodies)
        elapsed = time.monotonic() - start
    assert len(results) == 20
    for i, r in enumerate(results):
        if i % 5 == 0:
            assert isinstance(r, APIError) and r.status is None and r.attempts == 2
        elif i % 5 == 1:
            assert isinstance(r, APIError) and r.status == 400 and r.attempts == 1
        else:
            assert isinstance(r, dict) and r["choices"][0]["message"]["content"] == f"answer {i}"
    # 4 hanging bodies x 2 attempts x 0.3 s and 12 x 50 ms over 4 slots: about a second
    assert elapsed < 6.0
    assert 1 < stub.max_in_flight <= 4
    assert stub.count(CHAT) == 4 * 2 + 4 + 12
    assert client.stats.as_dict() == {"requests": 24, "cached": 0, "retries": 4, "failures": 8}


def test_the_limit_holds_for_post_from_many_threads(stub):
    stub.behave("delay:0.1")
    with client_for(stub.url, max_concurrency=3) as client:
        threads = [threading.Thread(target=client.chat, args=(MESSAGES,), kwargs={"model": "m"})
                   for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert stub.count(CHAT) == 12 and client.stats.requests == 12
    assert 1 < stub.max_in_flight <= 3


def test_stats_snapshot_is_a_consistent_copy():
    stats = ClientStats()
    threads = [threading.Thread(target=lambda: [stats.add(requests=1, retries=1) for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    stats.add(failures=1)
    assert (snap.requests, snap.retries, snap.failures) == (4000, 4000, 0)
    assert stats.as_dict() == {"requests": 4000, "cached": 0, "retries": 4000, "failures": 1}


def test_closed_client_takes_no_more_requests(stub):
    with client_for(stub.url) as client:
        assert client.post_many(CHAT, [{"model": "m", "messages": MESSAGES}])[0]["object"] == "chat.completion"
    with pytest.raises(RuntimeError, match="closed"):
        client.post_many(CHAT, [{"model": "m", "messages": MESSAGES}])
    with pytest.raises(RuntimeError, match="closed"):
        client.post(CHAT, {"model": "m", "messages": MESSAGES})


def test_post_many_checks_every_body_before_sending(stub):
    with client_for(stub.url) as client:
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            client.post_many(CHAT, [{"model": "m"}, {"model": object()}])
    assert stub.count() == 0


# ----------------------------------------------------------------------------- disk cache

def test_cache_hits_misses_and_resumed_runs(stub, tmp_path):
    body = {"model": "m", "messages": MESSAGES, "seed": 1}
    with client_for(stub.url, cache_dir=tmp_path) as client:
        first = client.post(CHAT, body)
        file = client.cache_path(CHAT, body)
        assert file.parent.parent == tmp_path and file.parent.name == file.stem[:2] and file.suffix == ".json"
        assert json.loads(file.read_text())["response"] == first
        # the same request, keys in another order: from disk, no request
        assert client.post(CHAT, dict(reversed(list(body.items())))) == first
        assert stub.count(CHAT) == 1 and client.stats.cached == 1 and client.stats.requests == 1
        # a different body misses; cache=False goes to the network and leaves the cache alone
        client.post(CHAT, {**body, "seed": 2})
        assert stub.count(CHAT) == 2
        client.post(CHAT, body, cache=False)
        assert stub.count(CHAT) == 3 and client.stats.cached == 1
        # the path is part of the key: the same body to /completions misses
        assert client.cache_path("/completions", body) != file
    assert not list(tmp_path.rglob("*.tmp"))

    # a resumed run: a new client, and the endpoint gone; cached requests need no network at all
    with client_for(f"http://127.0.0.1:{free_port()}/v1", cache_dir=tmp_path, retries=0) as resumed:
        assert resumed.post(CHAT, body) == first
        assert resumed.post_many(CHAT, [body, {**body, "seed": 2}])[0] == first
        assert resumed.stats.as_dict() == {"requests": 0, "cached": 3, "retries": 0, "failures": 0}
        with pytest.raises(APIError):   # and what was never cached does go to the (absent) network
            resumed.post(CHAT, {**body, "seed": 3})


@pytest.mark.parametrize("corrupt", ['{"path": "/chat/compl', "", "[1, 2]", '{"response": "text"}', "\udcff"])
def test_a_corrupt_cache_file_is_a_miss_and_is_rewritten(stub, tmp_path, corrupt):
    body = {"model": "m", "messages": MESSAGES}
    with client_for(stub.url, cache_dir=tmp_path) as client:
        file = client.cache_path(CHAT, body)
        file.parent.mkdir(parents=True)
        file.write_bytes(corrupt.encode("utf-8", "surrogateescape"))
        answer = client.post(CHAT, body)
        assert stub.count(CHAT) == 1 and client.stats.cached == 0
        assert json.loads(file.read_text())["response"] == answer
        assert client.post(CHAT, body) == answer and stub.count(CHAT) == 1 and client.stats.cached == 1


def test_failures_are_not_cached(stub, tmp_path):
    body = {"model": "m", "messages": MESSAGES}
    stub.behave("status:500")
    with client_for(stub.url, cache_dir=tmp_path, retries=1) as client:
        with pytest.raises(APIError):
            client.post(CHAT, body)
        assert not client.cache_path(CHAT, body).exists()
        stub.behave("malformed")
        with pytest.raises(APIError):
            client.post(CHAT, body)
        assert not client.cache_path(CHAT, body).exists()
        stub.behave("ok")
        client.post(CHAT, body)
        client.post(CHAT, body)
        assert stub.count(CHAT) == 5 and client.stats.cached == 1 and client.cache_path(CHAT, body).exists()
