"""Rank meta-trained artifacts (e.g. one recipe's meta-seeds) by their probe-predicted gain on meta-training tasks.

    l2zo probe-blocks --model tiny --task synth-size --artifact A --artifact B ... --output runs/probe/synth-size
    (one probe per meta-training task, the same --artifact list in each), then
    python scripts/rank_artifacts.py runs/probe/synth-size runs/probe/synth-category ... [--out ranking.md]

Prints (and writes) one row per artifact, best first: R over MeZO per task and the score, the mean R over the
tasks whose start loss is above --min-loss (``l2zo.blockstats.select``). Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from l2zo.blockstats.select import rank_artifacts, ranking_table, task_loss
from l2zo.errors import L2ZOError
from l2zo.utils.io import write_text_atomic


def load_probe(folder: Path) -> dict:
    path = folder / "probe.json"
    if not path.is_file():
        raise L2ZOError(f"{folder} holds no probe.json: pass the --output folder of a finished `l2zo probe-blocks`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", type=Path, help="probe-blocks output folders, one per task")
    ap.add_argument("--min-loss", type=float, default=0.1, help="tasks with a start loss at or below it are left out")
    ap.add_argument("--curvature", choices=("fisher", "hessian"), default="fisher")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = ap.parse_args(argv)
    try:
        probes = [load_probe(p) for p in a.probes]
        scores, kept = rank_artifacts(probes, min_loss=a.min_loss, curvature=a.curvature)
    except L2ZOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    losses = {str(p["task"]): task_loss(p) for p in probes}
    text = (f"R ({a.curvature}) over MeZO per task; score = mean over the tasks with start loss > {a.min_loss}\n\n"
            f"{ranking_table(scores, kept, losses)}\n")  # fmt: skip
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
