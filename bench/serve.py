"""Continuous batching through the OpenAI-compatible server: the same requests sent one after another
and all at once, side by side in one run.

    python bench/serve.py [--preset tiny] [--requests 32] [--max-tokens 64] [--rows 32] [--reps 3]

A server (serve/server.py) over a fresh model of --preset (random weights: the figures are about the
server and the engine, not the text) takes --requests chat requests of --max-tokens tokens each
(temperature 1, a seed each, so every request runs to its budget or its EOS), first sequentially
from one client thread, then concurrently from as many threads through verify.openai_client; the
engine holds up to --rows sequences at once. It prints a table of the median wall time of each
way, the completion tokens per second and the engine's mean rows per decode step, then one JSON
line. The ratio (sequential / concurrent wall time) is what continuous batching buys here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from data.tokenizer import Tokenizer
    from model.build import preset_config
    from model.transformer import Transformer
    from sampling.sampler import Sampler
    from serve.server import RunningServer
    from verify.openai_client import OpenAIClient

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    tok = Tokenizer.train([f"What is {i} + {i + 1}? The answer is {2 * i + 1}." for i in range(200)], vocab_size=400)
    model = Transformer(preset_config(args.preset, tok)).eval()
    sampler = Sampler(model, max_batch_size=args.rows, max_seq_len=64 + args.max_tokens, tokenizer=tok, verbose=False)
    bodies = [{"model": "bench", "prompt": f"What is {i} + {i + 1}?", "max_tokens": args.max_tokens,
               "temperature": 1.0, "seed": i} for i in range(args.requests)]
    rows = []
    with RunningServer(sampler, tok, "bench", max_len=64 + args.max_tokens, stop_ids=[]) as srv:
        client = OpenAIClient(srv.url, retries=0, timeout_s=600, max_concurrency=args.requests)
        client.post("/completions", bodies[0])   # warm-up
        for way in ("sequential", "concurrent"):
            walls, tokens, mean_rows = [], 0, []
            for _ in range(args.reps):
                stats0 = sampler.engine.stats
                steps0, rowsteps0 = stats0.decode_steps, stats0.row_steps
                t0 = time.perf_counter()
                if way == "sequential":
                    out = [client.post("/completions", b, cache=False) for b in bodies]
                else:
                    with ThreadPoolExecutor(args.requests) as ex:
                        out = list(ex.map(lambda b: client.post("/completions", b, cache=False), bodies))
                walls.append(time.perf_counter() - t0)
                tokens = sum(o["usage"]["completion_tokens"] for o in out)
                s = sampler.engine.stats
                mean_rows.append((s.row_steps - rowsteps0) / max(s.decode_steps - steps0, 1))
            wall = statistics.median(walls)
            rows.append({"way": way, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                         "mean_rows": statistics.median(mean_rows)})
        client.close()
    print(f"{'way':<12}{'median wall s':>15}{'tokens':>9}{'tokens/s':>11}{'rows/step':>11}")
    for r in rows:
        print(f"{r['way']:<12}{r['wall_s']:>15.3f}{r['tokens']:>9}{r['tokens_per_s']:>11.0f}{r['mean_rows']:>11.1f}")
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"concurrent / sequential speed-up: {ratio:.2f}x")
    print(json.dumps({"bench": "serve", "preset": args.preset, "requests": args.requests, "max_tokens": args.max_tokens,
                      "rows": args.rows, "reps": args.reps, "results": rows, "speedup": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
