"""Chat templates: render conversations the way Hugging Face's `apply_chat_template` does, and
encode them for training with a mask over the tokens the assistant produced.

Rendering (`render`) matches transformers' `apply_chat_template(tokenize=False)` exactly: the same
sandboxed Jinja environment (trim_blocks, lstrip_blocks, loopcontrols, a `tojson` that keeps
non-ASCII, `raise_exception`, `strftime_now`, a hardened `namespace`, the `{% generation %}` tag),
the same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's
named special tokens, any extra keyword) and the same message clean-up (keys whose value is None
are dropped; reasoning given as `reasoning_content`, `thinking` or `reasoning` is copied under
`reasoning_content` and `thinking`).

Training (`encode_chat`) renders the conversation, tokenizes the whole text once (BPE merges across
turn boundaries come out as they will at inference, unlike tokenizing turns separately) and marks
each token that overlaps an assistant span. How a span is found, for assistant message i:

    P = render(messages[:i], add_generation_prompt=True)   # ends with the assistant header
    F = render(messages[:i+1])                             # ends after the assistant turn
    T = the whole conversation

  - F must be a prefix of T ("prefix-stable" template); otherwise ValueError. Templates that
    rewrite earlier turns are not: Qwen3's drops the reasoning of turns before the last user
    message, so multi-turn conversations with reasoning need a template without that rewrite.
  - The span starts where P and F first differ (the header is P's common part with F), or
    earlier, at the start of the message's content, when the generation prompt already holds the
    beginning of the content (R1-Distill's prompt ends with "<think>\\n"): the whole message as
    written is trained.
  - The span ends at the end of F, minus whitespace the template writes after the last visible
    character: the end-of-turn token (`<|im_end|>`, `<｜end▁of▁sentence｜>`, eos) is in, the "\\n"
    ChatML writes after `<|im_end|>` is out. The model stops at the end-of-turn token and never
    samples that newline; the next turn's rendering writes it again. This matches the
    `{% generation %}` spans of Qwen's templates. Whitespace ending the content itself is kept
    whenever the content is located in the turn (always, in training).
  - A token that straddles a span boundary is in the mask (any overlap counts, as transformers'
    assistant masks do), so the first and last characters of the assistant's text are always
    trained, at the cost of sometimes training a token that also holds a header character
    (e.g. " The" after "Assistant:"): dropping it would leave the content's first word untrained.

Reasoning in training (`training=True`). The text an assistant message must contribute is its
`content`, or, when the message has reasoning (`reasoning_content` / `thinking` / `reasoning`),

    "<think>\\n" + reasoning + "\\n</think>\\n\\n" + content

(joined as is, nothing stripped; a message with reasoning must not also hold "</think>" in its
content). Templates may alter assistant content: R1-Distill's keeps only what follows "</think>",
so rendering through it silently drops the reasoning. Each assistant message is therefore first
rendered by the template as is; if its training text does not appear exactly once in its turn,
the message is rendered again with its content replaced by an opaque placeholder (private-use
characters no template strips or splits; its reasoning fields removed), and the training text is
spliced in where the placeholder landed.
This keeps every template's own headers and end-of-turn tokens, and the template's own reasoning
rendering where it keeps the text (Qwen3's last turn). With `training=False` the text is exactly
what transformers renders, reasoning dropped or not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data.templates import BUILTIN_TEMPLATES

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

# Names a message's reasoning goes by (DeepSeek API / transformers: reasoning_content; gpt-oss: thinking).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(ValueError):
    """Raised by a template's own `raise_exception(...)`."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson keeps non-ASCII text and does not HTML-escape, unlike jinja2's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to find assistant spans; here spans are found by prefix rendering,
    which works for every template, so the tag only needs to parse.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # As in transformers: a template may not store underscore names on a namespace (no dunder tricks).
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore names on a "
                                                  f"namespace, got {name!r}")


def _dict(*args, **kwargs):
    return dict(*args, **kwargs)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment settings transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _dict
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def resolve_template(template: str) -> str:
    """The Jinja source of `template`: a built-in name ("r1-zero", "chatml") or Jinja source itself."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if not isinstance(template, str):
        raise ValueError(f"chat template must be a string, got {type(template).__name__}")
    if "{{" not in template and "{%" not in template and template.replace("-", "").replace("_", "").isalnum():
        # A bare word is almost surely a misspelt built-in name, not a template that prints it.
        raise ValueError(f"unknown chat template {template!r}; built-ins are {', '.join(BUILTIN_TEMPLATES)} "
                         f"(or pass Jinja source)")
    return template


def prepare_messages(messages) -> list[dict]:
    """Copies of the messages as transformers hands them to a template (see the module docstring)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{j}] must be an object with 'role' and 'content', got {m!r:.80}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _render(source: str, messages: list[dict], add_generation_prompt: bool, tools, documents,
            template_vars: dict) -> str:
    return compile_template(source).render(messages=messages, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **template_vars)


def template_source(value: str | None) -> str | None:
    """--chat-template as the renderer takes it: None (the tokenizer's), a built-in name, Jinja source,
    or the path of a file holding Jinja source (read here)."""
    if value is None:
        return None
    if "{" not in value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    return value


def render(messages: list[dict], template: str, add_generation_prompt: bool = False, tools=None,
           documents=None, **template_vars) -> str:
    """Render `messages` (dicts with `role` and `content`) with a Jinja chat template.

    `template` is Jinja source or the name of a built-in ("r1-zero", "chatml"); `tools` are JSON
    schemas, `documents` dicts with title/text; `template_vars` are passed to the template: the
    special tokens (bos_token="<s>", eos_token="</s>", ...) and switches like enable_thinking=False.
    Equals transformers' tokenizer.apply_chat_template(messages, tokenize=False, ...) when the
    tokenizer's named special tokens are passed.
    """
    _check_inputs(messages, tools, documents)
    return _render(resolve_template(template), prepare_messages(messages), add_generation_prompt, tools,
                   documents, template_vars)


def _check_inputs(messages, tools, documents) -> None:
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be JSON schemas (dicts)")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ValueError("documents must be dicts with 'title' and 'text'")


# ---------------------------------------------------------------------------------------------
# Assistant spans and training encodings
# ---------------------------------------------------------------------------------------------


def training_text(message: dict) -> str:
    """The text an assistant message must contribute in training: its content, with reasoning joined.

    reasoning (reasoning_content / thinking / reasoning) and content are joined as
    "<think>\\n{reasoning}\\n</think>\\n\\n{content}"; without reasoning, the content alone.
    """
    content = message.get("content", "")
    if not isinstance(content, str):
        raise ValueError(f"assistant content must be a string to train on, got {type(content).__name__}")
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if not reasoning:
        return content
    if not isinstance(reasoning, str):
        raise ValueError(f"assistant reasoning must be a string, got {type(reasoning).__name__}")
    if "</think>" in content:
        raise ValueError("an assistant message has both reasoning_content and a </think> in its content; "
                         "give the reasoning in one place only")
    return f"<think>\n{reasoning}\n</think>\n\n{content}"


def _placeholder(i: int, messages: list[dict]) -> str:
    # Private-use characters: no template strips, splits or escapes them.
    text = f"\ue000assistant-content-{i}\ue001"
    if any(text in json.dumps(m, ensure_ascii=False) for m in messages):
        raise ValueError(f"the messages contain the text {text!r}, which marks assistant content while "
                         f"rendering for training; remove it")
    return text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _unique_find(haystack: str, needle: str, start: int) -> int | None:
    """Index of the only occurrence of `needle` in haystack[start:], or None (absent or repeated)."""
    if not needle:
        return None
    first = haystack.find(needle, start)
    if first < 0 or haystack.find(needle, first + 1) >= 0:
        return None
    return first


def render_spans(messages: list[dict], template: str, add_generation_prompt: bool = False,
                 training: bool = True, tools=None, documents=None,
                 **template_vars) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the rendered conversation and one [start, end) character span per assistant message.

    See the module docstring for how spans are found and what `training` changes. Raises
    ValueError when the template is not prefix-stable or, in training, loses an assistant's text
    even when it is given as a placeholder.
    """
    _check_inputs(messages, tools, documents)
    source = resolve_template(template)
    msgs = prepare_messages(messages)
    context = dict(tools=tools, documents=documents, template_vars=template_vars)
    assistants = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if training:
        targets = {i: training_text(msgs[i]) for i in assistants}
    else:  # only used to find where the content sits, when the template kept it
        targets = {i: msgs[i]["content"] for i in assistants if isinstance(msgs[i].get("content"), str)}
    spliced: set[int] = set()
    while True:
        text, spans, unlocated = _locate(source, msgs, assistants, targets, spliced, add_generation_prompt,
                                         context)
        if not unlocated or not training:
            break
        assert not spliced.intersection(unlocated), "a spliced message is always located"
        spliced |= set(unlocated)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert b0 <= a1, f"assistant spans overlap: {(a0, b0)} and {(a1, b1)}"
    return text, spans


def _locate(source, msgs, assistants, targets, spliced, add_generation_prompt, context):
    """One pass of `render_spans` with the messages in `spliced` rendered as placeholders.

    Returns (text, spans, unlocated): unlocated lists the assistant messages whose target text
    was not found exactly once in their turn (no span is made for them in training mode).
    """
    placeholders = {i: _placeholder(i, msgs) for i in spliced}
    view = [{**{k: v for k, v in m.items() if k not in REASONING_FIELDS}, "content": placeholders[i]}
            if i in spliced else m for i, m in enumerate(msgs)]

    def rendered(upto: int, gen: bool) -> tuple[str, dict[int, int]]:
        """The first `upto` messages rendered, placeholders replaced; and where each target landed."""
        try:
            raw = _render(source, view[:upto], gen, context["tools"], context["documents"],
                          context["template_vars"])
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed on the first {upto} messages: {e}") from e
        found = []
        for j in (p for p in spliced if p < upto):
            if raw.count(placeholders[j]) != 1:
                raise ValueError(f"chat template does not render assistant message {j}'s content "
                                 f"verbatim, even as an opaque placeholder; cannot train on it")
            found.append((raw.index(placeholders[j]), j))
        out, at, pos = [], {}, 0
        for k, j in sorted(found):  # in text order, so each target's position accounts for earlier ones
            out.append(raw[pos:k])
            at[j] = sum(map(len, out))
            out.append(targets[j])
            pos = k + len(placeholders[j])
        out.append(raw[pos:])
        return "".join(out), at

    text, _ = rendered(len(view), add_generation_prompt)
    spans, unlocated = [], []
    for i in assistants:
        full, at = rendered(i + 1, False)
        before = rendered(i, False)[0] if i > 0 else ""
        prompt = rendered(i, True)[0]
        if not text.startswith(full):
            raise ValueError(f"chat template is not prefix-stable: the conversation up to message {i} "
                             f"(assistant) does not render as a prefix of the whole conversation (the "
                             f"template rewrites earlier turns), so the turn cannot be located")
        if not full.startswith(before):
            raise ValueError(f"chat template is not prefix-stable: adding message {i} (assistant) changes "
                             f"how the messages before it render")
        start = _common_prefix(prompt, full)
        if start < len(before):
            raise ValueError(f"chat template's generation prompt before message {i} (assistant) changes how "
                             f"the messages before it render, so the assistant header cannot be located")
        content_at = at.get(i) if i in spliced else (
            _unique_find(full, targets[i], len(before)) if i in targets else None)
        if content_at is not None and i not in spliced and content_at + len(targets[i]) <= start:
            content_at = None  # found inside the header, so the template did not render it
        if content_at is None and i in targets and i not in spliced and targets[i] == "":
            content_at = start  # an empty message: nothing to find, nothing lost
        if content_at is None and i in targets:
            unlocated.append(i)
        end = max(len(full.rstrip()), start)  # whitespace written after the end-of-turn token stays out
        if content_at is not None:
            start = min(start, content_at)
            end = max(end, content_at + len(targets[i]))
        spans.append((start, end))
    return text, spans, unlocated


@dataclass
class ChatEncoding:
    """A tokenized conversation: ids[k] is trained on when assistant_mask[k] (len(ids) == len(assistant_mask)).

    assistant_spans are the [start, end) character ranges of `text` the mask was built from, one
    per assistant message.
    """

    text: str
    ids: list[int]
    assistant_mask: list[bool]
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """mask[k] = token k's characters [s, e) overlap some span [a, b): s < b and e > a
    (a zero-width token counts when a <= s < b).

    spans must be sorted and disjoint, and token starts non-decreasing (as tokenizers give them),
    so one pass over both suffices.
    """
    spans = [(a, b) for a, b in spans if b > a]  # an empty span marks nothing
    mask, j = [], 0
    for s, e in offsets:
        while j < len(spans) and spans[j][1] <= s:  # spans ending before this token end before all later ones
            j += 1
        mask.append(j < len(spans) and spans[j][0] < max(e, s + 1))
    return mask


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = False, training: bool = True, tools=None, documents=None,
                **template_vars) -> ChatEncoding:
    """Render a conversation, tokenize the whole text once, and mask the assistant tokens.

    template None uses tokenizer.chat_template; otherwise Jinja source or a built-in name. The
    tokenizer's named special tokens are passed to the template (template_vars override them).
    With training=False, text and ids equal transformers' apply_chat_template(tokenize=False) and
    (tokenize=True). The mask covers each assistant message's content (reasoning joined when
    training) and its end-of-turn token, not the role header; see the module docstring.
    """
    source = tokenizer.chat_template if template is None else template
    if source is None:
        raise ValueError("the tokenizer has no chat template; pass template= (Jinja source, 'r1-zero' or "
                         "'chatml')")
    text, spans = render_spans(messages, source, add_generation_prompt=add_generation_prompt, training=training,
                               tools=tools, documents=documents, **{**tokenizer.special_tokens, **template_vars})
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ChatEncoding(text=text, ids=ids, assistant_mask=token_mask(offsets, spans), assistant_spans=spans)
