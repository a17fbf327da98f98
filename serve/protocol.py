"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

    req = parse_request(body, kind="chat", model_names={"tiny"}, max_len=4096)   # BadRequest naming the field
    req.messages / req.prompt, req.params (a SamplingParams without max_new_tokens fixed), req.stream, ...
    completion_response(req, choices, usage)  /  chat_response(...)  /  *_chunk(...)

Parameters served: model, n, temperature, top_p, top_k and min_p (vLLM's extensions), max_tokens
(chat: also max_completion_tokens), stop (a string or a list), seed, logprobs (the sampled tokens'
log-probabilities: completions `logprobs: 0`, chat `logprobs: true`), stream and
stream_options.include_usage, and user (ignored). Defaults follow OpenAI: temperature 1, top_p 1,
n 1; max_tokens 16 for completions, the room left in the context for chat.

Refused with a 400 that names the field (rather than silently ignored, which would hand back
something other than what was asked): a value out of range or of the wrong type, an unknown model,
echo, best_of other than n, non-zero presence/frequency penalties, logit_bias, suffix, tools,
response_format other than text, and top log-probabilities (logprobs > 0, top_logprobs > 0): the
engine returns the log-probability of the token it drew, not the distribution's top entries.
Fields this server does not know are ignored, as OpenAI-compatible servers commonly do.

Log-probabilities are those the engine reports (sampling/sampler.py): of the drawn token under the
temperature-scaled distribution, before top-p / top-k truncation, and under T = 1 for greedy.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from sampling.types import SamplingParams

MAX_N = 128


class BadRequest(ValueError):
    """A request this server refuses: HTTP `status` (400 unless said) with `message`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


@dataclass
class Request:
    kind: str                           # "completions" | "chat"
    model: str
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_tokens: int | None              # None: the room left in the context (chat)
    stop: list[str]
    seed: int | None
    logprobs: bool
    stream: bool
    include_usage: bool
    prompt: str | list[int] | None = None   # completions: text or token ids
    messages: list[dict] | None = None      # chat
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def params(self, prompt_len: int, max_len: int, stop_ids: list[int]) -> SamplingParams:
        """The engine's SamplingParams for a prompt of prompt_len tokens in a context of max_len."""
        room = max_len - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens; this model's context is {max_len} tokens, which "
                             f"leaves no room for a completion", "messages" if self.kind == "chat" else "prompt")
        max_new = room if self.max_tokens is None else self.max_tokens
        if max_new > room:
            raise BadRequest(f"max_tokens {max_new} with a prompt of {prompt_len} tokens needs {prompt_len + max_new} "
                             f"positions, but this model's context is {max_len} tokens (at most {room} new tokens "
                             f"for this prompt)", "max_tokens")
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, max_new_tokens=max_new, stop_token_ids=list(stop_ids),
                              stop=self.stop or None, seed=self.seed)


def _number(body: dict, key: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and value > hi):
        lo_text = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_text = "" if hi is None else f"<= {hi}"
        raise BadRequest(f"'{key}' must be {' and '.join(t for t in (lo_text, hi_text) if t)}, got {value!r}", key)
    return value


def _refuse_unless(body: dict, key: str, allowed, why: str) -> None:
    if key in body and body[key] not in allowed:
        raise BadRequest(f"'{key}' {body[key]!r} is not supported by this server: {why}", key)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"'stop' must be a string or a list of strings, got {stop!r:.200}", "stop")
    return [s for s in stop if s]


def _content(value, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{k}]: only text parts ({{'type': 'text', 'text': ...}}) are served, got "
                                 f"{part!r:.120}", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where} must be a string or a list of text parts, got {type(value).__name__}", "messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{j}] must be an object with a string 'role', got {m!r:.120}", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{j}]: unknown role {m['role']!r} (expected system, user, assistant or tool)",
                             "messages")
        msg = {"role": "system" if m["role"] == "developer" else m["role"],
               "content": _content(m.get("content"), f"messages[{j}].content")}
        for key in ("reasoning_content", "name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # one prompt in a list; several prompts per request are not served
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def parse_request(body, kind: str, model_names: set[str]) -> Request:
    """Validate an OpenAI request body; BadRequest (HTTP 400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or model not in model_names:
        raise BadRequest(f"unknown model {model!r}; this server serves {sorted(model_names)} (GET /v1/models)",
                         "model")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise BadRequest(f"'best_of' {best_of!r} is not supported (only best_of == n)", "best_of")
    for key in ("presence_penalty", "frequency_penalty"):
        _number(body, key, 0.0, -2.0, 2.0)
        _refuse_unless(body, key, (0, 0.0, None), "penalties are not applied by the sampler")
    _refuse_unless(body, "echo", (False, None), "the prompt is not echoed")
    _refuse_unless(body, "suffix", (None, ""), "no insertion")
    _refuse_unless(body, "logit_bias", (None, {}), "no logit bias")
    if body.get("tools"):
        raise BadRequest("'tools' is not supported by this server", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise BadRequest(f"'response_format' {fmt!r:.80} is not supported (text only)", "response_format")
    if kind == "chat":
        logprobs = body.get("logprobs", False)
        if logprobs not in (True, False, None):
            raise BadRequest(f"'logprobs' must be true or false, got {logprobs!r}", "logprobs")
        if _number(body, "top_logprobs", 0, 0, 20, integer=True):
            raise BadRequest("'top_logprobs' > 0 is not supported: the engine returns the drawn token's "
                             "log-probability only", "top_logprobs")
        logprobs = bool(logprobs)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        top = _number(body, "logprobs", None, 0, 5, integer=True)
        if top:
            raise BadRequest(f"'logprobs' {top} is not supported: the engine returns the drawn token's "
                             f"log-probability only (logprobs: 0)", "logprobs")
        logprobs = top is not None
        max_tokens, key = body.get("max_tokens", 16), "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({key: max_tokens}, key, None, 1, integer=True)
    stream = body.get("stream", False)
    if stream not in (True, False, None):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest(f"'stream_options' must be an object, got {opts!r:.80}", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BadRequest(f"'seed' must be a non-negative integer, got {seed!r}", "seed")
    top_k = _number(body, "top_k", 0, -1, integer=True)
    req = Request(kind=kind, model=model, n=n, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                  top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)), top_k=max(top_k, 0),
                  min_p=float(_number(body, "min_p", 0.0, 0.0, 1.0)), max_tokens=max_tokens, stop=_stop(body),
                  seed=seed, logprobs=logprobs, stream=bool(stream), include_usage=bool(opts.get("include_usage")))
    if req.min_p >= 1.0:
        raise BadRequest(f"'min_p' must be < 1, got {req.min_p}", "min_p")
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    return req


# ---- responses ------------------------------------------------------------------------------------

def _logprobs(req: Request, tokens: list[str], logprobs: list[float]):
    if not req.logprobs:
        return None
    if req.kind == "chat":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Request, choices: list[dict], use: dict) -> dict:
    """The whole (non-streamed) response. choices: dicts with text, finish_reason, tokens (their
    strings) and logprobs, in index order."""
    if req.kind == "chat":
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                "logprobs": _logprobs(req, c["tokens"], c["logprobs"]), "finish_reason": c["finish_reason"]}
               for i, c in enumerate(choices)]
        obj = "chat.completion"
    else:
        out = [{"index": i, "text": c["text"], "logprobs": _logprobs(req, c["tokens"], c["logprobs"]),
                "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
        obj = "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": req.model, "choices": out,
            "usage": use, "system_fingerprint": None}


def chunk(req: Request, index: int, text: str | None, finish_reason: str | None = None, first: bool = False,
          tokens: list[str] | None = None, logprobs: list[float] | None = None) -> dict:
    """One server-sent event of a stream: a choice's new text (or, for chat, its opening role)."""
    lp = _logprobs(req, tokens or [], logprobs or []) if tokens else None
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": req.model, "choices": [choice]}


def usage_chunk(req: Request, use: dict) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": req.model, "choices": [], "usage": use}


def _id(req: Request) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id
