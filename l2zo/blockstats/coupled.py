"""The K-step ZO model with the blocks' gradient directions coupled through the Hessian.

``gain.QuadraticModel`` (two-scale) gives each block its own "signal" direction (its gradient g_b, curvature rho_b)
and treats the blocks as independent quadratics, so it credits each block with the loss G_b / (2 rho_b) that its
own gradient alone could remove. The blocks' gradients remove the *same* loss: measured on the tiny world
(synth-color, full train split, state 0), g^T H g is 3.75x the sum of its diagonal blocks g_b^T H_bb g_b, and the
separable signal losses sum to 7.6 where the loss is 1.11, while this model's quadratic in the span of the block
gradients can lose 0.96 (scripts/kstep_coupling.py; docs/results/oracle-tiny). An allocation fitted to the separable
model (``kstep_opt``) exploits exactly that overcount.

Here the signal is one coordinate x_b per block along the unit gradient g_b / ||g_b||, with the full coupling
between blocks: L_s(x) = -r^T x + x^T K x / 2, r_b = ||g_b|| = sqrt(G_b), K_bc = g_b^T H_bc g_c / (r_b r_c) (the
block-gradient Gram of the Hessian, ``gram``). The other n_b - 1 directions of a block are the isotropic bulk of
the two-scale model (curvature l_b, minibatch noise tr(C_b)). For u = S z (W = S^2), step theta' = theta -
eta (u^T g_t) u, Gaussian z, the mean x_bar, the covariance Sigma of x and the bulk losses f_y follow exactly

    h     = K x_bar - r                                     mean signal gradient [B]
    Q     = sum_b w_b (h_b^2 + (K Sigma K)_bb + 2 l_b f_y,b + c_b)      E[(u^T g_t)^2 / 1] per unit of z
    x_bar <- x_bar - eta W h
    Sigma <- (I - eta W K) Sigma (I - eta K W) + eta^2 (Q W + W (h h^T + K Sigma K) W)
    f_y   <- f_y (1 - 2 eta w l + 2 eta^2 w^2 l^2) + (eta^2 / 2) l w ((n - 1) Q + 2 w c)

(Isserlis: E[(u^T g)^2 (u.e_b)(u.e_c)] = Q w_b [b = c] + 2 w_b w_c h_b h_c), and E[L_K] - L_0 = L_s(x_bar) +
tr(K Sigma) / 2 + sum_b f_y,b. With K diagonal (K_bb = rho_b) this is the two-scale model step for step
(tests/test_coupled.py checks both that and a Monte Carlo run of the ZO process).

Pure functions over tensors; the Gram is measured by ``coupling_stats.gradient_gram``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.blockstats.gain import minimise_eta, positive_curvature
from l2zo.blockstats.stats import BlockStats
from l2zo.errors import L2ZOError


@dataclass(frozen=True)
class CoupledModel:
    """The coupled signal plus isotropic bulk (all float64).

    Attributes:
        n: [B] numel per block.
        l: [B] bulk curvature per element (``positive_curvature`` of the statistics' tau).
        c: [B] minibatch noise tr(C_b) (floored at 0), in the bulk.
        r: [B] ||g_b|| (0 where G_b <= 0: no resolved gradient, the block's x_b is one more bulk direction).
        K: [B, B] symmetric positive semi-definite signal Hessian in unit-gradient coordinates.
    """

    n: Tensor
    l: Tensor
    c: Tensor
    r: Tensor
    K: Tensor

    @classmethod
    def from_gram(cls, stats: BlockStats, G: Tensor, gram: Tensor, floor: float = 1e-3) -> CoupledModel:
        """The model from ``stats`` (n, tau, noise: the bulk) and a measured gradient energy G [B] with its
        Hessian Gram gram [B, B] (gram_bc = g_b^T H_bc g_c, ``coupling_stats.gradient_gram``).

        The Gram is symmetrised and projected onto the PSD cone (negative eigenvalues, from non-convexity or
        estimation noise, set to 0: the model needs a bounded quadratic). Blocks with G_b <= 0 get r_b = 0 and
        K_bb = l_b, no coupling; every K_bb is at least l_b (the gradient direction is never flatter than the bulk
        average, as the two-scale model's rho).
        """
        B = stats.n.numel()
        G = G.to(torch.float64)
        gram = gram.to(torch.float64)
        if G.shape != (B,) or gram.shape != (B, B):
            raise L2ZOError(f"the Gram must be [{B}, {B}] and G [{B}] for these statistics; got {tuple(gram.shape)} "
                            f"and {tuple(G.shape)}")  # fmt: skip
        if not bool(torch.isfinite(gram).all() and torch.isfinite(G).all()):
            raise L2ZOError("the Gram or G holds non-finite values: measure them again at a finite loss")
        l = positive_curvature(stats.tau, stats.n, floor)
        live = G > 0
        r = torch.where(live, G.clamp_min(0.0).sqrt(), torch.zeros_like(G))
        sym = (gram + gram.T) / 2
        evals, evecs = torch.linalg.eigh(sym)
        psd = (evecs * evals.clamp_min(0.0)) @ evecs.T
        inv_r = torch.where(live, 1.0 / r.clamp_min(1e-300), torch.zeros_like(r))
        K = psd * torch.outer(inv_r, inv_r)
        K = torch.where(torch.outer(live, live), K, torch.zeros_like(K))
        diag = torch.where(live, torch.diagonal(K).clamp_min(l), l)
        K = K - torch.diag(torch.diagonal(K)) + torch.diag(diag)
        return cls(n=stats.n.to(torch.float64), l=l, c=stats.noise.to(torch.float64).clamp_min(0.0), r=r, K=K)

    @classmethod
    def diagonal(cls, n: Tensor, l: Tensor, c: Tensor, G: Tensor, rho: Tensor) -> CoupledModel:
        """No coupling: K = diag(rho), the two-scale ``QuadraticModel``'s signal (for comparison and tests)."""
        G = G.to(torch.float64)
        r = torch.where(G > 0, G.clamp_min(0.0).sqrt(), torch.zeros_like(G))
        return cls(n=n.to(torch.float64), l=l.to(torch.float64), c=c.to(torch.float64), r=r,
                   K=torch.diag(rho.to(torch.float64)))  # fmt: skip

    def reducible(self) -> float:
        """r^T K^+ r / 2: the loss the signal quadratic can lose at most (K's pseudo-inverse)."""
        return float(0.5 * self.r @ torch.linalg.pinv(self.K, hermitian=True) @ self.r)


def coupled_change(w: Tensor, eta: float | Tensor, model: CoupledModel, steps: int) -> Tensor:
    """E[L_K] - L_0 after ``steps`` ZO steps at per-block variances w = s^2 [B] (0-dim; differentiable in w, eta).

    Negative when the loss decreases. The recursion of the module docstring, one [B, B] update per step.
    """
    if steps < 0:
        raise L2ZOError(f"steps must be >= 0, got {steps}")
    K, l, n, c, r = (t.to(w) for t in (model.K, model.l, model.n, model.c, model.r))
    B = w.numel()
    eye = torch.eye(B, dtype=w.dtype, device=w.device)
    A = eye - eta * w[:, None] * K  # I - eta W K
    x = torch.zeros_like(w)
    sigma = torch.zeros(B, B, dtype=w.dtype, device=w.device)
    fy = torch.zeros_like(w)
    wl = w * l
    for _ in range(steps):
        h = K @ x - r
        ksk = K @ sigma @ K
        q = (w * (h * h + torch.diagonal(ksk) + 2 * l * fy + c)).sum()
        x = x - eta * w * h
        extra = torch.outer(h, h) + ksk
        sigma = A @ sigma @ A.T + eta * eta * (q * torch.diag(w) + w[:, None] * extra * w[None, :])
        fy = fy * (1 - 2 * eta * wl + 2 * eta * eta * wl * wl) + 0.5 * eta * eta * l * w * ((n - 1) * q + 2 * w * c)
    return -r @ x + 0.5 * x @ K @ x + 0.5 * (K * sigma).sum() + fy.sum()


WARM_DECADES = 0.3  # a warm-started search looks within 10^(+-0.3) = 2x of the previous eta


def tune_coupled_eta(w: Tensor, model: CoupledModel, steps: int, grid: int = 61, near: float | None = None) -> float:
    """The eta minimising ``coupled_change`` (``gain.minimise_eta`` around the one-step stability scale).

    ``near``: the optimum for a nearby w (the previous iterate of a fit): a 7-point grid within 2x of it and 20
    golden-section steps (27 evaluations of the recursion instead of 103); where the optimum lands in the outer
    cells of that bracket, the full search runs instead.
    """
    with torch.no_grad():
        w = w.detach().to(torch.float64)
        if near is not None and near > 0:
            eta = minimise_eta(lambda e: float(coupled_change(w, e, model, steps)), near, 7,
                               (-WARM_DECADES, WARM_DECADES), 20)  # fmt: skip
            if abs(math.log10(eta / near)) < WARM_DECADES * 2 / 3:  # inside the inner cells: a true interior optimum
                return eta
        root = w.sqrt()
        top = float(torch.linalg.eigvalsh(root[:, None] * model.K * root[None, :]).max())
        scale = 1.0 / max(float((w * model.l * (model.n + 2)).max()), top)
        return minimise_eta(lambda eta: float(coupled_change(w, eta, model, steps)), scale, grid)


@dataclass(frozen=True)
class CoupledKStep:
    """The coupled K-step prediction of one allocation at its tuned eta."""

    eta: float
    change: Tensor  # E[L_K] - L_0 (0-dim, differentiable in w)

    @property
    def decrease(self) -> float:
        return -float(self.change)


def coupled_kstep(s: Tensor, model: CoupledModel, steps: int) -> CoupledKStep:
    """The coupled K-step expected loss change of allocation ``s`` [B] with eta re-tuned for it."""
    w = s.to(torch.float64) ** 2
    eta = tune_coupled_eta(w, model, steps)
    return CoupledKStep(eta=eta, change=coupled_change(w, eta, model, steps))


def coupled_ratio(s: Tensor, model: CoupledModel, steps: int) -> float:
    """R_K under the coupled model: the K-step decrease of ``s`` over MeZO's (s = 1), each at its tuned eta."""
    base = coupled_kstep(torch.ones_like(model.n), model, steps).decrease
    if not base > 0:
        raise L2ZOError(f"the coupled model predicts no decrease for MeZO over {steps} steps: no resolved gradient")
    return coupled_kstep(s, model, steps).decrease / base
