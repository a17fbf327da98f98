"""The tools by name (--tools): the calculator (envs/tools.py) and the python tool
(envs/python_tool.py, whose sandboxes start only when a session is first asked for)."""
from __future__ import annotations

from envs.python_tool import PythonTool
from envs.tools import Calculator, Tool

TOOLS = {"calculator": Calculator, "python": PythonTool}


def get_tool(name: str) -> Tool:
    """The tool of that name; ValueError listing the known ones."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; known tools: {', '.join(sorted(TOOLS))}")
    return TOOLS[name]()


def parse_tools(spec: str | None) -> list[str]:
    """--tools "python,calculator" -> the names, each checked (ValueError naming an unknown one)."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    for n in names:
        if n not in TOOLS:
            raise ValueError(f"--tools: unknown tool {n!r}; known tools: {', '.join(sorted(TOOLS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"--tools {spec!r}: a tool is named twice")
    return names
