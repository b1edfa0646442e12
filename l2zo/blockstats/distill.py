"""The ``distill`` meta-objective: regress log sigma onto an oracle allocation at meta-training states (issue 15, 2c).

At trajectory state theta, with the statistics measured there (``state_stats.measure_state``):

    s*     = oracle(stats)                                 ``gsl`` (default, temperature 1/2), ``hizoo`` or
                                                           ``water-filling`` from ``l2zo.blockstats.oracles``
    t      = max(s*, floor), renormalised with the optimizer's block weights n (sum n t^2 = sum n)
    s      = normalize(net(features(theta)))               c in the graph (as the deployed optimizer scales it)
    L_meta = mean_b (log s_b - log t_b)^2                  uniform weights over blocks

Both sides are normalised by the same rule and weights, so only the relative allocation is regressed (a common
factor of the net's output is free, as it is at deployment). Default oracle: GS-L at temperature 1/2, the best
measured allocation on the tiny world (docs/results/probe-blocks/tiny).

Why uniform weights over blocks. The net outputs one sigma per block, and the loss is on log sigma, i.e. on
relative errors: a factor of 2 on any block changes that block's perturbation energy by the same factor 4.
Weighting by n_b (the energy share at MeZO) would let the few large matrices and the embedding decide the fit
and leave the small blocks (norm gains, biases; a third of the blocks) effectively untrained, and their sigma
can then take energy arbitrarily (the normalisation counts them little, the ZO step does not care). Weighting by
the oracle's energy share would ignore the blocks the oracle starves, which is exactly where a wrong sigma costs
most (the oracle starves them because they are expensive: high curvature per unit of gradient).

Why a floor. A block with G_b <= 0 (its signal below the noise at this state) gets s* = 0 from GS-L, whose log is
-inf; single-pair statistics are noisy, so unfloored log targets would be dominated by such blocks. The floor
(default 1e-2, i.e. at most a 1e4-fold cut of a block's energy relative to MeZO) bounds each block's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from l2zo.blockstats.expected import in_graph_sigma, zo_probe
from l2zo.blockstats.gain import normalize
from l2zo.blockstats.oracles import gsl, hizoo, water_filling, water_filling_eta
from l2zo.blockstats.stats import BlockStats
from l2zo.engine import Block, ZSource
from l2zo.errors import L2ZOError
from l2zo.learned.meta import LossFn, MetaResult, SigmaNorm, TaskState, predict_sigma
from l2zo.learned.net import VarianceNet

ORACLES: tuple[str, ...] = ("gsl", "hizoo", "water-filling")


@dataclass(frozen=True)
class OracleSpec:
    """Which oracle allocation to distill, and its parameter.

    Attributes:
        oracle: "gsl" (s_b^2 ~ (G_b / tau_b)^(1/temperature)), "hizoo" (s_b^2 ~ (n_b / tau_b)^gamma) or
            "water-filling" (the one-step optimum at a fixed eta).
        temperature: GS-L's temperature (> 0).
        gamma: HiZOO's exponent (>= 0).
        wf_eta: water-filling's eta, or None for MeZO's one-step optimal eta at the state.
        floor: the smallest target scale, relative to MeZO's 1 (> 0).
    """

    oracle: str = "gsl"
    temperature: float = 0.5
    gamma: float = 1.0
    wf_eta: float | None = None
    floor: float = 1e-2

    def __post_init__(self) -> None:
        if self.oracle not in ORACLES:
            raise L2ZOError(f"bad distill oracle {self.oracle!r}; valid choices: {', '.join(ORACLES)}")
        if not self.temperature > 0 or not self.gamma >= 0 or not self.floor > 0:
            raise L2ZOError(f"the distill oracle needs temperature > 0, gamma >= 0 and floor > 0, got "
                            f"{self.temperature}, {self.gamma} and {self.floor}")  # fmt: skip
        if self.wf_eta is not None and not self.wf_eta > 0:
            raise L2ZOError(f"the water-filling eta must be > 0, got {self.wf_eta}")


def oracle_allocation(stats: BlockStats, spec: OracleSpec) -> Tensor | None:
    """[B] float64 the oracle's normalised allocation (sum numel s^2 = sum numel), or None where the state gives
    it no signal (no block with G_b > 0, no positive curvature, or no positive one-step eta for water-filling)."""
    if not bool((stats.G > 0).any()) or not bool((stats.tau > 0).any()):
        return None
    if spec.oracle == "gsl":
        return gsl(stats, spec.temperature)
    if spec.oracle == "hizoo":
        return hizoo(stats, spec.gamma)
    eta = water_filling_eta(stats, spec.wf_eta)
    return None if eta is None else water_filling(stats, eta)


def distill_target(s_star: Tensor, norm: SigmaNorm, floor: float) -> Tensor:
    """[B] float64 the regression target: ``s_star`` floored, then normalised with the optimizer's weights n."""
    return normalize(s_star.to(torch.float64).clamp_min(floor), norm.n)


def distill_loss(raw: Tensor, target: Tensor, norm: SigmaNorm) -> Tensor:
    """0-dim float64 mean_b (log s_b - log t_b)^2 with s = the net's ``raw`` [B] normalised in the graph."""
    s = in_graph_sigma(raw, norm)
    diff = torch.log(s.clamp_min(1e-30)) - torch.log(target.to(s))
    return (diff * diff).mean()


def distill_meta_loss(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState,
                      norm: SigmaNorm, inner: LossFn, stats: BlockStats, *, seed: int, eps: float, zsrc: ZSource,
                      oracle: OracleSpec) -> tuple[MetaResult, Tensor | None]:  # fmt: skip
    """The ``distill`` objective at the model's current weights (see the module docstring).

    Returns the ``MetaResult`` (meta-loss float64 with a graph into the net; 0 with a zero gradient where the
    state gives the oracle no signal) and the target t [B] (None then).
    """
    sig = predict_sigma(net, blocks, state, norm)
    probe = zo_probe(model, blocks, sig, inner, seed=seed, eps=eps, zsrc=zsrc)
    s_star = oracle_allocation(stats, oracle)
    if s_star is None:
        return MetaResult(meta_loss=(sig.raw.to(torch.float64) * 0.0).sum(), probe=probe, sigma=sig), None
    target = distill_target(s_star, norm, oracle.floor)
    return MetaResult(meta_loss=distill_loss(sig.raw, target, norm), probe=probe, sigma=sig), target
