"""Chat templates: render conversations the way Hugging Face's `apply_chat_template` does.

A template is a Jinja string (a checkpoint's own `chat_template`, or one of the built-ins below),
rendered in a sandboxed environment with `messages`, `add_generation_prompt`, the tokenizer's
special tokens (`bos_token`, `eos_token`, ...) and `raise_exception`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# R1-Zero's prompt (DeepSeek-R1 report, Table 1). The model writes "<think>" itself, so the format
# reward measures something the policy chose.
R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% set rest = messages[1:] %}"
    "{%- else %}{{ '" + R1_ZERO_SYSTEM + "' }}{% set rest = messages %}{% endif %}"
    "{%- for m in rest %}"
    "{%- if m.role == 'user' %}{{ '\\nUser: ' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{ '\\nAssistant: ' + m.content }}{{ eos_token if eos_token else '' }}"
    "{%- else %}{{ raise_exception('R1-Zero template: unexpected role ' ~ m.role) }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\\nAssistant: ' }}{% endif %}"
)

# ChatML, as used by Qwen2/Qwen2.5 (without their default system prompt).
CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"r1-zero": R1_ZERO_TEMPLATE, "chatml": CHATML_TEMPLATE}


class TemplateError(ValueError):
    """Raised by a template's own `raise_exception(...)`."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson keeps non-ASCII text and does not HTML-escape, unlike jinja2's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment settings transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(messages: list[dict], template: str, add_generation_prompt: bool = False, **special_tokens) -> str:
    """Render `messages` (dicts with `role` and `content`) with a Jinja chat template.

    `template` is a Jinja source string or the name of a built-in ("r1-zero", "chatml");
    `special_tokens` are passed to the template (bos_token="<s>", eos_token="</s>", ...).
    """
    source = BUILTIN_TEMPLATES.get(template, template)
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **special_tokens)
