"""The ``expected`` meta-objective: the z-free K-step expected loss of the block-quadratic model (issue 15, 2a).

At trajectory state theta, with per-block statistics measured there (``state_stats.measure_state``: G_b, the
noise, tau_b or the Fisher, g^T H g; all detached constants):

    s      = normalize(net(features(theta)))      [B], the normalisation IN the graph (c is not detached)
    w      = s^2
    L_meta = sum_b E[f_K,b](w, eta) / sum_b f0_b    the two-scale block quadratic (``gain.QuadraticModel``),
                                                     K = ``horizon`` ZO steps in closed form (``gain.kstep_loss``)

No z and no look-ahead forward: the expectation over z is taken in closed form, so the meta-gradient has no
sampling noise beyond that of the statistics.

Step size. ``eta=None`` (the default, "tuned") re-tunes eta for the net's current allocation at every meta-step
(``gain.tune_eta``, detached). Why: (1) it makes the objective depend only on the *relative* allocation: the
closed form depends on eta and w only through eta * w, so with eta tuned, scaling s changes nothing, and the
loss ratio is also invariant to scaling the loss (G ~ a^2, tau ~ a, f ~ a): every state and task of the family
is on one scale; (2) with a fixed eta, any allocation with a smaller curvature term T looks better just because
it takes a safer step (learning-signal.md, section 6), and a fixed eta that is fine at one state diverges at
another (the model's f_K then explodes and its gradient says only "be safer"); (3) it is what the evaluation
measures: each optimizer at its own tuned lr. Detaching the tuned eta loses nothing to first order: at the
optimum dL/deta = 0 (envelope theorem). A fixed ``eta`` (the config's ``inner_lr``) is available for ablation.

The objective is well posed: over the normalised allocations (a compact set) the relative K-step loss is
continuous and in (0, 1] at the tuned eta (eta -> 0 gives 1), and the noise term keeps it away from 0. Dividing
by f0 (a constant of the state) only weights states and tasks equally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from l2zo.blockstats.gain import QuadraticModel, kstep_loss, normalize, tune_eta
from l2zo.blockstats.stats import BlockStats
from l2zo.engine import Block, Probe, ZSource, eval_mode, two_point_estimate
from l2zo.errors import L2ZOError
from l2zo.learned.meta import LossFn, MetaResult, SigmaNorm, SigmaOut, TaskState, predict_sigma
from l2zo.learned.net import VarianceNet


@dataclass(frozen=True)
class ExpectedLoss:
    """One evaluation of the relative K-step expected loss.

    Attributes:
        loss: 0-dim float64 sum_b E[f_K,b] / sum_b f0_b, with a graph into the allocation (0 and no signal when
            the state has none: every G_b <= 0, or no positive curvature estimate).
        eta: the step size used (tuned or given); nan without signal.
        f0: the model's initial excess loss sum_b f0_b.
    """

    loss: Tensor
    eta: float
    f0: float


def in_graph_sigma(raw: Tensor, norm: SigmaNorm) -> Tensor:
    """[B] float64 c * raw with c = sqrt(sum n / sum n raw^2) differentiable (rule "none": raw itself)."""
    raw = raw.to(torch.float64)
    return raw if norm.rule == "none" else normalize(raw, norm.n)


def has_signal(stats: BlockStats) -> bool:
    """Whether the block quadratic can be built: some G_b > 0 and some positive curvature estimate."""
    return bool((stats.G > 0).any()) and bool((stats.tau > 0).any())


def expected_loss(s: Tensor, stats: BlockStats, *, horizon: int, eta: float | None = None) -> ExpectedLoss:
    """The relative K-step expected loss of allocation ``s`` [B] (differentiable in s) on ``stats``' model.

    Args:
        s: per-block scales (any dtype; used in float64).
        stats: the state's statistics, in the curvature to use (``curvature_stats``).
        horizon: K, the number of ZO steps (>= 1).
        eta: the ZO step size, or None to re-tune it for ``s`` (detached, see the module docstring).
    """
    if horizon < 1:
        raise L2ZOError(f"the expected objective's horizon must be >= 1, got {horizon}")
    w = s.to(torch.float64) ** 2
    if not has_signal(stats):
        return ExpectedLoss(loss=(w * 0.0).sum(), eta=math.nan, f0=0.0)
    quad = QuadraticModel.from_stats(stats)
    f0 = float(quad.f0.sum())
    if not f0 > 0:
        return ExpectedLoss(loss=(w * 0.0).sum(), eta=math.nan, f0=0.0)
    step = tune_eta(w.detach(), quad, horizon) if eta is None else float(eta)
    return ExpectedLoss(loss=kstep_loss(w, step, quad, horizon).sum() / f0, eta=step, f0=f0)


def zo_probe(model: nn.Module, blocks: Sequence[Block], sig: SigmaOut, inner: LossFn, *, seed: int, eps: float,
             zsrc: ZSource) -> Probe:  # fmt: skip
    """The ZO probe at theta with the net's sigma (what ``TaskState.record`` and an on-policy step use): the same
    probe as ``greedy_meta_loss`` takes; theta is restored (to an ulp) on return."""
    with eval_mode(model):
        probe = two_point_estimate(lambda: inner(model), blocks, seed, eps, zsrc, sig.eff.detach().tolist())
    if not math.isfinite(probe.projected_grad):
        raise L2ZOError(f"non-finite ZO loss during the meta-step's probe (L+={float(probe.loss_plus):.4g}, "
                        f"L-={float(probe.loss_minus):.4g}); lower --inner-lr, --teacher-lr or --eps")  # fmt: skip
    return probe


def expected_meta_loss(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState,
                       norm: SigmaNorm, inner: LossFn, stats: BlockStats, *, seed: int, eps: float, zsrc: ZSource,
                       horizon: int, eta: float | None = None) -> tuple[MetaResult, ExpectedLoss]:  # fmt: skip
    """The ``expected`` objective at the model's current weights (see the module docstring).

    ``stats`` are the state's statistics (``measure_state``); ``inner`` the first batch's loss, on which the ZO
    probe at theta is taken (for the recurrent state and an on-policy step, as the greedy objective does).
    Returns the ``MetaResult`` (meta-loss float64 with a graph into the net) and the evaluation's details.
    """
    sig = predict_sigma(net, blocks, state, norm)
    probe = zo_probe(model, blocks, sig, inner, seed=seed, eps=eps, zsrc=zsrc)
    out = expected_loss(in_graph_sigma(sig.raw, norm), stats, horizon=horizon, eta=eta)
    return MetaResult(meta_loss=out.loss, probe=probe, sigma=sig), out
