"""The ``static_curvature`` feature of ``l2zo.learned.features``: per-element curvature of each block, measured once
per base model (here, not in ``l2zo.learned``, which the blockstats package sits above).

At the start of meta-training, on the pretrained weights and the meta-training tasks' train batches,
``l2zo.blockstats`` measures per block tau_b = tr(H_bb) (Hutchinson) or F_b = tr(F_bb) (the Fisher, for
classification losses: positive, and resolved where Hutchinson's tau often is not). The feature is

    l_b = curvature_b / n_b         (per element; ``positive_curvature`` floors it at 1e-3 x the median positive one)
    x_b = log l_b - mean_c log l_c  (relative across the model's blocks: scale-free, centred)

stored in the net (``VarianceNet.static_curvature``), so the artifact carries it and the learned optimizer
needs no extra forward at fine-tuning time. SensZOQ and the dominant-layer reports find such per-block
sensitivity model-specific and task-agnostic: one measurement serves every task of the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from l2zo.blockstats.gain import positive_curvature
from l2zo.blockstats.probe import _Batches
from l2zo.blockstats.stats import PairSample, combine, measure_pair
from l2zo.engine.blocks import Block
from l2zo.engine.modes import eval_mode
from l2zo.errors import L2ZOError


@dataclass(frozen=True)
class CurvatureTask:
    """One task's train examples and loss kind (``Task.loss_kind``): what the measurement draws batches from."""

    name: str
    loss_kind: str
    train: list[Any]


@dataclass(frozen=True)
class StaticCurvature:
    """The measured feature and its record.

    Attributes:
        feature: [B] fp32 x_b (module docstring), what the net sees.
        per_element: [B] fp64 l_b, floored.
        kind: "fisher" or "hessian".
        pairs: batch pairs measured, over all tasks.
    """

    feature: Tensor
    per_element: Tensor
    kind: str
    pairs: int

    def record(self) -> dict[str, Any]:
        """For the artifact's manifest (meta_training.static_curvature)."""
        return {"kind": self.kind, "pairs": self.pairs, "per_element": self.per_element.tolist(),
                "feature": self.feature.tolist()}  # fmt: skip


def curvature_feature(curvature: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """(x [B] fp32, l [B] fp64) from per-block traces ``curvature`` [B] and block sizes ``n`` [B]."""
    per_element = positive_curvature(curvature.double(), n.double())
    logs = per_element.log()
    return (logs - logs.mean()).float(), per_element


def measure_static_curvature(model: nn.Module, blocks: Sequence[Block], tasks: Sequence[CurvatureTask], scorer: Any,
                             *, kind: str, batch_size: int, pairs: int = 2, probes: int = 8, fisher_samples: int = 2,
                             seed: int = 0) -> StaticCurvature:  # fmt: skip
    """Measure ``kind`` curvature with ``pairs`` independent batch pairs per task at the model's current weights.

    Args:
        scorer: the ``CandidateScorer`` (collates examples, gives the task loss and the candidate scores).
        kind: "fisher" (needs classification tasks: labels are sampled from the model) or "hessian".
        probes: Hutchinson probes per pair (hessian); fisher_samples: sampled label sets per batch (fisher).
    """
    if kind not in ("fisher", "hessian"):
        raise L2ZOError(f"static curvature kind must be fisher or hessian, got {kind!r}")
    if kind == "fisher":
        other = [t.name for t in tasks if t.loss_kind != "classification"]
        if other:
            raise L2ZOError(f"--feature-curvature fisher needs classification tasks (labels drawn from the model); "
                            f"{', '.join(other)} are not: use --feature-curvature hessian")  # fmt: skip
    if pairs < 1:
        raise L2ZOError(f"--feature-curvature-pairs must be >= 1, got {pairs}")
    device = blocks[0].param.device
    samples: list[PairSample] = []
    with eval_mode(model):
        for i, task in enumerate(tasks):
            batches = _Batches(task.train, scorer, task.loss_kind, batch_size, seed + 7919 * i, device)
            for k in range(pairs):
                a, b = batches.draw(model), batches.draw(model)
                samples.append(measure_pair(blocks, a, b, probes=probes if kind == "hessian" else 1, gHg_probes=1,
                                            fisher_samples=fisher_samples if kind == "fisher" else 0,
                                            seed=seed + 104729 * i + k))  # fmt: skip
    stats = combine(blocks, samples)
    trace = stats.fisher if kind == "fisher" else stats.tau
    feature, per_element = curvature_feature(trace, stats.n)
    return StaticCurvature(feature=feature, per_element=per_element, kind=kind, pairs=len(samples))
