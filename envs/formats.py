"""How a tool call is written in the model's text, and how its result is written back.

The fenced format (ToRL / ReTool's convention, the default): the model opens a fenced block named
after the tool and closes it; the rollout pauses at the closing fence, the block's body is the call,
and the result comes back as an `output` block:

    ```calculator            ```python
    1234 * 5678              print(2 ** 10)
    ```                      ```
    ```output                ```output
    7006652                  1024
    ```                      ```

The rollout pauses at FENCE_STOP, a closing fence on its own line ("\\n```\\n"); an opening fence
("```python") never contains it. What the model wrote since its last observation is parsed: a call
when it ends in a block whose opening names a tool of the run; a block of another language, or no
block, is no call (the model goes on); a block naming an unknown tool, or an empty or unclosed one,
is a malformed call, answered with an error.

The qwen format (QwenFormat) is Qwen2.5's own: a <tool_call> JSON object, answered by a tool turn as
the checkpoint's chat template renders it.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from envs.tools import MAX_CALL_CHARS, Observation

FENCE_STOP = "\n```\n"
_OPEN = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n")


@dataclass
class ToolCall:
    tool: str
    code: str
    error: str | None = None   # a malformed call: no tool runs, the error is the observation


class ToolFormat(ABC):
    name: str = ""
    stop: list[str] = []

    @abstractmethod
    def parse(self, text: str, tools: list[str]) -> ToolCall | None:
        """The call `text` ends with (the model's text since the last observation), or None."""

    @abstractmethod
    def render(self, obs: Observation) -> str:
        """The text that follows a call in the rollout: the observation, ready to be tokenised."""

    def messages(self, segments: list[tuple[bool, str]]) -> list[dict]:
        """A rollout's text as chat messages, from its runs of (model text?, text): each model run an
        assistant turn and each observation a tool turn, as the chat template of this format renders
        them back (the fenced format's templates write tool turns inline, data/templates.py)."""
        return [{"role": "assistant" if model else "tool", "content": text} for model, text in segments]


class FencedFormat(ToolFormat):
    name = "fenced"
    stop = [FENCE_STOP]
    # aliases of the python tool's fence that models write
    ALIASES = {"py": "python", "python3": "python"}

    def parse(self, text: str, tools: list[str]) -> ToolCall | None:
        if text.endswith(FENCE_STOP):
            body = text[: -len(FENCE_STOP)] + "\n"       # up to the closing fence, the code's newline kept
        elif text.rstrip().endswith("\n```"):
            body = text.rstrip()[: -len("```")]
        else:
            return None
        opens = list(_OPEN.finditer(body))
        if not opens:
            return None
        last = opens[-1]
        lang = self.ALIASES.get(last.group(1).lower(), last.group(1).lower())
        code = body[last.end():]
        if lang in ("", "output", "text"):
            return None                        # not a call: a plain or an output block
        if lang not in tools:
            if lang in ("python", "calculator"):
                return ToolCall(lang, code, f"the {lang} tool is not available here; tools: {', '.join(tools)}")
            return None                        # a block of some other language
        if not code.strip():
            return ToolCall(lang, code, "the call is empty")
        if len(code) > MAX_CALL_CHARS:
            return ToolCall(lang, code, f"the call has {len(code)} characters, more than {MAX_CALL_CHARS}")
        return ToolCall(lang, code.rstrip("\n"))

    def render(self, obs: Observation) -> str:
        text = obs.text if obs.text.endswith("\n") or not obs.text else obs.text + "\n"
        return f"```output\n{text}```\n"


class QwenFormat(ToolFormat):
    """Qwen2.5's own tool-call format, as its chat template writes a tool-using conversation:

        <tool_call>
        {"name": "calculator", "arguments": {"expression": "1234 * 5678"}}
        </tool_call><|im_end|>
        <|im_start|>user
        <tool_response>
        7006652
        </tool_response><|im_end|>
        <|im_start|>assistant

    The rollout pauses at "</tool_call>"; the call is the JSON object of the last <tool_call> block
    (its `arguments` hold the call's input under "code" or "expression", or as their one string);
    the observation is what Qwen2.5's template renders after that assistant turn for a tool turn
    with the output, up to and with the next assistant header (tests/envs holds them equal)."""
    name = "qwen"
    stop = ["</tool_call>"]
    END, USER, ASSISTANT = "<|im_end|>", "<|im_start|>user", "<|im_start|>assistant"

    def parse(self, text: str, tools: list[str]) -> ToolCall | None:
        if not text.rstrip().endswith("</tool_call>"):
            return None
        start = text.rfind("<tool_call>")
        if start < 0:
            return None
        body = text[start + len("<tool_call>"): text.rstrip().rfind("</tool_call>")].strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            return ToolCall("?", body, f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ToolCall("?", body, 'a tool call is a JSON object {"name": ..., "arguments": {...}}')
        name, args = obj["name"], obj.get("arguments", {})
        if name not in tools:
            return ToolCall(name, body, f"unknown tool {name!r}; tools: {', '.join(tools)}")
        if isinstance(args, str):
            code = args
        elif isinstance(args, dict):
            strings = [v for v in args.values() if isinstance(v, str)]
            code = args.get("code", args.get("expression", strings[0] if len(strings) == 1 else None))
        else:
            code = None
        if not isinstance(code, str) or not code.strip():
            return ToolCall(name, body, 'the call needs its input in "arguments" ("code" or "expression")')
        if len(code) > MAX_CALL_CHARS:
            return ToolCall(name, code, f"the call has {len(code)} characters, more than {MAX_CALL_CHARS}")
        return ToolCall(name, code)

    def render(self, obs: Observation) -> str:
        return f"{self.END}\n{self.USER}\n{self._OPEN_RESPONSE}{obs.text}{self._CLOSE_RESPONSE}"

    _OPEN_RESPONSE = "<tool_response>\n"
    _CLOSE_RESPONSE = f"\n</tool_response>{END}\n{ASSISTANT}\n"

    def messages(self, segments: list[tuple[bool, str]]) -> list[dict]:
        """Qwen2.5's own message form: an assistant turn that ends in a call holds the text before it as
        content and the call as `tool_calls`; a tool turn holds the output alone (the template wraps it)."""
        out = []
        for model, text in segments:
            if not model:
                start = text.find(self._OPEN_RESPONSE)
                end = text.rfind(self._CLOSE_RESPONSE)
                body = text[start + len(self._OPEN_RESPONSE):end] if 0 <= start < end else text
                out.append({"role": "tool", "content": body})
                continue
            cut = text.rfind("<tool_call>")
            call = None
            if cut >= 0 and text.rstrip().endswith("</tool_call>"):
                try:
                    call = json.loads(text[cut + len("<tool_call>"): text.rstrip().rfind("</tool_call>")])
                except json.JSONDecodeError:
                    call = None
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                out.append({"role": "assistant", "content": text[:cut].rstrip("\n"),
                            "tool_calls": [{"type": "function", "function": {"name": call["name"],
                                                                             "arguments": call.get("arguments", {})}}]})
            else:
                out.append({"role": "assistant", "content": text})
        return out


FORMATS: dict[str, type[ToolFormat]] = {"fenced": FencedFormat, "qwen": QwenFormat}


def get_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"--tool-format {name!r}: expected one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]()
