"""Hostile tool code inside rollouts (issue: tool-use RL): each attack of the sandbox's own list,
written as the model's python call in one rollout of a batch, costs only that rollout an error or
timeout observation; the batch finishes, the benign rollout beside them gets its answer, and nothing
the attacks started is left running afterwards."""
import os
import secrets
import string

import pytest
import torch

from envs import Reply, ToolEnvironment
from evaluation.tool_rollout import generate_with_env
from model import ModelConfig, Transformer
from sampling import Sampler, SamplingParams
from tests.verify.test_code import processes_with
from tests.verify.test_session import descendants


class ByteTokenizer:
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


class Injected(ToolEnvironment):
    """The tool environment with each rollout's first call taken from its row (what a hostile model
    would write); the model text is random, and pauses are frequent (every printable character)."""

    def __init__(self):
        super().__init__(["python"], max_calls=2)
        self.stop = list(string.ascii_letters + string.digits)

    def respond(self, episode, text):
        if episode.calls:
            return Reply(None, status="none")
        return super().respond(episode, f"```python\n{episode.row['code']}\n```\n")


def test_each_attack_costs_only_its_own_rollout(tmp_path):
    marker = "rollout-attack-" + secrets.token_hex(6)
    outside = tmp_path / f"escaped-{secrets.token_hex(4)}"
    attacks = {
        "benign": "print(6 * 7)",
        "fork_bomb": ("import os\nfor _ in range(500):\n    try:\n        if os.fork() == 0:\n"
                      f"            os.execv('/bin/sleep', [{marker!r}, '60'])\n    except OSError:\n        break\n"
                      "raise SystemError('forked')"),
        "memory_bomb": "x = bytearray(10 ** 10)",
        "write_outside": f"open({str(outside)!r}, 'w').write('x')",
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)",
        "infinite_loop": "while True:\n    pass",
        "huge_output": "print('x' * 10 ** 7)",
    }
    torch.manual_seed(0)
    model = Transformer(ModelConfig(model_type="qwen2", vocab_size=256, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512)).eval()
    env = Injected()
    env.tools["python"].timeout_s = 2.0
    tok = ByteTokenizer()
    sampler = Sampler(model, max_batch_size=8, max_seq_len=1600, tokenizer=tok, verbose=False)
    rows = [{"name": k, "code": v} for k, v in attacks.items()]
    params = [SamplingParams(n=1, temperature=1.0, max_new_tokens=12, stop_token_ids=[], seed=i) for i in range(len(rows))]
    before = descendants(os.getpid())
    try:
        outs = generate_with_env(sampler, tok, [[65, 66, 67]] * len(rows), params, env, rows, max_total_tokens=1500)
    finally:
        env.tools["python"].close()
    got = {row["name"]: group[0] for row, group in zip(rows, outs)}
    print({k: (v.episode.turns, v.completion.finish_reason, round(v.episode.seconds, 2)) for k, v in got.items()})
    assert len(got) == len(attacks)                                           # the batch finished
    assert got["benign"].episode.turns == [("python", "ok")]
    assert "```output\n42\n```" in tok.decode(got["benign"].completion.token_ids)
    for name in attacks:
        tc = got[name]
        assert tc.episode.calls == 1 and sum(tc.completion.sampled_mask) >= 1, name
        if name not in ("benign", "huge_output"):
            assert tc.episode.turns[0][1] in ("error", "timeout"), (name, tc.episode.turns)
    assert got["infinite_loop"].episode.turns == [("python", "timeout")]
    assert not outside.exists()                                               # nothing escaped the work dir
    assert len(tok.decode(got["huge_output"].completion.token_ids)) < 2000     # the output was capped
    # nothing the attacks started survives: no marker process, no new descendant of this process
    # (the sampler's own reward or thread pools start none)
    for _ in range(50):
        if not processes_with(marker) and not (descendants(os.getpid()) - before):
            break
        import time
        time.sleep(0.1)
    assert processes_with(marker) == []
    assert descendants(os.getpid()) - before == set()
