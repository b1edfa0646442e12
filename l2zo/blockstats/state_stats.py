"""Per-block statistics at one state of a meta-training trajectory, for the ``expected`` and ``distill`` objectives.

One meta-step measures, at the current theta and with everything detached (constants of the meta-objective):
G_b and the noise from two independent train batches (the step's first inner batch and a second one drawn by
``stats_draws``), tau_b by Hutchinson HVPs and, where the loss gives sampled labels, the Fisher. It reuses
``measure_pair`` / ``combine`` / ``curvature_stats``: one pair, so the standard errors are nan.

The second batch and the probes' seed are a pure function of (seed, step), drawn from their own random stream:
the step plan of the other objectives (``l2zo.learned.meta.plan_step``) is unchanged, and a resumed run replays
the same statistics. The two batches are drawn independently (they may share examples), which is what makes
<g^(a)_b, g^(b)_b> unbiased for ||grad_b L||^2.

This module lives in ``l2zo.blockstats`` rather than ``l2zo.learned``: blockstats already depends on the
optimizers (``allocations``), which depend on ``l2zo.learned``, so ``l2zo.learned`` cannot import it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from l2zo.blockstats.probe import curvature_stats
from l2zo.blockstats.stats import BatchFns, BlockStats, combine, measure_pair
from l2zo.engine import Block, eval_mode, mix_seed
from l2zo.errors import L2ZOError

ModelLike = Callable[..., Any]
LossFn = Callable[[ModelLike], Tensor]  # loss_fn(model_like) -> fp32 scalar (l2zo.learned.meta.LossFn)
SampledFn = Callable[[ModelLike, torch.Generator], Tensor]  # the loss at labels drawn from the model (Fisher)

CURVATURES: tuple[str, ...] = ("auto", "fisher", "hessian")
_STATS_STREAM = 0x53544154  # "STAT": the second batch's random stream, apart from plan_step's
_PROBE_STREAM = 0x48565053  # "HVPS": the seed of the Rademacher probes and sampled labels


@dataclass(frozen=True)
class StatsSpec:
    """How much to measure per meta-step (the names of ``l2zo probe-blocks``; its defaults are for a one-off
    measurement, these for one per meta-step, where the meta-optimizer averages over steps).

    Attributes:
        probes: Hutchinson probes for tau (HVPs), >= 1.
        gHg_probes: sign-mixed HVPs for g^T H g (the two-scale model's curvature along the gradient), >= 1.
        fisher_samples: sampled label sets per batch (forward-backwards) for the Fisher; 0: none.
        curvature: "auto" (the Fisher where the loss gives sampled labels, else the Hessian), "fisher", "hessian".
    """

    probes: int = 1
    gHg_probes: int = 1
    fisher_samples: int = 1
    curvature: str = "auto"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise L2ZOError(f"bad curvature {self.curvature!r}; valid choices: {', '.join(CURVATURES)}")
        if self.probes < 1 or self.gHg_probes < 1 or self.fisher_samples < 0:
            raise L2ZOError(f"need >= 1 Hutchinson probe, >= 1 gHg probe and >= 0 Fisher samples, got {self.probes}, "
                            f"{self.gHg_probes} and {self.fisher_samples}")  # fmt: skip
        if self.curvature == "fisher" and self.fisher_samples < 1:
            raise L2ZOError("curvature 'fisher' needs >= 1 Fisher sample per batch; raise the Fisher samples")


@dataclass(frozen=True)
class StatsDraws:
    """The random choices of one meta-step's statistics: the second batch's train indices and the probes' seed."""

    second: tuple[int, ...]
    seed: int


def stats_draws(seed: int, step: int, num_train: int, batch_size: int) -> StatsDraws:
    """Meta-step ``step``'s second batch (``batch_size`` distinct indices into the task's train split, drawn
    independently of the first) and probe seed: a pure function of (seed, step)."""
    rng = random.Random(mix_seed(seed, step, _STATS_STREAM))
    second = tuple(rng.sample(range(num_train), min(batch_size, num_train)))
    return StatsDraws(second=second, seed=mix_seed(seed, step, _PROBE_STREAM))


def batch_fns(model: nn.Module, loss: LossFn, batch_size: int, sampled: SampledFn | None = None) -> BatchFns:
    """``BatchFns`` of ``model`` from meta-training's loss closures (which take the model as argument)."""
    return BatchFns(
        loss=lambda: loss(model),
        sampled_loss=None if sampled is None else (lambda gen: sampled(model, gen)),
        batch_size=batch_size,
    )


def sampled_label_loss(scores: Callable[[ModelLike], Tensor]) -> SampledFn:
    """The classification loss at labels drawn from the model's own candidate distribution (the Fisher's labels).

    ``scores(model)`` gives the [B, C] candidate scores whose cross-entropy is the training loss
    (``CandidateScorer.candidate_scores``); -inf marks a missing candidate.
    """

    def loss(model: ModelLike, gen: torch.Generator) -> Tensor:
        s = scores(model)  # [B, C]
        probs = torch.softmax(s.detach().double().cpu(), dim=-1)
        y = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(s.device)
        return torch.nn.functional.cross_entropy(s, y)

    return loss


def measure_state(model: nn.Module, blocks: list[Block], a: BatchFns, b: BatchFns, spec: StatsSpec,
                  seed: int) -> BlockStats:  # fmt: skip
    """``BlockStats`` of one batch pair at the current parameters, in the curvature ``spec`` asks for.

    Dropout off (eval mode); the parameters are unchanged and receive no ``.grad``. Cost: 2 forward-backwards
    with double-backward graphs, ``probes + gHg_probes`` HVPs and ``2 * fisher_samples`` forward-backwards
    (none when the curvature is the Hessian).
    """
    fisher = 0 if spec.curvature == "hessian" or a.sampled_loss is None else spec.fisher_samples
    with eval_mode(model):
        sample = measure_pair(blocks, a, b, probes=spec.probes, gHg_probes=spec.gHg_probes, fisher_samples=fisher,
                              seed=seed)  # fmt: skip
    return curvature_stats(combine(blocks, [sample]), spec.curvature)
