"""The allocation that maximises the K-step prediction directly, on one task's statistics or on several tasks' at once.

The GS-L oracle (``oracles.gsl``) is the optimum of the *one-step* gain with eta re-tuned, tempered by hand. On the
tiny world the K-step prediction R_K (``transfer.kstep_scorer``: the two-scale block-quadratic model over the run's
horizon, eta re-tuned) ranks measured runs where the one-step R misranks them (docs/results/oracle-tiny). Here the
allocation is found by maximising R_K itself: gradient ascent on x = log s (s normalised, sum n s^2 = sum n) of

    J(s) = (1 / T) sum_t log R_K,t(s),     R_K,t(s) = (f0_t - E[f_K,t](s, eta_t*(s))) / (MeZO's decrease on t)

over the statistics of T tasks. The closed-form K-step loss (``gain.kstep_loss``) is differentiable in s; eta_t* is
re-tuned without grad at every iterate (``gain.tune_eta``), which is exact to first order because dE[f_K]/deta = 0
at the optimum (the envelope theorem). With T = 1 it is the task's own K-step oracle; with the statistics of the
meta-training tasks it is a static allocation learned from them, which a held-out task never informs: the mean of
logs asks it to help every task rather than the easiest one.

With the tasks' Hessian Grams (``coupling_stats.Gram``) the K-step loss is the coupled model's
(``coupled.coupled_change``): the blocks' gradient directions share one quadratic, which the separable model above
counts once per block (docs/results/oracle-tiny, stop 27).

Pure function over ``BlockStats``; no Lightning, no model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.blockstats.coupled import CoupledModel, coupled_change, tune_coupled_eta
from l2zo.blockstats.coupling_stats import Gram
from l2zo.blockstats.gain import QuadraticModel, kstep_loss, normalize, tune_eta
from l2zo.blockstats.stats import BlockStats
from l2zo.errors import L2ZOError


@dataclass(frozen=True)
class KStepOptimum:
    """The result of ``kstep_optimal``.

    Attributes:
        s: [B] float64 normalised allocation (the best iterate found).
        ratios: R_K of ``s`` on each statistics passed, in order.
        objective: [iters + 1] the mean log R_K at every iterate (the first is MeZO's, 0).
    """

    s: Tensor
    ratios: tuple[float, ...]
    objective: Tensor


def kstep_optimal(
    stats: Sequence[BlockStats],
    horizon: int,
    *,
    iters: int = 300,
    lr: float = 0.1,
    init: Tensor | None = None,
    grams: Sequence[Gram] | None = None,
) -> KStepOptimum:
    """The allocation s [B] maximising the mean over ``stats`` of log R_K over ``horizon`` steps (see the module doc).

    Adam on log s from ``init`` (default MeZO's s = 1) for ``iters`` steps of size ``lr`` (in log s); the best
    iterate is returned, so the result is never worse than the start. Every entry of ``stats`` must describe the
    same blocks (the same ``n``) and predict a positive decrease for MeZO. With ``grams`` (one per entry of
    ``stats``), R_K is the coupled model's (``coupled.CoupledModel.from_gram``), not the separable two-scale one's.
    """
    if not stats:
        raise L2ZOError("the K-step optimal allocation needs the statistics of at least one task")
    if horizon < 1 or iters < 0 or not lr > 0:
        raise L2ZOError(f"kstep_optimal needs horizon >= 1, iters >= 0 and lr > 0; got {horizon}, {iters}, {lr}")
    n = stats[0].n.to(torch.float64)
    if any(s.n.shape != n.shape or not torch.equal(s.n.to(torch.float64), n) for s in stats):
        raise L2ZOError("the statistics passed describe different blocks: pass probes of one model")
    if grams is not None and len(grams) != len(stats):
        raise L2ZOError(f"pass one Gram per statistics: {len(grams)} Grams for {len(stats)} statistics")
    models = ([_separable(QuadraticModel.from_stats(s), horizon) for s in stats] if grams is None else
              [_coupled(CoupledModel.from_gram(s, g.G, g.gram), horizon) for s, g in zip(stats, grams, strict=True)])  # fmt: skip
    base = [-float(m.change(torch.ones_like(n), m.tune(torch.ones_like(n), None))) for m in models]
    for i, b in enumerate(base):
        if not b > 0:
            raise L2ZOError(f"statistics {i} predict no decrease for MeZO over {horizon} steps (no gradient signal "
                            "resolved): measure more batch pairs, or leave that task out")  # fmt: skip

    etas: list[float | None] = [None] * len(models)  # each task's last tuned eta: the next search starts there

    def objective(x: Tensor) -> Tensor:
        w = normalize(torch.exp(x), n) ** 2
        terms = []
        for i, (m, b) in enumerate(zip(models, base, strict=True)):
            eta = etas[i] = m.tune(w, etas[i])  # without grad: exact to first order at the optimum
            decrease = -m.change(w, eta)
            terms.append(torch.log(decrease.clamp_min(1e-300) / b))
        return torch.stack(terms).mean()

    x = (torch.zeros_like(n) if init is None else torch.log(init.to(torch.float64).clamp_min(1e-30))).requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    trace: list[float] = []
    best_x, best = x.detach().clone(), -math.inf
    for i in range(iters + 1):  # iters steps, and the objective at every iterate including the last
        j = objective(x)
        value = float(j.detach())
        trace.append(value)
        if math.isfinite(value) and value > best:
            best, best_x = value, x.detach().clone()
        if i == iters:
            break
        opt.zero_grad()
        (-j).backward()
        opt.step()
    s = normalize(torch.exp(best_x), n)
    w = s * s
    ratios = tuple(-float(m.change(w, m.tune(w, None))) / b for m, b in zip(models, base, strict=True))
    return KStepOptimum(s=s, ratios=ratios, objective=torch.tensor(trace, dtype=torch.float64))


@dataclass(frozen=True)
class _Predictor:
    """One task's K-step model: its eta search (given the last optimum, or None) and its expected loss change
    E[L_K] - L_0 at (w, eta)."""

    tune: Callable[[Tensor, float | None], float]
    change: Callable[[Tensor, float], Tensor]


def _separable(model: QuadraticModel, horizon: int) -> _Predictor:
    # the separable recursion is [B] a step: its full search is cheap, so it never starts from the last optimum
    return _Predictor(tune=lambda w, near: tune_eta(w, model, horizon),
                      change=lambda w, eta: kstep_loss(w, eta, model, horizon).sum() - model.f0.sum())  # fmt: skip


def _coupled(model: CoupledModel, horizon: int) -> _Predictor:
    # a [B, B] recursion: each Adam step's search starts at the last optimum (27 evaluations instead of 103)
    return _Predictor(tune=lambda w, near: tune_coupled_eta(w, model, horizon, near=near),
                      change=lambda w, eta: coupled_change(w, eta, model, horizon))  # fmt: skip
