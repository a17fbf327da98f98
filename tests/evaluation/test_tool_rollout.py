"""Multi-turn rollouts on the rollout engine (evaluation/tool_rollout.py): environment replies are
appended with extend and the sample decodes on from its own cache; every sampled token's log-prob
equals one forward over the same ids without a cache; the mask marks the replies; budgets end a
rollout with "length"; a multi-turn environment (a guessing game) ends episodes itself."""
import pytest
import torch

from envs.base import Environment, Episode, Reply
from evaluation.tool_rollout import generate_with_env
from model import ModelConfig, Transformer
from sampling import Sampler, SamplingParams
from tests.sampling.test_sampler import CONFIGS


class DigitsTokenizer:
    """ids <-> space-separated numbers: a stop string is a piece of a number's text."""
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]


class Echo(Environment):
    """Pauses at every sampled number holding a 1; answers the first `calls` pauses with the ids
    REPLY, lets the model go on (no reply) after that; records the texts it was given."""
    REPLY = "5 6 7"

    def __init__(self, calls: int = 2):
        self.calls, self.stop, self.seen = calls, ["1"], []

    def start(self, row):
        return Episode(row)

    def respond(self, episode, text):
        self.seen.append(text)
        if episode.calls >= self.calls:
            return Reply(None, status="none")
        episode.calls += 1
        return Reply(self.REPLY)


class GuessingGame(Environment):
    """A multi-turn environment: the model's latest number is its guess of a secret; the game
    answers 2 (go higher) or 3 (go lower), and ends the episode when the guess is right or after
    `turns` answers."""

    def __init__(self, turns: int = 3):
        self.turns, self.stop = turns, ["1"]

    def start(self, row):
        return Episode(row)

    def respond(self, episode, text):
        guess = int(text.split()[-1])
        if guess == episode.row["secret"] or episode.calls >= self.turns:
            return Reply(None, done=True)
        episode.calls += 1
        return Reply("2" if guess < episode.row["secret"] else "3")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CONFIGS[request.param])).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m


def _recompute(model, prompt, tokens, T):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0].float()
    logp = torch.log_softmax(logits / T, -1)[len(prompt) - 1:-1]
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_two_replies_then_decoding_on_equals_one_forward(model):
    T, tok, env = 0.9, DigitsTokenizer(), Echo(calls=2)
    sampler = Sampler(model, max_batch_size=8, max_seq_len=96, tokenizer=tok, page_size=4, sync_every=4,
                      verbose=False)
    prompts = [[5, 6, 7], list(range(1, 14))]
    params = [SamplingParams(n=2, temperature=T, max_new_tokens=30, stop_token_ids=[], seed=s) for s in (1, 2)]
    outs = generate_with_env(sampler, tok, prompts, params, env, rows=[{}, {}], max_total_tokens=60)
    for prompt, group in zip(prompts, outs):
        for tc in group:
            c = tc.completion
            mask = c.sampled_mask
            assert tc.episode.calls == 2 and tc.observation_tokens == 6
            assert mask.count(0) == 6 and sum(mask) == 30 and c.finish_reason == "length"
            # the replies sit where the model paused, as whole runs of the reply's ids
            runs = [i for i in range(len(mask)) if mask[i] == 0 and (i == 0 or mask[i - 1] == 1)]
            assert len(runs) == 2 and all(c.token_ids[i:i + 3] == [5, 6, 7] for i in runs)
            assert all("1" in str(c.token_ids[i - 1]) for i in runs)   # each follows a token holding the stop
            ref = _recompute(model, prompt, c.token_ids, T)
            sampled = torch.tensor(mask, dtype=torch.bool)
            assert (ref[sampled] - torch.tensor(c.logprobs)[sampled]).abs().max() < 1e-5
            assert all(lp == 0.0 for lp, m in zip(c.logprobs, mask) if not m)
    # every text handed to the environment is the model's own since its last pause, ending at the stop
    assert all("1" in t.split()[-1] and "5 6 7" not in t for t in env.seen)


def test_total_budget_counts_replies_and_ends_with_length(model):
    tok = DigitsTokenizer()
    sampler = Sampler(model, max_batch_size=4, max_seq_len=96, tokenizer=tok, verbose=False)
    params = [SamplingParams(n=3, temperature=1.0, max_new_tokens=40, stop_token_ids=[], seed=4)]
    outs = generate_with_env(sampler, tok, [[3, 4]], params, Echo(calls=10), rows=[{}], max_total_tokens=20)
    for tc in outs[0]:
        assert len(tc.completion.token_ids) <= 20 and tc.completion.finish_reason == "length"
        assert tc.model_tokens + tc.observation_tokens == len(tc.completion.token_ids)


def test_guessing_game_ends_episodes_itself(model):
    tok = DigitsTokenizer()
    sampler = Sampler(model, max_batch_size=8, max_seq_len=96, tokenizer=tok, verbose=False)
    rows = [{"secret": 100}, {"secret": 150}]
    params = [SamplingParams(n=2, temperature=1.0, max_new_tokens=40, stop_token_ids=[], seed=i) for i in (7, 8)]
    outs = generate_with_env(sampler, tok, [[9, 9], [8, 8]], params, GuessingGame(turns=3), rows=rows)
    for row, group in zip(rows, outs):
        for tc in group:
            c = tc.completion
            answers = [t for t, m in zip(c.token_ids, c.sampled_mask or [1] * len(c.token_ids)) if not m]
            assert set(answers) <= {2, 3} and len(answers) == tc.episode.calls <= 3
            if c.finish_reason == "stop":   # the game ended it: a right guess, or its 3 answers given
                assert tc.episode.calls == 3 or c.token_ids[-1] == row["secret"]
    assert sampler.engine.seqs == {}   # every sequence delivered and forgotten


def test_an_environment_that_raises_costs_only_its_rollout(model):
    class Broken(Echo):
        def respond(self, episode, text):
            if episode.row.get("broken"):
                raise RuntimeError("boom")
            return super().respond(episode, text)

    tok = DigitsTokenizer()
    sampler = Sampler(model, max_batch_size=8, max_seq_len=96, tokenizer=tok, verbose=False)
    params = [SamplingParams(n=1, temperature=1.0, max_new_tokens=20, stop_token_ids=[], seed=i) for i in (1, 2)]
    outs = generate_with_env(sampler, tok, [[3, 4], [5, 6]], params, Broken(), rows=[{"broken": True}, {}])
    assert outs[0][0].completion.finish_reason == "stop" and outs[0][0].observation_tokens == 0
    assert outs[1][0].episode.calls == 2 and sum(outs[1][0].completion.sampled_mask) == 20


def test_eval_stage_with_tools_records_the_calls(tmp_path):
    """--stage eval --tools calculator: samples are multi-turn rollouts; eval.json says how often a
    tool was called and each sample how many calls it made (a fresh model rarely calls one: the
    numbers are the plumbing's, the tool-tiny recipe shows real use)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from data.tokenizer import Tokenizer

    root = Path(__file__).resolve().parents[2]
    corpus = [f"What is {i} * {i + 3}? ```calculator\n{i} * {i + 3}\n```\n```output\n{i * (i + 3)}\n```\n"
              for i in range(60)]
    Tokenizer.train(corpus, vocab_size=300, min_frequency=1).save(tmp_path / "tok")
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} * 7?", "answer": str(7 * i)}) + "\n"
                            for i in range(3)))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(root / "train.py"), "--stage", "eval", "--preset", "tiny", "--tokenizer",
                        str(tmp_path / "tok"), "--chat-template", "r1-zero", "--eval-sets", str(data), "--eval-n", "2",
                        "--eval-max-new-tokens", "16", "--tools", "calculator", "--max-rollout-tokens", "40",
                        "--eval-save-logprobs", "--reward-workers", "1", "--out", str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    entry = json.loads((tmp_path / "run" / "eval.json").read_text())["set"]
    assert 0.0 <= entry["tool_share"] <= 1.0 and entry["tool_calls_per_sample"] >= 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples-set.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all("tool_calls" in s and len(s["sampled_mask"]) == len(s["token_ids"])
                                     for s in samples)
    bad = subprocess.run([sys.executable, str(root / "train.py"), "--stage", "eval", "--preset", "tiny", "--tokenizer",
                          str(tmp_path / "tok"), "--eval-sets", str(data), "--tools", "shell",
                          "--out", str(tmp_path / "bad")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown tool 'shell'" in bad.stderr and not (tmp_path / "bad").exists()


def test_trace_messages_split_model_and_tool_turns():
    from evaluation.generate_stage import trace_messages
    from sampling.types import Completion

    class Tok:
        special_ids = {0}

        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    c = Completion([1, 2, 3, 4, 5, 6, 0], [0.0] * 7, "stop", sampled_mask=[1, 1, 0, 0, 1, 1, 1])
    assert trace_messages(Tok(), c) == [{"role": "assistant", "content": "ab"}, {"role": "tool", "content": "cd"},
                                        {"role": "assistant", "content": "ef"}]
    plain = Completion([1, 2], [0.0, 0.0], "length")
    assert trace_messages(Tok(), plain) == [{"role": "assistant", "content": "ab"}]
