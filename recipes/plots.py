"""The recipes' pictures, made to be read at a glance (matplotlib, the plot extra).

- `rl_curves(stages, path)`: a panel per quantity (rollout reward, rollout accuracy, completion
  length, KL to the reference, entropy) with a line per RL stage against its step; held-out
  evaluations are marked on the accuracy panel (each logged eval/greedy_accuracy, and the
  stage's own evaluation after its last step, as stars); a stage of a single step is drawn as a
  point and named as such, and a figure with nothing but single steps says so in its title
  instead of drawing empty axes.
- `accuracy_bars(entries, path)`: held-out accuracy per stage, sampled and greedy side by side, on
  a 0-1 axis with each value written on its bar.

Both return the path written, or None (and print why) without matplotlib.
"""
from __future__ import annotations

from pathlib import Path

from runtime.distributed import print0

PANELS = (("reward/mean", "rollout reward"), ("accuracy", "rollout accuracy"),
          ("response_length/mean", "completion length (tokens)"), ("kl", "KL to the reference"),
          ("entropy", "entropy (nats / token)"))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a line saying how to install it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print0("plots: matplotlib is not installed; pip install -e '.[plot]' to get them")
        return None


def rl_curves(stages: list[tuple[str, list[dict], dict | None]], path: Path) -> Path | None:
    """stages: (name, its metrics.jsonl rows, its held-out figures after the last step or None)."""
    plt = pyplot()
    if plt is None:
        return None
    fig = rl_figure(plt, stages)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rl_figure(plt, stages: list[tuple[str, list[dict], dict | None]]):
    """The figure rl_curves writes."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    axes = axes.ravel()
    longest, drawn = 0, set()
    for k, (name, rows, heldout) in enumerate(stages):
        steps_rows = [r for r in rows if "reward/mean" in r]
        longest = max(longest, len(steps_rows))
        color = f"C{k}"
        label = name if len(steps_rows) > 1 else f"{name} (1 step)"
        for ax, (key, title) in zip(axes, PANELS):
            xs = [r["step"] for r in steps_rows if r.get(key) is not None]
            ys = [r[key] for r in steps_rows if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, color=color, label=label, marker="o" if len(xs) <= 1 else None)
                drawn.add(key)
            ax.set_title(title)
            ax.set_xlabel("step")
        acc = axes[1]
        evals = [(r["step"], r["eval/greedy_accuracy"]) for r in rows if r.get("eval/greedy_accuracy") is not None]
        if evals:
            acc.plot(*zip(*evals), color=color, linestyle="--", marker="s", label=f"{name} held-out greedy")
        if heldout and steps_rows:
            last = steps_rows[-1]["step"]
            acc.scatter([last], [heldout["accuracy"]], color=color, marker="*", s=160, zorder=3,
                        label=f"{name} held-out after the stage ({heldout['accuracy']:.2f})")
    axes[1].set_ylim(-0.02, 1.02)                 # a share: the 0-1 axis
    for ax, (key, _) in zip(axes, PANELS):
        if key not in drawn:                       # e.g. the KL of a run without a reference (beta 0)
            ax.text(0.5, 0.5, f"no {key} logged" + (" (beta 0: no reference model)" if key == "kl" else ""),
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1].legend(fontsize=7)
    if "reward/mean" in drawn:
        axes[0].legend(fontsize=8)
    axes[-1].axis("off")
    axes[-1].text(0, 0.5, "rollout figures are each step's samples (temperature 1);\nstars: the held-out "
                  "evaluation after each stage;\nsquares: held-out evaluations logged during a stage", fontsize=9)
    if longest <= 1:
        fig.suptitle("single-step runs: points, not curves (a --recipe-smoke run?)")
    fig.tight_layout()
    return fig


def accuracy_bars(entries: list[dict], path: Path, sampled_label: str = "sampled (T=1, mean of 4)") -> Path | None:
    """entries: {"name", "accuracy", "greedy_accuracy"} per stage."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(entries)), 4.5))
    x = range(len(entries))
    for offset, key, label in ((-0.2, "accuracy", sampled_label), (0.2, "greedy_accuracy", "greedy")):
        values = [e[key] for e in entries]
        bars = ax.bar([i + offset for i in x], values, 0.4, label=label)
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [e["name"] for e in entries], rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
