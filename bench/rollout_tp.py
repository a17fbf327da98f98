"""Per-rank memory of a GRPO-style rollout from an FSDP2-sharded model, with the whole model gathered
on every rank (--rollout-tp 1) against the model split over the ranks (--rollout-tp 2), on CPU.

    python bench/rollout_tp.py                      # a 123M-parameter Qwen2-style model, 2 gloo ranks
    python bench/rollout_tp.py --size small

Each setting runs in fresh processes (torchrun, 2 ranks): the model is built with fresh fp32 weights
(the same seed on both ranks) and sharded with model.parallel.apply_fsdp, as the GRPO loop holds it;
then each rank samples its prompts (--prompts x --samples samples of --new-tokens tokens, seeded) the way
rl/loop.py does: inside model.tensor_parallel.TensorParallelRollout.weights(), with a Sampler over
the policy it yields (the gathered model, or this rank's share with the pair sampling both ranks'
prompts as one batch). Each rank reports

    weights held   the bytes of weights the rollout sampled with (the gathered model, or the share)
    KV cache       the rollout engine's cache (split by kv heads under tensor parallelism)
    peak above     VmHWM during the rollout minus the RSS just before it (VmHWM reset through
                   /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_ set so freed blocks go back to the
                   kernel and the figure follows live memory), i.e. what the rollout added on top
                   of the FSDP shards
    wall           the rollout's seconds

(after a warm-up rollout of 2 tokens, so that lazy imports and first-call set-up are not counted)

and the tokens sampled, compared between the settings: how many samples are identical, and the
largest log-prob difference up to each sample's first differing token. A freshly initialised model
of a large vocabulary draws from a nearly flat distribution, where a float-rounding difference of
the two computations (1e-6 in a log-prob) can move a draw across a neighbouring token's boundary;
from there the two samples go their own ways (the tests compare on models whose draws are not
that close: tests/model/test_tensor_parallel.py). Prints a table, then one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "large": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2),
}


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from model import ModelConfig, Transformer
    from model.parallel import apply_fsdp
    from model.tensor_parallel import TensorParallelRollout
    from runtime.distributed import all_gather_object, init_distributed, subgroup, teardown
    from runtime.memory import peak_bytes, reset_peak, resident_bytes
    if resident_bytes() is None:
        sys.exit("bench/rollout_tp.py reads /proc/self/status (Linux only)")
    from sampling import Sampler, SamplingParams

    info = init_distributed()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(model_type="qwen2", max_position_embeddings=1024, **SIZES[args.size]))
    apply_fsdp(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        torch.manual_seed(0)
        model.init_weights()
    model.eval()
    rollout = TensorParallelRollout(model, subgroup(args.tp))
    g = torch.Generator().manual_seed(1 + info.rank)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    params = [SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=[],
                             seed=1000 * info.rank + i) for i in range(args.prompts)]
    with rollout.weights() as policy:   # warm-up: lazy imports and first-call set-up, outside the figure
        Sampler(policy, max_batch_size=2, max_seq_len=8, verbose=False).generate(
            [prompts[0][:4]], SamplingParams(max_new_tokens=2, stop_token_ids=[], seed=0))
    import gc
    gc.collect()
    cpu = torch.device("cpu")
    reset_peak(cpu)
    before = resident_bytes()
    t0 = time.perf_counter()
    with rollout.weights() as policy:
        sampler = Sampler(policy, max_batch_size=64, max_seq_len=args.prompt_len + args.new_tokens, verbose=False)
        outs = sampler.generate(prompts, params)
        cache = sampler.cache_bytes
        sampler.release()
    wall = time.perf_counter() - t0
    peak = peak_bytes(cpu)
    mine = dict(rank=info.rank, weights=rollout.weight_bytes, cache=cache, before=before, peak_above=peak - before,
                wall_s=wall, tokens=[c.token_ids for o in outs for c in o], logprobs=[c.logprobs for o in outs for c in o])
    reports = all_gather_object(mine)
    if info.rank == 0:
        Path(args.report).write_text(json.dumps(reports))
    teardown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rank")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    from model import ModelConfig
    from model.counts import count_params
    params = count_params(ModelConfig(model_type="qwen2", **SIZES[args.size]))
    params = params.total
    results = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2):
            report = Path(tmp) / f"tp{tp}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--child", "--tp", str(tp), "--report", str(report), "--size", args.size, "--prompts",
                   str(args.prompts), "--samples", str(args.samples), "--prompt-len", str(args.prompt_len), "--new-tokens",
                   str(args.new_tokens)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"--rollout-tp {tp} run failed:\n{proc.stderr[-4000:]}")
            results[tp] = json.loads(report.read_text())
    pairs = [(ta, tb, la, lb) for a, b in zip(results[1], results[2])
             for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"])]
    same = sum(ta == tb for ta, tb, _, _ in pairs)
    prefix_err = 0.0   # log-prob differences over the positions before two samples first differ
    for ta, tb, la, lb in pairs:
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        prefix_err = max([prefix_err] + [abs(x - y) for x, y in zip(la[:n], lb[:n])])
    mib = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
    print(f"model: qwen2 '{args.size}', {params / 1e6:.0f}M parameters (fp32 {params * 4 / 2**20:.0f} MiB), FSDP2 "
          f"over 2 ranks; per rank {args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens")
    print("rollout-tp  rank  weights held MiB  KV cache MiB  peak above shards MiB  wall s")
    for tp, reports in results.items():
        for r in reports:
            print(f"{tp:>10}  {r['rank']:>4}  {mib(r['weights']):>16}  {mib(r['cache']):>12}  "
                  f"{mib(r['peak_above']):>21}  {r['wall_s']:6.1f}")
    ratio = max(r["peak_above"] for r in results[2]) / max(r["peak_above"] for r in results[1])
    print(f"samples identical under --rollout-tp 1 and 2: {same} of {len(pairs)}; largest log-prob difference up "
          f"to a sample's first differing token: {prefix_err:.2e}; peak above the shards, tp 2 / tp 1: {ratio:.3f}")
    print(json.dumps({"size": args.size, "params": params, "samples_identical": same, "samples": len(pairs),
                      "prefix_logprob_diff": prefix_err, "peak_ratio": ratio,
                      **{f"tp{tp}": [{k: r[k] for k in ("rank", "weights", "cache", "peak_above", "wall_s")}
                                     for r in reports] for tp, reports in results.items()}}))


if __name__ == "__main__":
    main()
