"""The one prepared check for a GPU machine: kernel accuracy, kernel speed, SFT and GRPO steps of a
0.5B model through train.py, and sampler decode speed, in one run of under 5 minutes on one H100/H200.

    bash bench/gpu_check.sh [--out FILE] [--dry-run] [--only NAME[,NAME...]] [--keep-work]

Writes one JSON file (--out, default gpu_check.json in the caller's directory), rewritten
atomically (temporary file, fsync, rename) after every section, so a check that is killed still
leaves the figures of the sections it finished:

    {"check": "gpu_check", "mode": "gpu" | "dry-run" | "cpu-smoke", "complete": bool,
     "started_at", "updated_at", "finished_at" (ISO 8601 UTC), "elapsed_s", "device_name",
     "device": {"name", "capability", "memory_gib", "multiprocessors", "count"} | null,
     "versions": {"python", "torch", "torch_cuda", "triton", "flash_attn", "flash_attn_3"},
     "budget_s": {section: seconds}, "sections": {name: {"status": "ok" | "failed" | "skipped",
     "reason": str, "elapsed_s", "budget_s", <figures>}}}

"ok": the section ran and every check in it passed; "failed": an error (with "error" and the
traceback tail in "traceback"), a check outside its tolerance, or the budget spent before the
section's work was done; "skipped": not run, with the reason (dry run, not selected by --only,
not reached yet while the check is running). --dry-run writes every section as skipped ("dry
run") and needs neither CUDA nor Triton nor flash-attn. Without CUDA (and without --dry-run) the
script says so and exits with status 2.

Sections and their budgets on one H100 (seconds; 275 in all, plus ~5 of start-up). A section's
deadline is the check's start plus the budgets of it and every section before it, so time an
earlier section leaves unused carries forward and none can eat a later one's own budget; work not
started by its deadline is listed as skipped and fails the section. A watchdog ends the process
(killing a train.py child and writing the JSON first) 45 s past the total budget, and faulthandler
45 s after that should the watchdog thread not run.

1. kernels (100 s; most of it Triton's first compilations and autotuning: every configuration of
   kernels.tuning is compiled at each kernel's first launch of a shape class, on a cold cache
   several seconds per attention kernel; the cases run bf16 first, so a cut drops fp16): every Triton kernel of kernels/ forced
   onto its Triton path (KERNELS_BACKEND=triton), forward and backward, in bf16 and fp16, against
   plain float64 math written here from the formulas of the kernels' docstrings (the torch twins
   compute in fp32, so they are not the oracle): token_logprobs at vocab 151936 (Qwen2) with and
   without entropy (4096 tokens of hidden 1536, 2048 of hidden 3584 at temperature 0.7: logp,
   entropy, d hidden, d weight); flash_attention causal with GQA at head dim 128, MLA's 192/128,
   packed documents of different lengths (cu_seqlens) for both, and a bottom-right mask (128
   queries over 2048 keys): o, dq, dk, dv; rms_norm at hidden 3584 (one shape class, as timed in
   section 2): y, dx, dweight;
   grpo_token_loss with every option (dual clip, IS weight, k3 KL) and with none: loss, kl, clip
   indicators, d log_ratio, d logp. Inputs and upstream gradients are rounded to the dtype first;
   the reference runs on those same rounded values in float64. Per output: max_abs = max |a - r|, max_rel = max_abs / max |r|,
   rel_l2 = ||a - r|| / ||r||; a case passes when every output is finite with rel_l2 and max_rel
   within TOLERANCES[dtype] (bf16 looser than fp16: 8 against 11 mantissa bits), and the clip
   indicators agree on all but INDICATOR_MISMATCH_FRACTION of the tokens.
   paged_decode_attention (the rollout engine's decode attention over KV-cache pages, split-K):
   GQA d128 (32 query / 8 kv heads, pages of 16, rows of 1..8192 positions) and MLA's latent pages
   (576 wide, values its first 512, pages of 64, rows up to 4096), block tables shuffled with rows
   sharing their first pages: o.
2. kernel_speed (30 s): forward and forward + backward, CUDA-event timing, median of 10 runs after
   3 warm-up runs, bf16 (grpo_token_loss fp32, as the RL loop feeds it): ours (Triton) beside
   flash-attn (FA3's flash_attn_interface if importable, else FA2's flash_attn; imported lazily),
   torch SDPA (batched: F.scaled_dot_product_attention; packed: our per-document SDPA path) and,
   for log-probs, the naive log_softmax + gather over full [N, V] fp32 logits and our torch twin.
   Work per call (written down as in kernels/bench.py):
       flash_attention  fwd flop = 2 * pairs * (Dqk + Dv);  fwd+bwd adds 2 * pairs * (3 Dqk + 2 Dv)
                        (bwd: recomputed q k^T, dv, dp, dq, dk); pairs = visible (query, key) pairs
                        summed over sequences and query heads (causal: T (T + 1) / 2 per sequence)
       token_logprobs   fwd flop = 2 N V D;  fwd+bwd = 6 N V D (our recomputed logits not counted)
       rms_norm         fwd bytes = 2 N D e; fwd+bwd = 5 N D e (read x, write y; read dy, x, write dx)
       grpo_token_loss  fwd bytes = 11 * 4 n; fwd+bwd = 20 * 4 n (6 reads + 5 writes; 7 reads + 2 writes)
   Peak memory above the inputs (torch.cuda.max_memory_allocated) is reported per row.
3. sft (65 s): a random Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads,
   intermediate 4864, vocab 151936, tied embeddings, q/k/v biases; saved in bf16 with
   model.checkpoint.save_pretrained beside a byte-level BPE trained on the arithmetic corpus of
   data/tasks.py, whose few hundred ids all lie below the model's vocab) trained 20 steps by
   `python train.py --stage sft` (bf16 compute, 256 documents of ~165 tokens a step, packed), as a
   subprocess with the section's remaining time as its timeout; its metrics.jsonl is parsed.
   Figures: median tokens/s and step time over steps 3..20 (the first two compile kernels), the
   first step's time, the loss going down, and MFU = tokens/s * flops_per_token / peak, with
   model.stats.flops_per_token(config, S) = 6 N + 6 L S H (Dqk + Dv) at S = the mean document
   length (tokens_seen / (steps * batch)) and peak = PEAK_BF16_TFLOPS (dense, no sparsity) of the
   GPU found by name; an unknown GPU gives MFU null with the reason.
4. grpo (60 s): 3 steps of `python train.py --stage grpo` on the same model: 16 prompts x 8
   samples of up to 128 new tokens (a random model almost never draws EOS: 128 in practice), beta 0.04 (the
   frozen reference model runs), a token-parity reward (token_parity below: random but varying
   within groups, so the advantages are not all zero). Figures: the loop's tokens/s (completion
   tokens trained / step time), step and phase times, rollout tokens/s, and MFU of the training
   phase and of the whole step, counting per sequence of P prompt + C completion tokens
       train   (6 N + 6 L S H (Dqk + Dv)) (P + C)         S = P + C
       ref     (2 N + 2 L S H (Dqk + Dv)) (P + C)         (beta > 0)
       rollout (2 N + 2 L S' H (Dqk + Dv)) (P / G + C)    S' = P + C / 2; a prompt is prefilled once
   with P the mean prompt length of the prompt file and C the step's response_length/mean.
5. sampler (20 s): sampling.Sampler on the same checkpoint (bf16), 64-token prompts, 128 new
   tokens at temperature 1 with no stop tokens, batch 1, 64 and 256, after a warm-up at each
   batch: decode tokens/s = decode-step tokens / SamplerStats.decode_s, per-step ms, prefill
   tokens/s, end-to-end tokens/s, and the bytes a decode step must read over its time:
       weights 2 bytes x N_read + KV cache B L 2 Hkv Dh 2 bytes x S_mean,   S_mean = P + new / 2
   with N_read every matrix once (all parameters when the embedding is tied: the head reads it whole;
   untied, the input embedding's lookup reads only B rows and is left out).

--cpu-smoke (a hidden developer option) runs every section on CPU at tiny shapes: the Triton
kernels under TRITON_INTERPRET=1 in fp32 and fp16 (the interpreter's bf16 tl.dot is wrong),
perf_counter timing, a 2-layer model trained a few steps in bf16 (FSDP2 mixed precision on a
one-rank gloo group, as on GPU), a bf16 checkpoint and sampler. It catches what can be caught
without a GPU (argument plumbing, the references, JSON, train.py flags, parsing); its figures mean
nothing.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_T0 = time.monotonic()  # the check's start: section deadlines and elapsed_s count from here

SECTIONS = ("kernels", "kernel_speed", "sft", "grpo", "sampler")
BUDGET_S = {"kernels": 100, "kernel_speed": 30, "sft": 65, "grpo": 60, "sampler": 20}  # one H100; 275 s
WATCHDOG_GRACE_S = 45

# Accuracy against float64, per dtype: rel_l2 = ||a - r|| / ||r|| and max_rel = max|a - r| / max|r|.
# fp16 keeps 11 mantissa bits (unit roundoff 4.9e-4), bf16 8 (3.9e-3); attention rounds p to the
# input dtype before p @ v and the log-prob backward writes dz in it, so errors reach a few units of
# roundoff on the whole tensor and ~10 on its worst element. Measured on CPU with the same rounding
# points (the log-prob twin; attention emulated), the worst legit errors were rel_l2 8.6e-3, max_rel
# 1.3e-2 in bf16 (d hidden of log-probs with entropy, hidden 3584) and 1.2e-3 / 2.1e-3 in fp16:
# margins of 3-10x, while one wrong row or document gives an O(1) max_rel. fp32 is for --cpu-smoke
# only (k3's exp(d) - d - 1 cancels: ~5e-6 relative in fp32 whatever the kernel).
TOLERANCES = {
    "float32": {"rel_l2": 5e-5, "max_rel": 2e-4},
    "float16": {"rel_l2": 1e-2, "max_rel": 2e-2},
    "bfloat16": {"rel_l2": 3e-2, "max_rel": 6e-2},
}
INDICATOR_MISMATCH_FRACTION = 1e-4  # clip indicators: a token at a clip edge may round either way

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first pattern
# that matches torch.cuda.get_device_name() wins (so the specific names come first).
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100", 989.0),   # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (r"H800", 989.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
)


# ---------------------------------------------------------------- shapes and settings per mode

@dataclass(frozen=True)
class Profile:
    """Everything a mode's sections run on. Attention cases: (name, dict) with B, T, S for a batch or
    docs (lengths) for a packed batch, plus H, Hkv, dqk, dv."""
    name: str
    device: str
    dtypes: tuple
    logprob_cases: tuple      # (name, N, D, V, temperature, with_entropy)
    attn_cases: tuple
    norm_cases: tuple         # (name, shape)
    grpo_cases: tuple         # (name, [B, T], every option on)
    paged_cases: tuple        # (name, dict(B, H, Hkv, D, Dv, P, max_len)); Dv None: MLA latent pages, values C wide
    speed_dtype: str
    speed_attn: tuple
    speed_logprobs: tuple     # (N, D, V)
    speed_norm: tuple         # (N, D)
    speed_grpo_n: int
    warmup: int
    reps: int
    model: dict               # ModelConfig fields besides the tokenizer's ids
    param_dtype: str          # train.py --param-dtype and the sampler's dtype
    corpus_digits: int
    sft: dict
    grpo: dict
    sampler_batches: tuple
    sampler_prompt_len: int
    sampler_new_tokens: int
    budget_s: dict = field(default_factory=lambda: dict(BUDGET_S))


QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, attention_bias=True,
                  tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)

GPU = Profile(
    name="gpu", device="cuda", dtypes=("bfloat16", "float16"),
    logprob_cases=(("qwen2_1.5b_hidden", 4096, 1536, 151936, 1.0, False),
                   ("qwen2_7b_hidden_entropy", 2048, 3584, 151936, 0.7, True)),
    attn_cases=(("gqa_d128", dict(B=2, T=2048, S=2048, H=16, Hkv=2, dqk=128, dv=128)),
                ("mla_d192_128", dict(B=1, T=2048, S=2048, H=16, Hkv=16, dqk=192, dv=128)),
                ("varlen_gqa_d128", dict(docs=(1, 37, 500, 1024, 64, 1333, 1137), H=16, Hkv=2, dqk=128, dv=128)),
                ("varlen_mla_d192_128", dict(docs=(300, 1, 1500, 247), H=16, Hkv=16, dqk=192, dv=128)),
                ("bottom_right_gqa_d128", dict(B=2, T=128, S=2048, H=16, Hkv=2, dqk=128, dv=128))),
    norm_cases=(("hidden_3584", (4, 1024, 3584)),),
    grpo_cases=(("all_options", (256, 2048), True), ("plain", (64, 1024), False)),
    paged_cases=(("gqa_d128", dict(B=16, H=32, Hkv=8, D=128, Dv=128, P=16, max_len=8192)),
                 ("mla_576_512", dict(B=8, H=16, Hkv=1, D=576, Dv=None, C=512, P=64, max_len=4096))),
    speed_dtype="bfloat16",
    speed_attn=(("gqa_d128", dict(B=4, T=4096, S=4096, H=32, Hkv=8, dqk=128, dv=128)),
                ("mla_d192_128", dict(B=2, T=4096, S=4096, H=32, Hkv=32, dqk=192, dv=128)),
                ("varlen_gqa_d128", dict(docs=(4096, 1024, 3000, 2048, 500, 1716, 4000), H=32, Hkv=8, dqk=128, dv=128))),
    speed_logprobs=(8192, 3584, 151936), speed_norm=(16384, 3584), speed_grpo_n=1 << 22,
    warmup=3, reps=10,
    model=QWEN25_05B, param_dtype="bf16", corpus_digits=4,
    sft=dict(steps=20, batch_size=256, micro_batch_size=64, seq_len=2048, lr=2e-4, docs=2048),  # 8 steps an epoch
    grpo=dict(steps=3, prompts_per_step=16, group_size=8, max_new_tokens=128, sampler_batch_size=128,
              micro_batch_tokens=16384, lr=1e-6, beta=0.04, prompts=64),
    sampler_batches=(1, 64, 256), sampler_prompt_len=64, sampler_new_tokens=128,
)

SMOKE = Profile(
    name="cpu-smoke", device="cpu", dtypes=("float32", "float16"),
    logprob_cases=(("tiny", 37, 48, 1000, 1.0, False), ("tiny_entropy", 29, 32, 777, 0.7, True)),
    attn_cases=(("gqa", dict(B=2, T=40, S=40, H=4, Hkv=2, dqk=32, dv=32)),
                ("mla_shape", dict(B=1, T=33, S=33, H=2, Hkv=2, dqk=48, dv=32)),
                ("varlen_gqa", dict(docs=(1, 17, 30, 5), H=4, Hkv=1, dqk=32, dv=32)),
                ("bottom_right", dict(B=1, T=9, S=40, H=2, Hkv=1, dqk=32, dv=32))),
    norm_cases=(("tiny", (33, 96)), ("tiny_3d", (2, 5, 64))),
    grpo_cases=(("all_options", (8, 50), True), ("plain", (4, 30), False)),
    paged_cases=(("gqa", dict(B=3, H=4, Hkv=2, D=32, Dv=32, P=4, max_len=40)),
                 ("mla", dict(B=2, H=4, Hkv=1, D=40, Dv=None, C=32, P=8, max_len=30))),
    speed_dtype="float32",
    speed_attn=(("gqa", dict(B=1, T=64, S=64, H=4, Hkv=2, dqk=32, dv=32)),
                ("varlen_gqa", dict(docs=(20, 44), H=4, Hkv=2, dqk=32, dv=32))),
    speed_logprobs=(64, 32, 1000), speed_norm=(64, 128), speed_grpo_n=4096,
    warmup=1, reps=3,
    model=dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
               max_position_embeddings=1024, rope_theta=10000.0),
    param_dtype="bf16", corpus_digits=3,  # bf16 as on GPU: FSDP2 mixed precision on a one-rank group
    sft=dict(steps=4, batch_size=8, micro_batch_size=4, seq_len=512, lr=3e-3, docs=64),
    grpo=dict(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, sampler_batch_size=4,
              micro_batch_tokens=4096, lr=1e-4, beta=0.04, prompts=8),
    sampler_batches=(1, 4, 8), sampler_prompt_len=16, sampler_new_tokens=8,
    budget_s={"kernels": 600, "kernel_speed": 300, "sft": 300, "grpo": 300, "sampler": 120},
)


# ---------------------------------------------------------------- pure helpers

def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def peak_bf16_tflops(device_name: str | None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, how it was found) for a GPU name; (None, reason) when unknown."""
    if not device_name:
        return None, "no GPU name (not a CUDA run), so no peak to divide by"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, f"{device_name!r} matches {pattern!r} in PEAK_BF16_TFLOPS"
    return None, f"no bf16 peak for {device_name!r} in PEAK_BF16_TFLOPS (add its dense figure to compute MFU)"


def mfu(flop_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (a fraction), None without a peak."""
    if peak_tflops is None or flop_per_s is None or not math.isfinite(flop_per_s):
        return None
    return flop_per_s / (peak_tflops * 1e12)


def error_stats(out, ref, chunk: int = 1 << 24) -> dict:
    """max_abs, max_ref (= max |ref|), max_rel, rel_l2 and finite of out against ref, in float64,
    a flat chunk at a time (the gradient of a 152k x 3584 head is 4 GiB in float64)."""
    import torch

    a, b = out.detach().reshape(-1), ref.detach().reshape(-1)
    assert a.numel() == b.numel(), f"sizes differ: {tuple(out.shape)} vs {tuple(ref.shape)}"
    max_abs = max_ref = sq_diff = sq_ref = 0.0
    finite = True
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        finite = finite and bool(torch.isfinite(x).all())
        d = x - y
        max_abs = max(max_abs, float(d.abs().max()))
        max_ref = max(max_ref, float(y.abs().max()))
        sq_diff += float((d * d).sum())
        sq_ref += float((y * y).sum())
    rel_l2 = math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else math.sqrt(sq_diff)
    max_rel = max_abs / max_ref if max_ref > 0 else max_abs
    return {"max_abs": max_abs, "max_ref": max_ref, "max_rel": max_rel, "rel_l2": rel_l2, "finite": finite}


def within_tolerance(stats: dict, dtype: str) -> bool:
    """True when the output is finite and its rel_l2 and max_rel are within TOLERANCES[dtype]."""
    tol = TOLERANCES[dtype]
    return bool(stats["finite"]) and stats["rel_l2"] <= tol["rel_l2"] and stats["max_rel"] <= tol["max_rel"]


def median(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Report:
    """The JSON file, rewritten whole and atomically (temp file, fsync, rename) on every change."""

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data
        self.lock = threading.Lock()

    def set_section(self, name: str, result: dict) -> None:
        with self.lock:
            self.data["sections"][name] = result
        self.write()

    def write(self) -> None:
        with self.lock:
            self.data["updated_at"] = utc_now()
            self.data["elapsed_s"] = round(time.monotonic() - _T0, 3)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "w") as f:
                    json.dump(json_safe(self.data), f, indent=1, allow_nan=False, default=str)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
            finally:
                if tmp.exists():
                    tmp.unlink()



def json_safe(x):
    """x with every non-finite float replaced by None (the file stays strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class Deadline:
    """The time by which a section must be done (monotonic seconds)."""

    def __init__(self, at: float, budget_s: float):
        self.at = at
        self.budget_s = budget_s

    def left(self) -> float:
        return self.at - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def versions() -> dict:
    """Package versions from their metadata (nothing imported: works in a dry run)."""
    def dist(*names):
        for n in names:
            try:
                return importlib.metadata.version(n)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None
    out = {"python": platform.python_version(), "torch": dist("torch"), "torch_cuda": None, "triton": dist("triton"),
           "flash_attn": dist("flash-attn", "flash_attn"), "flash_attn_3": dist("flash-attn-3", "flash_attn_3")}
    if out["flash_attn_3"] is None and importlib.util.find_spec("flash_attn_interface") is not None:
        out["flash_attn_3"] = "installed (flash_attn_interface, version unknown)"
    return out


def token_parity(completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]:
    """GRPO reward of the grpo section: 1.0 when the completion's token ids sum to an even number.
    Random for a random model, but it varies within a group, so the advantages are not all zero."""
    return [1.0 if sum(ids) % 2 == 0 else 0.0 for ids in completion_ids]


REWARD_SPEC = "bench.gpu_check:token_parity"


@contextmanager
def env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ---------------------------------------------------------------- context shared by the sections

@dataclass
class Context:
    profile: Profile
    work: Path
    keep_work: bool
    device_name: str | None
    assets: dict | None = None      # the model folder and data files, made on first use
    assets_error: str | None = None
    flash_attn: tuple = (None, None, "not looked for")  # load_flash_attn(), by the kernel_speed section

    @property
    def device(self):
        import torch
        return torch.device(self.profile.device)

    def sync(self):
        import torch
        if self.profile.device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------- section 1: kernel accuracy

def _ref_token_logprobs(h, w, t, temperature, with_entropy, g_lp, g_ent, chunk=512):
    """float64 autograd, a chunk of tokens at a time: logp = log_softmax(h w^T / T)[t],
    ent = -sum p log p; returns (logp, ent or None, d hidden, d weight) for the cotangents."""
    import torch

    w64 = w.detach().double().requires_grad_(True)
    lps, ents, dhs = [], [], []
    for i in range(0, h.shape[0], chunk):
        hc = h[i:i + chunk].detach().double().requires_grad_(True)
        logq = torch.log_softmax(hc @ w64.T / temperature, dim=-1)        # [c, V]
        lp = logq.gather(1, t[i:i + chunk, None]).squeeze(1)
        total = (lp * g_lp[i:i + chunk].double()).sum()
        if with_entropy:
            ent = -(logq.exp() * logq).sum(-1)
            total = total + (ent * g_ent[i:i + chunk].double()).sum()
            ents.append(ent.detach())
        total.backward()
        lps.append(lp.detach())
        dhs.append(hc.grad)
        del logq
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None), torch.cat(dhs), w64.grad


def _ref_attention(q, k, v, scale, seqs):
    """float64, one sequence at a time: seqs = [(q0, q1, k0, k1)] row ranges of the flattened
    [tokens, heads, dim] tensors; causal, aligned bottom-right (key j visible to query i iff
    j <= i + S - T); GQA by repeating each kv head over its H / Hkv query heads."""
    import torch

    out = []
    H, Hkv = q.shape[1], k.shape[1]
    for q0, q1, k0, k1 in seqs:
        qi, ki, vi = q[q0:q1], k[k0:k1].repeat_interleave(H // Hkv, 1), v[k0:k1].repeat_interleave(H // Hkv, 1)
        T, S = qi.shape[0], ki.shape[0]
        s = torch.einsum("thd,shd->hts", qi, ki) * scale                  # [H, T, S]
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(~(j <= i + S - T), float("-inf"))
        out.append(torch.einsum("hts,shd->thd", torch.softmax(s, -1), vi))  # [T, H, Dv]
    return torch.cat(out)


def _ref_rms_norm(x, w, eps):
    """float64: x / sqrt(mean(x**2) + eps) * w."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w


def _ref_grpo(lr, adv, mask, w, logp, ref, eps_low, eps_high, dual_clip, beta):
    """float64 per-token GRPO loss of kernels/grpo_loss.py's docstring (k3 KL), and its indicators."""
    import torch

    r = torch.exp(lr.clamp(-20.0, 20.0))
    pg = -torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
    live = mask != 0
    high, low = (adv > 0) & (r > 1 + eps_high), (adv < 0) & (r < 1 - eps_low)
    dual = torch.zeros_like(low)
    if dual_clip is not None:
        dual = (adv < 0) & (r > dual_clip)
        pg = torch.where(dual, -dual_clip * adv, pg)
    if w is not None:
        pg = pg * w
    kl = torch.zeros_like(pg)
    if logp is not None:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        pg = pg + beta * kl
    return mask * pg, (low & live), (high & live), (dual & live), torch.where(live, kl, torch.zeros_like(kl))


def _ref_paged_decode(q, k_pages, v_pages, tables, lens, scale, v_dim):
    """float64, row by row: row b's positions 0..lens[b]-1 read from its pages (page tables[b, p // P],
    offset p % P); GQA by repeating each kv head; MLA (v_pages None): one kv head, values its first
    v_dim channels. q [B, H, D] -> [B, H, Dv]."""
    import torch

    P = k_pages.shape[1]
    out = []
    for b in range(q.shape[0]):
        pos = torch.arange(int(lens[b]), device=q.device)
        pages, off = tables[b, pos // P], pos % P
        k = k_pages[pages, off].double()
        k = k[:, None] if k.dim() == 2 else k                               # [n, Hkv, D]
        v = k[..., :v_dim] if v_pages is None else v_pages[pages, off].double()
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("hd,shd->hs", q[b].double(), k.repeat_interleave(g, 1)) * scale
        out.append(torch.einsum("hs,shd->hd", torch.softmax(s, -1), v.repeat_interleave(g, 1)))
    return torch.stack(out)


def _paged_inputs(ctx, dtype_name, spec, seed=5):
    """Random pages, shuffled block tables (rows sharing their first pages, as forked samples do) and
    lengths from 1 to max_len, on the device."""
    import torch

    dt, dev = getattr(torch, dtype_name), ctx.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, H, Hkv, D, Dv, P, L = (spec[k] for k in ("B", "H", "Hkv", "D", "Dv", "P", "max_len"))
    W = -(-L // P)
    M = B * W + 1
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    tables = torch.randperm(M, generator=g)[: B * W].view(B, W)
    tables[1:, : W // 2] = tables[0, : W // 2]                                # shared prompt pages
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(M, P, D, generator=g) if Dv is None else torch.randn(M, P, Hkv, D, generator=g)
    v = None if Dv is None else torch.randn(M, P, Hkv, Dv, generator=g)
    put = lambda t: None if t is None else t.to(device=dev, dtype=dt)        # noqa: E731
    return put(q), put(k), put(v), tables.to(dev), lens.to(dev), spec.get("C")


def _accuracy_paged_decode(ctx, dtype_name, case):
    from kernels.paged_attention import paged_decode_attention

    name, spec = case
    q, k, v, tables, lens, v_dim = _paged_inputs(ctx, dtype_name, spec)
    scale = spec["D"] ** -0.5
    o = paged_decode_attention(q, k, v, tables, lens, scale, v_dim)
    ref = _ref_paged_decode(q, k, v, tables, lens, scale, v_dim)
    return _case("paged_decode", name, dtype_name, f"q={list(q.shape)} pages={list(k.shape)} P={spec['P']}",
                 {"o": error_stats(o, ref)})


def _case(kernel, name, dtype, shape, outputs, extra=None):
    ok = all(within_tolerance(s, dtype) for s in outputs.values())
    row = {"kernel": kernel, "case": name, "dtype": dtype, "shape": shape, "tolerance": TOLERANCES[dtype],
           "outputs": outputs, "pass": ok}
    if extra:
        row.update(extra)
        ok = ok and extra.get("indicators_pass", True)
        row["pass"] = ok
    return row


def _accuracy_logprobs(ctx, dtype_name, case):
    import torch
    from kernels import token_logprobs

    name, N, D, V, temp, with_ent = case
    dt, dev = getattr(torch, dtype_name), ctx.device
    g = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(N, D, device=dev, generator=g).to(dt)                       # unit RMS, as after the final norm
    w = (torch.randn(V, D, device=dev, generator=g) * (2.0 / D ** 0.5)).to(dt)  # logits of std ~2
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    g_lp, g_ent = torch.randn(N, device=dev, generator=g), torch.randn(N, device=dev, generator=g)
    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    if with_ent:
        lp, ent = token_logprobs(hk, wk, t, temp, with_entropy=True)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    else:
        lp, ent = token_logprobs(hk, wk, t, temp), None
        (lp * g_lp).sum().backward()
    r_lp, r_ent, r_dh, r_dw = _ref_token_logprobs(h, w, t, temp, with_ent, g_lp, g_ent)
    outs = {"logp": error_stats(lp, r_lp), "d_hidden": error_stats(hk.grad, r_dh), "d_weight": error_stats(wk.grad, r_dw)}
    if with_ent:
        outs["entropy"] = error_stats(ent, r_ent)
    return _case("token_logprobs", name, dtype_name, f"N={N} D={D} V={V} T={temp}" + (" entropy" if with_ent else ""),
                 outs)


def _attn_layout(spec):
    """(q lead shape, k lead shape, cu_seqlens list or None, seqs for _ref_attention) of a case."""
    if "docs" in spec:
        cu = [0]
        for n in spec["docs"]:
            cu.append(cu[-1] + n)
        return (cu[-1],), (cu[-1],), cu, [(a, b, a, b) for a, b in zip(cu, cu[1:])]
    B, T, S = spec["B"], spec["T"], spec["S"]
    return (B, T), (B, S), None, [(b * T, (b + 1) * T, b * S, (b + 1) * S) for b in range(B)]


def _accuracy_attention(ctx, dtype_name, case):
    import torch
    from kernels import flash_attention

    name, spec = case
    dt, dev = getattr(torch, dtype_name), ctx.device
    H, Hkv, dqk, dv = spec["H"], spec["Hkv"], spec["dqk"], spec["dv"]
    lead_q, lead_k, cu, seqs = _attn_layout(spec)
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(*lead_q, H, dqk, device=dev, generator=g).to(dt)
    k = torch.randn(*lead_k, Hkv, dqk, device=dev, generator=g).to(dt)
    v = torch.randn(*lead_k, Hkv, dv, device=dev, generator=g).to(dt)
    do = torch.randn(*lead_q, H, dv, device=dev, generator=g).to(dt)   # the same rounded values for both sides
    qk, kk, vk = (x.clone().requires_grad_(True) for x in (q, k, v))
    cu_t = torch.tensor(cu, device=dev, dtype=torch.int32) if cu is not None else None
    o = flash_attention(qk, kk, vk, causal=True, cu_seqlens=cu_t)
    o.backward(do)
    flat = lambda x: x.detach().double().reshape(-1, *x.shape[-2:]).requires_grad_(True)  # noqa: E731
    q64, k64, v64 = flat(q), flat(k), flat(v)
    o64 = _ref_attention(q64, k64, v64, dqk ** -0.5, seqs)
    o64.backward(do.double().reshape(o64.shape))
    outs = {"o": error_stats(o, o64), "dq": error_stats(qk.grad, q64.grad), "dk": error_stats(kk.grad, k64.grad),
            "dv": error_stats(vk.grad, v64.grad)}
    layout = f"docs={list(spec['docs'])}" if cu is not None else f"B={spec['B']} T={spec['T']} S={spec['S']}"
    return _case("flash_attention", name, dtype_name, f"{layout} H={H}/{Hkv} D={dqk}/{dv} causal", outs)


def _accuracy_rms_norm(ctx, dtype_name, case):
    import torch
    from kernels import rms_norm

    name, shape = case
    dt, dev = getattr(torch, dtype_name), ctx.device
    g = torch.Generator(device=dev).manual_seed(3)
    x = (torch.randn(*shape, device=dev, generator=g) * 3.0).to(dt)
    w = (1.0 + 0.1 * torch.randn(shape[-1], device=dev, generator=g)).to(dt)
    dy = torch.randn(*shape, device=dev, generator=g).to(dt)
    xk, wk = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = rms_norm(xk, wk, 1e-6)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = _ref_rms_norm(x64, w64, 1e-6)
    y64.backward(dy.double())
    outs = {"y": error_stats(y, y64), "dx": error_stats(xk.grad, x64.grad), "dweight": error_stats(wk.grad, w64.grad)}
    return _case("rms_norm", name, dtype_name, f"x={list(shape)}", outs)


def _accuracy_grpo(ctx, dtype_name, case):
    import torch
    from kernels import grpo_token_loss

    name, shape, full = case
    dt, dev = getattr(torch, dtype_name), ctx.device
    g = torch.Generator(device=dev).manual_seed(4)
    B, T = shape
    lr = (torch.randn(B, T, device=dev, generator=g) * 0.5).to(dt)   # some beyond the dual clip
    adv = torch.randn(B, device=dev, generator=g)                                   # per sequence
    lengths = torch.randint(1, T + 1, (B,), device=dev, generator=g)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()        # padded tails
    opts = dict(eps_low=0.2, eps_high=0.28)
    w = logp = ref = None
    if full:
        w = torch.rand(B, T, device=dev, generator=g) * 1.5
        logp = (-torch.rand(B, T, device=dev, generator=g) * 3).to(dt)
        ref = (logp.float() + 0.1 * torch.randn(B, T, device=dev, generator=g)).to(dt)
        opts.update(dual_clip=3.0, beta=0.04)
    lrk = lr.clone().requires_grad_(True)
    lpk = logp.clone().requires_grad_(True) if full else None
    out = grpo_token_loss(lrk, adv, mask, logp=lpk, ref_logp=ref, is_weight=w, kl_estimator="k3", **opts)
    g_out = torch.randn(B, T, device=dev, generator=g)
    out.loss.backward(g_out)
    lr64 = lr.double().requires_grad_(True)
    lp64 = logp.double().requires_grad_(True) if full else None
    ref_out = _ref_grpo(lr64, adv.double()[:, None].expand(B, T), mask.double(), None if w is None else w.double(),
                        lp64, None if ref is None else ref.double(), opts["eps_low"], opts["eps_high"],
                        opts.get("dual_clip"), opts.get("beta", 0.0))
    ref_out[0].backward(g_out.double())
    outs = {"loss": error_stats(out.loss, ref_out[0]), "d_log_ratio": error_stats(lrk.grad, lr64.grad)}
    if full:
        outs["kl"] = error_stats(out.kl, ref_out[4])
        outs["d_logp"] = error_stats(lpk.grad, lp64.grad)
    mism = {k: int(((got != 0) != want).sum()) for k, got, want in
            (("clipped_low", out.clipped_low, ref_out[1]), ("clipped_high", out.clipped_high, ref_out[2]),
             ("clipped_dual", out.clipped_dual, ref_out[3]))}
    allowed = int(INDICATOR_MISMATCH_FRACTION * B * T)
    extra = {"indicator_mismatches": mism, "indicator_mismatches_allowed": allowed,
             "indicators_pass": all(m <= allowed for m in mism.values()),
             "clipped_fraction": {k: float((t != 0).float().mean()) for k, t in
                                  (("low", out.clipped_low), ("high", out.clipped_high), ("dual", out.clipped_dual))}}
    opt_text = "dual_clip=3 beta=0.04 k3 is_weight" if full else "no KL, no dual clip, no IS weight"
    return _case("grpo_token_loss", name, dtype_name, f"[B, T]={list(shape)} eps=0.2/0.28 {opt_text}", outs, extra)


def section_kernels(ctx: Context, deadline: Deadline) -> dict:
    import torch
    from kernels import backend
    from kernels.triton_import import HAVE_TRITON

    if not HAVE_TRITON:
        return {"status": "failed", "reason": "Triton is not installed: there is no Triton path to check"}
    p = ctx.profile
    jobs = [(fn, dt, case) for dt in p.dtypes for fn, cases in
            ((_accuracy_logprobs, p.logprob_cases), (_accuracy_attention, p.attn_cases),
             (_accuracy_rms_norm, p.norm_cases), (_accuracy_grpo, p.grpo_cases),
             (_accuracy_paged_decode, p.paged_cases)) for case in cases]
    cases, not_run = [], []
    with env_var("KERNELS_BACKEND", "triton"):
        probe = torch.zeros(1, device=ctx.device)
        assert backend.use_triton(probe), "KERNELS_BACKEND=triton did not select the Triton path"
        for fn, dt, case in jobs:
            label = f"{fn.__name__.removeprefix('_accuracy_')}/{case[0]}/{dt}"
            if deadline.spent():
                not_run.append(label)
                continue
            t0 = time.monotonic()
            try:
                row = fn(ctx, dt, case)
            except Exception as e:  # one case's error (e.g. a compile failure) must not hide the others
                row = {"kernel": fn.__name__.removeprefix("_accuracy_"), "case": case[0], "dtype": dt, "pass": False,
                       "error": f"{type(e).__name__}: {e}", "traceback": tail(traceback.format_exc(), 12)}
            row["seconds"] = round(time.monotonic() - t0, 3)
            cases.append(row)
            if ctx.profile.device == "cuda":
                torch.cuda.empty_cache()
    failed = [f"{c['kernel']}/{c['case']}/{c['dtype']}" for c in cases if not c["pass"]]
    status = "ok" if not failed and not not_run else "failed"
    parts = [f"{len(cases) - len(failed)} of {len(jobs)} cases within tolerance"]
    if failed:
        parts.append("outside tolerance or errored: " + ", ".join(failed))
    if not_run:
        parts.append(f"section budget spent before: {', '.join(not_run)}")
    return {"status": status, "reason": "; ".join(parts), "backend": "triton (KERNELS_BACKEND=triton)",
            "tolerances": TOLERANCES, "indicator_mismatch_fraction": INDICATOR_MISMATCH_FRACTION,
            "cases": cases, "not_run": not_run}


# ---------------------------------------------------------------- section 2: kernel speed

def measure(fn, ctx: Context, warmup: int, reps: int) -> dict:
    """Median and min milliseconds of fn() over reps (CUDA events on GPU, perf_counter on CPU) after
    warmup calls, and the peak memory of one more call above what was allocated before it."""
    import torch

    for _ in range(warmup):
        fn()
    ctx.sync()
    if ctx.profile.device == "cuda":
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in events]
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        ms = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        peak = None
    return {"ms": statistics.median(ms), "ms_min": min(ms), "reps": reps, "peak_mib": peak}


def _fwd(fn):
    import torch

    def step():
        with torch.no_grad():
            fn()
    return step


def _fwd_bwd(fn, inputs, cotangent):
    import torch

    def step():
        for t in inputs:
            t.grad = None
        out = fn()
        torch.autograd.backward(out, cotangent)
    return step


def load_flash_attn() -> tuple[str | None, object, str]:
    """(flavour "fa3" | "fa2" | None, module, note): FA3's flash_attn_interface if importable, else FA2."""
    notes = []
    for flavour, name in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        try:
            return flavour, __import__(name), f"{name} imported"
        except Exception as e:  # ImportError, or an OSError from a build against another torch
            notes.append(f"{name}: {type(e).__name__}: {e}")
    return None, None, "; ".join(notes)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _attn_pairs(spec) -> int:
    """Visible (query, key) pairs summed over sequences and query heads (causal, bottom-right)."""
    def causal(T, S):
        return sum(max(0, min(S, i + S - T + 1)) for i in range(T))
    if "docs" in spec:
        return spec["H"] * sum(n * (n + 1) // 2 for n in spec["docs"])
    return spec["B"] * spec["H"] * causal(spec["T"], spec["S"])


def _speed_attention(ctx, dt, case):
    import torch
    import torch.nn.functional as F
    from kernels import flash_attention
    from kernels.attention import flash_attention_sdpa

    name, spec = case
    dev = ctx.device
    H, Hkv, dqk, dv = spec["H"], spec["Hkv"], spec["dqk"], spec["dv"]
    lead_q, lead_k, cu, _ = _attn_layout(spec)
    q = torch.randn(*lead_q, H, dqk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(*lead_k, Hkv, dqk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(*lead_k, Hkv, dv, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(*lead_q, H, dv, device=dev, dtype=dt)
    cu_t = torch.tensor(cu, device=dev, dtype=torch.int32) if cu is not None else None
    impls = {"ours-triton": lambda: flash_attention(q, k, v, causal=True, cu_seqlens=cu_t)}
    inputs = {"ours-triton": (q, k, v)}
    if cu is None:  # SDPA wants [B, H, T, D]: transposed copies, made outside the timing
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        impls["torch-sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=H != Hkv)
        inputs["torch-sdpa"] = (qt, kt, vt)
    else:
        impls["torch-sdpa-per-doc"] = lambda: flash_attention_sdpa(q, k, v, causal=True, cu_seqlens=cu_t)
        inputs["torch-sdpa-per-doc"] = (q, k, v)
    skipped = {}
    flavour, fa, note = ctx.flash_attn
    if fa is None:
        skipped["flash-attn"] = f"not installed or not importable ({note})"
    elif dt not in (torch.bfloat16, torch.float16):
        skipped["flash-attn"] = f"flash-attn takes fp16/bf16, not {dt}"
    elif cu is None:
        impls[f"flash-attn-{flavour}"] = lambda: _first(fa.flash_attn_func(q, k, v, causal=True))
        inputs[f"flash-attn-{flavour}"] = (q, k, v)
    else:
        mx = max(spec["docs"])
        impls[f"flash-attn-{flavour}"] = lambda: _first(fa.flash_attn_varlen_func(q, k, v, cu_t, cu_t, mx, mx, causal=True))
        inputs[f"flash-attn-{flavour}"] = (q, k, v)
    pairs = _attn_pairs(spec)
    work = {"fwd": 2 * pairs * (dqk + dv), "fwd+bwd": 2 * pairs * (dqk + dv) + 2 * pairs * (3 * dqk + 2 * dv)}
    layout = f"docs={list(spec['docs'])}" if cu is not None else f"B={spec['B']} T={spec['T']}"
    shape = f"{layout} H={H}/{Hkv} D={dqk}/{dv} causal"
    rows = []
    for impl, fn in impls.items():
        cot = dot if impl == "torch-sdpa" else do
        for kind, step in (("fwd", _fwd(fn)), ("fwd+bwd", _fwd_bwd(fn, inputs[impl], cot))):
            rows.append(_timed_row(ctx, "flash_attention", name, shape, impl, kind, step, work[kind], "TFLOP/s"))
    rows += [dict(kernel="flash_attention", case=name, shape=shape, impl=i, mode=None, status="skipped", reason=r)
             for i, r in skipped.items()]
    return rows


def _timed_row(ctx, kernel, case, shape, impl, kind, step, work, unit):
    row = dict(kernel=kernel, case=case, shape=shape, impl=impl, mode=kind, unit=unit, work=work)
    try:
        m = measure(step, ctx, ctx.profile.warmup, ctx.profile.reps)
    except Exception as e:  # a comparator's unsupported shape, or an out-of-memory naive path
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        _free(ctx)
        return row
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    row.update(status="ok", rate=work / (m["ms"] * 1e-3) / scale, **m)
    return row


def _free(ctx):
    import gc

    import torch
    gc.collect()
    if ctx.profile.device == "cuda":
        torch.cuda.empty_cache()


def _speed_logprobs(ctx, dt):
    import torch
    from kernels import token_logprobs
    from kernels.logprobs import token_logprobs_torch

    N, D, V = ctx.profile.speed_logprobs
    dev = ctx.device
    h = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(V, D, device=dev, dtype=dt) * D ** -0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)

    def naive():
        return torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)   # [N, V] fp32 logits

    impls = {"ours-triton": lambda: token_logprobs(h, w, t),
             "ours-triton+entropy": lambda: sum(token_logprobs(h, w, t, with_entropy=True)),
             "torch-twin": lambda: token_logprobs_torch(h, w, t),
             "naive": naive}
    shape = f"N={N} D={D} V={V}"
    rows = []
    for impl, fn in impls.items():
        for kind, step, work in (("fwd", _fwd(fn), 2 * N * V * D), ("fwd+bwd", _fwd_bwd(fn, (h, w), g), 6 * N * V * D)):
            rows.append(_timed_row(ctx, "token_logprobs", "lm_head", shape, impl, kind, step, work, "TFLOP/s"))
            _free(ctx)
    return rows


def _speed_rms_norm(ctx, dt):
    import torch
    import torch.nn.functional as F
    from kernels import rms_norm
    from kernels.norm import rms_norm_torch

    N, D = ctx.profile.speed_norm
    dev = ctx.device
    x = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(D, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(N, D, device=dev, dtype=dt)
    impls = {"ours-triton": lambda: rms_norm(x, w, 1e-6), "torch-twin": lambda: rms_norm_torch(x, w, 1e-6)}
    if hasattr(F, "rms_norm"):
        impls["torch-F.rms_norm"] = lambda: F.rms_norm(x, (D,), w, 1e-6)
    e = x.element_size()
    rows = []
    for impl, fn in impls.items():
        for kind, step, work in (("fwd", _fwd(fn), 2 * N * D * e), ("fwd+bwd", _fwd_bwd(fn, (x, w), dy), 5 * N * D * e)):
            rows.append(_timed_row(ctx, "rms_norm", "hidden", f"N={N} D={D}", impl, kind, step, work, "GB/s"))
    return rows


def _speed_grpo(ctx):
    import torch
    from kernels import grpo_token_loss
    from kernels.grpo_loss import grpo_token_loss_torch

    n = ctx.profile.speed_grpo_n
    dev = ctx.device
    lr = (torch.randn(n, device=dev) * 0.3).requires_grad_(True)
    lp = (-torch.rand(n, device=dev) * 3).requires_grad_(True)
    ref = lp.detach() + 0.1 * torch.randn(n, device=dev)
    adv, mask, w = torch.randn(n, device=dev), (torch.rand(n, device=dev) > 0.1).float(), torch.rand(n, device=dev)
    kw = dict(dual_clip=3.0, beta=0.04, logp=lp, ref_logp=ref, is_weight=w)
    g = torch.randn(n, device=dev)
    impls = {"ours-triton": lambda: grpo_token_loss(lr, adv, mask, **kw).loss,
             "torch-twin": lambda: grpo_token_loss_torch(lr, adv, mask, **kw).loss}
    rows = []
    for impl, fn in impls.items():
        for kind, step, work in (("fwd", _fwd(fn), 11 * 4 * n), ("fwd+bwd", _fwd_bwd(fn, (lr, lp), g), 20 * 4 * n)):
            rows.append(_timed_row(ctx, "grpo_token_loss", "all_options_fp32", f"n={n}", impl, kind, step, work, "GB/s"))
    return rows


def section_kernel_speed(ctx: Context, deadline: Deadline) -> dict:
    import torch
    from kernels.triton_import import HAVE_TRITON

    if not HAVE_TRITON:
        return {"status": "failed", "reason": "Triton is not installed: there is no Triton path to time"}
    p = ctx.profile
    dt = getattr(torch, p.speed_dtype)
    ctx.flash_attn = load_flash_attn()
    jobs = [(f"flash_attention/{c[0]}", lambda c=c: _speed_attention(ctx, dt, c)) for c in p.speed_attn]
    jobs += [("token_logprobs", lambda: _speed_logprobs(ctx, dt)), ("rms_norm", lambda: _speed_rms_norm(ctx, dt)),
             ("grpo_token_loss", lambda: _speed_grpo(ctx))]
    rows, not_run, errors = [], [], []
    with env_var("KERNELS_BACKEND", "triton"):
        for label, job in jobs:
            if deadline.spent():
                not_run.append(label)
                continue
            try:
                rows += job()
            except Exception as e:
                errors.append(f"{label}: {type(e).__name__}: {e}")
            _free(ctx)
    # ours (the plain Triton row of a kernel, case and mode) over each comparator's time: < 1 is faster
    ours = {(r["kernel"], r["case"], r["mode"]): r["ms"] for r in rows if r["impl"] == "ours-triton" and r["status"] == "ok"}
    for r in rows:
        base = ours.get((r["kernel"], r["case"], r["mode"]))
        if base is not None and r["status"] == "ok" and not r["impl"].startswith("ours"):
            r["ours_time_over_this"] = base / r["ms"]
    ours_failed = [f"{r['kernel']}/{r['case']}/{r['impl']}/{r['mode']}" for r in rows
                   if r["impl"].startswith("ours") and r["status"] != "ok"]
    other_failed = [f"{r['kernel']}/{r['case']}/{r['impl']}/{r['mode']}: {r.get('error', '')[:120]}" for r in rows
                    if not r["impl"].startswith("ours") and r["status"] == "failed"]
    status = "ok" if not (ours_failed or errors or not_run) else "failed"
    parts = [f"{sum(r['status'] == 'ok' for r in rows)} rows timed"]
    if ours_failed:
        parts.append("our kernels failed: " + ", ".join(ours_failed))
    if errors:
        parts.append("errors: " + "; ".join(errors))
    if not_run:
        parts.append("section budget spent before: " + ", ".join(not_run))
    if other_failed:
        parts.append("comparators that failed (not counted against us): " + "; ".join(other_failed))
    fl, _, note = ctx.flash_attn
    return {"status": status, "reason": "; ".join(parts), "dtype": p.speed_dtype, "warmup": p.warmup, "reps": p.reps,
            "timing": "CUDA events, median" if p.device == "cuda" else "perf_counter, median (CPU smoke)",
            "flash_attn": {"flavour": fl, "note": note}, "rows": rows, "not_run": not_run}


# ---------------------------------------------------------------- the model folder and data (sections 3-5)

def make_assets(ctx: Context) -> dict:
    """The random model folder (bf16 on GPU), its tokenizer, the SFT and prompt files; made once."""
    if ctx.assets is not None:
        return ctx.assets
    if ctx.assets_error is not None:
        raise RuntimeError(f"the model folder could not be made earlier: {ctx.assets_error}")
    try:
        ctx.assets = _make_assets(ctx)
    except Exception as e:
        ctx.assets_error = f"{type(e).__name__}: {e}"
        raise
    return ctx.assets


def _make_assets(ctx: Context) -> dict:
    import torch
    from data.tasks import arithmetic_problems, pretraining_corpus, write_jsonl
    from data.tokenizer import Tokenizer
    from model.checkpoint import save_pretrained
    from model.config import ModelConfig
    from model.transformer import Transformer
    from rl.rollout import encode_prompt

    t0 = time.monotonic()
    p = ctx.profile
    d = ctx.work / "assets"
    d.mkdir(parents=True, exist_ok=True)
    rows = pretraining_corpus("arithmetic", p.sft["docs"], seed=0, carry_bug=0.0, wrong_answer=0.0, missing_tags=0.0,
                              digits=p.corpus_digits)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], d / "sft.jsonl", force=True)
    prompts = arithmetic_problems(p.grpo["prompts"], seed=1, digits=p.corpus_digits)
    write_jsonl(prompts, d / "prompts.jsonl", force=True)
    tok = Tokenizer.train([r["text"] for r in rows], vocab_size=2048)
    if tok.vocab_size > p.model["vocab_size"]:
        raise ValueError(f"tokenizer of {tok.vocab_size} tokens exceeds the model's vocab {p.model['vocab_size']}")
    config = ModelConfig(**p.model, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]), torch.device(ctx.device):
        torch.manual_seed(0)
        model = Transformer(config)
    save_dtype = torch.bfloat16 if p.param_dtype == "bf16" else torch.float32
    save_pretrained(model, d / "model", tokenizer=tok, dtype=save_dtype, overwrite=True)
    del model
    _free(ctx)
    prompt_lens = [len(encode_prompt(tok, r, "r1-zero")) for r in prompts]
    return {"dir": d / "model", "sft": d / "sft.jsonl", "prompts": d / "prompts.jsonl", "config": config,
            "tokenizer_vocab": tok.vocab_size, "prompt_len_mean": sum(prompt_lens) / len(prompt_lens),
            "seconds": round(time.monotonic() - t0, 2)}


def model_figures(config) -> dict:
    from model.stats import count_params

    c = count_params(config)
    return {"params": c.total, "embedding_params": c.embedding, "hidden": config.hidden_size,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
            "vocab": config.vocab_size, "tied_embeddings": config.tie_word_embeddings}


# ---------------------------------------------------------------- train.py as a subprocess (sections 3-4)

_CHILDREN: dict = {}  # pid -> Popen of the train.py run in progress (the watchdog kills its group)


def run_train(argv: list[str], log_path: Path, timeout_s: float) -> dict:
    """`python train.py argv` in its own session (so a timeout kills all it started), its console to
    log_path. KERNELS_BACKEND and TRITON_INTERPRET are removed: train.py picks its own path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, argv)]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _CHILDREN[proc.pid] = proc
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.wait()
        finally:
            _CHILDREN.pop(proc.pid, None)
    return {"cmd": " ".join(["python", "train.py", *map(str, argv)]), "rc": rc, "timed_out": timed_out,
            "timeout_s": round(timeout_s, 1), "wall_s": round(time.monotonic() - t0, 2),
            "log_tail": tail(log_path.read_text(errors="replace"), 40)}


def kill_group(proc) -> None:
    """SIGKILL the process group of a child started with start_new_session (its pid is the group's id)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def sft_figures(rows: list[dict], summary: dict | None, config, batch_size: int, peak: float | None) -> dict:
    """Throughput and MFU of an SFT run's step rows (steady state: steps after the first two)."""
    from model.stats import flops_per_token

    steps = [r for r in rows if "tokens_per_s" in r]
    steady = steps[2:] or steps
    tok_s = median(r["tokens_per_s"] for r in steady)
    out = {"steps_logged": len(steps), "first_step_s": steps[0].get("step_s") if steps else None,
           "tokens_per_s": tok_s, "step_s": median(r.get("step_s") for r in steady),
           "steady_steps": [r["step"] for r in steady],
           "loss_first": steps[0].get("loss") if steps else None, "loss_last": steps[-1].get("loss") if steps else None}
    mean_doc = None
    if summary and summary.get("tokens_seen") and summary.get("steps"):
        mean_doc = summary["tokens_seen"] / (summary["steps"] * batch_size)
    out["mean_document_tokens"] = mean_doc
    if tok_s is not None and mean_doc is not None:
        fpt = flops_per_token(config, round(mean_doc))
        out["flops_per_token"] = fpt
        out["model_tflop_s"] = tok_s * fpt / 1e12
        out["mfu"] = mfu(tok_s * fpt, peak)
    return out


def grpo_figures(rows: list[dict], config, prompts_per_step: int, group: int, prompt_len: float, beta: float,
                 peak: float | None) -> dict:
    """Throughput and MFU of a GRPO run's step rows (formulas in the module docstring)."""
    from model.stats import flops_per_token

    steps = [r for r in rows if "step_s" in r]
    per_step = []
    for r in steps:
        C = r.get("response_length/mean")
        if not _finite(C):
            continue
        seqs = prompts_per_step * group
        S = prompt_len + C
        train = flops_per_token(config, round(S)) * seqs * S
        ref = flops_per_token(config, round(S), training=False) * seqs * S if beta > 0 else 0.0
        rollout = flops_per_token(config, round(prompt_len + C / 2), training=False) * (prompts_per_step * prompt_len
                                                                                         + seqs * C)
        t_train, t_roll = r.get("time/train"), r.get("time/rollout")
        per_step.append({
            "step": r["step"], "step_s": r["step_s"], "tokens_per_s": r.get("tokens_per_s"),
            "time_rollout_s": t_roll, "time_logprobs_s": r.get("time/logprobs"), "time_train_s": t_train,
            "response_length_mean": C, "generated_tokens": seqs * C,
            "rollout_tokens_per_s": seqs * C / t_roll if _finite(t_roll) and t_roll > 0 else None,
            "mfu_train": mfu(train / t_train, peak) if _finite(t_train) and t_train > 0 else None,
            "mfu_step": mfu((train + ref + rollout) / r["step_s"], peak) if r["step_s"] > 0 else None,
            "loss": r.get("loss"), "grad_norm": r.get("grad_norm"), "reward_mean": r.get("reward/mean")})
    steady = per_step[1:] or per_step
    keys = ("step_s", "tokens_per_s", "rollout_tokens_per_s", "mfu_train", "mfu_step", "time_rollout_s",
            "time_train_s", "time_logprobs_s")
    out = {"steps_logged": len(steps), "prompt_tokens_mean": prompt_len, "per_step": per_step,
           "steady_steps": [s["step"] for s in steady]}
    out.update({k: median(s[k] for s in steady) for k in keys})
    return out


def _train_common(ctx: Context) -> list[str]:
    return ["--chat-template", "r1-zero", "--param-dtype", ctx.profile.param_dtype, "--log-every-s", "1000",
            "--keep-last", "1", "--seed", "0"]


def _run_problems(run: dict, figs: dict, steps: int) -> list[str]:
    """What went wrong with a train.py run of a section: a timeout, an exit status, missing steps."""
    problems = []
    if run["timed_out"]:
        problems.append(f"train.py timed out after {run['timeout_s']} s (the section's time left)")
    elif run["rc"] != 0:
        problems.append(f"train.py exited with status {run['rc']}")
    if figs["steps_logged"] != steps:
        problems.append(f"{figs['steps_logged']} of {steps} steps in metrics.jsonl")
    return problems


def _finish_run(ctx: Context, run_dir: Path) -> None:
    """Drop a run's checkpoints (GBs at 0.5B) once parsed, unless --keep-work."""
    import shutil
    if not ctx.keep_work:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def section_sft(ctx: Context, deadline: Deadline) -> dict:
    a = make_assets(ctx)
    p = ctx.profile.sft
    run_dir = ctx.work / "sft_run"
    argv = ["--stage", "sft", "--model", a["dir"], "--data", a["sft"], "--out", run_dir,
            "--max-steps", p["steps"], "--warmup-steps", 2, "--batch-size", p["batch_size"],
            "--micro-batch-size", p["micro_batch_size"], "--seq-len", p["seq_len"], "--lr", p["lr"],
            *_train_common(ctx)]
    run = run_train(argv, ctx.work / "sft.log", deadline.left())
    rows = read_metrics(run_dir)
    summary_f = run_dir / "summary.json"
    summary = json.loads(summary_f.read_text()) if summary_f.exists() else None
    peak, peak_note = peak_bf16_tflops(ctx.device_name)
    figs = sft_figures(rows, summary, a["config"], p["batch_size"], peak)
    _finish_run(ctx, run_dir)
    problems = _run_problems(run, figs, p["steps"])
    losses = [r.get("loss") for r in rows if "tokens_per_s" in r]
    if not all(_finite(x) for x in losses):
        problems.append("non-finite loss in metrics.jsonl")
    elif losses and not losses[-1] < losses[0]:
        problems.append(f"the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    out = {"status": "failed" if problems else "ok",
           "reason": "; ".join(problems) if problems else
           f"{p['steps']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
           "model": model_figures(a["config"]), "assets_s": a["seconds"], "tokenizer_vocab": a["tokenizer_vocab"],
           "settings": {**p, "param_dtype": ctx.profile.param_dtype}, "peak_bf16_tflops": peak,
           "peak_source": peak_note, **figs, "run": run}
    if figs.get("mfu") is None:
        out["mfu_reason"] = peak_note if peak is None else "no steady-state tokens/s or document length to count with"
    return out


def section_grpo(ctx: Context, deadline: Deadline) -> dict:
    a = make_assets(ctx)
    p = ctx.profile.grpo
    run_dir = ctx.work / "grpo_run"
    argv = ["--stage", "grpo", "--model", a["dir"], "--data", a["prompts"], "--out", run_dir,
            "--max-steps", p["steps"], "--warmup-steps", 0, "--prompts-per-step", p["prompts_per_step"],
            "--group-size", p["group_size"], "--max-new-tokens", p["max_new_tokens"], "--reward", REWARD_SPEC,
            "--reward-workers", 0, "--beta", p["beta"], "--lr", p["lr"], "--sampler-batch-size", p["sampler_batch_size"],
            "--micro-batch-tokens", p["micro_batch_tokens"], *_train_common(ctx)]
    run = run_train(argv, ctx.work / "grpo.log", deadline.left())
    rows = read_metrics(run_dir)
    peak, peak_note = peak_bf16_tflops(ctx.device_name)
    figs = grpo_figures(rows, a["config"], p["prompts_per_step"], p["group_size"], a["prompt_len_mean"], p["beta"], peak)
    _finish_run(ctx, run_dir)
    problems = _run_problems(run, figs, p["steps"])
    bad = [s["step"] for s in figs["per_step"] if not (_finite(s["loss"]) and _finite(s["grad_norm"]))]
    if bad:
        problems.append(f"non-finite loss or grad_norm at steps {bad}")
    out = {"status": "failed" if problems else "ok",
           "reason": "; ".join(problems) if problems else f"{p['steps']} steps, finite losses and gradients",
           "model": model_figures(a["config"]), "settings": {**p, "param_dtype": ctx.profile.param_dtype,
                                                              "reward": REWARD_SPEC},
           "peak_bf16_tflops": peak, "peak_source": peak_note, **figs, "run": run}
    if peak is None:
        out["mfu_reason"] = peak_note
    return out


# ---------------------------------------------------------------- section 5: sampler decode speed

def section_sampler(ctx: Context, deadline: Deadline) -> dict:
    import torch
    from model.checkpoint import load_pretrained
    from model.stats import count_params
    from sampling.sampler import Sampler, SamplingParams

    a = make_assets(ctx)
    p = ctx.profile
    dtype = torch.bfloat16 if p.param_dtype == "bf16" else torch.float32
    model = load_pretrained(a["dir"], dtype=dtype, device=ctx.device)
    c = a["config"]
    counts = count_params(c)
    # a decode step reads every matrix once; the (tied) head is read whole, the embedding lookup only B rows
    matmul_params = counts.total - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    elt = torch.finfo(dtype).bits // 8
    kv_bytes_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * elt
    P, new = p.sampler_prompt_len, p.sampler_new_tokens
    g = torch.Generator().manual_seed(5)
    rows, not_run, problems = [], [], []
    for B in p.sampler_batches:
        if deadline.spent():
            not_run.append(f"batch {B}")
            continue
        prompts = torch.randint(0, a["tokenizer_vocab"], (B, P), generator=g).tolist()
        params = [SamplingParams(temperature=1.0, max_new_tokens=new, stop_token_ids=[], seed=i) for i in range(B)]
        warm = [SamplingParams(temperature=1.0, max_new_tokens=min(4, new), stop_token_ids=[], seed=i) for i in range(B)]
        try:
            s = Sampler(model, max_batch_size=B, max_seq_len=P + new, verbose=False)
            s.generate(prompts, warm)            # kernels compiled, cache allocated
            s.stats = type(s.stats)()
            ctx.sync()
            t0 = time.perf_counter()
            outs = s.generate(prompts, params)
            ctx.sync()
            wall = time.perf_counter() - t0
        except Exception as e:
            rows.append({"batch": B, "status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": tail(traceback.format_exc(), 12)})
            problems.append(f"batch {B}: {type(e).__name__}: {e}")
            _free(ctx)
            continue
        st = s.stats
        lengths = {len(o[0].token_ids) for o in outs}
        reasons = {o[0].finish_reason for o in outs}
        decode_tokens = st.generated_tokens - B     # each sample's first token comes from the prefill logits
        step_s = st.decode_s / st.decode_steps if st.decode_steps else None
        bytes_step = elt * matmul_params + B * kv_bytes_per_token * (P + new / 2)
        row = {"batch": B, "status": "ok", "prompt_tokens": P, "new_tokens": new,
               "decode_tokens_per_s": decode_tokens / st.decode_s if st.decode_s > 0 else None,
               "decode_step_ms": step_s * 1e3 if step_s else None, "decode_steps": st.decode_steps,
               "prefill_tokens_per_s": st.prefill_tokens / st.prefill_s if st.prefill_s > 0 else None,
               "end_to_end_tokens_per_s": st.generated_tokens / wall, "wall_s": wall,
               "bytes_per_decode_step": bytes_step, "hbm_gb_s": bytes_step / step_s / 1e9 if step_s else None}
        if lengths != {new} or reasons != {"length"}:
            row["status"] = "failed"
            problems.append(f"batch {B}: completions of lengths {sorted(lengths)} ending {sorted(reasons)}; "
                            f"expected all {new} tokens ending 'length'")
        rows.append(row)
        del s
        _free(ctx)
    del model
    _free(ctx)
    status = "ok" if not problems and not not_run else "failed"
    parts = problems + ([f"section budget spent before: {', '.join(not_run)}"] if not_run else [])
    return {"status": status, "reason": "; ".join(parts) or f"batches {list(p.sampler_batches)} decoded {new} tokens each",
            "dtype": str(dtype).removeprefix("torch."), "matmul_params": matmul_params,
            "kv_bytes_per_token": kv_bytes_per_token, "rows": rows, "not_run": not_run}


# ---------------------------------------------------------------- driver

RUNNERS = {"kernels": section_kernels, "kernel_speed": section_kernel_speed, "sft": section_sft,
           "grpo": section_grpo, "sampler": section_sampler}


def skipped(reason: str, budget_s=None) -> dict:
    return {"status": "skipped", "reason": reason, "budget_s": budget_s}


def run_section(name: str, ctx: Context, deadline: Deadline) -> dict:
    """One section, its own errors caught: status failed with the error and the traceback's tail."""
    t0 = time.monotonic()
    try:
        result = RUNNERS[name](ctx, deadline)
    except Exception as e:
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "error": f"{type(e).__name__}: {e}",
                  "traceback": tail(traceback.format_exc())}
    try:
        _free(ctx)
    except Exception:  # a broken CUDA context: the section already says why
        pass
    result["elapsed_s"] = round(time.monotonic() - t0, 2)
    result["budget_s"] = deadline.budget_s
    result["time_left_at_end_s"] = round(deadline.left(), 2)
    return json_safe(result)


def device_info(profile: Profile) -> dict | None:
    import torch
    if profile.device != "cuda":
        return {"name": None, "type": "cpu", "note": "CPU smoke run: figures mean nothing"}
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "type": "cuda", "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON report, rewritten after each section "
                                                           "(relative paths: from the caller's directory)")
    p.add_argument("--dry-run", action="store_true", help="write the report with every section skipped; no GPU needed")
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of {', '.join(SECTIONS)} "
                                              "(the others are written as skipped)")
    p.add_argument("--keep-work", action="store_true", help="keep the model folder, run directories and logs "
                                                            "(default: a temporary folder, removed at the end)")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    args.only = only
    if args.dry_run and args.cpu_smoke:
        p.error("--dry-run and --cpu-smoke exclude each other")
    return args


def out_path(arg: str) -> Path:
    """--out, relative to the caller's directory (gpu_check.sh cds to the repository root first)."""
    path = Path(arg)
    if not path.is_absolute():
        path = Path(os.environ.get("GPU_CHECK_CALLER_CWD") or os.getcwd()) / path
    return path


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    profile = SMOKE if args.cpu_smoke else GPU
    mode = "dry-run" if args.dry_run else profile.name
    data = {"check": "gpu_check", "mode": mode, "complete": False, "started_at": utc_now(), "updated_at": None,
            "finished_at": None, "elapsed_s": 0.0, "argv": sys.argv[1:] if argv is None else list(argv),
            "device_name": None, "device": None, "versions": versions(), "budget_s": dict(profile.budget_s),
            "budget_total_s": sum(profile.budget_s.values()), "sections": {}}
    report = Report(out_path(args.out), data)
    if args.dry_run:
        for name in SECTIONS:
            data["sections"][name] = skipped("dry run", profile.budget_s[name])
        data["complete"], data["finished_at"] = True, utc_now()
        report.write()
        print(f"gpu_check: dry run; wrote {report.path} with every section skipped")
        return 0

    if str(ROOT) not in sys.path:  # the sections import the project's packages (gpu_check.sh sets PYTHONPATH too)
        sys.path.insert(0, str(ROOT))
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): this check needs one GPU; "
              "use --dry-run to write the report skeleton without one", file=sys.stderr)
        return 2
    data["versions"]["torch_cuda"] = torch.version.cuda
    data["device"] = device_info(profile)
    data["device_name"] = device_name = data["device"]["name"]
    for name in SECTIONS:
        data["sections"][name] = skipped("not reached yet (the check is running, or stopped before it)",
                                         profile.budget_s[name])
    report.write()

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    data["work_dir"] = str(work) if args.keep_work else None
    ctx = Context(profile=profile, work=work, keep_work=args.keep_work, device_name=device_name)
    total = sum(profile.budget_s.values())
    current = {"name": None}

    def watchdog():
        name = current["name"]
        if name is not None:
            report.set_section(name, {"status": "failed", "reason": f"watchdog: the check passed {total} + "
                                      f"{WATCHDOG_GRACE_S} s and was ended inside this section",
                                      "budget_s": profile.budget_s[name]})
        for proc in list(_CHILDREN.values()):
            kill_group(proc)
        print(f"gpu_check: watchdog fired in section {name}; wrote {report.path}", file=sys.stderr, flush=True)
        os._exit(3)
    timer = threading.Timer(total + WATCHDOG_GRACE_S, watchdog)
    timer.daemon = True
    timer.start()
    # the backstop, should the watchdog thread never get the GIL: tracebacks to stderr, then exit
    faulthandler.dump_traceback_later(total + 2 * WATCHDOG_GRACE_S, exit=True)

    at = _T0
    for name in SECTIONS:
        at += profile.budget_s[name]
        if args.only and name not in args.only:
            report.set_section(name, skipped(f"not selected (--only {','.join(args.only)})", profile.budget_s[name]))
            continue
        current["name"] = name
        print(f"gpu_check: {name} (budget {profile.budget_s[name]} s, {at - time.monotonic():.0f} s to its deadline)",
              flush=True)
        result = run_section(name, ctx, Deadline(at, profile.budget_s[name]))
        report.set_section(name, result)
        print(f"gpu_check: {name}: {result['status']} in {result['elapsed_s']} s: {result['reason'][:300]}", flush=True)
    current["name"] = None
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    if not args.keep_work:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    data["complete"], data["finished_at"] = True, utc_now()
    report.write()
    statuses = {n: s["status"] for n, s in data["sections"].items()}
    print(f"gpu_check: wrote {report.path}: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
    return 0 if all(s != "failed" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
