"""A stub OpenAI-compatible server for tests: answers like a real one, or misbehaves on demand.

    from tests.verify.stub_openai import Reply, StubOpenAI, chat_completion

    with StubOpenAI(content="42") as stub:            # 127.0.0.1, a free port, a daemon thread
        client = OpenAIClient(stub.url)               # stub.url == "http://127.0.0.1:PORT/v1"
        stub.behave(["status:500", "status:500", "ok"])   # by request number; the last one repeats
        stub.behave(lambda body: "hang" if body["messages"][0]["content"] == "x" else "ok")
        stub.count("/chat/completions"), stub.count()     # requests to one path / to all paths
        stub.bodies("/chat/completions")                  # their parsed JSON bodies, in arrival order
        stub.requests                                     # every Request(method, path, headers, body)
        stub.max_in_flight                                # most requests handled at once so far
        stub.reset()                                      # forget the requests and counters

Endpoints under /v1: POST /chat/completions (a chat.completion object with `n` choices of
`content`), POST /completions (a text_completion object), GET /models (one model, `model`);
any other path gets an OpenAI-style 404. Paths are recorded and counted relative to /v1, as the
client names them.

Behaviour: behave() takes one of
  - a mode, used for every request;
  - a list of modes: request number i (counted over all requests since the last reset/behave)
    gets modes[i], the last mode once the list runs out;
  - a function handler(body) -> mode, called for each request with its parsed JSON body (None for
    a GET); an exception it raises becomes a 500 naming it.
A mode is a Reply, a dict (sent as a 200 JSON answer), or a string:
  "ok"           the endpoint's normal answer
  "delay:S"      the normal answer after S seconds
  "hang"         no answer: hold the connection for `hang_s` seconds (or until the stub stops or
                 the client hangs up), then close it
  "trickle"      the normal answer's headers, then its body one byte every 50 ms
  "malformed"    200 with a body that is not JSON
  "close"        close the connection without any response
  "status:NNN"   an OpenAI-style error {"error": {"message": "stub error NNN", ...}} with that status
Request bodies are always read in full before the reply, so "close" is a clean close, not a reset.
A waiting request ("hang", "delay", "trickle", Reply.delay_s) ends as soon as the client hangs up,
so max_in_flight counts the connections the client really holds open. Stopping is fast even with
hanging requests: handler threads are daemons, the server does not join them, and waiting ones
wake up when the stub stops.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/v1"


@dataclass
class Reply:
    """A reply spelled out: `status`, a JSON `json` or raw `text` body (neither: the endpoint's
    normal answer for status 200, an OpenAI-style error body otherwise), extra `headers` (say
    {"Retry-After": "1"}), and `delay_s` to wait first."""
    status: int = 200
    json: dict | list | None = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Request:
    method: str
    path: str                 # relative to /v1 when under it, e.g. "/chat/completions"
    headers: dict[str, str]
    body: object              # parsed JSON, or the raw text when it does not parse, None for a GET


def chat_completion(content: str | list[str], model: str = "stub-model", n: int = 1) -> dict:
    """An OpenAI chat.completion object: `n` choices of `content` (or one choice per string given)."""
    contents = [content] * n if isinstance(content, str) else list(content)
    return {
        "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
                    for i, c in enumerate(contents)],
        "usage": {"prompt_tokens": 1, "completion_tokens": sum(len(c.split()) for c in contents),
                  "total_tokens": 1 + sum(len(c.split()) for c in contents)},
    }


def text_completion(text: str, model: str = "stub-model", n: int = 1) -> dict:
    """An OpenAI text_completion object with `n` choices of `text`."""
    return {
        "id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i in range(n)],
        "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()),
                  "total_tokens": 1 + len(text.split())},
    }


def error_body(status: int, message: str | None = None) -> dict:
    return {"error": {"message": message or f"stub error {status}", "type": "stub_error",
                      "param": None, "code": status}}


class StubOpenAI:
    """The stub server (see the module docstring). Thread-safe; start()/stop() or a `with` block."""

    def __init__(self, behaviour=None, content: str = "Hello from the stub.", model: str = "stub-model",
                 hang_s: float = 30.0):
        self.content, self.model, self.hang_s = content, model, hang_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()
        self.behave(behaviour if behaviour is not None else "ok")

    # ------------------------------------------------------------------------- control

    def start(self) -> StubOpenAI:
        stub = self

        class Handler(_Handler):
            pass
        Handler.stub = stub
        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.handle_error = lambda request, address: None   # a client that hung up is no news
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stub-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> StubOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the stub is not running: call start() or use `with`"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def behave(self, behaviour) -> None:
        """Set the behaviour (a mode, a list of modes, or handler(body) -> mode) and restart the
        request numbering that a list of modes follows."""
        with self._lock:
            self._behaviour = behaviour
            self._numbered = 0

    def reset(self) -> None:
        """Forget recorded requests, counts and max_in_flight."""
        with self._lock:
            self.requests: list[Request] = []
            self._in_flight = 0
            self.max_in_flight = 0
            self._numbered = 0

    def count(self, path: str | None = None) -> int:
        """Requests received for `path` (relative to /v1, e.g. "/chat/completions"), or for all paths."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def bodies(self, path: str | None = None) -> list:
        with self._lock:
            return [r.body for r in self.requests if path is None or r.path == path]

    # ------------------------------------------------------------------------- used by the handler

    def _arrive(self, request: Request):
        """Record a request and pick its mode."""
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            behaviour, number = self._behaviour, self._numbered
            self._numbered += 1
        if isinstance(behaviour, list):
            assert behaviour, "behave([]): give at least one mode"
            return behaviour[min(number, len(behaviour) - 1)]
        if callable(behaviour):
            try:
                return behaviour(request.body)
            except Exception as e:   # the test's handler is broken: say so in the answer
                return Reply(status=500, json=error_body(500, f"stub handler raised {type(e).__name__}: {e}"))
        return behaviour

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def normal_answer(self, request: Request) -> tuple[int, dict]:
        body = request.body if isinstance(request.body, dict) else {}
        n = body.get("n", 1) if isinstance(body.get("n", 1), int) else 1
        if request.method == "POST" and request.path == "/chat/completions":
            return 200, chat_completion(self.content, model=body.get("model", self.model), n=n)
        if request.method == "POST" and request.path == "/completions":
            return 200, text_completion(self.content, model=body.get("model", self.model), n=n)
        if request.method == "GET" and request.path == "/models":
            return 200, {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                     "owned_by": "stub"}]}
        return 404, error_body(404, f"no endpoint {request.method} {PREFIX}{request.path}")


class _Server(ThreadingHTTPServer):
    request_queue_size = 128   # the default backlog of 5 drops connections of a burst of concurrent requests


class _Handler(BaseHTTPRequestHandler):
    stub: StubOpenAI
    protocol_version = "HTTP/1.1"   # Content-Length on every answer; the connection closes after it

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(None)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        self._serve(body)

    def _serve(self, body) -> None:
        stub = self.stub
        self.close_connection = True
        path = self.path[len(PREFIX):] if self.path.startswith(PREFIX + "/") else self.path
        request = Request(self.command, path, dict(self.headers.items()), body)
        try:
            self._reply(stub, request, stub._arrive(request))
        except OSError:   # the client gave up (timed out) while we answered
            pass
        finally:
            stub._leave()

    def _reply(self, stub: StubOpenAI, request: Request, mode) -> None:
        if isinstance(mode, dict):
            mode = Reply(json=mode)
        if isinstance(mode, str):
            name, _, arg = mode.partition(":")
            if name == "ok":
                mode = Reply()
            elif name == "delay":
                mode = Reply(delay_s=float(arg))
            elif name == "status":
                mode = Reply(status=int(arg))
            elif name == "malformed":
                mode = Reply(text="<html>this is not JSON {")
            elif name == "hang":
                self._wait(stub, stub.hang_s)
                return
            elif name == "close":
                return
            elif name == "trickle":
                self._trickle(stub, request)
                return
            else:
                mode = Reply(status=500, json=error_body(500, f"stub: unknown mode {mode!r}"))
        assert isinstance(mode, Reply), f"a stub mode is a str, dict or Reply, got {mode!r}"
        if mode.delay_s and self._wait(stub, mode.delay_s):
            return
        status = mode.status
        if mode.text is not None:
            text = mode.text
        elif mode.json is not None:
            text = json.dumps(mode.json)
        elif mode.status != 200:
            text = json.dumps(error_body(mode.status))
        else:
            status, answer = stub.normal_answer(request)
            text = json.dumps(answer)
        self._send(status, text.encode("utf-8"), mode.headers)

    def _wait(self, stub: StubOpenAI, seconds: float) -> bool:
        """Sleep `seconds`; True as soon as the stub stops or the client hangs up (so a request the
        client abandoned no longer counts as in flight)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if stub._stopping.is_set():
                return True
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.02))
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return True   # EOF: the client closed its end
                except OSError:
                    return True
                time.sleep(min(left, 0.02))   # unexpected extra bytes: keep waiting
        return stub._stopping.is_set()

    def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _trickle(self, stub: StubOpenAI, request: Request) -> None:
        status, answer = stub.normal_answer(request)
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        for i in range(len(data)):
            if self._wait(stub, 0.05):
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
