"""Which lr picks of finished compares another pick rule would move: `l2zo compare --lr-tolerance R` applied to
the tuning runs already on disk (nothing runs).

    python scripts/lr_tolerance.py docs/results/heldout-smollm2/compares/*/* --tolerance 0.05

Prints one markdown row per tuned optimizer of each compare folder: the lr its runs ran at, the lowest-score
pick and the rule's (:func:`l2zo.compare.protocol.repick`), a moved pick in bold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2zo.compare.events import load_experiment
from l2zo.compare.protocol import repick
from l2zo.compare.run import EXPERIMENT_FILE
from l2zo.compare.tuning import check_tolerance
from l2zo.errors import L2ZOError


def table(roots: list[Path], tolerance: float) -> str:
    """The rows, then how many of the picks the rule moves (the lowest-score pick against the rule's)."""
    lines = [f"| compare | optimizer | lr its runs ran at | lowest-score pick | pick at --lr-tolerance {tolerance:g} |",
             "|---|---|---|---|---|"]  # fmt: skip
    moved = total = 0
    for root in roots:
        for base, (ran, best, safe) in repick(load_experiment(root), tolerance).items():
            total += 1
            moved += best != safe
            cells = ["not yet" if ran is None else f"{ran:g}", "none" if best is None else f"{best:g}",
                     "none" if safe is None else f"**{safe:g}**" if safe != best else f"{safe:g}"]  # fmt: skip
            lines.append(f"| {root} | {base} | {' | '.join(cells)} |")
    return "\n".join([*lines, "", f"{moved} of {total} picks move."]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path, help="compare folders (each holds compare.json)")
    ap.add_argument("--tolerance", type=float, required=True)
    a = ap.parse_args(argv)
    try:
        check_tolerance(a.tolerance)
        roots = [r for r in a.roots if (r / EXPERIMENT_FILE).is_file()]
        if not roots:
            raise L2ZOError(f"no compare folder among {', '.join(map(str, a.roots))} (none holds {EXPERIMENT_FILE})")
        print(table(roots, a.tolerance), end="")
    except L2ZOError as exc:
        print(f"lr_tolerance: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
