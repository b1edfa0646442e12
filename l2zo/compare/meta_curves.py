"""Meta-training curves read back from a meta-train run's TensorBoard events, and their plot.

Per task the look-ahead meta-loss (``meta/loss/<task>``) and the trajectory loss (``train/loss/<task>``),
smoothed by a trailing mean; the normaliser c (``meta/c``) and the mean raw sigma (``meta/sigma_mean``).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from l2zo.compare.events import find_run_folders, read_folder
from l2zo.compare.plots import save_png
from l2zo.errors import L2ZOError

Scalars = dict[str, dict[int, float]]  # tag -> {step: value}


def read_scalars(run: Path) -> Scalars:
    """tag -> {step: value} over every event file under ``run`` (a resumed run has several): a step logged
    twice keeps its latest value."""
    folders = find_run_folders(run)
    if not folders:
        raise L2ZOError(f"no TensorBoard event files under {run}; pass the meta-train --logdir folder")
    out: Scalars = {}
    for folder in folders:
        for tag, series in read_folder(folder)[0].items():
            out.setdefault(tag, {}).update(series)
    return out


def rolling(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (noisy per-step meta-losses read better smoothed)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def meta_tasks(scalars: Scalars) -> list[str]:
    """The meta-training tasks that logged a meta-loss, sorted."""
    return sorted(t.split("/", 2)[2] for t in scalars if t.startswith("meta/loss/"))


def plot_meta_curves(scalars: Scalars, out: Path, window: int = 20) -> None:
    """Write a 3-panel PNG to ``out`` (atomically): losses per task (rolling mean of ``window``), c, mean sigma."""
    fig = Figure(figsize=(15, 4))  # not pyplot's: no global figure state
    axes = fig.subplots(1, 3)
    for task in meta_tasks(scalars):
        for tag, style in ((f"meta/loss/{task}", "-"), (f"train/loss/{task}", ":")):
            steps = sorted(scalars.get(tag, {}))
            if steps:
                label = f"{task}: {'look-ahead meta-loss' if tag.startswith('meta') else 'trajectory loss'}"
                axes[0].plot(steps, rolling([scalars[tag][s] for s in steps], window), style, label=label)
    axes[0].set(xlabel="meta-step", ylabel=f"loss (rolling mean of {window})", title="meta-training losses")
    for ax, tag, title in ((axes[1], "meta/c", "normaliser c"), (axes[2], "meta/sigma_mean", "mean raw sigma")):
        steps = sorted(scalars.get(tag, {}))
        ax.plot(steps, [scalars[tag][s] for s in steps])
        ax.set(xlabel="meta-step", title=title)
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out)
