"""envs/: the calculator's exact arithmetic and its refusals, observation cleaning, the fenced call
format, and the tool environment's answers (malformed calls, other fences, the call budget)."""
from fractions import Fraction

import pytest

from envs import FENCE_STOP, FencedFormat, Observation, ToolEnvironment, clean_output, get_format, parse_tools
from envs.calculator import CalculatorError, evaluate, format_value


@pytest.mark.parametrize("text, value", [
    ("1234 * 5678", 7006652), ("12 * (3 + 4) / 8", Fraction(21, 2)), ("-2**2", -4), ("2**3**2", 512),
    ("(-2)**2", 4), ("7 // 2", 3), ("7 % 3", 1), ("-7 // 2", -4), ("1.5 * 4", 6), ("2^10", 1024), ("3x4", 12),
    ("6 ÷ 4", Fraction(3, 2)), ("2 ** -2", Fraction(1, 4)), ("1_000 + .5", Fraction(2001, 2)),
    ("99999999999999999999 * 99999999999999999999", 99999999999999999999 ** 2),   # exact, no float rounding
    ("0.1 + 0.2", Fraction(3, 10)),
])
def test_calculator_is_exact(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("1 +", "ends too early"), ("((1)", "not closed"), ("1 / 0", "division by zero"),
    ("2 ** 0.5", "integer exponents"), ("2 ** 100000", "beyond the limit"), ("10 ** 999 * 10 ** 999 * 10 ** 999",
                                                                           "more than 2000 digits"),
    ("__import__('os')", "unexpected"), ("1 2", "after a complete expression"), ("(" * 60 + "1" + ")" * 60, "nested"),
    ("1+" * 300 + "1", "more than 500"),
])
def test_calculator_refuses_with_a_reason(text, message):
    with pytest.raises(CalculatorError, match=message):
        evaluate(text)


def test_format_value():
    assert format_value(Fraction(21, 2)) == "10.5" and format_value(Fraction(-1, 8)) == "-0.125"
    assert format_value(Fraction(7)) == "7" and format_value(Fraction(1, 3)) == "1/3 ≈ 0.333333333333"


def test_clean_output_caps_and_strips_control_characters():
    assert clean_output(b"ok\x00\xff\n") == "ok?\ufffd\n"
    long = clean_output("x" * 5000, limit=100)
    assert len(long) < 140 and "characters cut" in long and long.startswith("x") and long.endswith("x")


def test_fenced_format_parses_calls_at_the_closing_fence():
    f = FencedFormat()
    assert f.stop == [FENCE_STOP]
    call = f.parse("Let me compute.\n```calculator\n1234 * 5678\n```\n", ["calculator"])
    assert (call.tool, call.code, call.error) == ("calculator", "1234 * 5678", None)
    assert f.parse("```py\nprint(1)\n```\n", ["python"]).tool == "python"
    assert f.parse("plain text\n```\n", ["calculator"]) is None                 # no opening fence: no call
    assert f.parse("```text\nhi\n```\n", ["calculator"]) is None                # another language: no call
    assert f.parse("```calculator\n\n```\n", ["calculator"]).error == "the call is empty"
    assert "not available" in f.parse("```python\nx\n```\n", ["calculator"]).error
    assert f.render(Observation("84")) == "```output\n84\n```\n"


def test_tool_environment_answers_and_counts():
    env = ToolEnvironment(["calculator"], get_format("fenced"), max_calls=2)
    ep = env.start({"id": 1})
    r = env.respond(ep, "```calculator\n1/0\n```\n")
    assert r.status == "error" and "division by zero" in r.text and not r.done
    assert env.respond(ep, "no call here\n```\n").status == "none"
    r = env.respond(ep, "```calculator\n2 + 2\n```\n")
    assert r.text == "```output\n4\n```\n" and r.status == "ok"
    r = env.respond(ep, "```calculator\n3 + 3\n```\n")          # a third call: over the budget
    assert r.done and r.status == "budget" and r.text is None
    assert (ep.calls, ep.errors, ep.turns) == (2, 1, [("calculator", "error"), ("calculator", "ok")])
    env.close(ep)
    assert ep.sessions == {}


def test_unknown_tools_and_formats_are_named():
    assert parse_tools("calculator") == ["calculator"]
    with pytest.raises(ValueError, match="unknown tool 'shell'; known tools: calculator"):
        parse_tools("calculator,shell")
    with pytest.raises(ValueError, match="--tool-format 'xml'"):
        get_format("xml")


def test_tool_rewards_read_the_rollouts_tool_counts():
    from verify.rewards import get_reward

    texts = ["a", "b", "c", "d"]
    cols = dict(tool_calls=[0, 2, 1, 1], tool_errors=[0, 0, 1, 1], tool_malformed=[0, 0, 0, 1])
    assert get_reward("tool_format")(texts, **cols) == [0.0, 1.0, 1.0, 0.0]
    assert get_reward("tool_ok")(texts, **cols) == [0.0, 1.0, 0.0, 0.0]
    assert get_reward("tool_ok")(texts) == [None] * 4        # rollouts without tools: no signal


def test_qwen_format_reads_calls_and_answers_as_the_qwen25_template_renders_a_tool_turn():
    from data.chat import render
    from envs.formats import QwenFormat
    from tests.data.test_chat import QWEN25_TEMPLATE

    f = QwenFormat()
    msgs = [{"role": "user", "content": "What is 12 * 13?"},
            {"role": "assistant", "content": "I will compute it.",
             "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                              "arguments": {"expression": "12 * 13"}}}]},
            {"role": "tool", "content": "156"}]
    text = render(msgs, QWEN25_TEMPLATE, add_generation_prompt=True)
    cut = text.index("</tool_call>") + len("</tool_call>")
    model_turn = text[text.rindex("<|im_start|>assistant", 0, cut) + len("<|im_start|>assistant\n"):cut]
    call = f.parse(model_turn, ["calculator"])
    assert (call.tool, call.code, call.error) == ("calculator", "12 * 13", None)
    assert text[cut:] == f.render(Observation("156"))        # the observation is the template's tool turn
    assert f.parse('<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>',
                   ["calculator"]).error.startswith("the tool call is not valid JSON")
    assert "unknown tool 'shell'" in f.parse('<tool_call>\n{"name": "shell", "arguments": {}}\n</tool_call>',
                                             ["calculator"]).error
    assert f.parse("no call here", ["calculator"]) is None


def test_qwen_format_traces_become_qwen25_messages_that_render_back_to_the_rollout():
    """A qwen-format rollout (model text, the observation the format appended, model text) turned
    into messages (assistant with tool_calls, tool, assistant) renders through Qwen2.5's template back
    to the same text: SFT on generated traces trains on what the rollout wrote."""
    from data.chat import render
    from envs.formats import QwenFormat
    from tests.data.test_chat import QWEN25_TEMPLATE

    f = QwenFormat()
    call = 'I will compute it.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 13"}}\n</tool_call>'
    after = "It is 156.<|im_end|>"
    segments = [(True, call), (False, f.render(Observation("156"))), (True, after)]
    msgs = [{"role": "user", "content": "What is 12 * 13?"}] + f.messages(segments)
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "12 * 13"}}
    assert msgs[2] == {"role": "tool", "content": "156"}
    prompt = render(msgs[:1], QWEN25_TEMPLATE, add_generation_prompt=True)
    msgs[3]["content"] = msgs[3]["content"].removesuffix("<|im_end|>")
    assert render(msgs, QWEN25_TEMPLATE) == prompt + call + f.render(Observation("156")) + after + "\n"
