"""Latency of the python tool's sandbox (verify/session.py): what a rollout waits for per call.

    python bench/python_tool.py [--reps 20] [--pool-size 4] [--isolation auto]

Three figures, medians (and p90) of wall milliseconds over --reps repetitions, measured in the
caller as a rollout sees them:
  (a) warm call     `x = 1` on a session that already ran a call: one command frame out, the cell
                    compiled and run in the sandbox, one reply frame and the output drained back
  (b) pool acquire  SessionPool.acquire() of a warm session, then its first `x = 1`; the pool is
                    left to refill before each repetition (the steady state of a rollout loop that
                    is slower than a start), and the session is closed outside the timing
  (c) cold start    PythonSession() then its first `x = 1`, no pool: the supervisor started (behind
                    `unshare` when namespaces are allowed), cgroups made, the minimal root mounted,
                    privileges dropped, the worker's interpreter up; closed outside the timing
plus the cost of close() (kill, reap, cgroups and temporary dirs removed), which a pool moves off
the rollout's path only partly: the caller pays it when it closes its session.

The sandbox's isolation layers are printed, since they set the cold-start cost (a process-only
sandbox starts faster than one in namespaces). Machine noise hits the three alike: they are
interleaved, one repetition of each per round.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from verify.session import PythonSession, SessionPool  # noqa: E402


def ms(seconds: float) -> float:
    return 1000.0 * seconds


def wait_full(pool: SessionPool, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while pool.ready() < pool.size:
        if time.monotonic() > end:
            raise RuntimeError(f"the pool did not refill to {pool.size} within {timeout_s} s")
        time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each measurement")
    ap.add_argument("--pool-size", type=int, default=4, help="warm sessions kept by the pool")
    ap.add_argument("--isolation", default="auto", help="auto | namespaces | userns | process")
    args = ap.parse_args()

    times = {"warm_call": [], "pool_acquire_first_call": [], "cold_start_first_call": [], "close": []}
    warm = PythonSession(isolation=args.isolation)
    assert warm.run("x = 0").status == "ok"
    layers = warm.isolation
    with SessionPool(size=args.pool_size, isolation=args.isolation) as pool:
        for _ in range(args.reps):
            t = time.perf_counter()
            r = warm.run("x = 1")
            times["warm_call"].append(ms(time.perf_counter() - t))
            assert r.status == "ok", r

            wait_full(pool)
            t = time.perf_counter()
            s = pool.acquire()
            r = s.run("x = 1")
            times["pool_acquire_first_call"].append(ms(time.perf_counter() - t))
            assert r.status == "ok", r
            pool.release(s)

            t = time.perf_counter()
            s = PythonSession(isolation=args.isolation)
            r = s.run("x = 1")
            times["cold_start_first_call"].append(ms(time.perf_counter() - t))
            assert r.status == "ok", r
            t = time.perf_counter()
            s.close()
            times["close"].append(ms(time.perf_counter() - t))
        hits, colds = pool.warm_hits, pool.cold_starts
    warm.close()

    def p90(xs):
        return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]

    print(f"isolation: {', '.join(layers)}")
    print(f"pool: {hits} warm hits, {colds} cold starts over {args.reps} acquires (size {args.pool_size})")
    print(f"{'measurement':<28}{'median ms':>12}{'p90 ms':>10}")
    labels = {"warm_call": "(a) warm call x = 1", "pool_acquire_first_call": "(b) pool acquire + 1st call",
              "cold_start_first_call": "(c) cold start + 1st call", "close": "close()"}
    for key, label in labels.items():
        print(f"{label:<28}{statistics.median(times[key]):>12.2f}{p90(times[key]):>10.2f}")
    cold, pooled = statistics.median(times["cold_start_first_call"]), statistics.median(times["pool_acquire_first_call"])
    print(f"the pool saves {cold - pooled:.1f} ms per rollout's first call ({cold / pooled:.1f}x)")
    print(json.dumps({"bench": "python_tool", "reps": args.reps, "pool_size": args.pool_size,
                      "isolation": list(layers), "warm_hits": hits, "cold_starts": colds,
                      **{f"{k}_ms_median": round(statistics.median(v), 3) for k, v in times.items()},
                      **{f"{k}_ms_p90": round(p90(v), 3) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
