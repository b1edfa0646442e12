"""Oracle allocations: per-block scales s [B] computed from ``BlockStats``, each normalised (sum n s^2 = sum n).

* ``water_filling``: the allocation minimising the one-step expected change E[dL] at a FIXED eta (with eta
  re-tuned the optimum is a vertex, see ``gsl``). Solved over the energy fractions x_b = n_b s_b^2 / sum n
  (the probability simplex) by projected gradient descent; the Euclidean projection onto the simplex is a
  water-filling (x_b = max(0, y_b - level)), hence the name.
* ``gsl``: Gauss-Southwell-Lipschitz with a temperature: s_b^2 ~ (G_b / tau_b)^(1 / temperature). Temperature
  -> 0 puts all energy on the block with the largest G_b / tau_b (the re-tuned one-step optimum without noise
  and Bq); temperature -> inf is MeZO (s = 1).
* ``hizoo``: tempered inverse curvature, s_b^2 ~ (n_b / tau_b)^gamma; gamma = 1 is HiZOO's Sigma ~ H^-1 per
  block (every block of a separable quadratic then decays at the same rate), gamma = 0 is MeZO.

Blocks with tau_b <= 0 use the floored curvature of ``gain.positive_curvature``; blocks with G_b <= 0 get no
energy from ``gsl`` (they cannot help in expectation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from l2zo.blockstats.gain import normalize, positive_curvature, step_terms, terms_of_w
from l2zo.blockstats.stats import BlockStats
from l2zo.errors import L2ZOError


def _from_log_w(log_w: Tensor, n: Tensor) -> Tensor:
    """Normalised s from log(s^2) (computed in log space: large exponents overflow)."""
    finite = torch.isfinite(log_w)
    if not bool(finite.any()):
        raise L2ZOError("the oracle gives every block zero energy (no block has G_b > 0); measure more batch pairs")
    w = torch.where(finite, torch.exp(log_w - log_w[finite].max()), torch.zeros_like(log_w))
    return normalize(w.sqrt(), n)


def gsl(stats: BlockStats, temperature: float = 1.0, floor: float = 1e-3) -> Tensor:
    """Tempered Gauss-Southwell-Lipschitz: s_b^2 ~ (G_b / tau_b)^(1 / temperature), normalised. [B] float64."""
    if not temperature > 0:
        raise L2ZOError(f"the GS-L temperature must be > 0, got {temperature}")
    tau = positive_curvature(stats.tau, stats.n, floor) * stats.n
    ratio = stats.G / tau
    log_w = torch.where(ratio > 0, torch.log(ratio.clamp_min(1e-300)), torch.full_like(ratio, -torch.inf))
    return _from_log_w(log_w / temperature, stats.n)


def hizoo(stats: BlockStats, gamma: float = 1.0, floor: float = 1e-3) -> Tensor:
    """Tempered inverse curvature: s_b^2 ~ (n_b / tau_b)^gamma, normalised. [B] float64."""
    if not gamma >= 0:
        raise L2ZOError(f"the HiZOO exponent gamma must be >= 0, got {gamma}")
    l = positive_curvature(stats.tau, stats.n, floor)
    return _from_log_w(-gamma * torch.log(l), stats.n)


def project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of [B] y onto {x >= 0, sum x = 1}: x = max(0, y - level), the level by sorting."""
    u, _ = torch.sort(y, descending=True)
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, y.numel() + 1, dtype=y.dtype, device=y.device)
    rho = int(torch.nonzero(u - css / k > 0).max())
    return (y - css[rho] / (rho + 1)).clamp_min(0.0)


def water_filling_eta(stats: BlockStats, given: float | None) -> float | None:
    """Water-filling's fixed eta: ``given``, else MeZO's one-step optimum on ``stats``; None where that is not a
    finite positive number (A = sum_b G_b <= 0, or no positive curvature), so no water-filling allocation exists."""
    eta = given if given is not None else float(step_terms(torch.ones_like(stats.n), stats).best_eta())
    return eta if math.isfinite(eta) and eta > 0 else None


def water_filling(stats: BlockStats, eta: float, iters: int = 2000, tol: float = 1e-12) -> Tensor:
    """The allocation minimising E[dL] = -eta A + (eta^2/2) ((A + V) T + 2 Bq) at fixed ``eta``, normalised.

    Projected gradient descent on the energy fractions, from MeZO's (x_b = n_b / sum n), with a backtracking
    step; the objective may be non-convex (the product (A + V) T), so this is a local minimum that is never
    worse than MeZO. [B] float64.
    """
    if not eta > 0:
        raise L2ZOError(f"water-filling needs a learning rate eta > 0, got {eta}")
    n = stats.n
    total = n.sum()

    def objective(x: Tensor) -> Tensor:
        return terms_of_w(x.clamp_min(0.0) * total / n, stats).expected_change(eta)

    x = n / total
    f = objective(x)
    scale = abs(float(f)) or 1.0
    step = 1.0
    for _ in range(iters):
        xg = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(objective(xg) / scale, xg)[0]
        while True:
            cand = project_simplex(x - step * grad)
            fc = objective(cand)
            # Armijo on the projected step: sufficient decrease along cand - x
            if float(fc) / scale <= float(f) / scale + 0.5 * float(grad @ (cand - x)) or step < 1e-20:
                break
            step *= 0.5
        moved = float((cand - x).abs().sum())
        if float(fc) <= float(f):
            x, f = cand, fc
        step *= 2.0
        if moved < tol:
            break
    return normalize(torch.sqrt(x * total / n), n)
