"""Tools and multi-turn environments for rollouts (no torch; tools that run code go through
verify's sandbox). See envs/base.py (the environment interface), envs/tools.py (the tools),
envs/formats.py (how calls and results are written in the text).

    from envs import ToolEnvironment, get_format
    env = ToolEnvironment(["calculator"], get_format("fenced"), max_calls=4)
"""
from envs.base import Environment, Episode, Reply, ToolEnvironment
from envs.formats import FENCE_STOP, FencedFormat, ToolCall, ToolFormat, get_format
from envs.registry import get_tool, parse_tools
from envs.tools import Calculator, Observation, Session, Tool, clean_output

__all__ = ["Environment", "Episode", "Reply", "ToolEnvironment", "FENCE_STOP", "FencedFormat", "ToolCall",
           "ToolFormat", "get_format", "Calculator", "Observation", "Session", "Tool", "clean_output", "get_tool",
           "parse_tools"]
