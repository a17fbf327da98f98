"""LLM judges over HTTP: `--reward judge:FILE` asks a model at `--judge-url` to grade each completion.

    python train.py --stage generate ... --reward accuracy,judge:equivalence --judge-url http://host:8000/v1
    python train.py --stage grpo ... --reward judge:rubric.txt:1.0,format:0.2 --judge-url ...

DeepSeek-R1's rejection sampling (section 2.3.3) kept answers "by feeding the ground-truth and model
predictions into DeepSeek-V3 for judgment" where a rule cannot check the gold (proofs, free-form
answers, symbolic forms sympy cannot parse). A judge is a prompt template and a parse rule:

    parse: verdict                          # the header: optional `key: value` lines, then ---
    verdicts: EQUIVALENT=1, NOT_EQUIVALENT=0
    system: You grade answers.
    ---
    Problem: {question}
    Reference answer: {answer}
    Answer to grade: {response}
    Reply EQUIVALENT or NOT_EQUIVALENT.

Placeholders (Python str.format names; write {{ and }} for literal braces):
  {question}    the problem text (the rewards' `prompts` column)
  {response}    the completion without its <think>...</think> reasoning (what it finally answers)
  {completion}  the whole completion
  {extracted}   the completion's final answer, verify.math.extract_answer of {response} ("" if none)
  {NAME}        any other name: that data set column of the completion's row (e.g. {answer}, {solution})
A template must use at least one of {response}, {completion}, {extracted} (otherwise it grades
nothing), and is refused at start otherwise, naming the file; a column it names that the data does
not have is an error naming the column at the first batch.

Parse rules (applied to the judge's reply with any <think>...</think> removed):
  verdict   the last of the verdict words (whole words, case-insensitive) in the reply gives its
            value; default verdicts YES=1, NO=0
  score     the last number in the reply, within `scale` (default 0-10), scaled to 0..1;
            a number outside the scale is unparsable
Header keys: parse, verdicts, scale, system, max_tokens (default 1024), temperature (default 0).
Without a header the whole file is the template and the rule is `verdict` with YES / NO.
`judge:equivalence` is the built-in template above (R1's "is this answer equivalent to the
reference"), `judge:equivalence` with a reasoning judge works the same (its thinking is dropped).

No signal: a request that fails after the client's retries (refused, timed out, malformed JSON, an
error status) or a reply that does not parse gives None, which GRPO and the generate stage's
filters treat as "no signal"; `judge.stats` counts requests, answered, failed and unparsable, and
the stages log them (judge/<spec>/failed, ...). A batch always finishes: every request ends by its
timeout and retries (verify/openai_client.py), run concurrently up to the client's limit.

Judges run in the scoring process, not in verify.pool's workers: they wait on the network, not
the CPU, so one thread pool serves them all (`in_parent = True` tells the pool).
"""
from __future__ import annotations

import re
import string
import threading
from collections import Counter
from pathlib import Path

PREFIX = "judge:"
COMPLETION_FIELDS = ("response", "completion", "extracted")
RESERVED = ("question",) + COMPLETION_FIELDS
HEADER_KEYS = ("parse", "verdicts", "scale", "system", "max_tokens", "temperature")

EQUIVALENCE = """\
parse: verdict
verdicts: EQUIVALENT=1, NOT_EQUIVALENT=0
system: You are a meticulous grader of math answers. You compare a student's final answer with a reference answer.
max_tokens: 2048
---
Problem:
{question}

Reference answer:
{answer}

Student's response (its final part):
{response}

Is the student's final answer mathematically equivalent to the reference answer? Equivalent forms count \
(fractions and decimals of the same value, reordered terms, equal sets, an equivalent expression); a missing, \
partial or different answer does not. Explain in at most a few sentences, then end your reply with exactly one \
word on its own line: EQUIVALENT or NOT_EQUIVALENT."""

BUILT_IN = {"equivalence": EQUIVALENCE}
_THINK = re.compile(r"<think>.*?</think>", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def is_judge(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def strip_thinking(text: str) -> str:
    """text without <think>...</think> blocks (and without everything up to an unopened </think>)."""
    text = _THINK.sub("", text)
    return text.split("</think>")[-1].strip()


class JudgeTemplate:
    """A parsed judge file: the template text, its placeholders and the parse rule."""

    def __init__(self, source: str, where: str):
        self.where = where
        header, body = {}, source
        lines = source.splitlines()
        if "---" in (line.strip() for line in lines):
            cut = [line.strip() for line in lines].index("---")
            head = [line for line in lines[:cut] if line.strip() and not line.strip().startswith("#")]
            if all(re.match(r"^\s*[A-Za-z_]+\s*:", line) for line in head):
                for k, line in enumerate(head):
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key not in HEADER_KEYS:
                        raise ValueError(f"{where}: header line {line.strip()!r}: unknown key {key!r} (known: "
                                         f"{', '.join(HEADER_KEYS)})")
                    header[key] = value.strip()
                body = "\n".join(lines[cut + 1:])
        self.text = body.strip("\n")
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: the template is not a valid format string ({e}); write {{{{ and }}}} for "
                             f"literal braces") from None
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ValueError(f"{where}: placeholders must be plain names like {{question}}, got {{{bad[0]}}}")
        self.placeholders = tuple(dict.fromkeys(names))
        if not set(self.placeholders) & set(COMPLETION_FIELDS):
            raise ValueError(f"{where}: the template has no placeholder for the completion it grades; use "
                             f"{{response}}, {{completion}} or {{extracted}} (it has: "
                             f"{', '.join('{' + n + '}' for n in self.placeholders) or 'none'})")
        self.columns = tuple(n for n in self.placeholders if n not in RESERVED)
        self.system = header.get("system") or None
        self.parse = header.get("parse", "verdict")
        if self.parse not in ("verdict", "score"):
            raise ValueError(f"{where}: parse: {self.parse!r}; expected verdict or score")
        self.verdicts = {"YES": 1.0, "NO": 0.0}
        if "verdicts" in header:
            self.verdicts = {}
            for part in header["verdicts"].split(","):
                word, eq, value = part.strip().partition("=")
                try:
                    self.verdicts[word.strip().upper()] = float(value)
                except ValueError:
                    raise ValueError(f"{where}: verdicts: {part.strip()!r}; expected WORD=NUMBER, e.g. "
                                     f"YES=1, NO=0") from None
                if not eq or not word.strip():
                    raise ValueError(f"{where}: verdicts: {part.strip()!r}; expected WORD=NUMBER")
        self.scale = (0.0, 10.0)
        if "scale" in header:
            m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d*)?)\s*(?:-|to|\.\.)\s*([-+]?\d+(?:\.\d*)?)\s*", header["scale"])
            if m is None or float(m[1]) >= float(m[2]):
                raise ValueError(f"{where}: scale: {header['scale']!r}; expected LOW-HIGH with LOW < HIGH, e.g. 0-10")
            self.scale = (float(m[1]), float(m[2]))
        try:
            self.max_tokens = int(header.get("max_tokens", 1024))
            self.temperature = float(header.get("temperature", 0.0))
        except ValueError:
            raise ValueError(f"{where}: max_tokens must be an integer and temperature a number") from None
        self._verdict_re = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(
            re.escape(w) for w in sorted(self.verdicts, key=len, reverse=True)) + r")(?![A-Za-z0-9_])", re.I)

    def prompt(self, fields: dict) -> str:
        return self.text.format(**fields)

    def value(self, reply: str) -> float | None:
        """The reply's grade by the parse rule, None when it does not parse."""
        text = strip_thinking(reply)
        if self.parse == "verdict":
            hits = self._verdict_re.findall(text)
            return self.verdicts[hits[-1].upper()] if hits else None
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        x, (lo, hi) = float(numbers[-1]), self.scale
        return (x - lo) / (hi - lo) if lo <= x <= hi else None


def load_template(spec: str) -> JudgeTemplate:
    """The template of `judge:NAME` (a built-in) or `judge:FILE`; ValueError naming what is wrong."""
    name = spec[len(PREFIX):] if is_judge(spec) else spec
    if name in BUILT_IN:
        return JudgeTemplate(BUILT_IN[name], f"judge:{name}")
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--reward {spec}: no judge template file {name!r} (built-in judges: "
                         f"{', '.join('judge:' + k for k in BUILT_IN)})")
    return JudgeTemplate(path.read_text(encoding="utf-8"), str(path))


class JudgeReward:
    """A reward (verify.rewards' signature) that asks a judge model through an OpenAIClient."""

    in_parent = True          # verify.pool runs it in the scoring process (see the module docstring)
    timeout_reward = None

    def __init__(self, spec: str, client, model: str):
        self.spec, self.template, self.client, self.model = spec, load_template(spec), client, model
        self.__name__ = spec
        self.stats = Counter()
        self._lock = threading.Lock()

    def request(self, fields: dict) -> dict:
        t = self.template
        messages = ([{"role": "system", "content": t.system}] if t.system else []) + \
            [{"role": "user", "content": t.prompt(fields)}]
        return {"model": self.model, "messages": messages, "temperature": t.temperature, "max_tokens": t.max_tokens}

    def fields(self, completions: list[str], kwargs: dict) -> list[dict]:
        from verify.math import extract_answer
        n = len(completions)
        missing = [c for c in self.template.columns if kwargs.get(c) is None]
        if missing:
            raise ValueError(f"{self.template.where}: the template names {{{missing[0]}}}, but the data has no "
                             f"{missing[0]!r} column (columns: {', '.join(sorted(k for k in kwargs if kwargs[k] is not None))})")
        if "question" in self.template.placeholders and kwargs.get("prompts") is None and kwargs.get("prompt") is None:
            raise ValueError(f"{self.template.where}: the template names {{question}}, but the scorer passes no prompts")
        questions = kwargs.get("prompts") or kwargs.get("prompt") or [""] * n
        out = []
        for i, text in enumerate(completions):
            response = strip_thinking(text)
            row = {"question": _as_text(questions[i]), "response": response, "completion": text,
                   "extracted": extract_answer(response) or ""}
            row.update({c: _as_text(kwargs[c][i]) for c in self.template.columns})
            out.append(row)
        return out

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        bodies = [self.request(f) for f in self.fields(completions, kwargs)]
        replies = self.client.post_many("/chat/completions", bodies)
        values, counts = [], Counter(requests=len(bodies))
        for reply in replies:
            if isinstance(reply, Exception):
                counts["failed"] += 1
                values.append(None)
                continue
            value = self.template.value(_reply_text(reply))
            counts["answered"] += 1
            counts["unparsable"] += value is None
            values.append(value)
        with self._lock:
            self.stats.update(counts)
        return values


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value if m.get("role") == "user")   # a messages column
    return "" if value is None else str(value)


def _reply_text(reply: dict) -> str:
    """The judge's answer text: choices[0].message.content (reasoning fields are not the verdict)."""
    try:
        content = reply["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


def make_judges(specs, url: str | None, model: str | None = None, api_key: str | None = None,
                timeout_s: float = 60.0, retries: int = 3, concurrency: int = 16, cache_dir=None) -> dict:
    """{spec: JudgeReward} for the judge specs among `specs` (one client shared by them), {} when
    there are none. ValueError when a judge is asked for without --judge-url, or its template is bad."""
    judges = [s for s in specs if is_judge(s)]
    if not judges:
        return {}
    for spec in judges:
        load_template(spec)
    if url is None:
        raise ValueError(f"--reward {judges[0]} needs --judge-url, the OpenAI-compatible endpoint of the judge model")
    from verify.openai_client import OpenAIClient
    client = OpenAIClient(url, api_key=api_key, timeout_s=timeout_s, retries=retries, max_concurrency=concurrency,
                          cache_dir=cache_dir)
    if model is None:
        model = endpoint_model(client, "--judge-model")
    return {spec: JudgeReward(spec, client, model) for spec in judges}


def endpoint_model(client, flag: str) -> str:
    """The one model an endpoint lists (GET /models), for a run that does not name it."""
    names = client.models()
    if len(names) != 1:
        raise ValueError(f"{client.base_url} serves {len(names)} models ({', '.join(names[:8]) or 'none'}); name "
                         f"the one to use with {flag}")
    return names[0]


def judge_metrics(judges: dict) -> dict:
    """judge/<spec>/{requests, answered, failed, unparsable} summed over the run so far."""
    return {f"judge/{spec}/{k}": float(j.stats.get(k, 0)) for spec, j in judges.items()
            for k in ("requests", "answered", "failed", "unparsable")}
