"""The opd-tiny recipe: on-policy distillation against SFT on the teacher's traces, at toy scale.

    torchrun --nproc_per_node 2 train.py                                   # runs/r1-tiny first
    torchrun --nproc_per_node 2 train.py --recipe opd-tiny --from-run runs/r1-tiny   # runs/opd-tiny/

From an r1-tiny run it takes the data, the tokenizer, the final_rl model (the teacher) and the
traces rejection-sampled from final_rl (generate_final_rl/generated.jsonl). Stages (each its own
run directory under runs/opd-tiny/, each evaluated on r1-tiny's held-out problems as r1-tiny
evaluates its stages; figures in runs/opd-tiny/summary.json):

  student_base  the student of r1-tiny (the tiny-sft preset) pretrained as r1-tiny's base is (the
                same corpus, steps, batch and lr): the common starting point
  opd           on-policy distillation from student_base: GRPO's loop with --variant opd and
                --teacher final_rl (the student samples, the teacher scores each sampled token; the
                per-token reverse KL is the only advantage, rl/distill.py)
  sft_traces    SFT of student_base on final_rl's traces, for as many steps as give it (about) the
                student tokens opd trained on: opd's summed loss tokens / (batch x the traces' mean
                assistant tokens)

The summary lists each arm's held-out accuracy (sampled, T = 1, mean of 4, and greedy), its wall
time and the student tokens it trained on, beside the teacher's figures from the r1-tiny run.

Measured on 2 CPU cores (2 ranks), 200 held-out problems, one r1-tiny run (seed 0; its final_rl
teacher 0.419 sampled / 0.575 greedy, its traces 2,000-odd correct ones), the student seeded 0-2
(opd: 40 steps of 16 prompts x 8 samples at lr 1e-4; sft_traces: 160 steps of 32 at lr 1e-3):

    seed  student_base     opd (tokens, wall)             sft_traces (tokens, wall)
    0     0.244 / 0.140    0.550 / 0.865  (279k, 34 s)    0.669 / 0.950  (279k, 19 s)
    1     0.276 / 0.140    0.627 / 0.900  (278k, 34 s)    0.499 / 0.860  (279k, 19 s)
    2     0.210 / 0.140    0.456 / 0.820  (279k, 33 s)    0.525 / 0.915  (281k, 19 s)
    mean  0.243 / 0.140    0.544 / 0.862                  0.564 / 0.908

(sampled / greedy.) Both lift the student far past where it starts, and past the teacher's own
sampled accuracy. SFT on the rejection-sampled traces wins on average, by 0.02 sampled (within the
spread over seeds: opd won seed 1) and 0.046 greedy (2 seeds of 3), in about 0.56x the wall time:
its traces are the teacher's correct answers only, while on-policy distillation imitates the
teacher's whole distribution, mistakes included, and pays for sampling and a teacher forward.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from recipes.flags import stage_args
from recipes.r1_tiny import RECIPE as R1
from recipes.r1_tiny import SMOKE as R1_SMOKE
from recipes.r1_tiny import TEMPLATE, _evaluate, _hf_dir, _settings
from recipes.stages import run_recipe_stage
from runtime.distributed import DistInfo, print0
from runtime.rundir import write_json_atomic

RECIPE = {
    "student_base": dict(R1["base"], preset="tiny-sft"),
    "opd": dict(R1["rl"], variant="opd", max_steps=40, lr=1e-4, reward="task,format"),
    "sft_traces": dict(R1["sft"], batch_size=32, micro_batch_size=32, lr=1e-3, warmup_steps=5),
}
SMOKE = {
    "student_base": dict(R1_SMOKE["base"], warmup_steps=0),
    "opd": dict(R1_SMOKE["rl"], max_steps=1),
    "sft_traces": dict(batch_size=4, micro_batch_size=4, warmup_steps=0),
}


def _metrics(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def run_opd_tiny(args, run, info: DistInfo) -> int:
    from data.datasets import read_jsonl
    from data.tokenizer import load_tokenizer

    source = Path(args.from_run)
    need = {"data": source / "data", "teacher": source / "final_rl", "traces": source / "generate_final_rl" / "generated.jsonl"}
    missing = [str(p) for p in need.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--from-run {source}: not a finished r1-tiny run (missing {', '.join(missing)}); run "
                                f"`torchrun --nproc_per_node 2 train.py --out {source}` first")
    R = {**_settings(args.recipe_smoke), **({k: {**v, **SMOKE.get(k, {})} for k, v in RECIPE.items()}
                                            if args.recipe_smoke else RECIPE)}
    root, seed = run.path, args.seed
    t_start = time.perf_counter()
    data = need["data"]
    tok = load_tokenizer(data / "tokenizer")
    heldout = read_jsonl(data / "heldout.jsonl")
    teacher = _hf_dir(need["teacher"])
    r1_summary = json.loads((source / "summary.json").read_text()) if (source / "summary.json").exists() else {}
    summary = {"from_run": str(source), "eval_problems": len(heldout), "seed": seed, "world_size": info.world_size,
               "teacher": next((s for s in r1_summary.get("stages", []) if s["name"] == "final_rl"), None),
               "stages": []}
    common = dict(tokenizer=str(data / "tokenizer"), chat_template=TEMPLATE, seed=seed, log_every_s=10.0)

    def stage(name: str, stage_flags, tokens) -> Path:
        t0 = time.perf_counter()
        path, model_dir = run_recipe_stage(name, stage_flags, root, info)
        wall = time.perf_counter() - t0
        figures = _evaluate(model_dir, tok, heldout, info, R)
        entry = {"name": name, **figures, "wall_s": wall, "student_tokens": tokens(path), "model": str(model_dir)}
        summary["stages"].append(entry)
        print0(f"{name}: accuracy {figures['accuracy']:.3f} (greedy {figures['greedy_accuracy']:.3f}), "
               f"{entry['student_tokens']} student tokens trained, {wall:.0f}s")
        if info.rank == 0:
            write_json_atomic(root / "summary.json", {**summary, "wall_s": time.perf_counter() - t_start})
        return model_dir

    def sft_tokens(path):
        return int(sum(m.get("target_tokens", 0) for m in _metrics(path)))

    def opd_tokens(path):
        return int(sum(m.get("tokens", 0) for m in _metrics(path)))

    base = stage("student_base", stage_args(R["student_base"], data=str(data / "corpus.jsonl"), **common), sft_tokens)
    stage("opd", stage_args(R["opd"], model=str(base), teacher=str(teacher), data=str(data / "prompts.jsonl"),
                            **common), opd_tokens)
    # SFT for the student tokens opd trained on: the traces' assistant turns (and their end token)
    trained = summary["stages"][-1]["student_tokens"]
    traces = read_jsonl(need["traces"])
    per_trace = sum(len(tok.encode(t["messages"][-1]["content"])) + 1 for t in traces) / len(traces)
    batch = R["sft_traces"]["batch_size"]
    steps = max(1, math.ceil(trained / (batch * per_trace)))
    print0(f"sft_traces: {steps} steps of {batch} traces (~{per_trace:.1f} assistant tokens each) for opd's {trained} "
           f"student tokens")
    stage("sft_traces", stage_args(R["sft_traces"], model=str(base), data=str(need["traces"]), max_steps=steps,
                                   **common), sft_tokens)
    summary["wall_s"] = time.perf_counter() - t_start
    if info.rank == 0:
        write_json_atomic(root / "summary.json", summary)
        print0(json.dumps({s["name"]: [round(s["accuracy"], 3), round(s["greedy_accuracy"], 3)]
                           for s in summary["stages"]}))
    return 0
