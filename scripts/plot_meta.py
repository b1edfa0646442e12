"""Plot a meta-training run from its TensorBoard events: per-task meta-loss, the trajectory loss, c and mean sigma.

    python scripts/plot_meta.py runs/meta-train/smollm2-135m docs/results/meta-smollm2-135m.png [--window 20]

Reads every event file under the run folder (a resumed run has several; a step logged twice keeps the
last value) and writes one PNG atomically (:mod:`l2zo.compare.meta_curves`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l2zo.compare.meta_curves import plot_meta_curves, read_scalars
from l2zo.errors import L2ZOError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the meta-train --logdir folder")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--window", type=int, default=20, help="rolling-mean window in meta-steps")
    a = ap.parse_args()
    try:
        plot_meta_curves(read_scalars(a.run), a.out, a.window)
    except L2ZOError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
