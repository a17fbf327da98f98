"""The recipes' pictures (recipes/plots.py): held-out evaluations marked on the RL curves, a panel
with nothing logged says so, a single-step run is titled as such, accuracy bars on a 0-1 axis with
their values written on them."""
import pytest

plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib draws the plots (the test extra)")

from recipes.plots import accuracy_bars, rl_figure  # noqa: E402


def _rows(n):
    return [{"step": i, "reward/mean": 0.1 * i, "accuracy": 0.05 * i, "response_length/mean": 50 + i,
             "entropy": 0.5, **({"eval/greedy_accuracy": 0.3} if i == n else {})} for i in range(1, n + 1)]


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_curves_mark_held_out_evaluations_and_name_empty_panels():
    fig = rl_figure(plt, [("r1_zero", _rows(5), {"accuracy": 0.42}), ("final_rl", _rows(3), None)])
    acc = fig.axes[1]
    labels = [h.get_label() for h in acc.get_legend().legend_handles]
    assert "r1_zero held-out after the stage (0.42)" in labels and "final_rl held-out greedy" in labels
    assert acc.get_ylim() == (-0.02, 1.02)
    assert "no kl logged (beta 0: no reference model)" in _texts(fig)   # nobody logged a KL
    assert fig._suptitle is None
    plt.close(fig)


def test_a_single_step_run_says_so():
    fig = rl_figure(plt, [("r1_zero", _rows(1), {"accuracy": 0.1})])
    assert "single-step runs" in fig._suptitle.get_text()
    assert "r1_zero (1 step)" in [h.get_label() for h in fig.axes[0].get_legend().legend_handles]
    plt.close(fig)


def test_accuracy_bars_are_on_a_unit_axis_with_values(tmp_path, monkeypatch):
    seen = {}
    real = plt.Figure.savefig

    def keep(fig, *a, **k):
        seen["texts"] = _texts(fig)
        seen["ylim"] = fig.axes[0].get_ylim()
        return real(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    path = accuracy_bars([{"name": "base", "accuracy": 0.158, "greedy_accuracy": 0.115},
                          {"name": "r1_zero", "accuracy": 0.3525, "greedy_accuracy": 0.535}], tmp_path / "a.png")
    assert path.stat().st_size > 5000
    assert seen["ylim"] == (0.0, 1.08) and {"0.16", "0.12", "0.35", "0.54"} <= set(seen["texts"])
