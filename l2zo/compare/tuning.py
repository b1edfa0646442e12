"""The lr-tuning protocol of ``l2zo compare --lr-grid``: which lrs each optimizer tries, and which one wins.

Each optimizer runs every lr of its grid on the tuning seeds (``--tune-seeds``, default the first of
``--seeds``) with a short budget (``--tune-steps``). An lr scores the mean over those seeds of its final (or
best, ``--select``) dev loss; an lr whose run failed or diverged on any tuning seed is out, since an lr at the
edge of stability that happens to survive one seed blows up on others. The lowest score is picked; then
every seed runs the full budget with it. Nothing here looks at test data.

``--lr-tolerance R`` picks the smallest lr whose dev-loss decrease (from the step-0 dev loss) is within a
fraction R of the best one's: a ZO run's loss falls off a cliff one factor-2 step above its best lr, and a
best lr that gains a few percent over the next smaller one sits at that cliff, where some evaluation seeds
diverge that the tuning seeds survived. The rule is the one-standard-error rule of model selection in
spirit (of near-equal scores, take the safer choice), measured on the decrease so that a loss floor does
not set the scale. R = 0 (the default) is the plain lowest score.

Grid text: ``1e-5,2e-5,5e-5`` (every optimizer), ``mezo=1e-5,2e-5;learned=5e-5,1e-4`` (per run label or
optimizer name; a label wins over its optimizer's name), or both (``1e-5,2e-5;learned=5e-5,1e-4``: the
bare list for the optimizers not named). In YAML: a list, or a mapping name -> list (``default`` for
the others). An optimizer that no grid covers keeps its lr and is reported as not tuned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from l2zo.config import parse_scalar
from l2zo.errors import L2ZOError

DEFAULT_KEY = "default"  # the YAML mapping's key for the grid of the optimizers it does not name
TUNE_DIR = "tune"  # tuning runs live in LOGDIR/tune/<label>/lr=<lr>/seed<k>/

GridValue = list[Any] | dict[str, Any] | str | None


def _values(raw: Any, where: str) -> list[float]:
    items = raw if isinstance(raw, list) else [raw] if not isinstance(raw, str) else raw.split(",")
    out: list[float] = []
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                continue
            item = parse_scalar(item)
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item <= 0:
            raise L2ZOError(f"bad --lr-grid {where}: {item!r} is not a positive number (e.g. --lr-grid 1e-5,2e-5,5e-5)")
        out.append(float(item))
    if not out:
        raise L2ZOError(f"bad --lr-grid {where}: no values; give e.g. 1e-5,2e-5,5e-5")
    if len(set(out)) != len(out):
        raise L2ZOError(f"bad --lr-grid {where}: a value repeats")
    return sorted(out)


def parse_grid_text(value: GridValue) -> dict[str, list[float]]:
    """The grid as name -> sorted lrs (``DEFAULT_KEY`` for the bare list); {} without a grid."""
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, list):
        return {DEFAULT_KEY: _values(value, "list")}
    if isinstance(value, dict):
        return {str(k).strip(): _values(v, f"entry {k!r}") for k, v in value.items()}
    out: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in value.split(";"))):
        key, values = part.rsplit("=", 1) if "=" in part else (DEFAULT_KEY, part)  # labels may hold '='
        key = key.strip()
        if key in out:
            raise L2ZOError(f"bad --lr-grid {value!r}: {key!r} is given twice")
        out[key] = _values(values, repr(part))
    return out


def grids_for(value: GridValue, labels: Sequence[str], optimizer_of: Mapping[str, str]) -> dict[str, list[float]]:
    """Run label -> its lr grid, for the labels a grid covers (a label's own entry, else its optimizer's, else
    the default). A key that names neither a label nor an optimizer of the compare is refused."""
    grid = parse_grid_text(value)
    names = set(labels) | set(optimizer_of.values())
    unknown = sorted(set(grid) - names - {DEFAULT_KEY})
    if unknown:
        raise L2ZOError(f"--lr-grid names {', '.join(map(repr, unknown))}, not an optimizer of this compare "
                        f"(they are: {', '.join(labels)})")  # fmt: skip
    out = {}
    for label in labels:
        for key in (label, optimizer_of[label], DEFAULT_KEY):
            if key in grid:
                out[label] = grid[key]
                break
    return out


@dataclass(frozen=True)
class TunePoint:
    """One tuning run: its lr, its dev-loss score (final or best; None: no dev loss), whether it finished ok,
    and its dev loss at step 0 (None: not evaluated there; ``--lr-tolerance`` needs it)."""

    lr: float
    score: float | None
    ok: bool
    start: float | None = None


def pool_seeds(runs: Sequence[TunePoint]) -> list[TunePoint]:
    """One point per lr from its runs on the tuning seeds (``runs`` holds a point per run): the mean score, ok
    only when every one of its runs finished ok with a finite score. Sorted by lr."""
    by_lr: dict[float, list[TunePoint]] = {}
    for p in runs:
        by_lr.setdefault(p.lr, []).append(p)
    out = []
    for lr, ps in sorted(by_lr.items()):
        scores = [p.score for p in ps if p.score is not None and math.isfinite(p.score)]
        ok = all(p.ok for p in ps) and len(scores) == len(ps)
        starts = [p.start for p in ps if p.start is not None and math.isfinite(p.start)]
        start = sum(starts) / len(starts) if len(starts) == len(ps) else None
        out.append(TunePoint(lr, sum(scores) / len(scores) if ok else None, ok, start))
    return out


def pick_lr(points: Sequence[TunePoint], tolerance: float = 0.0) -> float | None:
    """The lr of the lowest score among the runs that finished ok (a failed or diverged run never wins; a tie
    goes to the smaller lr); None when no run finished.

    ``tolerance`` R in [0, 1): the smallest ok lr whose decrease ``start - score`` is at least (1 - R) times
    the best one's (the start: the best point's step-0 dev loss). Without a start, or where the best lr did
    not lower the loss, the lowest score wins as with R = 0.
    """
    scored = [(p.score, p.lr, p.start) for p in points if p.ok and p.score is not None and math.isfinite(p.score)]
    if not scored:
        return None
    best_score, best_lr, start = min(scored, key=lambda t: t[:2])
    if tolerance <= 0 or start is None or not start > best_score:
        return best_lr
    floor = (1.0 - tolerance) * (start - best_score)
    return min(lr for score, lr, _ in scored if start - score >= floor)


def check_tolerance(tolerance: float) -> None:
    """``--lr-tolerance`` is a fraction of the best decrease: 0 <= R < 1."""
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0):
        raise L2ZOError(f"--lr-tolerance must be in [0, 1) (a fraction of the best lr's dev-loss decrease, e.g. "
                        f"0.05), got {tolerance!r}")  # fmt: skip


def at_edge(lr: float, grid: Sequence[float]) -> bool:
    """Whether a picked lr is the grid's smallest or largest (then the grid should be widened), for grids of 2+."""
    return len(grid) > 1 and lr in (min(grid), max(grid))
