"""Models behind an OpenAI-compatible endpoint: the generate stage with a remote teacher (our own
server, started by the test) keeps what the local generate stage keeps, and a run killed mid-way and
resumed asks again only for what it had not got; LLM judges against our server (a tiny model trained
here to judge) and against a stub that hangs, garbles and closes, in the generate stage and in GRPO."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch

from data.chat import render
from data.tokenizer import Tokenizer
from evaluation.remote import RemoteTeacher, TeacherUnavailable, reward_names
from model.build import preset_config
from model.transformer import Transformer
from sampling.sampler import Sampler, SamplingParams
from serve.server import RunningServer
from tests.verify.stub_openai import StubOpenAI, chat_completion
from verify.judge import JudgeReward
from verify.openai_client import OpenAIClient

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "generated.jsonl").read_text().splitlines()]


def _prompts_done(run: Path) -> int:
    path = run / "progress.json"
    return json.loads(path.read_text())["prompts_done"] if path.exists() else 0


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1", "/stats")) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    tok = Tokenizer.train([f"What is {i} + {i + 1}? <think>{2 * i + 1}</think>" for i in range(50)], vocab_size=300)
    tok.save(d / "tok")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)})
                                             + "\n" for i in range(20)))
    return d


@pytest.fixture(scope="module")
def served(workdir):
    """train.py --stage serve of the tiny preset (seed 5), on a free port."""
    out = workdir / "serve"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--stage", "serve", "--preset", "tiny",
                             "--seed", "5", "--tokenizer", str(workdir / "tok"), "--chat-template", "r1-zero",
                             "--port", "0", "--sampler-batch-size", "16", "--out", str(out)],
                            cwd=workdir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "server.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the server did not start within 120 s"
        time.sleep(0.1)
    yield json.loads((out / "server.json").read_text())["url"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert json.loads((out / "summary.json").read_text())["http"]["status/200"] > 0


def generate(workdir, out, *extra, check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "generate", "--tokenizer", str(workdir / "tok"),
           "--data", str(workdir / "prompts.jsonl"), "--gen-n", "2", "--gen-batch-prompts", "2",
           "--gen-max-new-tokens", "24", "--gen-temperature", "0", "--reward", "format,accuracy", "--keep-if",
           "none", "--reward-workers", "1", "--seed", "5", "--out", str(workdir / out), *extra]
    done = subprocess.run(cmd, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_generate_from_our_server_keeps_the_local_stages_rows(workdir, served):
    local = generate(workdir, "local", "--preset", "tiny", "--chat-template", "r1-zero")
    remote = generate(workdir, "remote", "--teacher-url", served)
    want, got = _rows(workdir / "local"), _rows(workdir / "remote")
    assert len(want) == 20   # greedy: the two samples of a prompt are one, kept once
    assert got == want       # messages, prompt ids, samples, scores, token counts, finish reasons
    summary = json.loads((workdir / "remote" / "summary.json").read_text())
    assert summary["teacher_model"] == "tiny" and summary["teacher/requests"] == 40 + 1   # and GET /models
    assert summary["teacher/failures"] == 0 and summary["teacher/cached"] == 0
    assert "resuming" not in local.stdout + remote.stdout


def test_killed_and_resumed_it_does_not_ask_again_for_what_it_has(workdir, served):
    run = workdir / "victim"
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "generate", "--tokenizer", str(workdir / "tok"),
           "--data", str(workdir / "prompts.jsonl"), "--gen-n", "2", "--gen-batch-prompts", "2",
           "--gen-max-new-tokens", "24", "--gen-temperature", "0", "--reward", "format,accuracy", "--keep-if",
           "none", "--reward-workers", "1", "--seed", "5", "--teacher-url", served, "--teacher-concurrency", "1",
           "--out", str(run)]
    served_before = _stats(served)["http"].get("requests/chat", 0)
    victim = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _prompts_done(run) < 4:
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    time.sleep(0.5)   # a request sent just before the kill reaches the server
    at_kill = _prompts_done(run)
    assert 4 <= at_kill < 20, "the run ended before the kill"
    cached = len(list((run / "teacher_cache").glob("*/*.json")))
    asked_before = _stats(served)["http"]["requests/chat"] - served_before
    assert cached >= 2 * at_kill and asked_before - cached <= 1   # at most the one request in flight is lost

    resumed = subprocess.run(cmd + ["--resume"], cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    asked_after = _stats(served)["http"]["requests/chat"] - served_before - asked_before
    assert asked_after == 40 - cached            # every cached answer was read from disk, none asked again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher/cached"] == cached - 2 * at_kill   # the batch in flight at the kill, from the cache
    if (workdir / "remote").exists():                           # the uninterrupted run of the test above
        assert _rows(run) == _rows(workdir / "remote")


def test_an_unreachable_teacher_stops_the_stage_and_loses_nothing(workdir):
    with StubOpenAI(behaviour="ok") as stub:
        stub.behave(lambda body: "ok" if body is None or "What is 0 +" in json.dumps(body) else "close")
        done = generate(workdir, "down", "--teacher-url", stub.url, "--http-retries", "1", "--teacher-timeout-s", "2",
                        check=False)
    assert done.returncode == 1
    assert "teacher requests failed after the retries" in done.stdout and "--resume" in done.stdout
    assert _prompts_done(workdir / "down") == 0
    assert len(list((workdir / "down" / "teacher_cache").glob("*/*.json"))) == 2   # prompt 0's answers are kept


def test_remote_teacher_keeps_the_reasoning_and_drops_refused_samples():
    replies = {7000: {"choices": [{"message": {"content": "The answer is 3.", "reasoning_content": "1 + 2 = 3"},
                                   "finish_reason": "stop"}], "usage": {"completion_tokens": 9}},
               7001: {"choices": [{"message": {"content": "3", "reasoning": "so 3"}, "finish_reason": "length"}],
                      "usage": {"completion_tokens": 4}}}
    with StubOpenAI() as stub:
        stub.behave(lambda body: replies.get(body["seed"], "status:400"))
        teacher = RemoteTeacher(OpenAIClient(stub.url, retries=0), "stub-model")
        outs = teacher.generate([[{"role": "user", "content": "1 + 2?"}]],
                                [SamplingParams(n=3, temperature=0.6, max_new_tokens=50, seed=7)])
        assert sorted(b["seed"] for b in stub.bodies("/chat/completions")) == [7000, 7001, 7002]
        assert all(b["n"] == 1 and b["max_tokens"] == 50 for b in stub.bodies("/chat/completions"))
    first, second, refused = outs[0]
    assert first.text == "<think>\n1 + 2 = 3\n</think>\n\nThe answer is 3." and first.num_tokens == 9
    assert second.text == "<think>\nso 3\n</think>\n\n3" and second.finish_reason == "length"
    assert refused is None and teacher.counts["failed"] == 1
    with StubOpenAI(behaviour="status:503") as stub:
        with pytest.raises(TeacherUnavailable, match="1 of 1 teacher requests failed"):
            RemoteTeacher(OpenAIClient(stub.url, retries=0), "m").generate(
                [[{"role": "user", "content": "x"}]], [SamplingParams(n=1)])


def test_reward_names_strip_weights():
    assert reward_names("accuracy:1.0, judge:equivalence,judge:j.txt:0.5,format") == [
        "accuracy", "judge:equivalence", "judge:j.txt", "format"]


# ---- a judge against our server: a tiny model trained here to say YES when the answers are equal ----

JUDGE_CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\n=>{% endif %}"
PAIRS = [(a, b) for a in range(1, 5) for b in range(1, 5)]


def _judge_prompt(reference, answer):
    return f"Reference: {reference}\nAnswer: {answer}"


def _trained_judge():
    tok = Tokenizer.train([_judge_prompt(a, b) + "\n=> YES NO" for a, b in PAIRS] * 2, vocab_size=300,
                          chat_template=JUDGE_CHAT)
    torch.manual_seed(0)
    model = Transformer(preset_config("tiny", tok))
    seqs, starts = [], []
    for a, b in PAIRS:
        p = tok.encode(render([{"role": "user", "content": _judge_prompt(a, b)}], JUDGE_CHAT, add_generation_prompt=True))
        seqs.append(p + tok.encode(" YES" if a == b else " NO") + [tok.eos_id])
        starts.append(len(p))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        target[i, start:len(s)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(600):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[target[:, 1:]], ids[:, 1:][target[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01, "the tiny judge did not learn its 16 verdicts"
    return model.eval(), tok


def test_judge_reward_against_our_server(tmp_path):
    model, tok = _trained_judge()
    sampler = Sampler(model, max_batch_size=8, max_seq_len=64, tokenizer=tok, verbose=False)
    (tmp_path / "judge.txt").write_text("max_tokens: 8\n---\nReference: {answer}\nAnswer: {extracted}")
    with RunningServer(sampler, tok, "judge", max_len=64, stop_ids=[tok.eos_id]) as srv:
        client = OpenAIClient(srv.url, retries=0, max_concurrency=8)
        judge = JudgeReward(f"judge:{tmp_path / 'judge.txt'}", client, "judge")
        completions = [f"<think>it is {b}?</think>The answer is \\boxed{{{b}}}." for _, b in PAIRS] + ["no answer"]
        got = judge(completions, answer=[str(a) for a, _ in PAIRS] + ["1"])
        client.close()
    want = [1.0 if a == b else 0.0 for a, b in PAIRS]
    assert got[:16] == want
    # "no answer" has no final answer to extract: the judge sees "Answer: " and says something, or not
    assert got[16] in (0.0, 1.0, None)
    assert judge.stats["requests"] == 17 and judge.stats["failed"] == 0


# ---- a judge that misbehaves, in the generate stage and in GRPO ----------------------------------------

def _verdict_of(text: str) -> str:
    """The stub judge's rule on a completion: a fixed function of its text."""
    return ["YES", "NO", "hang", "malformed", "close", "mumble"][zlib.crc32(text.encode()) % 6]


def _stub_judge(body):
    if body is None:
        return "ok"
    text = re.search(r"<<(.*)>>", body["messages"][-1]["content"], re.S)[1]
    verdict = _verdict_of(text)
    if verdict in ("YES", "NO"):
        return chat_completion(f"My verdict: {verdict}")
    return chat_completion("Hard to say.") if verdict == "mumble" else verdict


def test_generate_stage_scores_with_a_judge_that_hangs_garbles_and_closes(workdir):
    (workdir / "stub_judge.txt").write_text("Grade this: <<{completion}>>")
    spec = f"judge:{workdir / 'stub_judge.txt'}"
    with StubOpenAI(behaviour=_stub_judge) as stub:
        generate(workdir, "judged", "--preset", "tiny", "--chat-template", "r1-zero", "--gen-temperature", "1.0",
                 "--reward", f"format,{spec}", "--judge-url", stub.url, "--judge-timeout-s", "0.5", "--http-retries",
                 "0")
    rows = _rows(workdir / "judged")
    assert len(rows) == 40
    want = {"YES": 1.0, "NO": 0.0}
    for r in rows:
        assert r["scores"][spec] == want.get(_verdict_of(r["messages"][-1]["content"]))
    verdicts = [_verdict_of(r["messages"][-1]["content"]) for r in rows]
    summary = json.loads((workdir / "judged" / "summary.json").read_text())
    assert summary[f"judge/{spec}/requests"] == 40
    assert summary[f"judge/{spec}/failed"] == sum(v in ("hang", "malformed", "close") for v in verdicts)
    assert summary[f"judge/{spec}/unparsable"] == verdicts.count("mumble")
    assert 0 < verdicts.count("YES") + verdicts.count("NO") < 40   # the batch had both kinds, and finished


def test_grpo_trains_on_a_judge_reward(tmp_path):
    import train
    from tests.rl._grpo_worker import GROUP_SIZE, grpo_argv, make_model_dir, write_prompts
    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "prompts.jsonl", 8)
    (tmp_path / "j.txt").write_text("Grade this: <<{completion}>>")
    spec = f"judge:{tmp_path / 'j.txt'}"
    with StubOpenAI(behaviour=_stub_judge) as stub:
        assert train.main(grpo_argv(tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path / "run", "--reward",
                                    f"{spec},format:0.5", "--judge-url", stub.url, "--judge-timeout-s", "0.5",
                                    "--http-retries", "0")) == 0
        asked = stub.count("/chat/completions")
        verdicts = [_verdict_of(re.search(r"<<(.*)>>", b["messages"][-1]["content"], re.S)[1])
                    for b in stub.bodies("/chat/completions")]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and asked == 2 * 4 * GROUP_SIZE
    last = rows[-1]
    assert last[f"judge/{spec}/requests"] == asked
    assert last[f"judge/{spec}/failed"] == sum(v in ("hang", "malformed", "close") for v in verdicts)
    assert last[f"judge/{spec}/unparsable"] == verdicts.count("mumble")
    assert last[f"judge/{spec}/answered"] + last[f"judge/{spec}/failed"] == asked
    assert 0.0 <= last[f"reward/{spec}"] <= 1.0 and last["grad_norm"] >= 0


def test_judge_flags_are_checked_before_anything_runs(workdir, tmp_path):
    (tmp_path / "bad.txt").write_text("Is {question} right?")
    for extra, message in [
        (["--preset", "tiny", "--reward", "judge:equivalence"], "needs --judge-url"),
        (["--preset", "tiny", "--reward", f"judge:{tmp_path / 'bad.txt'}", "--judge-url", "http://x:1/v1"],
         "no placeholder for the completion it grades"),
        (["--preset", "tiny", "--reward", "judge:equivalence", "--judge-url", "ftp://x"],
         "expected an http:// or https:// URL"),
        (["--teacher-url", "http://x:1/v1", "--preset", "tiny"], "without --model / --preset"),
    ]:
        done = generate(workdir, "never", *extra, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (workdir / "never").exists()


# ---- the judge in-process (--judge-model DIR without --judge-url) --------------------------------------

def test_in_process_judge_gives_the_trained_verdicts_and_fails_only_what_does_not_fit(tmp_path):
    from evaluation.local_judge import LocalChat
    model, tok = _trained_judge()
    (tmp_path / "judge.txt").write_text("max_tokens: 8\n---\nReference: {answer}\nAnswer: {extracted}")
    judge = JudgeReward(f"judge:{tmp_path / 'judge.txt'}", LocalChat(model, tok, max_len=64), "local")
    completions = [f"The answer is \\boxed{{{b}}}." for _, b in PAIRS] + ["\\boxed{" + "1 " * 80 + "}"]
    got = judge(completions, answer=[str(a) for a, _ in PAIRS] + ["1"])
    assert got == [1.0 if a == b else 0.0 for a, b in PAIRS] + [None]   # the last prompt is past the context
    assert dict(judge.stats) == {"requests": 17, "answered": 16, "failed": 1, "unparsable": 0}


class _Scripted:
    """Stands in for LocalChat's sampler: the i-th prompt of a call gets texts[i], ended by EOS."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.seen = tok, texts, []

    def generate(self, prompts, params):
        from sampling.sampler import Completion
        self.seen.append((prompts, params))
        return [[Completion(self.tok.encode(t) + [self.tok.eos_id], [0.0] * (len(self.tok.encode(t)) + 1), "stop")]
                for t in self.texts[:len(prompts)]]

    def release(self):
        pass


def test_in_process_judge_parse_rule_on_scripted_outputs(workdir):
    from evaluation.local_judge import LocalChat
    tok = Tokenizer.from_pretrained(workdir / "tok")
    torch.manual_seed(0)
    chat = LocalChat(Transformer(preset_config("tiny", tok, max_position_embeddings=4096)), tok, chat_template="chatml")
    chat.sampler = _Scripted(tok, ["It is right. EQUIVALENT", "<think>EQUIVALENT?</think> NOT_EQUIVALENT",
                                   "I cannot tell.", "equivalent"])
    judge = JudgeReward("judge:equivalence", chat, "local")
    got = judge(["\\boxed{7}", "\\boxed{8}", "\\boxed{9}", "7"], prompts=["What is 3 + 4?"] * 4, answer=["7"] * 4)
    assert got == [1.0, 0.0, None, 1.0]
    assert judge.stats["unparsable"] == 1 and judge.stats["failed"] == 0
    (prompts, params), = chat.sampler.seen
    assert all(p.temperature == 0.0 and p.max_new_tokens == 2048 for p in params)   # the template's greedy budget
    assert "What is 3 + 4?" in tok.decode(prompts[0]) and "<|im_start|>assistant" in tok.decode(prompts[0])


def test_a_judge_model_folder_is_checked_at_start(tmp_path):
    from evaluation.remote import check_judge_flags
    from model.checkpoint import save_pretrained
    from recipes.flags import stage_args
    tok = Tokenizer.train(["What is 1 + 2? 3"] * 4, vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(Transformer(preset_config("tiny", tok, max_position_embeddings=256)), tmp_path / "judge")
    tok.save(tmp_path / "judge")
    args = stage_args(stage="grpo", reward="judge:equivalence,format", judge_model=str(tmp_path / "judge"))
    with pytest.raises(ValueError, match="its tokenizer has no chat template"):
        check_judge_flags(args)
    Tokenizer.train(["What is 1 + 2? 3"] * 4, vocab_size=300, chat_template="{{ messages[0]['content'] }}").save(
        tmp_path / "judge")
    with pytest.raises(ValueError, match="max_tokens 2048 leaves no room for the prompt in the 256-token context"):
        check_judge_flags(args)
    (tmp_path / "short.txt").write_text("max_tokens: 16\n---\n{response}")
    check_judge_flags(stage_args(stage="grpo", reward=f"judge:{tmp_path / 'short.txt'}",
                                 judge_model=str(tmp_path / "judge")))
    with pytest.raises(ValueError, match="or --judge-model DIR"):
        check_judge_flags(stage_args(stage="grpo", reward="judge:equivalence"))


def test_grpo_with_an_in_process_judge(tmp_path):
    import train
    from model.checkpoint import save_pretrained
    from tests.rl._grpo_worker import GROUP_SIZE, grpo_argv, make_model_dir, write_prompts
    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "prompts.jsonl", 8)
    model, tok = _trained_judge()
    save_pretrained(model, tmp_path / "judge")
    tok.save(tmp_path / "judge")
    (tmp_path / "j.txt").write_text("max_tokens: 4\n---\nReference: {answer}\nAnswer: {extracted}")
    spec = f"judge:{tmp_path / 'j.txt'}"
    assert train.main(grpo_argv(tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path / "run", "--reward",
                                f"{spec},format:0.5", "--judge-model", str(tmp_path / "judge"))) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1][f"judge/{spec}/requests"] == 2 * 4 * GROUP_SIZE
    assert rows[-1][f"judge/{spec}/failed"] == 0
