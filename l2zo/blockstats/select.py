"""Rank meta-trained artifacts by their predicted gain on meta-training tasks: meta-seed selection without held-out data.

The greedy recipe's held-out result depends on the meta-seed (EVALUATION.md §0b): the same recipe gives nets that
beat MeZO and nets that lose to it. Picking among them on a held-out task is selecting on the test. What is left
is the probe (``l2zo probe-blocks``) run on the *meta-training* tasks: per task, each artifact's one-step gain over
MeZO, R = A^2 / (2((A+V)T + 2Bq)) relative to MeZO's, from per-block gradient and curvature statistics. A task
whose state-0 loss is already near zero carries no gradient signal (its R ranks noise), so it is left out.

Pure functions over the probe.json dicts that ``l2zo.cli.probe_blocks_cmd`` writes; no model code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from l2zo.errors import L2ZOError


@dataclass(frozen=True)
class ArtifactScore:
    """One artifact's score: the mean R over the kept tasks, and R per task (kept or not).

    Attributes:
        artifact: the artifact folder as the probes name it.
        score: mean over the kept tasks of R (the chosen curvature); nan where no task was kept.
        per_task: task -> R, for every probe.
    """

    artifact: str
    score: float
    per_task: dict[str, float]


def artifact_tag(i: int, n: int) -> str:
    """The probe's label suffix of the i-th (0-based) of n artifacts: none for one artifact, else "-1", "-2", ..."""
    return "" if n == 1 else f"-{i + 1}"


def task_loss(probe: Mapping[str, Any]) -> float:
    """The probe's minibatch loss at its first measured state (the start of the MeZO trajectory)."""
    states = probe["states"]
    first = min(states, key=int)
    return float(states[first]["loss"])


def artifact_r(probe: Mapping[str, Any], curvature: str = "fisher") -> dict[str, float]:
    """artifact folder -> its R over MeZO in one probe (pooled over the probe's states).

    The probe labels the artifacts ``learned`` (one) or ``learned-1``, ``learned-2``, ... (``artifact_tag``), in the
    order of ``config.artifacts``, which gives the folders.
    """
    table = probe["allocations"].get(curvature) or {}
    if not table:
        raise L2ZOError(f"probe of task {probe.get('task')!r} has no {curvature} allocations; "
                        f"use --curvature hessian or re-run the probe with a task that allows the Fisher")  # fmt: skip
    folders = probe["config"]["artifacts"]
    return {str(f): float(table[f"learned{artifact_tag(i, len(folders))}"]["R"]) for i, f in enumerate(folders)}


def rank_artifacts(
    probes: Sequence[Mapping[str, Any]], *, min_loss: float = 0.1, curvature: str = "fisher"
) -> tuple[list[ArtifactScore], list[str]]:
    """Score every artifact by its mean R over the probes whose start loss exceeds ``min_loss``; best first.

    Args:
        probes: probe.json dicts of one model, one per task, each scoring the same artifacts.
        min_loss: a task whose state-0 loss is at or below this is saturated and left out of the score.
        curvature: "fisher" or "hessian": which R of the probe.
    Returns:
        (scores sorted by score, highest first; the tasks kept).
    """
    if not probes:
        raise L2ZOError("no probe to rank artifacts with: pass at least one probe-blocks output folder")
    per_probe = [artifact_r(p, curvature) for p in probes]
    folders = list(per_probe[0])
    for p, r in zip(probes, per_probe, strict=True):
        if sorted(r) != sorted(folders):
            raise L2ZOError(f"probe of task {p.get('task')!r} scores other artifacts ({sorted(r)}) than the first "
                            f"({sorted(folders)}); re-score it with `l2zo probe-blocks --resume` and the same --artifact list")  # fmt: skip
    tasks = [str(p["task"]) for p in probes]
    if len(set(tasks)) != len(tasks):
        raise L2ZOError(f"two probes of the same task among {tasks}: pass one probe per task")
    kept = [t for t, p in zip(tasks, probes, strict=True) if task_loss(p) > min_loss]
    scores = []
    for folder in folders:
        per_task = {t: r[folder] for t, r in zip(tasks, per_probe, strict=True)}
        score = sum(per_task[t] for t in kept) / len(kept) if kept else math.nan
        scores.append(ArtifactScore(folder, score, per_task))
    scores.sort(key=lambda s: -math.inf if math.isnan(s.score) else s.score, reverse=True)
    return scores, kept


def ranking_table(scores: Sequence[ArtifactScore], kept: Sequence[str], losses: Mapping[str, float]) -> str:
    """Markdown: one row per artifact (best first), R per task (left-out tasks marked), the score."""
    tasks = list(losses)
    head = ["artifact", *[f"{t} (loss {losses[t]:.3g}{'' if t in kept else ', left out'})" for t in tasks], "score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scores:
        cells = [f"{s.per_task[t]:.3g}" for t in tasks]
        lines.append("| " + " | ".join([f"`{s.artifact}`", *cells, f"**{s.score:.3g}**"]) + " |")
    return "\n".join(lines)
