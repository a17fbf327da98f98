"""A small client for OpenAI-compatible HTTP servers (a remote teacher, an LLM judge), standard
library only, so it runs in light worker processes.

    from verify.openai_client import OpenAIClient, APIError
    with OpenAIClient("http://127.0.0.1:8000/v1", api_key=None, timeout_s=120.0, retries=3,
                      max_concurrency=16, cache_dir="runs/teacher-cache") as client:
        r = client.chat([{"role": "user", "content": "2+2?"}], model="teacher", n=4, temperature=0.6)
        r["choices"][0]["message"]["content"]
        judged = client.post_many("/chat/completions", bodies)   # in order; a failure is an APIError
        client.models()                                          # ids of GET /models
        client.stats.as_dict()   # {"requests": ..., "cached": ..., "retries": ..., "failures": ...}

Each request is one JSON object POSTed to base_url + path ("/chat/completions" with base_url
"http://host:8000/v1" goes to http://host:8000/v1/chat/completions); the answer must be a JSON
object, which is returned as a dict. Environment proxies are not used; a new connection is made
for each attempt (simple, and a broken connection never poisons the next request).

Failures and retries. Every attempt has `timeout_s` to finish: it is the socket timeout of the
connect and of each read, and a deadline for the whole response body, so a server that hangs, or
trickles its answer byte by byte, costs at most about timeout_s per attempt (a server that
trickles its *headers* is bounded per read only). Retried, with exponential back-off
(backoff_s * 2**k before the k-th retry, k = 0, 1, ..., capped at max_backoff_s, times a random
factor in [0.5, 1] so many clients do not retry in lockstep; a `Retry-After` header in seconds
is waited at least, capped at max_backoff_s too):
  - no response: connection refused, reset or closed before an answer, DNS failure, timeout;
  - HTTP 408, 409, 429 and 5xx;
  - a 2xx answer whose body is not a JSON object (a proxy's HTML page, a truncated body).
Not retried: any other status (400, 401, 404, ...), raised at once with the server's message.
After `retries` retries (retries + 1 attempts) the last failure is raised as APIError. A POST
that timed out may have been processed by the server; retrying it is fine for completions (they
are stateless) but costs the server the work twice. Only APIError leaves post() for network or
protocol trouble; a body that is not JSON raises ValueError before anything is sent.

Concurrency. At most `max_concurrency` attempts are in flight at once over all the threads using
one client (a semaphore around each network attempt; back-off sleeps hold no slot). post_many
runs its bodies on a thread pool of max_concurrency workers, created on first use and kept until
close(); each body's failure is its own (an APIError in its place of the result list).

Disk cache (cache_dir not None): a successful POST is stored under its request,
    key = sha256(json.dumps({"path": path, "body": body}, sort_keys=True, separators=(",", ":"),
                 ensure_ascii=False))
at cache_dir/<key[:2]>/<key>.json, and the same request is answered from there without a network
request (stats.cached). The key holds neither the base URL nor the API key: the same request to a
moved endpoint, or from a resumed run, hits the cache. Files are written atomically (a temporary
file in the same directory, flushed and fsynced, then os.replace), so a process killed mid-write
leaves at most a stray `*.tmp` file, never a half file read as a hit; a cache file that does not
parse is a miss and is overwritten; one that cannot be written (a full disk) raises OSError, so a
long generation stops loudly instead of silently losing its cache. Failures are never cached; post(..., cache=False) skips the
cache both ways; GET requests are never cached. Two threads asking for the same uncached request
at once may both reach the network (the later write wins; both answers are valid). Sampling with
temperature > 0 from the cache returns the *same* samples again: put a seed or an index in the
body when distinct samples of one prompt are wanted.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

RETRY_STATUSES = frozenset({408, 409, 429})   # and every 5xx
BODY_LIMIT = 2000                             # characters of a failed response kept in APIError.body


class APIError(RuntimeError):
    """A request that failed for good (after its retries, or at once for a status not retried).

    status: the HTTP status of the last attempt, None when no response came (refused, reset,
    closed, timed out); url; body: the last response's text (at most BODY_LIMIT characters);
    attempts: how many attempts were made. The message names the URL, the status or exception,
    and the server's own error message when the body has one ({"error": {"message": ...}})."""

    def __init__(self, message: str, status: int | None = None, url: str = "", body: str = "",
                 attempts: int = 0):
        super().__init__(message)
        self.status, self.url, self.body, self.attempts = status, url, body, attempts

    def __reduce__(self):   # picklable with its attributes (results may cross process boundaries)
        return (type(self), (str(self), self.status, self.url, self.body, self.attempts))


@dataclass
class ClientStats:
    """Counters over a client's life. requests: network attempts made (retries included); cached:
    requests answered from the disk cache; retries: attempts after the first; failures: requests
    that ended in APIError. Updated under a lock; read a consistent copy with snapshot()/as_dict()."""
    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> ClientStats:
        with self._lock:
            return ClientStats(self.requests, self.cached, self.retries, self.failures)

    def as_dict(self) -> dict[str, int]:
        s = self.snapshot()
        return {"requests": s.requests, "cached": s.cached, "retries": s.retries, "failures": s.failures}


def server_message(text: str) -> str | None:
    """The error message of an error body: OpenAI's {"error": {"message": ...}}, or the plain
    {"error": "..."}, {"message": "..."}, {"detail": "..."} forms other servers use; else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    error = value.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    for v in (error, value.get("message"), value.get("detail")):
        if isinstance(v, str):
            return v
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class OpenAIClient:
    """An OpenAI-compatible HTTP client with timeouts, retries, a concurrency limit and a disk cache
    (see the module docstring). Thread-safe: one client may be shared by many threads."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_concurrency: int = 16, cache_dir: str | os.PathLike | None = None,
                 headers: dict[str, str] | None = None):
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, "
                             f"like http://127.0.0.1:8000/v1; got {base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"base_url may not carry a query or fragment; got {base_url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"base_url has an invalid port; got {base_url!r}") from None
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (isinstance(backoff_s, (int, float)) and backoff_s >= 0):
            raise ValueError(f"backoff_s must be a number of seconds >= 0, got {backoff_s!r}")
        if not (isinstance(max_backoff_s, (int, float)) and max_backoff_s >= 0):
            raise ValueError(f"max_backoff_s must be a number of seconds >= 0, got {max_backoff_s!r}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, port
        self._prefix = parts.path.rstrip("/")
        self.timeout_s, self.retries = float(timeout_s), retries
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.max_concurrency = max_concurrency
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "Connection": "close", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.stats = ClientStats()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._random = random.Random()   # jitter of our own: never consumes the caller's seeded global RNG
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------------- public calls

    def post(self, path: str, body: dict, cache: bool = True) -> dict:
        """POST `body` as JSON to base_url + path and return the answer's JSON object; from the disk
        cache when there is one and `cache`. Raises APIError (see the module docstring)."""
        path, data = self._normalise(path), self._encode(path, body)
        return self._post(path, body, data, cache)

    def get(self, path: str) -> dict:
        """GET base_url + path as a JSON object (never cached; retried like post)."""
        path = self._normalise(path)
        return self._request("GET", path, None)

    def models(self) -> list[str]:
        """The model ids of GET /models ({"data": [{"id": ...}, ...]})."""
        url = self.base_url + "/models"
        answer = self.get("/models")
        data = answer.get("data")
        if not (isinstance(data, list) and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data)):
            raise APIError(f"GET {url}: expected {{\"data\": [{{\"id\": ...}}, ...]}}, got "
                           f"{json.dumps(answer)[:200]}", status=200, url=url,
                           body=json.dumps(answer)[:BODY_LIMIT], attempts=1)
        return [m["id"] for m in data]

    def chat(self, messages: list[dict], model: str, cache: bool = True, **params) -> dict:
        """POST /chat/completions {"model": model, "messages": messages, **params} (n, temperature,
        max_tokens, ... as the server knows them)."""
        return self.post("/chat/completions", {"model": model, "messages": messages, **params}, cache=cache)

    def complete(self, prompt: str | list, model: str, cache: bool = True, **params) -> dict:
        """POST /completions {"model": model, "prompt": prompt, **params}."""
        return self.post("/completions", {"model": model, "prompt": prompt, **params}, cache=cache)

    def post_many(self, path: str, bodies: list[dict], cache: bool = True) -> list[dict | APIError]:
        """post() every body concurrently (max_concurrency at a time); the results in the bodies'
        order, each a dict or the APIError its request ended in. Every body is encoded before any
        is sent, so a body that is not JSON raises ValueError and nothing goes out."""
        path = self._normalise(path)
        encoded = [self._encode(path, body) for body in bodies]
        pool = self._executor()
        futures = [pool.submit(self._post, path, body, data, cache) for body, data in zip(bodies, encoded)]
        results: list[dict | APIError] = []
        try:
            for f in futures:
                try:
                    results.append(f.result())
                except APIError as e:
                    results.append(e)
        except BaseException:   # a local failure (cache disk full, Ctrl-C): stop what has not started
            for f in futures:
                f.cancel()
            raise
        return results

    def cache_path(self, path: str, body: dict) -> Path:
        """The cache file of this request (whether or not it exists yet)."""
        if self.cache_dir is None:
            raise ValueError("this client has no cache_dir, so requests have no cache path")
        text = json.dumps({"path": self._normalise(path), "body": body}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def close(self) -> None:
        """Shut down the thread pool: requests not started are cancelled, running ones finish (each
        is bounded by its timeouts). The client takes no more requests."""
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OpenAIClient({self.base_url!r}, timeout_s={self.timeout_s}, retries={self.retries}, "
                f"max_concurrency={self.max_concurrency}, cache_dir={self.cache_dir!r})")

    # ------------------------------------------------------------------------- internals

    @staticmethod
    def _normalise(path: str) -> str:
        if not isinstance(path, str) or not path.strip("/"):
            raise ValueError(f"path must be an endpoint like '/chat/completions', got {path!r}")
        return "/" + path.lstrip("/")

    @staticmethod
    def _encode(path: str, body: dict) -> bytes:
        if not isinstance(body, dict):
            raise ValueError(f"request body for {path} must be a JSON object (dict), got {type(body).__name__}")
        try:
            return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:   # a tensor, a set, NaN, a lone surrogate
            raise ValueError(f"request body for {path} is not JSON-serialisable: {e}") from None

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai-client")
            return self._pool

    def _post(self, path: str, body: dict, data: bytes, cache: bool) -> dict:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        file = self.cache_path(path, body) if cache and self.cache_dir is not None else None
        if file is not None:
            hit = _read_cache(file)
            if hit is not None:
                self.stats.add(cached=1)
                return hit
        answer = self._request("POST", path, data)
        if file is not None:
            _write_cache(file, {"path": path, "body": body, "response": answer})
        return answer

    def _request(self, method: str, path: str, data: bytes | None) -> dict:
        """One request with its retries: the answer's JSON object, or APIError."""
        url = self.base_url + path
        for attempt in range(1, self.retries + 2):
            retry_after = None
            with self._slots:
                self.stats.add(requests=1)
                try:
                    status, retry_after, text = self._attempt(method, self._prefix + path, data)
                except (OSError, http.client.HTTPException) as e:
                    # refused, reset, closed without an answer (RemoteDisconnected), timeout, DNS, TLS
                    status, text, what = None, "", f"no response ({type(e).__name__}: {e})"
            if status is not None and 200 <= status < 300:
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = None
                if isinstance(answer, dict):
                    return answer
                what = f"HTTP {status} but the body is not a JSON object: {text[:200]!r}"
                retryable = True
            elif status is not None:
                message = server_message(text)
                what = f"HTTP {status}: {message if message is not None else repr(text[:200])}"
                retryable = status in RETRY_STATUSES or status >= 500
            else:
                retryable = True
            if not retryable or attempt > self.retries:
                self.stats.add(failures=1)
                raise APIError(f"{method} {url} failed after {_plural(attempt, 'attempt')}: {what}",
                               status=status, url=url, body=text[:BODY_LIMIT], attempts=attempt)
            self.stats.add(retries=1)
            time.sleep(self._backoff(attempt, retry_after))
        raise AssertionError("unreachable: the loop returns or raises")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        delay = self.backoff_s * 2 ** min(attempt - 1, 60) * (0.5 + 0.5 * self._random.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff_s)

    def _attempt(self, method: str, target: str, data: bytes | None) -> tuple[int, float | None, str]:
        """(status, Retry-After seconds or None, body text) of one attempt, all within timeout_s;
        raises OSError / http.client.HTTPException when no complete answer came."""
        deadline = time.monotonic() + self.timeout_s
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request(method, target, body=data, headers=self._headers)
            sock = conn.sock   # kept: getresponse() drops conn.sock when the server closes after answering
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            response = conn.getresponse()
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the response did not complete within {self.timeout_s:g} s")
                sock.settimeout(left)
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            text = b"".join(chunks).decode("utf-8", "replace")
            return response.status, _retry_after(response.getheader("Retry-After")), text
        finally:
            conn.close()


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; None when absent or not a number (the HTTP-date form is ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _read_cache(file: Path) -> dict | None:
    """The cached response, or None for a miss (no file, or one that does not parse)."""
    try:
        entry = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    response = entry.get("response") if isinstance(entry, dict) else None
    return response if isinstance(response, dict) else None


def _write_cache(file: Path, entry: dict) -> None:
    """Write `entry` to `file` atomically: a complete file appears under its name, or none does."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
