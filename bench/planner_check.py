"""The memory planner against measurement: per-rank peak memory of real CPU runs of train.py vs
`python -m model.stats plan --device cpu` for the same configuration.

    python bench/planner_check.py [--only NAME[,NAME]] [--steps 2]

One random Qwen2-style model (156M parameters: vocab 32000, hidden 1024, 8 layers, intermediate
2816, 16 heads over 4 kv heads, untied head; written with model.checkpoint.save_pretrained, fp32)
runs train.py in four configurations, each in fresh processes (OMP_NUM_THREADS=1):

    sft-2rank      2 gloo ranks, SFT, micro-batches of 1 x 1024 tokens, 2 per rank per step
    sft-2rank-ac   the same with --activation-checkpointing
    grpo-1proc     one process (no FSDP: a plain fp32 module), GRPO with a reference model (beta 0.04),
                   2 prompts x 4 samples, 128 new tokens, --micro-batch-tokens 1024 (2 micro-batches)
    grpo-2rank-ac  2 gloo ranks, GRPO with --activation-checkpointing, 4 prompts x 4 samples, 256 new
                   tokens: the whole model gathered for rollouts on each rank

All runs are fp32 on the CPU (--param-dtype fp32), which is what the planner's --device cpu models:
the kernels' torch twins (SDPA attention, the RMSNorm twin), AdamW's per-parameter loop, no CUDA
allowance, eager blocks (--compile off where train.py has the flag). Every run takes --steps optimizer
steps (2: AdamW's state exists from the first step on, and gradients persist across a step's
micro-batches).

Measurement (bench/activation_checkpointing.py's and bench/load_memory.py's way): each rank reports
VmHWM minus its RSS right before train.main, the high-water mark reset by writing 5 to
/proc/self/clear_refs. The lazy imports and the process group are set up before that reading (a fixed
cost of the process, reported apart). The run is cut into segments by wrapping the loops' own call
sites, each segment's peak read and the mark reset at its end:

    setup      model (and reference) built and loaded: until build_optimizer
    rollout    inside `gathered(model)` around generate_rollouts: the gathered weights, the KV cache
    ref_pass   inside `gathered(ref_model)`: the reference's no-grad log-prob pass
    train      the rest of a step: forward/backward of every micro-batch and the optimizer step
    checkpoint the final checkpoint (DCP-sharded optimizer state and the HF export): not planned

and compared with the planner's phases (always + what the phase adds; train against the larger of
its train and step phases). "peak" is the largest segment but the checkpoint, against the planner's
total. Goal: within 20% (ratio planned / measured in [0.8, 1.2]) for every rank of every configuration.

RSS and live bytes. The planner counts live tensors. glibc's malloc raises its mmap threshold to the
size of each mmapped block freed (up to 32 MiB), after which tensors below it come from the heap, and
freed heap memory mostly stays in RSS: with the default, the peaks measured 1.18-1.29 x the plan
(sft-2rank: 3.37-3.39 GB against 2.63 planned, 2.50 measured with the fixed threshold), and after
the checkpoint sft-2rank's RSS stayed 2.6 GB above the start, where 0.97 GB were still live. The
children therefore run with MALLOC_MMAP_THRESHOLD_=65536 (a fixed threshold: every larger tensor has
its own mapping, returned when freed), so that RSS follows the live tensors as a GPU's allocated
bytes do (a MALLOC_*_ variable also turns off train.py's own malloc tuning, runtime/host_memory.py);
--default-malloc measures with glibc's defaults instead (allocator retention included, the CPU
counterpart of the planner's GPU fragmentation margin; R1_HOST_MALLOC=system there).
Measured (this 2-core machine, shared; about 15 minutes): planned / measured 0.976-1.052 for every
rank, segment and peak (sft-2rank 1.052, sft-2rank-ac 1.050, grpo-1proc 0.994 with its rollout 0.987
and reference pass 0.988, grpo-2rank-ac 1.006-1.015 with its rollout 0.976); --default-malloc: peaks
0.776-0.845, segments up to 0.932.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(model_type="qwen2", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, attention_bias=True, tie_word_embeddings=False,
             max_position_embeddings=2048)
SEQ_LEN = 1024
GOAL = (0.8, 1.2)
MMAP_THRESHOLD = 1 << 16   # bytes: glibc serves every larger allocation with its own mmap (module docstring)
GRPO_REWARD = "tests.rl._grpo_worker:token_parity"   # varies within a group, so the loss has a gradient


def configs(steps: int) -> list[dict]:
    """Each configuration: its ranks, train.py flags and the planner's settings for the same run."""
    from recipes.flags import build_parser

    known = {flag for action in build_parser()._actions for flag in action.option_strings}
    eager = ["--compile", "off"] if "--compile" in known else []   # the planner counts eager blocks
    common = ["--max-steps", str(steps), "--warmup-steps", "0", "--lr", "1e-4", "--param-dtype", "fp32",
              "--log-every-s", "1000", *eager]
    sft = [*common, "--stage", "sft", "--chat-template", "chatml", "--seq-len", str(SEQ_LEN), "--overlong", "truncate",
           "--micro-batch-size", "1"]
    grpo = [*common, "--stage", "grpo", "--chat-template", "r1-zero", "--group-size", "4", "--reward", GRPO_REWARD,
            "--reward-workers", "0", "--micro-batch-tokens", "1024"]
    return [
        dict(name="sft-2rank", ranks=2, argv=[*sft, "--batch-size", "4"],
             plan=dict(stage="sft", micro_batch_tokens=SEQ_LEN, seq_len=SEQ_LEN)),
        dict(name="sft-2rank-ac", ranks=2, argv=[*sft, "--batch-size", "4", "--activation-checkpointing"],
             plan=dict(stage="sft", micro_batch_tokens=SEQ_LEN, seq_len=SEQ_LEN, activation_checkpointing=True)),
        dict(name="grpo-1proc", ranks=1, argv=[*grpo, "--prompts-per-step", "2", "--max-new-tokens", "128",
                                               "--sampler-batch-size", "8", "--beta", "0.04"],
             plan=dict(stage="grpo", micro_batch_tokens=1024, rollout_batch=8, group_size=4, max_new_tokens=128,
                       beta=0.04)),
        dict(name="grpo-2rank-ac", ranks=2, argv=[*grpo, "--prompts-per-step", "4", "--max-new-tokens", "256",
                                                  "--sampler-batch-size", "8", "--beta", "0",
                                                  "--activation-checkpointing"],
             plan=dict(stage="grpo", micro_batch_tokens=1024, rollout_batch=8, group_size=4, max_new_tokens=256,
                       activation_checkpointing=True)),
    ]


# ---- the measured process ---------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS


def child(argv: list[str], report: str) -> int:
    """train.main(argv) with each segment's peak above the RSS before it written to report.rank{r}."""
    sys.path.insert(0, str(ROOT))
    start = _status_kib("VmRSS") * 1024
    import torch

    torch.set_num_threads(1)
    # What train.main would import or create lazily: a fixed cost of the process, not of the run.
    import torch.distributed.checkpoint  # noqa: F401  (the optimizer's DCP shards)
    import torch.distributed.fsdp  # noqa: F401

    import rl.loop
    import sft.loop
    import train
    from model.config import ModelConfig
    from model.parallel import apply_fsdp
    from model.transformer import Transformer
    from runtime.distributed import init_distributed

    info = init_distributed()  # idempotent: train.main joins the same group
    with torch.device("meta"):
        tiny = Transformer(ModelConfig.from_preset("tiny"))
    if info.world_size > 1:
        apply_fsdp(tiny)
    del tiny

    segments: dict[str, int] = {}
    state = {"segment": "setup", "before": 0}

    def close(next_segment: str) -> None:
        """End the current segment: record its peak above `before`, reset the mark, start the next."""
        peak = _status_kib("VmHWM") * 1024 - state["before"]
        segments[state["segment"]] = max(segments.get(state["segment"], 0), peak)
        _reset_peak()
        state["segment"] = next_segment

    def wrap(module, name, before: str, after: str | None = None):
        inner = getattr(module, name)

        def call(*args, **kwargs):
            if before != state["segment"]:
                close(before)
            out = inner(*args, **kwargs)
            if after is not None:
                close(after)
            return out
        setattr(module, name, call)

    inner_gathered = rl.loop.gathered

    @contextlib.contextmanager
    def gathered(model):
        close("gather")                     # renamed below: rollout (generate inside) or ref_pass
        with inner_gathered(model) as m:
            yield m
        if state["segment"] == "gather":
            state["segment"] = "ref_pass"
        close("train")

    inner_generate = rl.loop.generate_rollouts

    def generate_rollouts(*args, **kwargs):
        state["segment"] = "rollout"        # the gather just before belongs to the rollout
        return inner_generate(*args, **kwargs)

    for loop in (sft.loop, rl.loop):
        wrap(loop, "build_optimizer", before="train")       # the model is built and loaded by then
        wrap(loop, "save_checkpoint", before="checkpoint", after="tail")  # tail: summary, teardown
    rl.loop.gathered, rl.loop.generate_rollouts = gathered, generate_rollouts

    _reset_peak()
    state["before"] = before = _status_kib("VmRSS") * 1024
    code = train.main(argv)
    close("end")
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{report}.rank{rank}").write_text(json.dumps({"rank": rank, "segments": segments,
                                                        "fixed_process_bytes": before - start}))
    return code


# ---- inputs -----------------------------------------------------------------------------------------

WORDS = ["carry", "digit", "sum", "seven", "tens", "plus", "so", "the", "answer", "check", "write", "next", "column"]


def make_inputs(tmp: Path, seed: int = 0) -> dict:
    """The model folder (fp32 random weights and a small BPE tokenizer), SFT conversations that are longer
    than --seq-len (truncated to exactly SEQ_LEN tokens each) and GRPO prompts."""
    import torch

    sys.path.insert(0, str(ROOT))
    from data.templates import R1_ZERO_SYSTEM
    from data.tokenizer import Tokenizer
    from model.checkpoint import save_pretrained
    from model.config import ModelConfig
    from model.transformer import Transformer
    from rl.rollout import encode_prompt
    from tests.rl._grpo_worker import write_prompts

    rng = random.Random(seed)
    corpus = [R1_ZERO_SYSTEM] * 4 + [f"User: What is {a} + {b}?\nAssistant: <think>{a} + {b} = {a + b}</think> "
                                     f"<answer>{a + b}</answer>" for a, b in ((rng.randint(10, 99), rng.randint(10, 99))
                                                                              for _ in range(200))]
    corpus += [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(50)]
    tok = Tokenizer.train(corpus, vocab_size=320, min_frequency=1)
    config = ModelConfig(**MODEL, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(config)
    save_pretrained(model, tmp / "model", tokenizer=tok)
    del model
    with open(tmp / "sft.jsonl", "w") as f:
        for i in range(16):
            text = " ".join(f"{rng.choice(WORDS)} {rng.randint(0, 999)}" for _ in range(3 * SEQ_LEN))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Task {i}."},
                                             {"role": "assistant", "content": text}]}) + "\n")
    rows = write_prompts(tmp / "prompts.jsonl", 64, seed=seed)
    prompt_len = max(len(encode_prompt(tok, r, "r1-zero")) for r in rows)
    return {"model": tmp / "model", "sft": tmp / "sft.jsonl", "prompts": tmp / "prompts.jsonl",
            "prompt_len": prompt_len}


def measure(tmp: Path, cfg: dict, inputs: dict, default_malloc: bool = False) -> list[dict]:
    data = inputs["sft"] if cfg["plan"]["stage"] == "sft" else inputs["prompts"]
    argv = [*cfg["argv"], "--model", str(inputs["model"]), "--data", str(data), "--out", str(tmp / cfg["name"])]
    report = tmp / f"{cfg['name']}.mem"
    cmd = [__file__, "--child", str(report), "--", *argv]
    if cfg["ranks"] > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg["ranks"]), *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if not default_malloc:   # see the module docstring: RSS then follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    else:                    # glibc's own defaults, not train.py's tuning (runtime/host_memory.py)
        env["R1_HOST_MALLOC"] = "system"
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['name']} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.rank{r}").read_text()) for r in range(cfg["ranks"])]


def planned(cfg: dict, inputs: dict):
    from model.checkpoint import read_config
    from model.stats import PlanSettings, plan_memory

    settings = PlanSettings(gpus=cfg["ranks"], gpu_mem_gib=24, device="cpu", param_dtype="fp32",
                            **({"prompt_len": inputs["prompt_len"]} if cfg["plan"]["stage"] == "grpo" else {}),
                            **cfg["plan"])
    return plan_memory(read_config(inputs["model"])[0], settings)


def plan_command(cfg: dict, inputs: dict) -> str:
    p = cfg["plan"]
    flags = [f"--stage {p['stage']}", f"--gpus {cfg['ranks']}", "--gpu-mem-gib 24", "--device cpu",
             f"--micro-batch-tokens {p['micro_batch_tokens']}"]
    for key in ("seq_len", "rollout_batch", "group_size", "max_new_tokens", "beta"):
        if key in p:
            flags.append(f"--{key.replace('_', '-')} {p[key]}")
    if p["stage"] == "grpo":
        flags.append(f"--prompt-len {inputs['prompt_len']}")
    if p.get("activation_checkpointing"):
        flags.append("--activation-checkpointing")
    return "python -m model.stats plan --model MODEL " + " ".join(flags)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (>= 2: see the docstring)")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's default (dynamic) mmap threshold: RSS then also holds freed heap memory")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    chosen = [c for c in configs(args.steps) if not args.only or c["name"] in args.only.split(",")]
    if not chosen:
        raise SystemExit(f"--only {args.only!r}: expected names from {[c['name'] for c in configs(args.steps)]}")
    rows, result = [], {"bench": "planner_check", "goal": list(GOAL), "configs": {},
                        "malloc": ("glibc default" if args.default_malloc
                                   else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        inputs = make_inputs(tmp)
        for cfg in chosen:
            t = time.perf_counter()
            reports = measure(tmp, cfg, inputs, args.default_malloc)
            plan = planned(cfg, inputs)
            phases = plan.phases
            want = {"rollout": phases.get("rollout"), "ref_pass": phases.get("ref_pass"),
                    "train": max(phases["train"], phases["step"])}
            out = {"plan_command": plan_command(cfg, inputs), "planned_total": plan.total_bytes,
                   "planned_phases": phases, "ranks": [], "wall_s": round(time.perf_counter() - t, 1)}
            for r in reports:
                seg = r["segments"]
                peak = max(v for k, v in seg.items() if k not in ("checkpoint", "tail"))
                ratios = {k: round(want[k] / seg[k], 4) for k in want if want[k] is not None and k in seg}
                ratios["peak"] = round(plan.total_bytes / peak, 4)
                out["ranks"].append({"rank": r["rank"], "measured": seg, "peak": peak, "ratio": ratios,
                                     "fixed_process_bytes": r["fixed_process_bytes"]})
                for k in ("rollout", "ref_pass", "train", "peak"):
                    if k in ratios:
                        rows.append((cfg["name"], r["rank"], k, want[k] if k != "peak" else plan.total_bytes,
                                     seg[k] if k != "peak" else peak, ratios[k]))
                rows.append((cfg["name"], r["rank"], "setup", None, seg.get("setup", 0), None))
                rows.append((cfg["name"], r["rank"], "checkpoint", None, seg.get("checkpoint", 0), None))
            result["configs"][cfg["name"]] = out
        result["inputs_s"] = round(time.perf_counter() - t0, 1)
    ok = [r[5] for r in rows if r[5] is not None]
    result["ratios_min_max"] = [min(ok), max(ok)]
    result["within_goal"] = all(GOAL[0] <= x <= GOAL[1] for x in ok)
    print(f"Planner (python -m model.stats plan --device cpu) vs measured peak above the pre-run RSS, per rank; "
          f"model: {MODEL['num_hidden_layers']} layers x hidden {MODEL['hidden_size']}, vocab {MODEL['vocab_size']}, "
          f"fp32; longest GRPO prompt {inputs['prompt_len']} tokens; malloc: {result['malloc']}")
    print(f"{'config':<15}{'rank':>5}  {'segment':<11}{'planned MB':>12}{'measured MB':>13}{'ratio':>8}")
    for name, rank, seg, want_b, got_b, ratio in rows:
        print(f"{name:<15}{rank:>5}  {seg:<11}{'' if want_b is None else f'{want_b / 1e6:.1f}':>12}"
              f"{got_b / 1e6:>13.1f}{'' if ratio is None else f'{ratio:.3f}':>8}")
    for name, out in result["configs"].items():
        print(f"{name}: {out['plan_command']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":   # one configuration's process (see measure)
        sys.exit(child(sys.argv[sys.argv.index("--") + 1:], sys.argv[2]))
    main()
