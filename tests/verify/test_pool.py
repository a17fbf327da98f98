"""RewardPool: same scores as serial scoring, hung/crashing/raising items handled, no processes left behind.

The misbehaving rewards live in a helper module written to a temporary directory that is put on
sys.path before the pool starts, so the spawned workers can import it by name.
"""
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from verify.pool import RewardError, RewardPool
from verify.rewards import get_reward, make_length_reward

ROOT = Path(__file__).resolve().parents[2]

HELPER = '''
import os
import subprocess
import time


def sleepy(completions, **kwargs):
    """len(completion); sleeps forever on "hang"."""
    out = []
    for c in completions:
        if c == "hang":
            time.sleep(3600)
        out.append(float(len(c)))
    return out


def strict(completions, **kwargs):
    return sleepy(completions)


strict.timeout_reward = 0.0


def crash(completions, **kwargs):
    if "crash" in completions:
        os._exit(3)
    return [1.0] * len(completions)


def broken(completions, **kwargs):
    raise ValueError("broken reward needs a `xyz` column")


def spawner(completions, pidfile, **kwargs):
    """Starts a long sleep in a child process, records its pid, then hangs."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(pidfile[0], "w") as f:
        f.write(str(child.pid))
    time.sleep(3600)
'''


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """The name of an importable module holding the misbehaving rewards."""
    (tmp_path / "pool_test_rewards.py").write_text(textwrap.dedent(HELPER))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pool_test_rewards"


def running(pid: int) -> bool:
    """Is pid a live (not zombie) process?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def answer(text: str) -> str:
    return f"<think>\nworking\n</think>\n<answer>\n{text}\n</answer>"


def test_scores_equal_serial_scoring_in_order():
    completions = [answer("7"), answer("8"), "<answer>7</answer> a a a a", answer("(1 + 2) * 3"),
                   answer("7") + " and more", answer("1 + 2 + 3"), answer("007"), "nothing"]
    columns = {
        "answer": ["7", "7", "7", None, "7", None, "7", "7"],
        "numbers": [None, None, None, [1, 2, 3], None, [1, 2, 3], None, None],
        "target": [None, None, None, 9, None, 9, None, None],
        "prompts": ["a", "a", "a", "b", "a", "b", "c", "c"],
    }
    rewards = {"format": "format", "tag_count": "tag_count", "arithmetic": "arithmetic", "countdown": "countdown",
               "repetition": "repetition", "combo": "format:1,arithmetic:2",
               "length": make_length_reward(correctness="arithmetic")}   # group-wise, passed as an object
    with RewardPool(num_workers=2, timeout_s=10.0, preload=()) as pool:
        got = pool.score(rewards, completions, **columns)
        assert pool.stats.timeouts == pool.stats.errors == pool.stats.restarts == 0
        # 6 per-completion rewards x 8 units, plus the length reward's 3 prompt groups
        assert pool.stats.units == 6 * 8 + 3
    serial = {name: get_reward(spec)(completions, **columns) for name, spec in rewards.items()}
    assert got == serial
    assert got["arithmetic"] == [1.0, 0.0, 1.0, None, 1.0, None, 1.0, 0.0]   # spot check against hand values


def test_math_rewards_in_workers_that_preload_sympy():
    completions = ["\\boxed{\\frac{1}{2}}", "<answer>0.5</answer>", "\\boxed{3}", "no answer", "\\boxed{72}"]
    columns = {"answer": ["1/2", "1/2", "4", "5", "#### 72"], "prompts": ["a", "a", "a", "b", "b"]}
    rewards = ["accuracy", "cosine", "length"]
    with RewardPool(num_workers=1, timeout_s=20.0) as pool:   # preloads verify.math (sympy)
        got = pool.score(rewards, completions, **columns)
    assert got == {name: get_reward(name)(completions, **columns) for name in rewards}
    assert got["accuracy"] == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_hung_item_times_out_and_worker_is_replaced(helper):
    timeout = 1.0
    completions = ["a", "bb", "hang", "ccc", "dddd", "eeeee"]
    with RewardPool(num_workers=2, timeout_s=timeout, preload=()) as pool:
        before = pool.pids
        start = time.monotonic()
        got = pool.score([f"{helper}:sleepy"], completions)
        elapsed = time.monotonic() - start
        assert got == {f"{helper}:sleepy": [1.0, 2.0, None, 3.0, 4.0, 5.0]}   # None: the reward's timeout value
        assert elapsed < timeout + 2.0, f"batch took {elapsed:.2f} s with a {timeout} s timeout"
        assert pool.stats.timeouts == 1 and pool.stats.restarts == 1
        assert pool.stats.timeouts_by_reward == {f"{helper}:sleepy": 1}
        after = pool.pids
        assert len(after) == 2 and len(set(before) & set(after)) == 1       # one worker replaced
        assert all(running(pid) for pid in after)
        assert not any(running(pid) for pid in set(before) - set(after))

        # a reward whose timeout value is 0.0 (like accuracy), given as a callable; the pool still works
        strict = get_reward(f"{helper}:strict")
        assert pool.score({"strict": strict}, ["hang", "xy"]) == {"strict": [0.0, 2.0]}
        assert pool.stats.timeouts == 2 and len(pool.pids) == 2
        pids = pool.pids
    assert not any(running(pid) for pid in pids)
    assert mp.active_children() == []


def test_timeout_kills_what_the_reward_started(helper, tmp_path):
    pidfile = str(tmp_path / "child.pid")
    with RewardPool(num_workers=1, timeout_s=1.0, preload=()) as pool:
        got = pool.score([f"{helper}:spawner"], ["x"], pidfile=[pidfile])
        assert got == {f"{helper}:spawner": [None]}
    child = int(open(pidfile).read())
    deadline = time.monotonic() + 2.0
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


def test_crash_and_error(helper):
    with RewardPool(num_workers=2, timeout_s=5.0, preload=()) as pool:
        got = pool.score([f"{helper}:crash"], ["ok", "crash", "ok"])
        assert got == {f"{helper}:crash": [1.0, None, 1.0]}
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1 and len(pool.pids) == 2

        with pytest.raises(RewardError, match="broken reward needs a `xyz` column"):
            pool.score([f"{helper}:broken"], ["a", "b", "c"])
        assert pool.stats.errors >= 1
        assert pool.score(["format"], ["<think>a</think><answer>b</answer>"]) == {"format": [1.0]}   # still usable


def test_bad_arguments_and_close():
    pool = RewardPool(num_workers=1, timeout_s=5.0, preload=())
    pids = pool.pids
    with pytest.raises(ValueError, match="unknown reward"):
        pool.score(["nope"], ["a"])
    with pytest.raises(ValueError, match="column `answer` has 1 values for 2"):
        pool.score(["arithmetic"], ["a", "b"], answer=["1"])
    with pytest.raises(ValueError, match="`prompts` or `prompt`"):   # a group-wise reward needs groups
        pool.score(["length"], ["a", "b"], answer=["1", "1"])
    with pytest.raises(ValueError, match="cannot be sent to a worker"):
        pool.score({"local": lambda completions, **kw: [1.0] * len(completions)}, ["a"])
    assert pool.score(["format"], ["<think>a</think><answer>b</answer>"]) == {"format": [1.0]}
    pool.close()
    pool.close()   # idempotent
    assert not any(running(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="after close"):
        pool.score(["format"], ["a"])
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
    with pytest.raises(ValueError, match="fork"):
        RewardPool(context="fork")


ENTRY_SCRIPT = """
import sys
with open(sys.argv[1], "a") as f:   # a top-level side effect, like a trainer script importing torch
    f.write("imported\\n")

from verify.pool import RewardPool


def local_reward(completions, **kwargs):
    return [1.0] * len(completions)


if __name__ == "__main__":
    with RewardPool(num_workers=2, timeout_s=10.0, preload=()) as pool:
        print(pool.score(["format"], ["<think>a</think><answer>b</answer>", "b"]))
        try:
            pool.score([local_reward], ["a"])
        except ValueError as e:
            print(e)
"""


def test_workers_do_not_rerun_the_entry_script(tmp_path):
    script, marker = tmp_path / "entry.py", tmp_path / "marker.txt"
    script.write_text(ENTRY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(marker)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "imported\n"        # once, by the parent; never by the 2 workers
    assert "{'format': [1.0, 0.0]}" in result.stdout
    assert "defined in the __main__ script" in result.stdout
