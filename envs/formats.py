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
"""
from __future__ import annotations

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


FORMATS: dict[str, type[ToolFormat]] = {"fenced": FencedFormat}


def get_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"--tool-format {name!r}: expected one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]()
