"""--stage compare: one table (and one bar chart) of several checkpoints across eval sets.

    python train.py --stage compare --models runs/a/checkpoints/step-00000100/hf,runs/b/... \\
        --eval-sets all-math --eval-n 4 --out runs/compare
    python train.py --stage compare --models runs/eval-a,runs/eval-b --out runs/compare   # finished eval runs

Each entry of --models is a model folder (config.json: it is evaluated here with the eval stage's
flags, --eval-sets, --eval-n, ..., into <run>/evals/<k>-<name>/, resumably: an entry whose
eval.json is already complete is read, not run again) or the run directory of a finished eval
stage (holding eval.json, read as it is). It writes:

  compare.md    a markdown table, a row per set and a column per model: pass@1 over the n samples
                (and the largest maj@k where every model has it), printed at the end too
  compare.json  {model label: {set: the eval.json entry}}
  compare.png   pass@1 per set, a group of bars per set and a bar per model, on a 0-1 axis with
                the value on each bar (needs matplotlib: pip install -e ".[plot]"; without it the
                table is still written and a line says so)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _entries(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _label(entry: str) -> str:
    """A short name for a model or run directory: its run's name for runs/<run>/checkpoints/step-N/hf."""
    p = Path(entry)
    parts = p.parts
    if "checkpoints" in parts:
        i = parts.index("checkpoints")
        return f"{parts[i - 1]}@{parts[i + 1].removeprefix('step-').lstrip('0') or '0'}" if i > 0 else p.name
    return p.name or str(p)


def check_flags(args, world_size: int) -> list[str]:
    """--models: two or more model folders or finished eval runs; the eval flags when any is a model."""
    from evaluation.eval_stage import check_flags as check_eval

    entries = _entries(args.models)
    if len(entries) < 2:
        raise ValueError(f"--stage compare needs --models with two or more model folders or eval run directories, "
                         f"comma-separated; got {args.models!r}")
    models = []
    for e in entries:
        p = Path(e)
        if (p / "eval.json").is_file():
            continue
        if not (p / "config.json").is_file():
            raise ValueError(f"--models: {e} is neither a model folder (config.json) nor a finished eval run (eval.json)")
        models.append(e)
    labels = [_label(e) for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--models: two entries share the name {next(x for x in labels if labels.count(x) > 1)!r}; "
                         f"give each its own folder name")
    if models:
        check_eval(argparse.Namespace(**{**vars(args), "model": models[0], "preset": None}), world_size)
    return []


def run_compare(args, run, info) -> int:
    from evaluation.eval_stage import run_eval
    from runtime.distributed import barrier, print0
    from runtime.rundir import RunDir, write_json_atomic

    entries = _entries(args.models)
    results = {}
    for k, entry in enumerate(entries):
        label = _label(entry)
        p = Path(entry)
        if not (p / "eval.json").is_file():
            sub = run.path / "evals" / f"{k}-{label}"
            done = (sub / "summary.json").is_file() and (sub / "eval.json").is_file()
            if not done:
                sub.mkdir(parents=True, exist_ok=True)
                print0(f"compare: evaluating {entry} into {sub}")
                run_eval(argparse.Namespace(**{**vars(args), "model": entry, "preset": None, "tokenizer": None,
                                               "stage": "eval", "out": str(sub)}),
                         RunDir(sub, moved_to=None, resumed=False), info)
            barrier()
            p = sub
        results[label] = json.loads((p / "eval.json").read_text())
    if info.rank != 0:
        return 0
    table = comparison_table(results)
    (run.path / "compare.md").write_text(table + "\n")
    write_json_atomic(run.path / "compare.json", results)
    print0(table)
    try:
        path = bar_chart(results, run.path / "compare.png")
        print0(f"compare: wrote {run.path / 'compare.md'}, compare.json and {path}")
    except ImportError:
        print0(f"compare: wrote {run.path / 'compare.md'} and compare.json; no compare.png: matplotlib is not "
               f"installed (pip install -e \".[plot]\")")
    return 0


def comparison_table(results: dict[str, dict]) -> str:
    """A markdown table: a row per set (in first-seen order), a column per model with its pass@1,
    then the largest maj@k every model reports for the set; '-' where a model lacks the set."""
    models = list(results)
    sets = list(dict.fromkeys(s for r in results.values() for s in r))
    head = ["set"] + [f"{m} pass@1" for m in models]
    rows = []
    for s in sets:
        cells = [s] + [f"{results[m][s]['pass@1']:.4f}" if s in results[m] else "-" for m in models]
        rows.append(cells)
    maj = {}
    for s in sets:
        common = None
        for m in models:
            ks = {int(k) for k in ((results[m].get(s) or {}).get("maj@k") or {})}
            common = ks if common is None else common & ks
        if common and max(common) > 1:
            maj[s] = max(common)
    if maj:
        head += [f"{m} maj@k" for m in models]
        for cells, s in zip(rows, sets):
            cells += [f"{results[m][s]['maj@k'][str(maj[s])]:.4f} (k={maj[s]})" if s in maj else "-" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def bar_chart(results: dict[str, dict], path: Path) -> Path:
    """pass@1 per set and model as grouped bars on a 0-1 axis, each bar labelled with its value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    sets = list(dict.fromkeys(s for r in results.values() for s in r))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(sets) * len(models) / 2 + 2), 4.5))
    for j, m in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(sets))]
        values = [results[m][s]["pass@1"] if s in results[m] else 0.0 for s in sets]
        bars = ax.bar(xs, values, width, label=m)
        for b, s, v in zip(bars, sets, values):
            if s in results[m]:
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pass@1 (mean over samples)")
    ax.set_title("held-out accuracy by set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
