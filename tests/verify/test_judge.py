"""LLM judges (verify/judge.py): templates refused at start when they lack what they need, the parse
rules on written-out replies, and a judge reward against a stub endpoint that answers, hangs, answers
malformed JSON or closes the connection: the right values, None where it must, the batch finished."""
import re
import time

import pytest

from tests.verify.stub_openai import StubOpenAI, chat_completion
from verify.judge import JudgeReward, JudgeTemplate, load_template, make_judges, strip_thinking
from verify.openai_client import OpenAIClient
from verify.pool import RewardPool


def test_templates_without_what_they_need_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no placeholder for the completion it grades.*\{question\}, \{answer\}"):
        JudgeTemplate("Is {question} answered by {answer}?", "j.txt")
    with pytest.raises(ValueError, match="j.txt: header line 'pasre: score': unknown key 'pasre'"):
        JudgeTemplate("pasre: score\n---\n{response}", "j.txt")
    with pytest.raises(ValueError, match="not a valid format string"):
        JudgeTemplate("grade {response", "j.txt")
    with pytest.raises(ValueError, match="placeholders must be plain names"):
        JudgeTemplate("grade {response[0]}", "j.txt")
    with pytest.raises(ValueError, match="parse: 'vote'; expected verdict or score"):
        JudgeTemplate("parse: vote\n---\n{response}", "j.txt")
    with pytest.raises(ValueError, match="scale: '10-0'"):
        JudgeTemplate("parse: score\nscale: 10-0\n---\n{response}", "j.txt")
    with pytest.raises(ValueError, match="no judge template file 'missing.txt'.*judge:equivalence"):
        load_template("judge:missing.txt")
    with pytest.raises(ValueError, match="needs --judge-url"):
        make_judges(["accuracy", "judge:equivalence"], url=None)
    assert make_judges(["accuracy", "format"], url=None) == {}
    path = tmp_path / "rubric.txt"
    path.write_text("Grade {response} against {solution}. Say YES or NO.")
    t = load_template(f"judge:{path}")
    assert t.placeholders == ("response", "solution") and t.columns == ("solution",) and t.parse == "verdict"
    eq = load_template("judge:equivalence")
    assert set(eq.placeholders) == {"question", "answer", "response"} and eq.max_tokens == 2048


def test_parse_rules_on_written_out_replies():
    eq = load_template("judge:equivalence")
    assert eq.value("Both are 1/2.\nEQUIVALENT") == 1.0
    assert eq.value("They differ.\nNOT_EQUIVALENT") == 0.0                  # not read as EQUIVALENT
    assert eq.value("Not EQUIVALENT at first sight, but in the end: NOT_EQUIVALENT") == 0.0   # the last word counts
    assert eq.value("<think>EQUIVALENT? maybe</think>I cannot tell.") is None  # thinking is not the verdict
    assert eq.value("equivalent") == 1.0                                      # case-insensitive
    assert eq.value("") is None and eq.value("INEQUIVALENT") is None
    score = JudgeTemplate("parse: score\nscale: 1-5\n---\n{completion}", "s.txt")
    assert score.value("Score: 4") == 0.75 and score.value("2 of 5 points... final: 5") == 1.0
    assert score.value("Score: 9") is None and score.value("no number") is None
    assert strip_thinking("reasoning</think> final") == "final"
    assert strip_thinking("<think>a</think>x<think>b</think>y") == "xy"


def _grade(body):
    """The stub judge: EQUIVALENT when the graded response holds the reference answer; a response
    asking for trouble gets it."""
    if body is None:   # GET /models
        return "ok"
    prompt = body["messages"][-1]["content"]
    reference = re.search(r"Reference answer:\n(.*)\n", prompt)[1]
    response = re.search(r"Student's response \(its final part\):\n(.*)\n", prompt)[1]
    if "HANG" in response:
        return "hang"
    if "GARBLE" in response:
        return "malformed"
    if "CLOSE" in response:
        return "close"
    if "MUMBLE" in response:
        return chat_completion("I would rather not say.")
    return chat_completion("EQUIVALENT" if reference in response else "NOT_EQUIVALENT")


COMPLETIONS = ["<think>2+2 is 4</think>The answer is 4.", "<think>hmm</think>It is 5.", "4, surely", "HANG 4",
               "GARBLE", "CLOSE 4", "MUMBLE", "<think>4</think>no idea"]
WANT = [1.0, 0.0, 1.0, None, None, None, None, 0.0]


def test_judge_against_a_stub_that_answers_hangs_garbles_and_closes():
    with StubOpenAI(behaviour=_grade) as stub:
        client = OpenAIClient(stub.url, timeout_s=0.5, retries=1, backoff_s=0.01, max_concurrency=4)
        judge = JudgeReward("judge:equivalence", client, "stub-model")
        t0 = time.monotonic()
        got = judge(COMPLETIONS, prompts=["What is 2 + 2?"] * 8, answer=["4"] * 8)
        elapsed = time.monotonic() - t0
        client.close()
    assert got == WANT
    assert elapsed < 10                       # the hanging request cost its timeouts, not the batch
    assert dict(judge.stats) == {"requests": 8, "answered": 5, "failed": 3, "unparsable": 1}
    # the reasoning never reaches the judge: it grades what the completion finally says
    sent = [b["messages"][-1]["content"] for b in stub.bodies("/chat/completions")]
    assert not any("2+2 is 4" in s for s in sent) and any("The answer is 4." in s for s in sent)
    assert all(b["temperature"] == 0.0 and b["model"] == "stub-model" for b in stub.bodies("/chat/completions"))


def test_judge_in_the_reward_pool_beside_worker_rewards(tmp_path):
    """RewardPool runs the judge in the scoring process while its workers score the rule rewards; a
    column the template names that the data lacks is an error naming the column."""
    with StubOpenAI(behaviour=_grade) as stub:
        judges = make_judges(["judge:equivalence"], stub.url, timeout_s=0.5, retries=0, concurrency=8)
        assert judges["judge:equivalence"].model == "stub-model"   # the one model the endpoint lists
        with RewardPool(num_workers=1, timeout_s=10) as pool:
            scored = pool.score({"accuracy": "accuracy", "judge:equivalence": judges["judge:equivalence"]},
                                COMPLETIONS, prompts=["What is 2 + 2?"] * 8, answer=["4"] * 8)
            assert scored["judge:equivalence"] == WANT
            assert scored["accuracy"][:2] == [1.0, 0.0]
            from verify.pool import RewardError
            with pytest.raises(RewardError, match="no 'answer' column"):
                pool.score({"judge:equivalence": judges["judge:equivalence"]}, COMPLETIONS[:2],
                           prompts=["q"] * 2)
            # the pool is still usable afterwards
            assert pool.score(["accuracy"], ["\\boxed{4}"], answer=["4"])["accuracy"] == [1.0]


def test_judge_cache_answers_a_resumed_run_without_requests(tmp_path):
    with StubOpenAI(behaviour=_grade) as stub:
        first = make_judges(["judge:equivalence"], stub.url, model="m", retries=0, cache_dir=tmp_path)
        first["judge:equivalence"](COMPLETIONS[:3], prompts=["q"] * 3, answer=["4"] * 3)
        n = stub.count("/chat/completions")
        again = make_judges(["judge:equivalence"], stub.url, model="m", retries=0, cache_dir=tmp_path)
        assert again["judge:equivalence"](COMPLETIONS[:3], prompts=["q"] * 3, answer=["4"] * 3) == WANT[:3]
        assert stub.count("/chat/completions") == n and again["judge:equivalence"].client.stats.cached == 3
