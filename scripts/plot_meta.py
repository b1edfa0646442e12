"""Plot a meta-training run from its TensorBoard events: per-task meta-loss, the trajectory loss, c and mean sigma.

    python scripts/plot_meta.py runs/meta-train/smollm2-135m docs/results/meta-smollm2-135m.png [--window 20]

Reads every event file under the run folder (a resumed run has several; a step logged twice keeps the
last value) and writes one PNG atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file of ``run``, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"error: no TensorBoard event files under {run}; pass the meta-train --logdir folder")
    out: dict[str, dict[int, float]] = {}
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in ea.Scalars(tag)})
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the meta-train --logdir folder")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--window", type=int, default=20, help="rolling-mean window in meta-steps")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = read_scalars(a.run)
    tasks = sorted(t.split("/", 2)[2] for t in sc if t.startswith("meta/loss/"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for task in tasks:
        for tag, style in ((f"meta/loss/{task}", "-"), (f"train/loss/{task}", ":")):
            steps = sorted(sc.get(tag, {}))
            if steps:
                label = f"{task}: {'look-ahead meta-loss' if tag.startswith('meta') else 'trajectory loss'}"
                axes[0].plot(steps, rolling([sc[tag][s] for s in steps], a.window), style, label=label)
    axes[0].set(xlabel="meta-step", ylabel=f"loss (rolling mean of {a.window})", title="meta-training losses")
    for ax, tag, title in ((axes[1], "meta/c", "normaliser c"), (axes[2], "meta/sigma_mean", "mean raw sigma")):
        steps = sorted(sc.get(tag, {}))
        ax.plot(steps, [sc[tag][s] for s in steps])
        ax.set(xlabel="meta-step", title=title)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
