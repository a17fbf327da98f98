"""Models behind an OpenAI-compatible endpoint: the generate stage's remote teacher, and the flags
of the LLM judges (verify/judge.py) that GRPO and the generate stage share.

    teacher = RemoteTeacher(client, "deepseek-r1", tok=None)
    outs = teacher.generate(conversations, [SamplingParams(n=4, temperature=0.6, max_new_tokens=32768, seed=s)])
    outs[i][j] -> RemoteCompletion(token_ids, logprobs=[], finish_reason, text, num_tokens), None if refused

The remote teacher is how Open-R1 made its distillation data: R1 served by vLLM or SGLang, traces
drawn through the OpenAI API. Each conversation is sent to /chat/completions as messages (the
endpoint applies its own model's chat template) once per sample, with n = 1 and the sample's own
seed (seed * 1000 + j): per-sample requests are what make a resumed run cheap (each answered sample
is cached on disk by verify.openai_client, so a crash mid-batch costs only the requests in flight)
and they spread over a server's replicas; a server with prefix caching pays the shared prompt once.

The text kept is the answer's content, with the reasoning in front as <think>...</think> when the
endpoint returns it apart (`reasoning_content`, as DeepSeek's API and vLLM's reasoning parsers
do, or `reasoning`). Token counts are the endpoint's (usage.completion_tokens, exact for n = 1);
token ids are the run's tokenizer's encoding of the text when the run has one (length rewards then
count the student's tokens), else empty.

Failures: a request the endpoint refuses as bad (HTTP 4xx: a prompt too long for it, say) is that
sample's failure: counted under teacher_failed and dropped; one that does not get through after
the retries (refused connection, time-outs, 5xx, malformed answers) makes generate() raise
TeacherUnavailable once every other request of the batch has finished, so nothing is recorded for
the batch and `--resume` asks again only for what is not cached.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from sampling.types import Completion


@dataclass
class RemoteCompletion(Completion):
    num_tokens: int = 0     # the endpoint's count of the completion's tokens


class TeacherUnavailable(RuntimeError):
    """Requests of a batch did not get through after the retries (the answered ones are cached)."""


def _text_of(choice: dict) -> str:
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
    return content


class RemoteTeacher:
    """A stand-in for the sampler of generate_batch: completions of conversations from an endpoint."""

    remote = True   # generate_batch passes it conversations, not token ids

    def __init__(self, client, model: str, tok=None):
        self.client, self.model, self.tok = client, model, tok
        self.counts = Counter()

    def body(self, messages: list[dict], params, j: int) -> dict:
        body = {"model": self.model, "messages": messages, "n": 1, "temperature": params.temperature,
                "top_p": params.top_p, "max_tokens": params.max_new_tokens}
        if params.seed is not None:
            body["seed"] = params.seed * 1000 + j
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def generate(self, conversations: list[list[dict]], params) -> list[list[RemoteCompletion | None]]:
        """n completions per conversation (params: one SamplingParams per conversation); a sample the
        endpoint refused is None. Raises TeacherUnavailable (see the module docstring)."""
        from verify.openai_client import APIError

        bodies = [self.body(conv, p, j) for conv, p in zip(conversations, params) for j in range(p.n)]
        replies = self.client.post_many("/chat/completions", bodies)
        down = [r for r in replies if isinstance(r, APIError) and not _refused(r)]
        if down:
            self.counts["unavailable"] += len(down)
            raise TeacherUnavailable(f"{len(down)} of {len(bodies)} teacher requests failed after the retries "
                                     f"(first: {down[0]}); the answered ones are cached: run again with --resume")
        outs, k = [], 0
        for p in params:
            group = []
            for _ in range(p.n):
                reply, k = replies[k], k + 1
                group.append(self._completion(reply))
            outs.append(group)
        return outs

    def _completion(self, reply) -> RemoteCompletion | None:
        if isinstance(reply, Exception):
            self.counts["failed"] += 1
            return None
        try:
            choice = reply["choices"][0]
            text = _text_of(choice)
            used = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            self.counts["failed"] += 1
            return None
        ids = self.tok.encode(text) if self.tok is not None else []
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        self.counts["answered"] += 1
        return RemoteCompletion(token_ids=ids, logprobs=[], finish_reason=finish, text=text, num_tokens=used)


def _refused(error) -> bool:
    """An HTTP 4xx other than 408/409/429: the request itself is bad, asking again will not help."""
    return error.status is not None and 400 <= error.status < 500 and error.status not in (408, 409, 429)


def api_key(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


# ---- flags ------------------------------------------------------------------------------------------

def reward_names(spec: str) -> list[str]:
    """The reward names of a --reward spec ("name" or "name:weight", comma-separated)."""
    from verify.rewards import split_weight
    return [split_weight(part)[0] for part in (p.strip() for p in spec.split(",")) if part]


def _check_http_flags(args, kind: str) -> None:
    concurrency, timeout = getattr(args, f"{kind}_concurrency"), getattr(args, f"{kind}_timeout_s")
    if concurrency < 1:
        raise ValueError(f"--{kind}-concurrency {concurrency}: expected >= 1")
    if not timeout > 0:
        raise ValueError(f"--{kind}-timeout-s {timeout}: expected > 0")
    if args.http_retries < 0:
        raise ValueError(f"--http-retries {args.http_retries}: expected >= 0")
    url = getattr(args, f"{kind}_url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"--{kind}-url {url!r}: expected an http:// or https:// URL such as http://host:8000/v1")


def check_judge_flags(args) -> None:
    """--reward judge:... needs --judge-url and a template with what it needs (ValueError naming them)."""
    from verify.judge import is_judge, load_template
    judges = [n for n in reward_names(args.reward) if is_judge(n)]
    _check_http_flags(args, "judge")
    for spec in judges:
        load_template(spec)
    if not judges or args.judge_url is not None:
        return
    if args.judge_model is None:
        raise ValueError(f"--reward {judges[0]} needs --judge-url, the OpenAI-compatible endpoint of the judge model "
                         f"(or --judge-model DIR, a local checkpoint to judge with in-process)")
    # in-process (evaluation/local_judge.py): a checkpoint folder with a chat template and room for the replies
    from pathlib import Path

    from data.tokenizer import load_tokenizer
    from model.checkpoint import read_config
    folder = Path(args.judge_model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--judge-model {folder}: no config.json; without --judge-url it must be a checkpoint folder")
    if load_tokenizer(None, folder).chat_template is None:
        raise ValueError(f"--judge-model {folder}: its tokenizer has no chat template (tokenizer_config.json "
                         f"'chat_template' or chat_template.jinja): a judge is asked in chat turns")
    context = read_config(folder)[0].max_position_embeddings
    for spec in judges:
        template = load_template(spec)
        if template.max_tokens >= context:
            raise ValueError(f"--reward {spec}: its max_tokens {template.max_tokens} leaves no room for the prompt in "
                             f"the {context}-token context of --judge-model {folder} (config.json "
                             f"max_position_embeddings); set max_tokens in the template's header")


def make_run_judges(args, cache_dir=None, device=None) -> dict:
    """{spec: JudgeReward} of the run's --reward judge specs ({} without any): asking --judge-url, or
    without it the local --judge-model checkpoint (evaluation/local_judge.py) on `device`."""
    from verify.judge import JudgeReward, is_judge, make_judges
    specs = [n for n in reward_names(args.reward) if is_judge(n)]
    if specs and args.judge_url is None:
        import torch

        from evaluation.local_judge import load_local_judge_chat
        chat = load_local_judge_chat(args.judge_model, device or torch.device("cpu"))
        return {spec: JudgeReward(spec, chat, str(args.judge_model)) for spec in specs}
    return make_judges(reward_names(args.reward), args.judge_url, model=args.judge_model,
                       api_key=api_key(args.judge_api_key_env), timeout_s=args.judge_timeout_s,
                       retries=args.http_retries, concurrency=args.judge_concurrency, cache_dir=cache_dir)


def check_teacher_flags(args) -> None:
    _check_http_flags(args, "teacher")
    if args.teacher_url is None:
        if args.teacher_model is not None:
            raise ValueError("--teacher-model names a model of --teacher-url, which is not given")
        return
    if args.model is not None or args.preset is not None:
        raise ValueError("--teacher-url samples from the endpoint: give it without --model / --preset (the local "
                         "model would not be used)")
    if args.tools is not None:
        raise ValueError("--tools runs the tools beside a local model's rollouts; with --teacher-url the endpoint "
                         "samples, so give one or the other")


def make_teacher(args, tok, cache_dir) -> RemoteTeacher:
    from verify.judge import endpoint_model
    from verify.openai_client import OpenAIClient
    client = OpenAIClient(args.teacher_url, api_key=api_key(args.teacher_api_key_env),
                          timeout_s=args.teacher_timeout_s, retries=args.http_retries,
                          max_concurrency=args.teacher_concurrency, cache_dir=cache_dir)
    model = args.teacher_model or endpoint_model(client, "--teacher-model")
    return RemoteTeacher(client, model, tok)
