"""--stage serve: an OpenAI-compatible HTTP server over the rollout engine.

    python train.py --stage serve --model DIR [--host 127.0.0.1] --port 8000 [--api-key KEY]
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "DIR-name", "messages": [{"role": "user", "content": "1 + 1?"}], "max_tokens": 64}'

Any OpenAI client (the `openai` package, lighteval's and evalplus' OpenAI backends, distilabel, our
own verify.openai_client) can then sample from a checkpoint of this project. Endpoints:

    GET  /v1/models                 the one served model (--served-model-name, default the --model
                                    folder's name or the --preset)
    POST /v1/completions            a text prompt (or token ids), continued as is
    POST /v1/chat/completions       messages rendered with the checkpoint's chat template (or
                                    --chat-template) and the assistant turn opened
    GET  /health                    200 once the model is loaded
    GET  /stats                     requests served, tokens, and the engine's counters (JSON)

Parameters, defaults and what is refused: serve/protocol.py. The returned text: serve/text.py.

How requests become batches. Two kinds of threads: one HTTP thread per connection (the standard
library's ThreadingHTTPServer) and one engine thread that owns the engine (sampling/engine.py; it
is not thread-safe, so nothing else touches it). An HTTP thread validates the request, renders and
tokenizes the prompt, checks it against the engine (a prompt that can never fit is a 400), and
hands it to the engine thread through a queue; it then waits on the request's own queue of events.
The engine thread, between steps, adds every request that arrived (its n samples share the prompt's
prefill and pages), drops those whose client went away, and steps: requests arriving at different
times decode in the same batch (continuous batching), and those beyond --sampler-batch-size rows or
the cache's pages wait in the engine's queue. Each step's events go to their requests' queues; a
streaming request turns them into server-sent events as they come, the others wait for the end.

Stops: the model's end-of-sequence ids (generation_config.json's eos_token_id when the folder has
one, else config.json's, else the tokenizer's EOS) and the request's stop strings.

A failure inside the engine step (which should not happen) fails the requests in flight with a 500
and the server goes on with a fresh engine state; a client that disconnects mid-stream has its
sequences aborted at once. SIGINT / SIGTERM stop the server; <run>/summary.json then holds its
totals. <run>/server.json, written once the socket listens, gives the URL (with --port 0 the port
the system chose), so scripts and tests can find it.
"""
from __future__ import annotations

import json
import queue
import signal
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from serve.protocol import BadRequest, Request, chunk, parse_request, response, usage, usage_chunk
from serve.text import ChoiceText

MAX_BODY_BYTES = 32 * 2**20


# ---- the engine thread -----------------------------------------------------------------------------

class Job:
    """One HTTP request inside the engine thread: its prompt, params, and the queue its events go to.
    The queue receives ("event", Event), then ("done", None), or ("error", message)."""

    def __init__(self, prompt_ids: list[int], params):
        self.prompt_ids, self.params = prompt_ids, params
        self.events: queue.Queue = queue.Queue()
        self.seqs: list[int] = []
        self.open = 0            # samples not finished yet
        self.cancelled = False


class EngineLoop:
    """The engine's only driver: takes Jobs from any thread, steps, and routes events to them."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.inbox: queue.Queue = queue.Queue()
        self.owner: dict[int, Job] = {}
        self.stats = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        self.inbox.put(job)
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.inbox.put(("cancel", job))

    def _take(self, engine, block: bool) -> None:
        """Add what arrived (waiting for something when the engine is idle)."""
        while True:
            try:
                item = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, tuple):        # ("cancel", job)
                self._drop(engine, item[1])
                continue
            if item.cancelled:
                continue
            try:
                item.seqs = engine.add(item.prompt_ids, item.params)
            except (ValueError, TypeError) as e:   # checked before submission; a race with nothing else
                item.events.put(("error", str(e)))
                continue
            item.open = len(item.seqs)
            self.owner.update((s, item) for s in item.seqs)
            self.stats["requests"] += 1

    def _drop(self, engine, job: Job) -> None:
        for s in job.seqs:
            if s in engine.seqs:
                engine.abort(s)
            self.owner.pop(s, None)
        self.stats["cancelled"] += 1

    def _run(self) -> None:
        with self.sampler.driving() as engine:
            while not self._stop.is_set():
                self._take(engine, block=not engine.has_work())
                if self._stop.is_set() or not engine.has_work():
                    continue
                try:
                    events = engine.step()
                except Exception:   # process boundary: fail what is in flight, keep serving
                    message = traceback.format_exc(limit=3)
                    for job in set(self.owner.values()):
                        job.events.put(("error", f"the engine failed: {message}"))
                        self._drop(engine, job)
                    self.stats["engine_errors"] += 1
                    continue
                for ev in events:
                    job = self.owner.get(ev.seq)
                    if job is None:
                        continue
                    job.events.put(("event", ev))
                    if ev.kind == "finished":
                        engine.pop(ev.seq)
                        del self.owner[ev.seq]
                        job.open -= 1
                        self.stats["completion_tokens"] += len(ev.completion.token_ids)
                        if job.open == 0:
                            job.events.put(("done", None))
            for job in set(self.owner.values()):
                job.events.put(("error", "the server is shutting down"))


# ---- the service: requests to jobs, events to responses --------------------------------------------

class Service:
    """What the HTTP handler calls: validation, prompt rendering, and the engine loop."""

    def __init__(self, sampler, tok, model_name: str, max_len: int, stop_ids: list[int], chat_template: str | None,
                 api_key: str | None = None):
        self.sampler, self.tok, self.model_name, self.max_len = sampler, tok, model_name, max_len
        self.stop_ids, self.chat_template, self.api_key = list(stop_ids), chat_template, api_key
        self.loop = EngineLoop(sampler)
        self.counts = Counter()
        self.lock = threading.Lock()
        self.started = time.time()

    def count(self, key: str, k: int = 1) -> None:
        with self.lock:
            self.counts[key] += k

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(self.started),
                                            "owned_by": "r1-recipe", "max_model_len": self.max_len}]}

    def stats(self) -> dict:
        e = self.sampler.engine.stats
        with self.lock:
            counts = dict(self.counts)
        return {"model": self.model_name, "uptime_s": time.time() - self.started, "http": counts,
                "engine": {**dict(self.loop.stats), "generated_tokens": e.generated_tokens,
                           "prefill_tokens": e.prefill_tokens, "decode_steps": e.decode_steps,
                           "mean_rows": e.mean_rows, "peak_rows": e.peak_rows, "preemptions": e.preemptions}}

    def prompt_ids(self, req: Request) -> list[int]:
        if req.kind == "chat":
            from data.chat import render
            source = self.chat_template if self.chat_template is not None else self.tok.chat_template
            if source is None:
                raise BadRequest("this model's tokenizer has no chat template (start the server with --chat-template); "
                                 "/v1/completions takes plain prompts")
            try:
                text = render(req.messages, source, add_generation_prompt=True, **self.tok.special_tokens)
            except Exception as e:   # a template that raises on this conversation (e.g. roles out of order)
                raise BadRequest(f"the chat template cannot render these messages: {e}", "messages") from None
            return self.tok.encode(text)
        if isinstance(req.prompt, list):
            return list(req.prompt)
        return self.tok.encode(req.prompt)

    def prepare(self, kind: str, body) -> tuple[Request, Job]:
        req = parse_request(body, kind, {self.model_name})
        ids = self.prompt_ids(req)
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        params = req.params(len(ids), self.max_len, self.stop_ids)
        try:
            self.sampler.engine.check(ids, params, where="the prompt")
        except ValueError as e:
            raise BadRequest(str(e), "prompt" if req.kind == "completions" else "messages") from None
        return req, Job(ids, params)

    def run(self, kind: str, body, send_json, start_stream, send_event) -> None:
        """Serve one completion request: send_json(status, obj) for a whole answer; for a stream,
        start_stream() then send_event(obj | "[DONE]") per event (raising OSError once the client
        has gone, which cancels the request)."""
        req, job = self.prepare(kind, body)
        texts = [ChoiceText(self.tok, req.stop, self.stop_ids) for _ in range(req.n)]
        pieces = [{"tokens": [], "logprobs": []} for _ in range(req.n)]
        finish = [None] * req.n
        index = {}
        self.loop.submit(job)
        self.count(f"requests/{kind}")
        streaming = req.stream
        try:
            if streaming:
                start_stream()
                for i in range(req.n) if req.kind == "chat" else ():
                    send_event(chunk(req, i, None, first=True))
            while True:
                what, item = job.events.get()
                if what == "error":
                    raise RuntimeError(item)
                if what == "done":
                    break
                ev = item
                i = index.setdefault(ev.seq, job.seqs.index(ev.seq))
                delta = texts[i].feed(ev.token_ids)
                toks = [self._token_text(t) for t in ev.token_ids] if req.logprobs else []   # only when asked
                pieces[i]["tokens"] += toks
                pieces[i]["logprobs"] += ev.logprobs if req.logprobs else []
                if ev.kind == "finished":
                    delta += texts[i].finish()
                    finish[i] = ev.completion.finish_reason
                if streaming and (delta or finish[i] is not None or (req.logprobs and toks)):
                    send_event(chunk(req, i, delta, finish[i], tokens=toks if req.logprobs else None,
                                     logprobs=ev.logprobs if req.logprobs else None))
        except OSError:
            self.loop.cancel(job)
            self.count("disconnected")
            raise
        except BaseException:
            self.loop.cancel(job)
            raise
        done_tokens = sum(len(t.ids) for t in texts)
        use = usage(len(job.prompt_ids), done_tokens)
        self.count("completion_tokens", done_tokens)
        self.count("prompt_tokens", len(job.prompt_ids))
        if streaming:
            if req.include_usage:
                send_event(usage_chunk(req, use))
            send_event("[DONE]")
            return
        choices = [{"text": t.text, "finish_reason": f, **p} for t, f, p in zip(texts, finish, pieces)]
        send_json(200, response(req, choices, use))

    def _token_text(self, t: int) -> str:
        if not 0 <= t < self.tok.vocab_size:
            return ""
        return self.tok.decode([t])


# ---- HTTP -------------------------------------------------------------------------------------------

def make_handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "r1-recipe"

        def log_message(self, fmt, *args):   # one line per request is the client's business, not stderr's
            pass

        def _send_json(self, status: int, obj) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _error(self, err: BadRequest) -> None:
            service.count(f"status/{err.status}")
            self._send_json(err.status, err.body())

        def _authorised(self) -> bool:
            if service.api_key is None:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {service.api_key}":
                return True
            self._error(BadRequest("missing or wrong API key (expected 'Authorization: Bearer KEY')", status=401))
            return False

        def _path(self) -> str:
            return self.path.split("?", 1)[0].rstrip("/")

        def do_GET(self):
            path = self._path()
            if path == "/health":
                return self._send_json(200, {"status": "ok"})
            if not self._authorised():
                return
            if path == "/v1/models":
                return self._send_json(200, service.models())
            if path == "/stats":
                return self._send_json(200, service.stats())
            self._error(BadRequest(f"no such endpoint: GET {path}", status=404))

        def do_POST(self):
            path = self._path()
            kinds = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
            if not self._authorised():
                return self._drain()
            if path not in kinds:
                self._drain()
                return self._error(BadRequest(f"no such endpoint: POST {path} (served: {', '.join(kinds)})",
                                              status=404))
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._error(BadRequest("the request needs a Content-Length header", status=411))
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                return self._error(BadRequest(f"the request body has {length} bytes; at most {MAX_BODY_BYTES}",
                                              status=413))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return self._error(BadRequest(f"the request body is not valid JSON: {e}"))
            stream = {"started": False}

            def start_stream():
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                stream["started"] = True

            def send_event(obj):
                data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
                payload = f"data: {data}\n\n".encode("utf-8")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                if obj == "[DONE]":
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            try:
                service.run(kinds[path], body, self._send_json, start_stream, send_event)
                service.count("status/200")
            except BadRequest as e:
                self._error(e)
            except OSError:
                self.close_connection = True      # the client went away; its sequences were aborted
            except Exception as e:
                service.count("status/500")
                if stream["started"]:           # too late for a status: say it in the stream and end it
                    self.close_connection = True
                    try:
                        send_event({"error": {"message": str(e), "type": "server_error"}})
                        send_event("[DONE]")
                    except OSError:
                        pass
                else:
                    self._send_json(500, BadRequest(str(e), status=500).body())

        def _drain(self):
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if 0 < length <= MAX_BODY_BYTES:
                    self.rfile.read(length)
                else:
                    self.close_connection = True
            except ValueError:
                self.close_connection = True

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128


# ---- the stage ----------------------------------------------------------------------------------------

def generation_stop_ids(model_dir, model_config, tok) -> list[int]:
    """The end-of-sequence ids a served completion stops at: generation_config.json's eos_token_id
    (chat models list their end-of-turn token there), else config.json's, else the tokenizer's EOS."""
    if model_dir is not None:
        path = Path(model_dir) / "generation_config.json"
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if eos is not None:
                eos = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(t, int) for t in eos):
                    raise ValueError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
                return eos
    if model_config.eos_token_ids:
        return list(model_config.eos_token_ids)
    return [tok.eos_id] if tok.eos_id is not None else []


def check_flags(args, world_size: int) -> list[str]:
    if world_size > 1:
        raise ValueError(f"--stage serve runs in one process (it got WORLD_SIZE={world_size}); start one server per "
                         f"GPU and balance requests over them")
    if (args.model is None) == (args.preset is None):
        raise ValueError("--stage serve needs exactly one of --model DIR and --preset NAME")
    from model.build import check_lora_targets
    check_lora_targets(args, sampling=True)   # --lora-init: serve base + adapter
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0..65535 (0: any free port)")
    if args.serve_max_len is not None and args.serve_max_len < 2:
        raise ValueError(f"--serve-max-len {args.serve_max_len}: expected >= 2")
    if args.sampler_batch_size < 1:
        raise ValueError(f"--sampler-batch-size {args.sampler_batch_size}: expected >= 1")
    from sampling.sampler import engine_options
    engine_options(args)
    return []


def model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model).resolve().name if args.model is not None else args.preset


class RunningServer:
    """A Service listening on (host, port) with its engine thread and its HTTP thread, until close().

        with RunningServer(sampler, tok, "tiny", max_len=1024, stop_ids=[eos]) as srv:
            srv.url    # http://127.0.0.1:PORT/v1
    """

    def __init__(self, sampler, tok, model_name: str, max_len: int, stop_ids: list[int],
                 chat_template: str | None = None, api_key: str | None = None, host: str = "127.0.0.1",
                 port: int = 0):
        self.service = Service(sampler, tok, model_name, max_len, stop_ids, chat_template, api_key=api_key)
        self.httpd = Server((host, port), make_handler(self.service))
        self.host, self.port = self.httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/v1"
        self.service.loop.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.loop.stop()
        self.service.sampler.release()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_serve(args, run, info) -> int:
    """--stage serve (module docstring): load, listen, serve until SIGINT / SIGTERM."""
    import torch

    from data.chat import template_source
    from data.tokenizer import load_tokenizer
    from model.build import build_sampling_model
    from runtime.distributed import print0
    from runtime.rundir import write_json_atomic
    from sampling.sampler import Sampler, engine_options

    check_flags(args, info.world_size)
    device = info.device
    tok = load_tokenizer(args.tokenizer, args.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_sampling_model(args, tok, device=device, dtype=dtype).eval()   # --lora-init folded in
    max_len = args.serve_max_len or model.config.max_position_embeddings
    stop_ids = generation_stop_ids(args.model, model.config, tok)
    sampler = Sampler(model, max_batch_size=args.sampler_batch_size, max_seq_len=max_len, tokenizer=tok,
                      **engine_options(args))
    template = template_source(args.chat_template)
    stopped = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stopped.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    srv = RunningServer(sampler, tok, model_name(args), max_len, stop_ids, template, api_key=args.api_key,
                        host=args.host, port=args.port)
    try:
        write_json_atomic(run.path / "server.json", {"url": srv.url, "host": srv.host, "port": srv.port,
                                                     "model": srv.service.model_name, "max_model_len": max_len,
                                                     "stop_token_ids": stop_ids})
        print0(f"serve: {srv.service.model_name} at {srv.url} (context {max_len} tokens, {args.sampler_batch_size} "
               f"rows, stops at ids {stop_ids}); Ctrl-C to stop")
        while not stopped.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        srv.close()
        write_json_atomic(run.path / "summary.json", srv.service.stats())
        print0(f"serve: stopped after {srv.service.counts.get('status/200', 0)} completed requests")
    return 0
