"""PNG plots of a compare (matplotlib, Agg backend: no display needed).

Dev loss against steps, forward passes and training time (mean over the seeds that finished ok, with a
±1 std band), and test-accuracy bars (mean ± std). Failed configurations have no curve; the tables say why.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers, tests, CI
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from l2zo.compare.events import RunRecord
    from l2zo.compare.summary import Row

PLOTS = {
    "dev_loss_vs_steps.png": "optimizer steps",
    "dev_loss_vs_forwards.png": "forward passes",
    "dev_loss_vs_time.png": "training time, s (optimizer steps only; evaluation excluded)",
}


def _x(run: RunRecord, axis: str, step: int) -> float:
    """Where an evaluation after ``step`` optimizer steps sits on ``axis``."""
    if axis == "optimizer steps":
        return float(step)
    if axis == "forward passes":
        return float(step * (run.forwards_per_step or 0))
    return sum(t for s, t in run.series("train/step_time_s") if s < step)


def _curve(runs: list[RunRecord], axis: str) -> tuple[list[float], list[float], list[float]]:
    """x (mean over seeds), mean and std of the dev loss at the evaluation steps every seed has."""
    steps = sorted(set.intersection(*(set(s for s, _ in r.series("val/loss")) for r in runs)))
    xs, means, stds = [], [], []
    for step in steps:
        vals = [dict(r.series("val/loss"))[step] for r in runs]
        xs.append(statistics.fmean(_x(r, axis, step) for r in runs))
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return xs, means, stds


def _dev_plot(path: Path, rows: list[Row], axis: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        runs = [r for r in row.ok_runs if r.series("val/loss")]
        if not runs:
            continue
        xs, mean, std = _curve(runs, axis)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{row.label} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)  # fmt: skip
    ax.set_xlabel(axis)
    ax.set_ylabel("dev loss")
    ax.set_title(f"dev loss vs {axis.split(',')[0]} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_png(fig, path)


def _acc_plot(path: Path, rows: list[Row]) -> None:
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4.5))
    for i, row in enumerate(rows):
        accs = [v for r in row.ok_runs if (v := r.last("test/acc")) is not None]
        if not accs:
            ax.text(i, 0.02, "failed", ha="center", va="bottom", rotation=90, color="crimson")
            continue
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax.bar(i, statistics.fmean(accs), yerr=std, capsize=4, alpha=0.8)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy of the final model (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)


def save_png(fig: plt.Figure, path: Path) -> None:
    """Save beside ``path`` and rename over it, so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_plots(root: Path, rows: list[Row]) -> list[str]:
    """Write the PNGs into ``root``; return their file names (for summary.md)."""
    for name, axis in PLOTS.items():
        _dev_plot(root / name, rows, axis)
    _acc_plot(root / "test_acc.png", rows)
    return [*PLOTS, "test_acc.png"]
