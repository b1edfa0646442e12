"""What an allocation s (one perturbation scale per block) buys, predicted from ``BlockStats``.

Notation: w_b = s_b^2, u = S z with z ~ N(0, I), the step theta' = theta - eta (u^T g) u with g a minibatch
gradient (the eps -> 0 limit of the two-point estimate). Allocations are compared after l2zo's normalisation
sum_b n_b s_b^2 = sum_b n_b (``l2zo.learned.normalization``, rule "numel"), so E||u||^2 is MeZO's.

One step (Isserlis: E[(u^T g)^2 u^T H u] = (g^T S^2 g) tr(H S^2) + 2 g^T S^2 H S^2 g), block-diagonal H:

    E[dL] = -eta A + (eta^2 / 2) ((A + V) T + 2 Bq)
    A = sum_b w_b G_b    T = sum_b w_b tau_b    V = sum_b w_b tr(C_b)    Bq = sum_b w_b^2 E[g_b^T H_bb g_b]

With eta re-tuned (eta* = A / D, D = (A + V) T + 2 Bq) the gain is A^2 / (2 D); R(s) = gain(s) / gain(1).

K steps, block-separable isotropic quadratic (H_bb = l_b I, l_b = tau_b / n_b, f_b the block's excess loss,
G_b = 2 l_b f_b, noise tr(C_b) = c_b constant):

    E[f_{t+1}] = M(w) E[f_t] + d(w)
    M = diag(1 - 2 eta w_b l_b + 2 eta^2 w_b^2 l_b^2) + eta^2 (l_b n_b w_b)(w_c l_c)^T
    d_b = (eta^2 / 2) l_b w_b (n_b sum_c w_c c_c + 2 w_b c_b)

The diagonal 2 eta^2 w_b^2 l_b^2 is the "+2" of E||z_b||^4 = n_b (n_b + 2) (learning-signal.md §2 writes n_b in
its place, i.e. drops it; it matters for small blocks). The closed form is the augmented matrix [[M, d], [0, 1]]
to the power K, differentiable in w.

The isotropic model attributes f0_b = G_b / (2 l_b) of loss to each block; measured on a small LM that sums to
~1e4 x the actual loss, because the gradient lies in directions far sharper than the block average. The
default two-scale model (``QuadraticModel``) keeps the average curvature l_b for the n_b - 1 "bulk" directions
(the cost T of perturbing them) and gives the gradient's own direction its curvature rho_b (from g^T H_bb g),
so f0_b = G_b / (2 rho_b); its state is [signal losses; bulk losses] ([2B]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.blockstats.stats import BlockStats
from l2zo.errors import L2ZOError


def normalize(s: Tensor, n: Tensor) -> Tensor:
    """[B] s scaled so that sum_b n_b s_b^2 = sum_b n_b (differentiable; ``s`` must not be all zero)."""
    n = n.to(s)
    denom = (n * s * s).sum()
    if not bool(denom > 0):
        raise L2ZOError("an allocation with every sigma 0 (or negative weights) cannot be normalised")
    return s * torch.sqrt(n.sum() / denom)


@dataclass(frozen=True)
class StepTerms:
    """The four scalars of the one-step model for one allocation (0-dim float64 tensors)."""

    A: Tensor
    T: Tensor
    V: Tensor
    Bq: Tensor

    @property
    def D(self) -> Tensor:
        """The curvature-and-noise denominator (A + V) T + 2 Bq."""
        return (self.A + self.V) * self.T + 2 * self.Bq

    def expected_change(self, eta: float | Tensor) -> Tensor:
        """E[dL] at learning rate eta."""
        return -eta * self.A + 0.5 * eta * eta * self.D

    def best_eta(self) -> Tensor:
        """The one-step optimal eta = A / D (inf or negative when D <= 0: the model predicts no finite optimum)."""
        return self.A / self.D

    def gain(self) -> Tensor:
        """-E[dL] at the best eta: A^2 / (2 D); +inf when D <= 0 (negative curvature: the model breaks down)."""
        return torch.where(self.D > 0, self.A * self.A / (2 * self.D), torch.full_like(self.D, math.inf))

    def to_dict(self) -> dict[str, float]:
        return {"A": float(self.A), "T": float(self.T), "V": float(self.V), "Bq": float(self.Bq),
                "eta_star": float(self.best_eta()), "gain": float(self.gain())}  # fmt: skip


def step_terms(s: Tensor, stats: BlockStats) -> StepTerms:
    """A, T, V, Bq of allocation ``s`` [B] (use it as given: normalise first to compare allocations)."""
    s = s.to(torch.float64)
    return terms_of_w(s * s, stats)


def terms_of_w(w: Tensor, stats: BlockStats) -> StepTerms:
    """A, T, V, Bq from the per-block variances w = s^2 [B] (polynomial in w: smooth where some w_b = 0)."""
    return StepTerms(
        A=(w * stats.G).sum(), T=(w * stats.tau).sum(), V=(w * stats.noise).sum(), Bq=(w * w * stats.gHg).sum()
    )


def gain_ratio(s: Tensor, stats: BlockStats) -> Tensor:
    """R(s) = gain(s) / gain(MeZO's s = 1), each with its own re-tuned eta (scale-free in s)."""
    return step_terms(s, stats).gain() / step_terms(torch.ones_like(stats.n), stats).gain()


# ------------------------------------------------------------------------------------------------ K steps


@dataclass(frozen=True)
class QuadraticModel:
    """A block-separable quadratic fitted to ``BlockStats`` (all [B] float64).

    Isotropic (``rho`` None): block b is 0.5 l_b ||x_b||^2, so G_b = 2 l_b f_b and f0_b = G_b / (2 l_b).

    Two-scale (``rho`` given): the gradient of block b lives in one "signal" direction of curvature rho_b (the
    curvature along the gradient, from g^T H_b g), the other n_b - 1 "bulk" directions have curvature l_b, and
    the bulk starts at its minimum: f0_b = G_b / (2 rho_b) in the signal part, 0 in the bulk. On a small LM
    rho_b is ~1e4 x l_b, and the isotropic f0 sums to ~1e4 x the actual loss (docs/results/probe-blocks).

    Attributes:
        n: numel per block.
        l: per-element curvature tau_b / n_b, floored at ``floor`` x the median positive one (the model needs
            l > 0; a block whose estimate is <= 0 gets the floor).
        f0: initial excess loss per block (signal part when two-scale).
        c: minibatch noise tr(C_b) (floored at 0), all in the bulk.
        rho: curvature along the gradient, or None (isotropic).
    """

    n: Tensor
    l: Tensor
    f0: Tensor
    c: Tensor
    rho: Tensor | None = None

    @classmethod
    def from_stats(cls, stats: BlockStats, floor: float = 1e-3, two_scale: bool = True) -> QuadraticModel:
        """The two-scale model (default) or the isotropic one from measured statistics.

        rho_b = (gHg_b - l_b tr(C_b)) / G_b: E[g^T H_bb g] over minibatch gradients is rho_b G_b + l_b tr(C_b)
        when the noise lies in the bulk; floored at l_b (and l_b where G_b <= 0, whose f0 is 0 anyway).
        """
        l = positive_curvature(stats.tau, stats.n, floor)
        G, c = stats.G.clamp_min(0.0), stats.noise.clamp_min(0.0)
        if not two_scale:
            return cls(n=stats.n, l=l, f0=G / (2 * l), c=c)
        signal = (stats.gHg - l * c).clamp_min(0.0)
        rho = torch.where(G > 0, signal / G.clamp_min(1e-300), l).clamp_min(l)
        return cls(n=stats.n, l=l, f0=G / (2 * rho), c=c, rho=rho)


def positive_curvature(tau: Tensor, n: Tensor, floor: float = 1e-3) -> Tensor:
    """[B] per-element curvature tau_b / n_b, at least ``floor`` x the median of the positive ones."""
    l = tau / n
    pos = l[l > 0]
    if pos.numel() == 0:
        raise L2ZOError("every block's curvature estimate is <= 0; measure at more states or with more probes")
    return l.clamp_min(floor * float(pos.median()))


def transition(w: Tensor, eta: float | Tensor, model: QuadraticModel) -> tuple[Tensor, Tensor]:
    """(M, d) of E[f_{t+1}] = M E[f_t] + d for per-block variances w = s^2.

    Isotropic: f = [B] block losses, M [B, B]. Two-scale: f = [signal (B); bulk (B)], M [2B, 2B]. Each part P of a
    block (dimension m, curvature k) gets, by Isserlis with Q = E[(u^T g_t)^2] = sum_c w_c (||g_c||^2 + tr C_c):

        E[f_P'] = f_P - 2 eta w k f_P + (eta^2 / 2) k (w m Q + 2 w^2 E||g_t,P||^2)
    """
    l, n, c = model.l.to(w), model.n.to(w), model.c.to(w)
    wl = w * l
    if model.rho is None:
        M = torch.diag(1 - 2 * eta * wl + 2 * eta * eta * wl * wl) + eta * eta * torch.outer(l * n * w, wl)
        d = 0.5 * eta * eta * l * w * (n * (w * c).sum() + 2 * w * c)
        return M, d
    rho = model.rho.to(w)
    wr = w * rho
    grad_row = torch.cat([2 * wr, 2 * wl])  # Q = grad_row . f + sum_c w_c c_c
    inject = 0.5 * eta * eta * torch.cat([rho * w, l * (n - 1) * w])  # signal dimension 1, bulk n - 1
    M = torch.diag(torch.cat([1 - 2 * eta * wr + 2 * eta * eta * wr * wr, 1 - 2 * eta * wl + 2 * eta * eta * wl * wl]))
    M = M + torch.outer(inject, grad_row)
    d = inject * (w * c).sum() + torch.cat([torch.zeros_like(w), eta * eta * wl * w * c])
    return M, d


def kstep_loss(w: Tensor, eta: float | Tensor, model: QuadraticModel, steps: int) -> Tensor:
    """[B] E[f_K] per block after ``steps`` ZO steps from f0, in closed form (differentiable in w and eta)."""
    if steps < 0:
        raise L2ZOError(f"steps must be >= 0, got {steps}")
    M, d = transition(w, eta, model)
    S = M.shape[0]
    aug = torch.zeros(S + 1, S + 1, dtype=M.dtype, device=M.device)
    aug[:S, :S] = M
    aug[:S, S] = d
    aug[S, S] = 1.0
    f0 = model.f0.to(M)
    start = f0 if model.rho is None else torch.cat([f0, torch.zeros_like(f0)])
    x0 = torch.cat([start, torch.ones(1, dtype=M.dtype, device=M.device)])
    f = (torch.linalg.matrix_power(aug, steps) @ x0)[:S]
    B = f0.numel()
    return f if model.rho is None else f[:B] + f[B:]


def _golden_min(fn: Callable[[float], float], lo: float, hi: float, iters: int = 40) -> float:
    """The argmin of a unimodal ``fn`` on [lo, hi] (golden section)."""
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    x1, x2 = b - phi * (b - a), a + phi * (b - a)
    f1, f2 = fn(x1), fn(x2)
    for _ in range(iters):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - phi * (b - a)
            f1 = fn(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + phi * (b - a)
            f2 = fn(x2)
    return (a + b) / 2


def tune_eta(w: Tensor, model: QuadraticModel, steps: int, grid: int = 61) -> float:
    """The eta minimising the K-step expected loss: a log grid over 8 decades around the one-step scale, then
    golden section between the best point's neighbours. eta is found without grad (at the optimum dL/deta = 0,
    so the K-step loss at the tuned eta is still differentiable in w to first order)."""
    with torch.no_grad():
        w = w.detach().to(torch.float64)
        # 1 / max_b (w_b l_b (n_b + 2)) is where the largest block's own contraction turns over.
        scale = 1.0 / float((w * model.l * (model.n + 2)).max())
        if model.rho is not None:
            scale = min(scale, 1.0 / float((w * model.rho).max()))
        return minimise_eta(lambda eta: float(kstep_loss(w, eta, model, steps).sum()), scale, grid)


def minimise_eta(loss_at: Callable[[float], float], scale: float, grid: int = 61,
                 decades: tuple[float, float] = (-6.0, 2.0), iters: int = 40) -> float:  # fmt: skip
    """The eta > 0 minimising ``loss_at`` (a K-step expected loss): a log grid from 10^decades[0] to 10^decades[1]
    x ``scale`` (default 1e-6..1e2), then ``iters`` golden-section steps between the best grid point's neighbours
    (non-finite losses count as +inf)."""

    def total(log_eta: float) -> float:
        v = loss_at(math.exp(log_eta))
        return v if math.isfinite(v) else math.inf

    span = torch.linspace(decades[0] * math.log(10), decades[1] * math.log(10), grid).tolist()
    logs = [math.log(scale) + x for x in span]
    values = [total(x) for x in logs]
    i = min(range(grid), key=values.__getitem__)
    lo, hi = logs[max(i - 1, 0)], logs[min(i + 1, grid - 1)]
    return math.exp(_golden_min(total, lo, hi, iters))


@dataclass(frozen=True)
class KStep:
    """The K-step prediction of one allocation at its tuned eta."""

    eta: float
    loss: Tensor  # E[sum_b f_K,b] (differentiable in w)
    f0: float

    @property
    def decrease(self) -> float:
        return self.f0 - float(self.loss)


def kstep(s: Tensor, model: QuadraticModel, steps: int) -> KStep:
    """The K-step expected excess loss of allocation ``s`` with eta re-tuned for it."""
    w = s.to(torch.float64) ** 2
    eta = tune_eta(w, model, steps)
    return KStep(eta=eta, loss=kstep_loss(w, eta, model, steps).sum(), f0=float(model.f0.sum()))
