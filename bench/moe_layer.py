"""DeepSeekMoE layer forward+backward on CPU: ours vs transformers' DeepseekV3MoE vs the bare GEMMs.

    python bench/moe_layer.py [--tokens 2048] [--hidden 512] [--experts 16] [--top-k 4]
                              [--shared 1] [--inter 256] [--repeats 15] [--threads 0]

All layers hold the same fp32 weights (ours are copied into transformers' fused
`experts.gate_up_proj` [E, 2I, D] / `experts.down_proj` [E, D, I]) and see the same input and
upstream gradient; one timed call is `y = layer(x); y.backward(dy)` with the gradients of the
previous call dropped (set to None), so no call pays for accumulating into old gradients.

    ours         model.moe.MoE: sort by expert, gather, one slice per expert, index_add_ back
    hf-default   DeepseekV3MoE with the experts implementation a DeepseekV3ForCausalLM picks by
                 default (printed; "grouped_mm" in transformers 5.x: torch's grouped GEMM)
    hf-eager     DeepseekV3MoE with experts_implementation="eager" (its per-expert Python loop)
    gemm-floor   only the matrix multiplies our layer must do, forward and backward, on
                 preallocated buffers: per expert e with n_e routed rows (our routing's counts)
                 gate/up [n_e, D]·[D, I] twice, down [n_e, I]·[I, D]; the shared expert the same
                 with N rows and I·n_shared; the router [N, D]·[D, E]. Backward: dX and dW per GEMM.

FLOPs (forward+backward = 3 × forward): 3 · 2 · (N·K + N·n_shared) · 3·D·I + 3 · 2·N·D·E.

Timing: a warm-up, then `--repeats` rounds; each round times every variant once, in the same order,
so slow drifts of the machine hit all of them alike; the table shows medians (and minima; the goals
are checked on medians). On a machine shared with other jobs, `--threads 1 --clock cpu` counts
only this process's CPU time. Prints a table, then one JSON line.
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
from model.moe import MoE  # noqa: E402


def build_ours(args) -> MoE:
    cfg = ModelConfig(model_type="deepseek_v3", hidden_size=args.hidden, kv_lora_rank=16, qk_nope_head_dim=16,
                      qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=args.experts,
                      num_experts_per_tok=args.top_k, n_shared_experts=args.shared,
                      moe_intermediate_size=args.inter, n_group=1, topk_group=1, norm_topk_prob=True,
                      routed_scaling_factor=2.5)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, args.hidden ** -0.5)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return moe


def build_hf(ours: MoE, args, implementation: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hc = DeepseekV3Config(hidden_size=args.hidden, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                          n_shared_experts=args.shared, moe_intermediate_size=args.inter, n_group=1, topk_group=1,
                          norm_topk_prob=True, routed_scaling_factor=2.5)
    hc._experts_implementation = implementation
    hf = DeepseekV3MoE(hc)
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("experts.")}
    sd["experts.gate_up_proj"] = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ours.experts])
    sd["experts.down_proj"] = torch.stack([e.down_proj.weight for e in ours.experts])
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf


def hf_default_experts_implementation(args) -> str:
    """What a DeepseekV3ForCausalLM selects when the user asks for nothing."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=32, hidden_size=args.hidden, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
                           qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=0,
                           n_group=1, topk_group=1)
    return DeepseekV3ForCausalLM(cfg).config._experts_implementation


class GemmFloor:
    """The GEMMs of the layer alone (fwd + bwd), on preallocated buffers, with the given row counts."""

    def __init__(self, moe: MoE, counts: list[int], n_tokens: int):
        d = moe.hidden_size
        self.experts = [(e.gate_proj.weight.detach(), e.up_proj.weight.detach(), e.down_proj.weight.detach())
                        for e in moe.experts]
        self.counts = counts
        self.gate_w = moe.gate.weight.detach()  # [E, D]
        sh = moe.shared_experts
        self.shared = (sh.gate_proj.weight.detach(), sh.up_proj.weight.detach(), sh.down_proj.weight.detach())
        self.x = torch.randn(n_tokens, d)
        self.dy = torch.randn(n_tokens, d)
        self.xs = torch.randn(sum(counts), d)  # [A, D] sorted tokens
        self.dys = torch.randn(sum(counts), d)
        self.bufs = {}

    def _buf(self, key, *shape):
        if key not in self.bufs:
            self.bufs[key] = torch.empty(*shape)
        return self.bufs[key]

    def _ffn(self, key, x, dy, wg, wu, wd):
        n, i = x.shape[0], wg.shape[0]
        g = torch.mm(x, wg.t(), out=self._buf((key, "g"), n, i))  # [n, I]
        u = torch.mm(x, wu.t(), out=self._buf((key, "u"), n, i))
        torch.mm(g, wd.t(), out=self._buf((key, "y"), n, wd.shape[0]))  # [n, D] (g stands in for silu(g)·u)
        da = torch.mm(dy, wd, out=self._buf((key, "da"), n, i))  # [n, I]
        torch.mm(dy.t(), g, out=self._buf((key, "dwd"), *wd.shape))  # [D, I]
        dx = torch.mm(da, wg, out=self._buf((key, "dx"), n, x.shape[1]))  # [n, D]
        dx.addmm_(u, wu)
        torch.mm(da.t(), x, out=self._buf((key, "dwg"), *wg.shape))  # [I, D]
        torch.mm(u.t(), x, out=self._buf((key, "dwu"), *wu.shape))

    def __call__(self):
        n, e = self.x.shape[0], self.gate_w.shape[0]
        logits = torch.mm(self.x, self.gate_w.t(), out=self._buf("logits", n, e))  # [N, E]
        torch.mm(logits, self.gate_w, out=self._buf("dx_gate", n, self.x.shape[1]))  # [N, D]
        torch.mm(logits.t(), self.x, out=self._buf("dw_gate", *self.gate_w.shape))  # [E, D]
        self._ffn("shared", self.x, self.dy, *self.shared)
        start = 0
        for k, ((wg, wu, wd), c) in enumerate(zip(self.experts, self.counts)):
            if c:
                self._ffn(k, self.xs[start:start + c], self.dys[start:start + c], wg, wu, wd)
            start += c


def fwd_bwd(layer, x, dy):
    def run():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(dy)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: os.cpu_count())")
    p.add_argument("--skip-hf", action="store_true", help="time only ours and the GEMM floor")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine, "
                        "meaningful with --threads 1)")
    args = p.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)

    ours = build_ours(args)
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    dy = torch.randn(1, args.tokens, args.hidden)
    with torch.no_grad():
        ours(x)
    counts = ours.last_load.tolist()
    variants = {"ours": fwd_bwd(ours, x, dy)}
    default_impl = None
    if not args.skip_hf:
        default_impl = hf_default_experts_implementation(args)
        hf_default = build_hf(ours, args, default_impl)
        hf_eager = build_hf(ours, args, "eager")
        with torch.no_grad():
            for name, hf in (("hf-default", hf_default), ("hf-eager", hf_eager)):
                err = (hf(x) - ours(x)).abs().max().item()
                assert err < 1e-4, f"{name} output differs from ours by {err}"
        variants["hf-default"] = fwd_bwd(hf_default, x, dy)
        variants["hf-eager"] = fwd_bwd(hf_eager, x, dy)
    variants["gemm-floor"] = GemmFloor(ours, counts, args.tokens)

    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}

    n, d, i, e, k, s = args.tokens, args.hidden, args.inter, args.experts, args.top_k, args.shared
    flops = 3 * 2 * (n * k + n * s) * 3 * d * i + 3 * 2 * n * d * e
    print(f"DeepSeekMoE fwd+bwd, fp32 CPU, {threads} threads, {args.clock} clock: N={n} D={d} E={e} K={k} shared={s} I={i}; "
          f"tokens per expert {counts}; transformers default experts implementation: {default_impl}")
    print(f"{'variant':<12} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>9} {'ours speed-up':>14}")
    for name, t in med.items():
        print(f"{name:<12} {t * 1e3:>10.2f} {best[name] * 1e3:>9.2f} {flops / t / 1e9:>9.1f} "
              f"{t / med['ours']:>13.2f}x")
    ratios = {"floor_over_ours": med["gemm-floor"] / med["ours"]}
    if not args.skip_hf:
        ratios.update(speedup_vs_hf_default=med["hf-default"] / med["ours"],
                      speedup_vs_hf_eager=med["hf-eager"] / med["ours"])
    print(f"goals: >= 2.5x hf-default, >= 1.0x hf-eager, ours <= 1.15x gemm-floor "
          f"(ours / floor = {med['ours'] / med['gemm-floor']:.3f})")
    print(json.dumps({"bench": "moe_layer", "threads": threads, "clock": args.clock, "tokens": n, "hidden": d, "experts": e, "top_k": k,
                      "shared": s, "inter": i, "repeats": args.repeats, "hf_default_impl": default_impl,
                      "median_ms": {k_: round(v * 1e3, 3) for k_, v in med.items()},
                      "min_ms": {k_: round(v * 1e3, 3) for k_, v in best.items()},
                      "ours_over_floor": round(med["ours"] / med["gemm-floor"], 4),
                      **{k_: round(v, 4) for k_, v in ratios.items()}}))


if __name__ == "__main__":
    main()
