"""Decode speed of sampling.Sampler on CPU: our step against its bare matrix multiplies, prefill and
decode tokens/s, transformers' `generate` on the same weights, and a GRPO-shaped workload.

    python bench/sampler.py [--rounds 5] [--steps 32] [--batches 1,8,32] [--grpo-rounds 2] [--capacity 0|1]

Model: a 100M-parameter Qwen2 (hidden D = 768, N = 12 layers, H = 12 heads, K = 2 KV heads of
Dh = 64, intermediate I = 2048, vocab V = 32000, tied embeddings, q/k/v biases), random weights
from a fixed seed, fp32, `torch.set_num_threads(2)`; prompts of P = 64 tokens.

What one decode step costs (batch B, S attended positions):
    weights read   every matrix once: per layer D·H·Dh (q) + 2·D·K·Dh (k, v) + H·Dh·D (o) + 3·D·I
                   (gate, up, down) = 6.09M, × 12 = 73.1M, plus the output head V·D = 24.6M:
                   P_step = 97.7M parameters, 391 MB in fp32 per step whatever B is (the embedding
                   lookup reads only B rows)
    FLOPs          2 · P_step per token (one multiply-add per weight): 0.195 GFLOP × B, plus the
                   attention over the cache, 4 · B · N · H · S · Dh (0.11 GFLOP at B = 32, S = 96)
    KV cache read  B · N · 2 · S · K · Dh · 4 bytes (38 MB at B = 32, S = 96: a tenth of the weights)
    intensity      2·B·P_step / (4·P_step) = B/2 FLOP per weight byte: memory-bound at small B,
                   compute-bound once B/2 exceeds the machine's FLOP/byte ratio (about 5-10 on a
                   2-core AVX-512 CPU)

Sections (each interleaved over `--rounds` rounds, so the machine's drifts hit every variant alike;
the figures are medians over rounds):
1. step vs floor, B = 1, 8, 32. `ours`: one Sampler.generate of B samples of one prompt (shared
   prefill), temperature 1, `--steps` decode steps, in the default configuration (for this model
   on the CPU: the compiled decode step, bucketed shapes, a host read every 4 steps); the step
   time is stats.decode_s / decode_steps (the forward over the paged cache, the draw, stop
   detection, the host's share of each window's bookkeeping). `eager`: the same with compile=False;
   `sync1`: eager with a host read after every step. `forward`: the model's cached forward alone
   at the same batch and positions (the slot cache, model/cache.py). `floor`: the GEMMs of the same step and nothing
   else, `torch.mm(x, W.t(), out=y)` with the model's own weight matrices and preallocated inputs
   and outputs (per layer q, k, v, o, gate, up, down; then the head [B, D]·[D, V]), averaged over
   `--steps` steps like ours. Goal: ours ≤ 1.15 × floor.
2. prefill tokens/s (one 64-token prompt) and decode tokens/s (B / step time).
3. transformers' Qwen2ForCausalLM.generate on the same weights (fp32, sdpa attention, do_sample with
   top_k 0, top_p 1, no EOS, B copies of the prompt as one [B, P] batch), end-to-end tokens/s
   (prefill included), beside ours end to end (stats-free wall time of the same generate call).
4. GRPO shape: 8 prompts × n = 8 samples, max_new_tokens per prompt uniform in 8..128 (fixed
   seed; the stand-in for completions that reach EOS at different times). Ours: one generate call
   (max_batch_size 64). transformers as TRL's GRPOTrainer calls it: the 64 rows (each prompt
   repeated 8 times) in one padded call, do_sample, max_new_tokens = the largest draw, every row
   running to the end. One untimed run of ours first (it compiles the buckets it passes through).
   Goal: ours ≥ 2.5 × faster.
5. capacity: 64 prompts × 8 samples, max_new_tokens per prompt uniform in 8..128, at the cache
   budget that slots of 192 positions would give 32 rows (6144 tokens). The engine's counters: rows
   in flight (mean and peak), pages at the peak, pages shared by forks, prefill tokens (prompts
   once, plus the recompute of preempted sequences), preemptions; beside the slot cache's rows in
   flight for the same lengths (32 slots refilled as samples finish). Eager (the counters do not
   depend on it). Goal: at least 2 × the rows in flight.

These CPUs are shared with other processes: the load average (os.getloadavg) is printed before and
after. Prints a table per section, then one JSON line with every figure.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from sampling import Sampler, SamplerStats, SamplingParams  # noqa: E402

CONFIG = dict(model_type="qwen2", vocab_size=32000, hidden_size=768, intermediate_size=2048,
              num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2, attention_bias=True,
              tie_word_embeddings=True, max_position_embeddings=4096)
PROMPT_LEN = 64


def build_models(seed: int):
    """Ours and transformers' Qwen2ForCausalLM holding the same fp32 weights (eval mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = ModelConfig(**CONFIG)
    torch.manual_seed(seed)
    ours = Transformer(config).eval()
    d = {k: v for k, v in config.to_hf_config().items() if k not in ("architectures", "model_type")}
    hf = Qwen2ForCausalLM(Qwen2Config(**d, attn_implementation="sdpa")).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.pad_token_id = 0
    return ours, hf


def check_same_logits(ours, hf, prompt: list[int]) -> float:
    """Max |logit difference| of the two models on the prompt (they must be one model)."""
    with torch.no_grad():
        a = ours(torch.tensor([prompt]))
        b = hf(torch.tensor([prompt])).logits
    return (a - b).abs().max().item()


class GemmFloor:
    """The matrix multiplies of one decode step at batch B and nothing else, on preallocated buffers."""

    def __init__(self, model: Transformer, B: int):
        c = model.config
        D, I, HD = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim
        self.x, self.xo, self.xi = torch.randn(B, D), torch.randn(B, HD), torch.randn(B, I)
        self.calls = []  # (input, W^T view, output)
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin, x in ((a.q_proj, self.x), (a.k_proj, self.x), (a.v_proj, self.x), (a.o_proj, self.xo),
                           (m.gate_proj, self.x), (m.up_proj, self.x), (m.down_proj, self.xi)):
                self.calls.append((x, lin.weight.t(), torch.empty(B, lin.weight.shape[0])))
        W = model.output_weight
        self.calls.append((self.x, W.t(), torch.empty(B, W.shape[0])))

    @torch.no_grad()
    def step(self) -> None:
        for x, wt, y in self.calls:
            torch.mm(x, wt, out=y)


def cached_forward(model: Transformer, B: int, steps: int):
    """A callable running the model's cached forward at batch B (slots 0..B-1) at positions P, P+1, ...
    (each call advances one position), the cache prefilled with random tokens."""
    cache = model.make_cache(B, PROMPT_LEN + steps + 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (B, PROMPT_LEN), generator=g)
        model(ids, torch.arange(PROMPT_LEN).expand(B, PROMPT_LEN), cache=cache)
    state = {"pos": PROMPT_LEN}
    tok = torch.randint(0, model.config.vocab_size, (B, 1), generator=g)

    def run():
        p = state["pos"] if state["pos"] < PROMPT_LEN + steps else PROMPT_LEN
        state["pos"] = p + 1
        with torch.no_grad():
            model(tok, torch.full((B, 1), p), cache=cache, attn_len=p + 1)
    return run


def mean_time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def ours_generate(sampler: Sampler, prompt, B: int, steps: int, seed: int) -> dict:
    """One generate of B samples of `prompt` with `steps` decode steps: per-step and end-to-end figures."""
    sampler.stats = SamplerStats()
    params = SamplingParams(n=B, temperature=1.0, max_new_tokens=steps + 1, stop_token_ids=[], seed=seed)
    t0 = time.perf_counter()
    sampler.generate([prompt], params)
    wall = time.perf_counter() - t0
    st = sampler.stats
    assert st.decode_steps == steps, (st.decode_steps, steps)
    return {"step_s": st.decode_s / st.decode_steps, "prefill_tok_s": st.prefill_tokens / st.prefill_s,
            "e2e_tok_s": st.generated_tokens / wall}


def hf_generate(hf, prompt, B: int, new_tokens: int) -> float:
    """Wall seconds of transformers' generate: B copies of the prompt, sampled, no EOS."""
    ids = torch.tensor([prompt] * B)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                          top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None)
    assert out.shape == (B, len(prompt) + new_tokens), out.shape
    return time.perf_counter() - t0


def section_steps(ours, hf, prompt, args) -> dict:
    """Sections 1-3: step vs floor, tokens/s, transformers' generate; rounds interleave every variant."""
    batches = [int(b) for b in args.batches.split(",")]
    max_len = PROMPT_LEN + args.steps + 2
    floors = {B: GemmFloor(ours, B) for B in batches}
    fwds = {B: cached_forward(ours, B, args.steps) for B in batches}
    samplers = {B: Sampler(ours, max_batch_size=B, max_seq_len=max_len, verbose=False) for B in batches}
    eager = {B: Sampler(ours, max_batch_size=B, max_seq_len=max_len, compile=False, verbose=False) for B in batches}
    eager1 = {B: Sampler(ours, max_batch_size=B, max_seq_len=max_len, compile=False, sync_every=1, verbose=False)
              for B in batches}
    for B in batches:
        t0 = time.perf_counter()
        ours_generate(samplers[B], prompt, B, args.steps, seed=0)  # compiles, when the default compiles
        print(f"warm-up B={B} (default configuration, compile={samplers[B].engine.compile}): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    # warm-up: every variant once
    for B in batches:
        floors[B].step()
        fwds[B]()
        ours_generate(eager[B], prompt, B, 2, seed=0)
        ours_generate(eager1[B], prompt, B, 2, seed=0)
        hf_generate(hf, prompt, B, 2)
    rec = {B: {k: [] for k in ("floor", "forward", "ours", "eager", "eager1", "prefill", "e2e", "hf")}
           for B in batches}
    for r in range(args.rounds):
        for B in batches:
            x = rec[B]
            x["floor"].append(mean_time(floors[B].step, args.steps))
            x["forward"].append(mean_time(fwds[B], args.steps))
            o = ours_generate(samplers[B], prompt, B, args.steps, seed=r)
            x["ours"].append(o["step_s"])
            x["prefill"].append(o["prefill_tok_s"])
            x["e2e"].append(o["e2e_tok_s"])
            x["eager"].append(ours_generate(eager[B], prompt, B, args.steps, seed=r)["step_s"])
            x["eager1"].append(ours_generate(eager1[B], prompt, B, args.steps, seed=r)["step_s"])
            x["hf"].append(B * args.steps / hf_generate(hf, prompt, B, args.steps))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    med = {B: {k: statistics.median(v) for k, v in x.items() if v} for B, x in rec.items()}
    return med


def section_grpo(ours, hf, args) -> dict:
    """Section 4: 8 prompts × 8 samples with per-prompt lengths; ours in one call vs transformers padded."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CONFIG["vocab_size"], (PROMPT_LEN,), generator=g).tolist() for _ in range(8)]
    lengths = torch.randint(8, 129, (8,), generator=g).tolist()
    sampler = Sampler(ours, max_batch_size=64, max_seq_len=PROMPT_LEN + 128, verbose=False)
    rows = torch.tensor([p for p in prompts for _ in range(8)])  # [64, P]: each prompt 8 times, as TRL
    longest = max(lengths)

    def run_ours(seed):
        sampler.stats = SamplerStats()
        params = [SamplingParams(n=8, temperature=1.0, max_new_tokens=L, stop_token_ids=[], seed=seed * 8 + i)
                  for i, L in enumerate(lengths)]
        t0 = time.perf_counter()
        outs = sampler.generate(prompts, params)
        t = time.perf_counter() - t0
        assert [len(c.token_ids) for o in outs for c in o] == [L for L in lengths for _ in range(8)]
        return t

    def run_hf():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=longest, min_new_tokens=longest, eos_token_id=None)
        assert out.shape == (64, PROMPT_LEN + longest)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run_ours(99)   # warm-up: compiles the batch buckets the workload passes through (default configuration)
    print(f"grpo warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {"ours": [], "hf": []}
    for r in range(args.grpo_rounds):
        times["ours"].append(run_ours(r))
        times["hf"].append(run_hf())
        print(f"grpo round {r + 1}/{args.grpo_rounds}: ours {times['ours'][-1]:.1f} s, transformers "
              f"{times['hf'][-1]:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    return {"lengths": lengths, "sampled_tokens": 8 * sum(lengths), "hf_tokens": 64 * longest,
            "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s,
            "ours_tok_s": 8 * sum(lengths) / ours_s, "decode_steps": sampler.stats.decode_steps}


def section_capacity(ours) -> dict:
    """Section 5: 64 prompts x 8 samples, max_new_tokens per prompt uniform in 8..128, at one cache
    budget: what slots of max_seq_len would hold for 32 rows (32 x 192 = 6144 positions). The slot
    cache decodes at most 32 rows at once; the engine admits rows as long as pages remain (rows cap
    512), shares each prompt's pages among its samples and preempts when the pages run out."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CONFIG["vocab_size"], (PROMPT_LEN,), generator=g).tolist() for _ in range(64)]
    lengths = torch.randint(8, 129, (64,), generator=g).tolist()
    max_len, slots = PROMPT_LEN + 128, 32
    budget = slots * max_len
    sampler = Sampler(ours, max_batch_size=512, max_seq_len=max_len, cache_tokens=budget, compile=False,
                      verbose=False)
    params = [SamplingParams(n=8, temperature=1.0, max_new_tokens=L, stop_token_ids=[], seed=i)
              for i, L in enumerate(lengths)]
    t0 = time.perf_counter()
    outs = sampler.generate(prompts, params)
    wall = time.perf_counter() - t0
    assert [len(c.token_ids) for o in outs for c in o] == [L for L in lengths for _ in range(8)]
    st = sampler.stats
    # the slot cache at the same budget: 32 rows, continuous batching; its mean rows in flight
    # follow from the same lengths (rows refill as samples finish, FIFO)
    queue = [L for L in lengths for _ in range(8)]
    running, steps, row_steps = [], 0, 0
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0) - 1)   # the first token comes from the prefill
        running = [r for r in running if r > 0]
        if running:
            steps += 1
            row_steps += len(running)
            running = [r - 1 for r in running]
    return {"budget_tokens": budget, "slot_rows": slots, "slot_mean_rows": row_steps / steps,
            "peak_rows": st.peak_rows, "mean_rows": st.mean_rows, "peak_pages": st.peak_pages,
            "pages": sampler.engine.num_pages, "prefill_tokens": st.prefill_tokens,
            "prompt_tokens": 64 * PROMPT_LEN, "preemptions": st.preemptions, "decode_steps": st.decode_steps,
            "shared_pages": st.shared_pages, "wall_s": wall, "sampled_tokens": st.generated_tokens,
            "rows_ratio": st.mean_rows / (row_steps / steps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed generate")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--grpo-rounds", type=int, default=2, help="0 skips section 4")
    ap.add_argument("--capacity", type=int, default=1, help="0 skips section 5")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"on {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_start = time.perf_counter()
    ours, hf = build_models(args.seed)
    n_params = sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, CONFIG["vocab_size"], (PROMPT_LEN,), generator=g).tolist()
    diff = check_same_logits(ours, hf, prompt)
    print(f"model: {n_params / 1e6:.1f}M parameters; max |logits ours - transformers| = {diff:.2e}")
    assert diff < 1e-3, "the two models must hold the same weights"

    med = section_steps(ours, hf, prompt, args)
    grpo = section_grpo(ours, hf, args) if args.grpo_rounds > 0 else None
    cap = section_capacity(ours) if args.capacity else None
    load_after = os.getloadavg()

    print(f"\n1-3. decode step (median of {args.rounds} rounds x {args.steps} steps; positions {PROMPT_LEN}.."
          f"{PROMPT_LEN + args.steps}); tokens/s end to end include the prefill")
    head = (f"{'B':>3} {'floor ms':>9} {'forward ms':>10} {'ours ms':>8} {'ours/floor':>10} {'eager/floor':>11} "
            f"{'sync1/floor':>11}")
    head += f" {'decode tok/s':>12} {'prefill tok/s':>13} {'ours e2e tok/s':>14} {'HF tok/s':>9} {'ours/HF':>7}"
    print(head)
    result = {"bench": "sampler", "params_m": round(n_params / 1e6, 2), "threads": torch.get_num_threads(),
              "prompt_len": PROMPT_LEN, "steps": args.steps, "rounds": args.rounds, "hf_attention": "sdpa",
              "load_before": round(load_before[0], 2), "logits_max_diff": diff, "batches": {}}
    for B, m in med.items():
        row = (f"{B:>3} {m['floor'] * 1e3:>9.1f} {m['forward'] * 1e3:>10.1f} {m['ours'] * 1e3:>8.1f} "
               f"{m['ours'] / m['floor']:>10.2f} {m['eager'] / m['floor']:>11.2f} {m['eager1'] / m['floor']:>11.2f}")
        row += (f" {B / m['ours']:>12.1f} {m['prefill']:>13.0f} {m['e2e']:>14.1f} {m['hf']:>9.1f} "
                f"{m['e2e'] / m['hf']:>7.2f}")
        print(row)
        entry = {"floor_ms": m["floor"] * 1e3, "forward_ms": m["forward"] * 1e3, "ours_ms": m["ours"] * 1e3,
                 "ratio_to_floor": m["ours"] / m["floor"], "decode_tok_s": B / m["ours"],
                 "prefill_tok_s": m["prefill"], "ours_e2e_tok_s": m["e2e"], "hf_tok_s": m["hf"],
                 "ours_over_hf": m["e2e"] / m["hf"], "eager_ms": m["eager"] * 1e3,
                 "eager_ratio_to_floor": m["eager"] / m["floor"], "eager_sync1_ms": m["eager1"] * 1e3,
                 "eager_sync1_ratio_to_floor": m["eager1"] / m["floor"]}
        result["batches"][B] = {k: round(v, 3) for k, v in entry.items()}
    if grpo is not None:
        print(f"\n4. GRPO shape: 8 prompts x 8 samples, max_new_tokens per prompt {grpo['lengths']}")
        print(f"   ours: one generate, {grpo['sampled_tokens']} tokens in {grpo['decode_steps']} decode steps: "
              f"{grpo['ours_s']:.2f} s ({grpo['ours_tok_s']:.1f} tok/s)")
        print(f"   transformers (TRL-style, 64 padded rows to {max(grpo['lengths'])} tokens, {grpo['hf_tokens']} "
              f"tokens): {grpo['hf_s']:.2f} s")
        print(f"   speedup {grpo['speedup']:.2f}x (goal >= 2.5)")
        result["grpo"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in grpo.items()}
    if cap is not None:
        print(f"\n5. capacity: 64 prompts x 8 samples, max_new_tokens U[8, 128], cache budget {cap['budget_tokens']} "
              f"tokens ({cap['pages']} pages of 16; slots of {PROMPT_LEN + 128} would hold {cap['slot_rows']} rows)")
        print(f"   rows in flight: engine mean {cap['mean_rows']:.1f}, peak {cap['peak_rows']}; slot cache mean "
              f"{cap['slot_mean_rows']:.1f}, at most {cap['slot_rows']}: {cap['rows_ratio']:.2f}x (goal >= 2)")
        print(f"   pages used at peak {cap['peak_pages']} of {cap['pages']}; pages shared by forks {cap['shared_pages']}; "
              f"prefill tokens {cap['prefill_tokens']} (prompts {cap['prompt_tokens']}; the rest recompute "
              f"preempted sequences: {cap['preemptions']} preemptions); {cap['decode_steps']} decode steps, "
              f"{cap['sampled_tokens']} tokens in {cap['wall_s']:.1f} s")
        result["capacity"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in cap.items()}
    result["load_after"] = round(load_after[0], 2)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"wall {result['wall_s']:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
