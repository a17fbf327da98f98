"""The generate stage: keep-if conditions, de-duplication and the per-prompt cap, SFT rows from scripted
completions, the output file's crash recovery, and a kill -9 in the middle of a run followed by --resume."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data.datasets import load_conversations
from data.tokenizer import Tokenizer
from evaluation.generate_stage import (Condition, GenerateConfig, GeneratedFile, check_flags, generate_batch,
                                       parse_keep_if, parse_rewards, render_prompts, select)
from sampling.sampler import Completion
from verify.pool import RewardPool

ROOT = Path(__file__).resolve().parents[2]


class ScriptedSampler:
    """Stands in for sampling.Sampler: prompt i gets the fixed texts script[i], tokenized, ending in EOS."""

    def __init__(self, tok, script: list[list[str]]):
        self.tok, self.script, self.params = tok, script, None

    def generate(self, prompts, params):
        assert len(prompts) == len(params) == len(self.script)
        self.params = params
        return [[Completion(self.tok.encode(t) + [self.tok.eos_id], [0.0] * (len(self.tok.encode(t)) + 1), "stop")
                 for t in texts] for texts in self.script]


@pytest.fixture(scope="module")
def tok():
    corpus = ["<think>What is 1 + 1? It is 2.</think><answer>2</answer> The answer is 4."] * 4
    return Tokenizer.train(corpus, vocab_size=300, min_frequency=1)


def test_keep_if_and_reward_specs():
    assert parse_keep_if("accuracy>=1, format > 0.5,language<=-1e-3", ["accuracy", "format", "language"]) == [
        Condition("accuracy", ">=", 1.0), Condition("format", ">", 0.5), Condition("language", "<=", -1e-3)]
    assert parse_keep_if("none", ["accuracy"]) == [] and parse_keep_if("", ["accuracy"]) == []
    with pytest.raises(ValueError, match="names 'language', which --reward does not score; scored: accuracy"):
        parse_keep_if("language>=0.9", ["accuracy"])
    with pytest.raises(ValueError, match="cannot read 'accuracy=>1'"):
        parse_keep_if("accuracy=>1", ["accuracy"])
    assert parse_rewards("accuracy, format") == ["accuracy", "format"]
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        parse_rewards("acuracy")
    with pytest.raises(ValueError, match="named twice"):
        parse_rewards("format,format")
    cond = Condition("accuracy", ">=", 1.0)
    assert cond.holds({"accuracy": 1.0}) and not cond.holds({"accuracy": 0.0})
    assert not cond.holds({"accuracy": None}) and not cond.holds({})   # no signal is not a pass


def test_flag_errors_name_the_flag(tmp_path):
    from recipes.flags import build_parser
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')

    def flags(*extra):
        return build_parser().parse_args(["--stage", "generate", "--preset", "tiny", "--tokenizer", "tok",
                                                "--data", str(data), *extra])

    check_flags(flags("--reward", "accuracy,language", "--keep-if", "language>=0.9"), 1)
    with pytest.raises(ValueError, match="group of --rollout-tp ranks \\(it got WORLD_SIZE=2 and --rollout-tp 1\\)"):
        check_flags(flags(), 2)
    check_flags(flags("--rollout-tp", "2"), 2)   # one tensor-parallel group of 2 ranks
    with pytest.raises(ValueError, match="--rollout-tp 3: expected a divisor of the 2 rank"):
        check_flags(flags("--rollout-tp", "3"), 2)
    for extra, message in [(("--keep-if", "language>=0.9"), "names 'language', which --reward does not score"),
                           (("--reward", "acuracy"), "unknown reward 'acuracy'"),
                           (("--data", str(tmp_path / "none.jsonl")), "needs --data, a prompts JSONL/Parquet file"),
                           (("--max-per-prompt", "-1"), "--max-per-prompt >= 0"),
                           (("--gen-temperature", "-1"), "--gen-temperature must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            check_flags(flags(*extra), 1)


def test_select_deduplicates_filters_and_caps():
    texts = ["a", "b", "a", "c", "d", "e"]
    scores = [{"accuracy": v} for v in (1.0, 0.0, 1.0, 1.0, 1.0, None)]
    conditions = [Condition("accuracy", ">=", 1.0)]
    kept, counts = select(texts, scores, conditions, max_per_prompt=2)
    # 0 kept, 1 wrong, 2 repeats 0, 3 kept, 4 over the cap, 5 no signal
    assert kept == [0, 3]
    assert counts == Counter(kept=2, duplicate=1, filtered=2, capped=1, **{"failed/accuracy": 2})
    assert select(texts, scores, conditions)[0] == [0, 3, 4]
    assert select(texts, scores, [])[0] == [0, 1, 3, 4, 5]      # no conditions: only the duplicate goes


def test_batch_rows_are_sft_conversations_with_their_scores(tok, tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"},
            {"id": "q7", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}]
    conversations = [[{"role": "user", "content": "What is 1 + 1?"}], rows[1]["messages"]]
    script = [["<think>a</think><answer>2</answer>", "<think>a</think><answer>2</answer>",
               "<think>b</think><answer>3</answer>", "The answer is 2."],
              ["<think>x</think><answer>4</answer>", "<think>y</think><answer>4</answer>",
               "<think>z</think><answer>4</answer>", "<answer>4</answer>"]]
    cfg = GenerateConfig(n=4, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=2, rewards=("accuracy", "format"),
                         conditions=(Condition("accuracy", ">=", 1), Condition("format", ">=", 1)), max_per_prompt=2)
    sampler = ScriptedSampler(tok, script)
    prompts = render_prompts(tok, conversations, "chatml")
    with RewardPool(num_workers=1, timeout_s=30.0) as pool:
        written, counts, scored = generate_batch(sampler, tok, pool, rows, [5, 6], prompts, conversations, cfg)

    # prompt 0: sample 1 repeats 0, 2 is wrong, 3 is right but not in format;
    # prompt 1: 0 and 1 kept, 2 over the cap of 2, 3 not in format
    assert [(r["prompt_id"], r["sample"]) for r in written] == [(5, 0), ("q7", 0), ("q7", 1)]
    assert written[0]["messages"] == [{"role": "user", "content": "What is 1 + 1?"},
                                      {"role": "assistant", "content": "<think>a</think><answer>2</answer>"}]
    assert written[1]["messages"] == rows[1]["messages"] + [
        {"role": "assistant", "content": "<think>x</think><answer>4</answer>"}]
    assert all(r["scores"] == {"accuracy": 1.0, "format": 1.0} and r["finish_reason"] == "stop" for r in written)
    assert scored == {"accuracy": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      "format": [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]}
    assert counts == Counter(samples=8, kept=3, duplicate=1, filtered=3, capped=1, tokens=counts["tokens"],
                             **{"failed/accuracy": 1, "failed/format": 2})
    assert [p.seed for p in sampler.params] == [2 * 1_000_003 + 5, 2 * 1_000_003 + 6]   # seeds by file index

    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in written))
    assert [c["messages"][-1]["content"] for c in load_conversations(path)] == [
        "<think>a</think><answer>2</answer>", "<think>x</think><answer>4</answer>", "<think>y</think><answer>4</answer>"]


def test_output_file_drops_what_a_crash_left_after_the_last_recorded_batch(tmp_path):
    settings = {"data": "p.jsonl", "gen_n": 2}
    out = GeneratedFile(tmp_path, settings)
    out.write_rows([{"a": 1}, {"a": 2}])
    out.record(2, Counter(kept=2))
    out.close()
    good = (tmp_path / "generated.jsonl").read_bytes()
    with open(tmp_path / "generated.jsonl", "ab") as f:   # a batch written but not recorded, then half a line
        f.write(b'{"a": 3}\n{"a": 4')

    out = GeneratedFile(tmp_path, settings)
    assert out.dropped_bytes == len(b'{"a": 3}\n{"a": 4') and out.prompts_done == 2
    assert (tmp_path / "generated.jsonl").read_bytes() == good
    out.write_rows([{"a": 3}])
    out.record(3, Counter(kept=1))
    out.close()
    assert [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()] == [
        {"a": 1}, {"a": 2}, {"a": 3}]
    state = json.loads((tmp_path / "progress.json").read_text())
    assert state["prompts_done"] == 3 and state["rows"] == 3 and state["counts"] == {"kept": 3}

    with pytest.raises(ValueError, match="made with {'gen_n': 2}; resuming it with {'gen_n': 4}"):
        GeneratedFile(tmp_path, {**settings, "gen_n": 4})
    (tmp_path / "generated.jsonl").write_bytes(good[:5])
    with pytest.raises(RuntimeError, match="changed outside this run"):
        GeneratedFile(tmp_path, settings)


def _prompts_done(run: Path) -> int:
    path = run / "progress.json"   # replaced atomically, so never read half-written
    return json.loads(path.read_text())["prompts_done"] if path.exists() else 0


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "generated.jsonl").read_text().splitlines()]


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    tok = Tokenizer.train([f"What is {i} + {i + 1}? <think>{2 * i + 1}</think>" for i in range(50)], vocab_size=300)
    tok.save(tmp_path / "tok")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(16)))
    # one thread: float sums then run in the same order in all three processes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def command(out, *extra):
        # --keep-if none: a random model is never right, and the test needs rows
        return [sys.executable, str(ROOT / "train.py"), "--stage", "generate", "--preset", "tiny", "--tokenizer",
                str(tmp_path / "tok"), "--chat-template", "r1-zero", "--data", str(data), "--gen-n", "3",
                "--gen-batch-prompts", "2", "--gen-max-new-tokens", "16", "--gen-temperature", "1.0",
                "--reward", "format,accuracy", "--keep-if", "none", "--reward-workers", "1", "--seed", "5",
                "--out", str(tmp_path / out), *extra]

    run = tmp_path / "run"
    victim = subprocess.Popen(command("run"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    # kill once two batches (4 prompts, 12 rows) are recorded: the kill lands while later batches are
    # sampled or written, so the file may also hold rows that progress.json does not yet count
    deadline = time.monotonic() + 240
    while _prompts_done(run) < 4:
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "two batches were not written within 240 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    at_kill = _prompts_done(run)
    assert 4 <= at_kill < 16, "the run ended before the kill"
    assert len(_rows(run)) >= 12

    resumed = subprocess.run(command("run", "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reference = subprocess.run(command("ref"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout + reference.stderr

    got, want = _rows(run), _rows(tmp_path / "ref")
    assert len(want) == 16 * 3     # keep-if none; 16 tokens of a random model never repeat
    keys = [(r["prompt_id"], r["sample"]) for r in got]
    assert len(set(keys)) == len(keys)          # nothing written twice
    assert got == want                          # nothing lost, every row as an uninterrupted run writes it
    assert f"resuming at prompt {at_kill}/16" in resumed.stdout
    progress = json.loads((run / "progress.json").read_text())
    assert progress["prompts_done"] == 16 and progress["rows"] == 48
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 17, 2))       # one metrics line per batch, none twice


@pytest.mark.distributed
def test_tensor_parallel_group_of_two_writes_what_one_process_writes(tmp_path):
    """--rollout-tp 2 under torchrun: rank 0 reads, scores and writes, the pair decodes its batches with
    the model split between them; generated.jsonl equals the one-process run's."""
    tok = Tokenizer.train([f"What is {i} + {i + 1}? <think>{2 * i + 1}</think>" for i in range(50)], vocab_size=300)
    tok.save(tmp_path / "tok")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(6)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    flags = ["--stage", "generate", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--chat-template",
             "r1-zero", "--data", str(data), "--gen-n", "2", "--gen-batch-prompts", "4", "--gen-max-new-tokens",
             "12", "--gen-temperature", "1.0", "--reward", "format,accuracy", "--keep-if", "none",
             "--reward-workers", "1", "--seed", "3"]
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--out", str(tmp_path / "one")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train.py"), *flags, "--rollout-tp", "2", "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    want, got = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(want) == 12 and got == want
    assert json.loads((tmp_path / "two" / "progress.json").read_text())["prompts_done"] == 6
