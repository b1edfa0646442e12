"""Runs read back from TensorBoard event files alone (plus folder names): the input of every table and plot.

``l2zo compare`` builds its tables from here too, not from ``summary.json``, so ``l2zo report`` on a
copied experiment folder reproduces them exactly. Each compare run also holds a small record (a JSON
text summary under ``RECORD_TAG``: label, optimizer, hyperparameters that ran, status, batch digest);
runs without one (e.g. from ``l2zo finetune``) are named after their folders and judged by their scalars.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2zo.errors import L2ZOError

RECORD_TAG = "l2zo/compare_record"
SCALAR_TAGS = ("val/loss", "val/acc", "test/loss", "test/acc", "train/step_time_s", "train/peak_mem_mb",
               "train/forward_passes")  # fmt: skip
DIVERGENCE_FACTOR = 10.0
_SEED_DIR = re.compile(r"^seed(\d+)$")

Series = list[tuple[int, float]]


@dataclass
class RunRecord:
    """One run (one optimizer configuration at one seed) as its events describe it."""

    label: str
    seed: int
    path: str  # relative to the experiment folder
    optimizer: str
    base: str
    sweep: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] | None = None  # None: not recorded (not a compare run)
    status: str = "ok"
    reason: str = ""
    order: int = 10**9  # position on the --optimizers list; unrecorded runs sort after, by label
    batch_digest: str | None = None
    forwards_per_step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, Series] = field(default_factory=dict)
    phase: str = "run"  # "tune": an lr-tuning run of ``--lr-grid`` (its own table, not a row of the comparison)
    tuned: dict[str, Any] = field(default_factory=dict)  # how its lr was tuned: grid, picked, tune_steps, tune_seed

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def series(self, tag: str) -> Series:
        return self.scalars.get(tag, [])

    def last(self, tag: str) -> float | None:
        s = self.series(tag)
        return s[-1][1] if s else None


def divergence_reason(dev: Series) -> str | None:
    """Why a dev-loss curve counts as diverged (non-finite, or above 10x the initial loss), else None."""
    if not dev:
        return None
    initial = dev[0][1]
    for step, loss in dev:
        if not math.isfinite(loss):
            return f"diverged: dev loss {loss} at step {step}"
        if math.isfinite(initial) and loss > DIVERGENCE_FACTOR * initial:
            return f"diverged: dev loss {loss:.4g} > {DIVERGENCE_FACTOR:g}x the initial {initial:.4g} at step {step}"
    return None


def _read_file(path: Path) -> tuple[dict[str, list[tuple[float, int, float]]], list[str]]:
    """(tag -> [(wall_time, step, value)], record texts) of one events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)] for t in tags.get("scalars", [])}
    records = []
    for tag in tags.get("tensors", []):  # SummaryWriter.add_text stores RECORD_TAG + "/text_summary"
        if tag == RECORD_TAG or tag.startswith(RECORD_TAG + "/"):
            for e in acc.Tensors(tag):
                records.extend(v.decode("utf-8") for v in e.tensor_proto.string_val)
    return scalars, records


def read_folder(folder: Path) -> tuple[dict[str, Series], list[str]]:
    """(tag -> [(step, value)] sorted by step, record texts) merged over every events file in ``folder``."""
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    texts: list[str] = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        scalars, records = _read_file(path)
        texts.extend(records)
        for tag, events in scalars.items():
            for wall, step, value in events:  # a re-logged step keeps its latest value
                old = merged.setdefault(tag, {}).get(step)
                if old is None or wall >= old[0]:
                    merged[tag][step] = (wall, float(value))
    return {t: sorted((s, v) for s, (_, v) in d.items()) for t, d in merged.items()}, texts


def read_run(folder: Path, root: Path) -> RunRecord:
    """Merge every events file in ``folder`` (Lightning's and the compare record's)."""
    scalars, texts = read_folder(folder)
    rel = folder.relative_to(root).as_posix() if folder != root else root.name
    m = _SEED_DIR.match(folder.name)
    parent = folder.parent.relative_to(root).as_posix() if folder.parent != root else root.name
    label = parent if m else rel
    optimizer = label.split("@")[0].split("/")[0]
    run = RunRecord(label=label, seed=int(m.group(1)) if m else 0, path=rel, optimizer=optimizer, base=label,
                    scalars=scalars)  # fmt: skip
    if texts:
        rec = json.loads(texts[-1])
        for key in ("label", "seed", "optimizer", "base", "sweep", "hparams", "status", "reason", "order",
                    "batch_digest", "forwards_per_step", "config", "phase", "tuned"):  # fmt: skip
            if key in rec:
                setattr(run, key, rec[key])
    else:
        _judge_unrecorded(run)
    return run


def _judge_unrecorded(run: RunRecord) -> None:
    """Status and forwards/step of a run without a compare record, from its scalars alone."""
    fp = run.series("train/forward_passes")
    if fp:
        run.forwards_per_step = int(round(fp[0][1] / (fp[0][0] + 1))) if fp[0][0] >= 0 else None
    reason = divergence_reason(run.series("val/loss"))
    if reason:
        run.status, run.reason = "failed", reason
    elif not run.series("test/acc"):
        run.status, run.reason = "failed", "incomplete: no test metrics in the events"


def find_run_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds TensorBoard events."""
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def load_experiment(root: str | Path) -> list[RunRecord]:
    """All runs under ``root``, in --optimizers order, then by seed."""
    root = Path(root)
    if _SEED_DIR.match(root.name) and any(root.glob("events.out.tfevents.*")):
        # One seed of a compare names its run by the folders above it, which are outside root.
        from l2zo.compare.run import EXPERIMENT_FILE

        above = next((p for p in root.parents if (p / EXPERIMENT_FILE).is_file()), root.parent.parent)
        raise L2ZOError(f"{root} is one run of a compare (a seed folder); give the experiment folder, e.g. {above}")
    runs = [read_run(folder, root) for folder in find_run_folders(root)]
    return sorted(runs, key=lambda r: (r.order, r.label, r.seed))
