"""The built-in chat templates, by name: `--chat-template r1-zero | r1-zero-short | chatml`.

Jinja sources in Hugging Face's chat-template dialect (rendered by data/chat.py, saved with a
tokenizer by data/tokenizer.py). They live here, below both, so that neither imports the other
for them.
"""
from __future__ import annotations

# R1-Zero's prompt (DeepSeek-R1 report, Table 1). The model writes "<think>" itself, so the format
# reward measures something the policy chose.
R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)


# Tool turns (role "tool") are written inline, as a rollout with tools reads them (envs/formats.py's
# fenced format): an assistant turn that ends in a tool call (a closing fence, TOOL_CALL_END) gets no
# end-of-sequence token, the tool's turn follows it as it is, and the assistant's next turn goes on
# without a header (so does the generation prompt after a tool turn). The rendered conversation is then
# token for token the rollout's prompt and completion, and training on it (data/chat.py's assistant
# mask) learns the model's text and never the tool's.
TOOL_CALL_END = "\n```\n"


def _r1_zero_template(system: str) -> str:
    return (
        "{{ bos_token if bos_token else '' }}"
        "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% set rest = messages[1:] %}"
        "{%- else %}{{ '" + system + "' }}{% set rest = messages %}{% endif %}"
        "{%- for m in rest %}"
        "{%- if m.role == 'user' %}{{ '\\nUser: ' + m.content }}"
        "{%- elif m.role == 'assistant' %}"
        "{{- '' if loop.previtem is defined and loop.previtem.role == 'tool' else '\\nAssistant: ' }}{{ m.content }}"
        "{{- '' if m.content.endswith('\\n```\\n') else (eos_token if eos_token else '') }}"
        "{%- elif m.role == 'tool' %}{{ m.content }}"
        "{%- else %}{{ raise_exception('R1-Zero template: unexpected role ' ~ m.role) }}{% endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and not (rest and rest[-1].role == 'tool') %}{{ '\\nAssistant: ' }}{% endif %}"
    )


R1_ZERO_TEMPLATE = _r1_zero_template(R1_ZERO_SYSTEM)
# The same prompt with a one-line system text, for toy-scale runs on a CPU: R1's system prompt is
# about 85 of the ~145 tokens of a 3-digit addition example, so this halves the cost of every
# pretraining, SFT and GRPO token without changing the format the rewards check.
R1_ZERO_SHORT_SYSTEM = "Think in <think> </think>, then answer in <answer> </answer>."
R1_ZERO_SHORT_TEMPLATE = _r1_zero_template(R1_ZERO_SHORT_SYSTEM)

# ChatML, as used by Qwen2/Qwen2.5 (without their default system prompt).
CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"r1-zero": R1_ZERO_TEMPLATE, "r1-zero-short": R1_ZERO_SHORT_TEMPLATE, "chatml": CHATML_TEMPLATE}
