"""Chat templates: rendering equal to transformers' apply_chat_template for the exact DeepSeek-R1-Distill
and Qwen2.5-Instruct templates and the built-ins; assistant masks that cover reasoning, answer and
the end-of-turn token (checked by decoding the masked tokens); the R1-Distill training rendering
that keeps the reasoning; transformers' {% generation %} masks as an oracle; bad templates."""
import json
import random

import pytest

from data.chat import TemplateError, encode_chat, render, render_spans, token_mask, training_text
from data.templates import CHATML_TEMPLATE, R1_ZERO_TEMPLATE
from data.tokenizer import DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, Tokenizer

transformers = pytest.importorskip("transformers")

# chat_template of deepseek-ai/DeepSeek-R1-Distill-Qwen-7B's tokenizer_config.json, as the JSON string
# literal it is stored as (decoded below, so every escape is exactly the file's).
R1_DISTILL_TEMPLATE = json.loads(r'''"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"''')

# chat_template of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json, as stored.
QWEN25_TEMPLATE = json.loads(r'''"{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"''')

# ChatML with transformers' {% generation %} markers around what the assistant writes.
CHATML_GENERATION_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_MARKERS = (R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>")
QWEN_PAD = "<|endoftext|>"

REASON_1, ANSWER_1 = "The user wants 12 + 30.\n2 + 0 = 2, 1 + 3 = 4.", "<answer>42</answer>"
REASON_2, ANSWER_2 = "Double 42: 84. Check: 84 / 2 = 42. ✓", "It is **84**."
CONVERSATIONS = {
    "one user": [{"role": "user", "content": "What is 12 + 30?"}],
    "system": [{"role": "system", "content": "You are terse. Réponds en français 🙂"},
               {"role": "user", "content": "What is 12 + 30?"}],
    "multi-turn, inline reasoning": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": f"<think>\n{REASON_1}\n</think>\n\n{ANSWER_1}"},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": f"<think>\n{REASON_2}\n</think>\n\n{ANSWER_2}"},
    ],
    "reasoning_content": [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": ANSWER_1, "reasoning_content": REASON_1},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": ANSWER_2, "reasoning_content": REASON_2},
    ],
    "ends with assistant, no reasoning": [
        {"role": "user", "content": "Say hi  "},
        {"role": "assistant", "content": "  hi there\n"},
    ],
}


def _corpus() -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(150):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        docs.append(f"What is {a} + {b}? The user wants {a} + {b}. <think>\nadd\n</think>\n\n<answer>{a + b}"
                    f"</answer> And twice that? It is double. You are Qwen, a helpful assistant.")
    return docs


@pytest.fixture(scope="module")
def backend():
    specials = tuple(DEFAULT_SPECIAL_TOKENS) + R1_MARKERS + (QWEN_PAD,)
    return Tokenizer.train(_corpus(), vocab_size=420, special_tokens=specials).backend


def _pair(backend, tmp_path_factory, named, template):
    """Our tokenizer with these named tokens and template, and transformers' load of its saved copy."""
    ours = Tokenizer(type(backend).from_str(backend.to_str()), named, chat_template=template)
    path = ours.save(tmp_path_factory.mktemp("chat_tok"))
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def r1(backend, tmp_path_factory):
    return _pair(backend, tmp_path_factory, {"bos_token": R1_BOS, "eos_token": R1_EOS, "pad_token": R1_EOS},
                 R1_DISTILL_TEMPLATE)


@pytest.fixture(scope="module")
def qwen(backend, tmp_path_factory):
    return _pair(backend, tmp_path_factory, {"eos_token": "<|im_end|>", "pad_token": QWEN_PAD}, QWEN25_TEMPLATE)


@pytest.fixture(scope="module")
def base(backend, tmp_path_factory):
    return _pair(backend, tmp_path_factory, {"bos_token": "<|begin_of_text|>", "eos_token": EOS_TOKEN,
                                             "pad_token": "<|pad|>"}, R1_ZERO_TEMPLATE)


def masked_runs(tok: Tokenizer, enc) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token_id, on in zip(enc.ids, enc.assistant_mask):
        if on:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def joined(reasoning: str, answer: str) -> str:
    return "<think>\n" + reasoning + "\n</think>\n\n" + answer


# ----------------------------------------------------------------------------- rendering = transformers


@pytest.mark.parametrize("which", ["r1", "qwen", "base-r1-zero", "base-chatml"])
def test_render_and_ids_equal_transformers(which, r1, qwen, base):
    ours, hf = {"r1": r1, "qwen": qwen, "base-r1-zero": base, "base-chatml": base}[which]
    template = CHATML_TEMPLATE if which == "base-chatml" else ours.chat_template
    for name, messages in CONVERSATIONS.items():
        for gen in (False, True):
            expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=gen)
            assert render(messages, template, add_generation_prompt=gen, **ours.special_tokens) == expected, name
            enc = encode_chat(ours, messages, template=template, add_generation_prompt=gen, training=False)
            assert enc.text == expected, name
            assert enc.ids == hf.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                     return_dict=False, add_generation_prompt=gen), name
            assert len(enc.assistant_mask) == len(enc.ids)


def test_qwen_tools_and_tool_calls_equal_transformers(qwen):
    ours, hf = qwen
    tools = [{"type": "function", "function": {
        "name": "add", "description": "Add two integers; returns «sum».",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}]
    messages = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    for gen in (False, True):
        expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        assert render(messages, QWEN25_TEMPLATE, add_generation_prompt=gen, tools=tools,
                      **ours.special_tokens) == expected
    assert "«sum»" in expected and '"a": 12' in expected
    # the tool call is what the assistant wrote: trained with its <|im_end|>; the tool's answer is not
    enc = encode_chat(ours, messages, tools=tools)
    assert enc.text == hf.apply_chat_template(messages, tools=tools, tokenize=False)
    assert masked_runs(ours, enc) == ['<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n'
                                      '</tool_call><|im_end|>', "It is 42.<|im_end|>"]


def test_r1_distill_generation_prompt_and_stripping(r1):
    ours, _ = r1
    messages = CONVERSATIONS["multi-turn, inline reasoning"]
    text = render(messages[:2], R1_DISTILL_TEMPLATE, add_generation_prompt=True, **ours.special_tokens)
    assert text == R1_BOS + "Think first.<｜User｜>What is 12 + 30?<｜Assistant｜><think>\n"
    full = render(messages, R1_DISTILL_TEMPLATE, **ours.special_tokens)
    assert REASON_1 not in full and REASON_2 not in full  # the template drops reasoning: why training needs care


# ----------------------------------------------------------------------------- masks


def test_r1_distill_training_keeps_reasoning_and_masks_eos(r1):
    ours, hf = r1
    for name in ("multi-turn, inline reasoning", "reasoning_content"):
        messages = CONVERSATIONS[name]
        enc = encode_chat(ours, messages, training=True)
        expected = [joined(REASON_1, ANSWER_1) + R1_EOS, joined(REASON_2, ANSWER_2) + R1_EOS]
        assert masked_runs(ours, enc) == expected, name
        assert enc.text == (R1_BOS + ("Think first." if name.startswith("multi") else "")
                            + "<｜User｜>What is 12 + 30?<｜Assistant｜>" + expected[0]
                            + "<｜User｜>And twice that?<｜Assistant｜>" + expected[1])
        assert enc.ids == ours.encode(enc.text)
        assert enc.ids[-1] == ours.eos_id and enc.assistant_mask[-1]
        # training=False is what transformers renders: reasoning gone, the answer and EOS still masked
        plain = encode_chat(ours, messages, training=False)
        assert plain.text == hf.apply_chat_template(messages, tokenize=False)
        after_think = ("\n\n" + ANSWER_1, "\n\n" + ANSWER_2) if name.startswith("multi") else (ANSWER_1, ANSWER_2)
        assert masked_runs(ours, plain) == [after_think[0] + R1_EOS, after_think[1] + R1_EOS]
    # a generation prompt after the last turn is not trained
    messages = CONVERSATIONS["reasoning_content"] + [{"role": "user", "content": "Thanks"}]
    enc = encode_chat(ours, messages, add_generation_prompt=True)
    assert enc.text.endswith("<｜User｜>Thanks<｜Assistant｜><think>\n")
    assert masked_runs(ours, enc) == [joined(REASON_1, ANSWER_1) + R1_EOS, joined(REASON_2, ANSWER_2) + R1_EOS]


@pytest.mark.parametrize("which", ["chatml", "qwen"])
def test_chatml_masks_content_and_im_end_not_the_newline(which, base, qwen):
    ours = base[0] if which == "chatml" else qwen[0]
    template = CHATML_TEMPLATE if which == "chatml" else QWEN25_TEMPLATE
    messages = CONVERSATIONS["multi-turn, inline reasoning"]
    enc = encode_chat(ours, messages, template=template)
    assert masked_runs(ours, enc) == [messages[2]["content"] + "<|im_end|>", messages[4]["content"] + "<|im_end|>"]
    assert [enc.text[a:b] for a, b in enc.assistant_spans] == masked_runs(ours, enc)
    assert enc.text.endswith("<|im_end|>\n") and not enc.assistant_mask[-1]  # the trailing newline
    # reasoning given as reasoning_content is joined into the trained text
    enc = encode_chat(ours, CONVERSATIONS["reasoning_content"], template=template)
    assert masked_runs(ours, enc) == [joined(REASON_1, ANSWER_1) + "<|im_end|>",
                                      joined(REASON_2, ANSWER_2) + "<|im_end|>"]
    # whitespace inside the content is kept, header whitespace is not added
    enc = encode_chat(ours, CONVERSATIONS["ends with assistant, no reasoning"], template=template)
    assert masked_runs(ours, enc) == ["  hi there\n<|im_end|>"]


def test_r1_zero_masks_content_and_eos(base):
    ours, _ = base
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n<answer>\n5\n</answer>"}]
    enc = encode_chat(ours, messages)  # the tokenizer's own template: r1-zero
    assert masked_runs(ours, enc) == [messages[1]["content"] + EOS_TOKEN]
    assert enc.text.startswith("<|begin_of_text|>A conversation between User and Assistant.")
    assert enc.ids[-1] == ours.eos_id and enc.assistant_mask[-1]
    assert not any(enc.assistant_mask[:len(ours.encode(render(messages[:1], "r1-zero", add_generation_prompt=True,
                                                              **ours.special_tokens)))])


def test_masks_equal_transformers_generation_masks(base):
    ours, hf = base
    for name, messages in CONVERSATIONS.items():
        for gen in (False, True):
            out = hf.apply_chat_template(messages, chat_template=CHATML_GENERATION_TEMPLATE, tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True,
                                         add_generation_prompt=gen)
            for template in (CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE):
                enc = encode_chat(ours, messages, template=template, add_generation_prompt=gen, training=False)
                assert enc.ids == out["input_ids"], name
                assert [int(m) for m in enc.assistant_mask] == out["assistant_masks"], (name, template)


def test_template_keeping_reasoning_is_used_as_is(base):
    # A template that renders reasoning_content itself (as Qwen3 does for the last turn) and marks
    # such turns in its header: training keeps the template's own text, identical to inference.
    template = ("{% for m in messages %}"
                "{{ '<|im_start|>' + m.role + (' (reasoning)' if m.reasoning_content else '') + '\n' }}"
                "{% if m.reasoning_content %}{{ '<think>\n' + m.reasoning_content + '\n</think>\n\n' }}{% endif %}"
                "{{ m.content + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    ours, _ = base
    messages = CONVERSATIONS["reasoning_content"]
    enc = encode_chat(ours, messages, template=template, training=True)
    assert enc.text == render(messages, template) and "<|im_start|>assistant (reasoning)\n" in enc.text
    # the header differs from the generation prompt, so its tail is trained with the content
    assert masked_runs(ours, enc) == [" (reasoning)\n" + joined(REASON_1, ANSWER_1) + "<|im_end|>",
                                      " (reasoning)\n" + joined(REASON_2, ANSWER_2) + "<|im_end|>"]


def test_template_reformatting_reasoning_falls_back_to_splicing(base):
    # The template writes reasoning in its own way: the joined training text does not appear, so the
    # message is rendered with a placeholder (no reasoning fields) and the training text spliced in.
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
                "{% if m.reasoning_content %}{{ '<reasoning>' + m.reasoning_content + '</reasoning>' }}{% endif %}"
                "{{ m.content + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    ours, _ = base
    messages = CONVERSATIONS["reasoning_content"]
    enc = encode_chat(ours, messages, template=template, training=True)
    assert "<reasoning>" not in enc.text and "<reasoning>" in render(messages, template)
    assert masked_runs(ours, enc) == [joined(REASON_1, ANSWER_1) + "<|im_end|>",
                                      joined(REASON_2, ANSWER_2) + "<|im_end|>"]
    assert encode_chat(ours, messages, template=template, training=False).text == render(messages, template)


# ----------------------------------------------------------------------------- rules and errors


def test_token_mask_rules():
    # straddling tokens are in; tokens outside are out; a zero-width token counts inside a span
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12), (12, 14), (14, 14)]
    assert token_mask(offsets, [(4, 9)]) == [False, True, True, False, False, False, False]
    assert token_mask(offsets, [(9, 13)]) == [False, False, False, True, True, True, False]
    assert token_mask(offsets, [(2, 3), (12, 12)]) == [True] + [False] * 6  # an empty span marks nothing
    rng = random.Random(0)
    for _ in range(300):  # against the obviously-correct quadratic rule
        cuts = sorted(rng.sample(range(1, 60), rng.randint(0, 20)))
        bounds = [0] + cuts + [60]
        offsets = [(a, b) for a, b in zip(bounds, bounds[1:])]
        points = sorted(rng.sample(range(61), 2 * rng.randint(0, 4)))
        spans = list(zip(points[::2], points[1::2]))
        slow = [any((s < b and e > a) if e > s else (a <= s < b) for a, b in spans if b > a) for s, e in offsets]
        assert token_mask(offsets, spans) == slow


def test_training_text_joining():
    assert training_text({"role": "assistant", "content": "A"}) == "A"
    assert training_text({"role": "assistant", "content": "A", "reasoning_content": "R"}) == \
        "<think>\nR\n</think>\n\nA"
    assert training_text({"role": "assistant", "content": "A", "thinking": "R"}) == "<think>\nR\n</think>\n\nA"
    assert training_text({"role": "assistant", "content": "A", "reasoning_content": ""}) == "A"
    with pytest.raises(ValueError, match="reasoning in one place"):
        training_text({"role": "assistant", "content": "<think>x</think>A", "reasoning_content": "R"})


def test_bad_templates_and_inputs(base):
    ours, _ = base
    messages = CONVERSATIONS["multi-turn, inline reasoning"]
    counting = ("{{ messages | length }}{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_chat(ours, messages, template=counting)
    truncating = ("{% for m in messages %}{{ m.role + ': ' + (m.content[:4] if m.role == 'assistant' else m.content)"
                  " + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="verbatim"):
        encode_chat(ours, messages, template=truncating)
    with pytest.raises(ValueError, match="unknown chat template 'chatm1'"):
        render(messages, "chatm1")
    with pytest.raises(ValueError, match="empty conversation"):
        render([], "chatml")
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        render([{"role": "user", "content": "x"}, "not a message"], "chatml")
    with pytest.raises(TemplateError, match="unexpected role function"):
        render([{"role": "user", "content": "x"}, {"role": "function", "content": "y"}], "r1-zero")
    bare = Tokenizer(ours.backend, ours.special_tokens, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(bare, messages)


def test_sandbox_matches_transformers(base):
    ours, hf = base
    messages = [{"role": "user", "content": "x"}]
    sneaky = "{% set ns = namespace(_secret=1) %}{{ ns._secret }}"
    with pytest.raises(Exception) as theirs:
        hf.apply_chat_template(messages, chat_template=sneaky, tokenize=False)
    with pytest.raises(type(theirs.value)):
        render(messages, sneaky)
    helpers = ("{{ dict(a=1) | tojson }} {{ 'é' | tojson }} {{ tools is none }} {{ documents is none }}"
               "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}")
    assert render(messages * 2, helpers) == hf.apply_chat_template(messages * 2, chat_template=helpers,
                                                                   tokenize=False)
    assert render_spans(CONVERSATIONS["reasoning_content"], "chatml", training=False)[0] == \
        hf.apply_chat_template(CONVERSATIONS["reasoning_content"], chat_template=CHATML_TEMPLATE, tokenize=False)


def test_r1_zero_short_is_r1_zero_with_a_one_line_system_text():
    from data.templates import R1_ZERO_SHORT_SYSTEM, R1_ZERO_SYSTEM
    msgs = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "<think>x</think>"}]
    for gen in (False, True):
        long = render(msgs[:1] if gen else msgs, "r1-zero", add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
        short = render(msgs[:1] if gen else msgs, "r1-zero-short", add_generation_prompt=gen, bos_token="<s>",
                       eos_token="</s>")
        assert short == long.replace(R1_ZERO_SYSTEM, R1_ZERO_SHORT_SYSTEM) and R1_ZERO_SYSTEM in long


def test_r1_zero_tool_turns_render_inline_and_are_never_trained(base):
    """A tool-using trace as messages (assistant, tool, assistant): rendered inline, as the rollout with
    tools wrote it (no end-of-sequence token after the call, no header after the tool's turn), and the
    training mask covers the model's text only (the tool's output is masked out), matching transformers'
    rendering of the same template."""
    ours, hf = base
    msgs = [{"role": "user", "content": "What is 12 * 13?"},
            {"role": "assistant", "content": "<think>use it\n```calculator\n12 * 13\n```\n"},
            {"role": "tool", "content": "```output\n156\n```\n"},
            {"role": "assistant", "content": "so</think> <answer>156</answer>"}]
    enc = encode_chat(ours, msgs)
    assert enc.text == hf.apply_chat_template(msgs, tokenize=False)
    tail = enc.text.split("\nAssistant: ", 1)[1]
    assert tail == "<think>use it\n```calculator\n12 * 13\n```\n```output\n156\n```\nso</think> <answer>156</answer>" \
        + EOS_TOKEN
    trained = "".join(enc.text[a:b] for a, b in enc.assistant_spans)
    assert "156\n```\nso" not in trained and "```output" not in trained
    assert "```calculator\n12 * 13\n```\n" in trained and trained.endswith("<answer>156</answer>" + EOS_TOKEN)
    # the prompt a rollout continues from after the tool's turn: no header, the text goes on inline
    prompt = render(msgs[:3], R1_ZERO_TEMPLATE, add_generation_prompt=True, **ours.special_tokens)
    assert enc.text.startswith(prompt) and prompt.endswith("```output\n156\n```\n")
