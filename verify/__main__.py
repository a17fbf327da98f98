"""Score a JSONL file of completions with reward functions and print each reward's mean.

    python -m verify score --data FILE.jsonl --reward accuracy,format [--workers 2] [--timeout 10]

Each line of FILE is a JSON object with a `completion` string plus data columns (`answer`,
`prompt`, `numbers`, `target`, `completion_ids`, ...): the columns are passed to the rewards as
keyword arguments, one value per completion (a key missing from some lines is None there).
`--reward` is a comma-separated list of REWARDS names (or "package.module:function"); each is
scored and reported on its own. Parts may carry weights ("accuracy:1.0,format:0.5"): then the
weighted sum is reported too, on a line of its own.

Output: one line per reward (mean over the completions it scored, how many it scored, how many
got None), then one JSON line with the same figures. --workers 0 scores in this process without
timeouts; N > 0 uses verify.pool.RewardPool with N workers and a per-item --timeout (items that
time out are counted and scored as the reward documents). Bad input (no such file, a line that is
not a JSON object, a line without a `completion` string, an unknown reward, a missing column a
reward needs) prints an error naming the file and line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verify.pool import RewardError, RewardPool
from verify.rewards import split_weight, get_reward


def read_completions(path: Path) -> tuple[list[str], dict[str, list]]:
    """(completions, columns) from a JSONL file; ValueError / FileNotFoundError naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("completion"), str):
                raise ValueError(f"{path}:{lineno}: expected a `completion` string column, "
                                 f"got keys {sorted(row)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    keys = sorted({k for row in rows for k in row} - {"completion"})
    return [row["completion"] for row in rows], {k: [row.get(k) for row in rows] for k in keys}


def reward_specs(text: str) -> dict[str, str]:
    """{report name: spec}: each comma-separated part, plus the whole text when any part has a weight."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--reward is empty; give names like accuracy,format")
    split = [split_weight(p) for p in parts]
    specs = {name: name for name, _ in split}
    if any(w is not None for _, w in split):
        specs["weighted(" + text + ")"] = text
    for spec in specs.values():
        get_reward(spec)   # unknown names fail here, with the list of known ones
    return specs


def summarize(scores: list[float | None]) -> dict:
    scored = [s for s in scores if s is not None]
    return {"mean": sum(scored) / len(scored) if scored else None, "scored": len(scored),
            "none": len(scores) - len(scored)}


def score_command(args, parser) -> int:
    try:
        completions, columns = read_completions(Path(args.data))
        specs = reward_specs(args.reward)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    timeouts = 0
    try:
        if args.workers == 0:
            scores = {name: get_reward(spec)(completions, **columns) for name, spec in specs.items()}
        else:
            with RewardPool(num_workers=args.workers, timeout_s=args.timeout) as pool:
                scores = pool.score(specs, completions, **columns)
                timeouts = pool.stats.timeouts + pool.stats.crashes
    except (ValueError, RewardError) as e:
        print(f"python -m verify score: error: scoring {args.data}: {e}", file=sys.stderr)
        return 2

    summary = {name: summarize(values) for name, values in scores.items()}
    width = max(len(name) for name in summary)
    print(f"{'reward':<{width}}  {'mean':>8}  {'scored':>7}  {'none':>6}")
    for name, s in summary.items():
        mean = "-" if s["mean"] is None else f"{s['mean']:.4f}"
        print(f"{name:<{width}}  {mean:>8}  {s['scored']:>7}  {s['none']:>6}")
    print(json.dumps({"data": str(args.data), "n": len(completions), "timeouts": timeouts, "rewards": summary}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verify", description="Reward tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a JSONL of completions and print each reward's mean")
    p.add_argument("--data", required=True, help="JSONL with a `completion` column plus data columns")
    p.add_argument("--reward", required=True, help="comma-separated rewards, e.g. accuracy,format or "
                                                   "accuracy:1.0,format:0.5 (adds the weighted sum)")
    p.add_argument("--workers", type=int, default=2, help="worker processes; 0 scores in this process")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per item in the worker pool")
    args = parser.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    return score_command(args, p)


if __name__ == "__main__":
    sys.exit(main())
