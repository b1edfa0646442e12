"""Per-block statistics and the gain model (l2zo.blockstats) against exact values and Monte Carlo, in float64.

The estimators are checked on a least-squares problem whose every quantity has a closed form: per-example loss
l_i(theta) = 0.5 ||X_i theta - y_i||^2 over a finite population, batches drawn with replacement. Then
grad L = mean_i X_i^T (X_i theta - y_i), the Hessian H = mean_i X_i^T X_i (equal to the Fisher/Gauss-Newton for
Gaussian labels), and the minibatch covariance C = Cov_i(grad l_i) / B. Tolerances are 4 standard errors of the
estimator, measured from the samples themselves, and the tests also require that standard error to be small
against the exact value, so a pass is informative.
"""

from __future__ import annotations

import math

import pytest
import torch

from l2zo.blockstats import (
    BatchFns,
    BlockStats,
    QuadraticModel,
    combine,
    gain_ratio,
    gsl,
    hizoo,
    kstep,
    kstep_loss,
    measure_pair,
    normalize,
    project_simplex,
    step_terms,
    transition,
    water_filling,
)
from l2zo.engine.blocks import partition
from tests.helpers import block_stats

D_BLOCKS = (3, 5, 2)  # three blocks: a 3-vector, a 5-vector, a 2-vector
M = 4  # rows of each X_i


class LeastSquares(torch.nn.Module):
    """Population of N examples (X_i [M, D], y_i [M]); theta split into blocks ``D_BLOCKS`` (float64)."""

    def __init__(self, n_examples: int = 40, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = sum(D_BLOCKS)
        self.blocks = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(k, generator=g, dtype=torch.float64)) for k in D_BLOCKS]
        )
        # Per-block column scales make the blocks' curvatures differ by ~10x.
        scale = torch.cat([torch.full((k,), s) for k, s in zip(D_BLOCKS, (0.7, 1.0, 1.5))]).double()
        self.X = torch.randn(n_examples, M, d, generator=g, dtype=torch.float64) * scale
        self.y = torch.randn(n_examples, M, generator=g, dtype=torch.float64) * 2

    def theta(self) -> torch.Tensor:
        return torch.cat(list(self.blocks))

    def loss(self, idx: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r = self.X[idx] @ self.theta() - (self.y[idx] if y is None else y)
        return 0.5 * (r * r).sum(dim=-1).mean()

    def batch(self, gen: torch.Generator, size: int) -> BatchFns:
        idx = torch.randint(0, self.X.shape[0], (size,), generator=gen)

        def sampled(g: torch.Generator) -> torch.Tensor:
            # Gaussian labels from the model itself: y ~ N(X theta, I) (the Fisher of this likelihood is H).
            with torch.no_grad():
                y = self.X[idx] @ self.theta() + torch.randn(size, M, generator=g, dtype=torch.float64)
            return self.loss(idx, y)

        return BatchFns(loss=lambda: self.loss(idx), sampled_loss=sampled, batch_size=size)

    def exact(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Per-block G, tr(C), tr(H_bb) and E[g_b^T H_bb g_b] (g a minibatch gradient) in closed form."""
        with torch.no_grad():
            per = torch.einsum("nmd,nm->nd", self.X, self.X @ self.theta() - self.y)  # [N, D] per-example grads
            grad = per.mean(0)
            cov = torch.cov(per.T, correction=0) / batch_size  # [D, D]
            H = torch.einsum("nmd,nme->de", self.X, self.X) / self.X.shape[0]
        out: dict[str, list[float]] = {"G": [], "noise": [], "tau": [], "gHg": []}
        start = 0
        for k in D_BLOCKS:
            sl = slice(start, start + k)
            Hb, gb, Cb = H[sl, sl], grad[sl], cov[sl, sl]
            out["G"].append(float(gb @ gb))
            out["noise"].append(float(Cb.trace()))
            out["tau"].append(float(Hb.trace()))
            out["gHg"].append(float(gb @ Hb @ gb + (Hb * Cb).sum()))
            start += k
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _check(est: torch.Tensor, se: torch.Tensor, exact: torch.Tensor, rel_se: float = 0.1) -> None:
    assert torch.all(se < rel_se * exact.abs()), f"estimator too noisy to test: se {se} vs exact {exact}"
    assert torch.all((est - exact).abs() <= 4 * se), f"estimate {est} +- {se} vs exact {exact}"


def test_block_statistics_match_the_exact_values_on_a_least_squares_problem():
    prob = LeastSquares()
    blocks = partition(prob)
    assert [b.numel for b in blocks] == list(D_BLOCKS)
    gen = torch.Generator().manual_seed(1)
    batch = 4
    samples = [
        measure_pair(blocks, prob.batch(gen, batch), prob.batch(gen, batch), probes=4, gHg_probes=2,
                     fisher_samples=2, seed=k)
        for k in range(1000)
    ]  # fmt: skip
    stats = combine(blocks, samples)
    exact = prob.exact(batch)
    _check(stats.G, stats.G_se, exact["G"])
    _check(stats.noise, stats.noise_se, exact["noise"])
    _check(stats.tau, stats.tau_se, exact["tau"], rel_se=0.05)
    _check(stats.gHg, stats.gHg_se, exact["gHg"], rel_se=0.15)
    # Least squares with Gaussian labels: the Fisher is the Hessian, and gFg is g^T H g along a minibatch gradient.
    _check(stats.fisher, stats.fisher_se, exact["tau"], rel_se=0.05)
    _check(stats.gFg, stats.gFg_se, exact["gHg"], rel_se=0.15)
    assert stats.pairs == 1000 and stats.probes == 4000
    # The measurement leaves the parameters where they were.
    assert torch.equal(prob.theta(), LeastSquares().theta())


def test_one_step_expected_change_matches_monte_carlo_of_zo_steps():
    """E[L(theta - eta (u^T g) u) - L(theta)] on a quadratic with dense blocks and noisy g, vs the formula."""
    torch.manual_seed(0)
    sizes = (2, 3, 4)
    d = sum(sizes)
    H = torch.zeros(d, d, dtype=torch.float64)
    start = 0
    for k in sizes:  # block-diagonal, dense SPD blocks
        a = torch.randn(k, k, dtype=torch.float64)
        H[start : start + k, start : start + k] = a @ a.T / k + torch.eye(k, dtype=torch.float64) * 0.3
        start += k
    grad = torch.randn(d, dtype=torch.float64)
    noise_sd = torch.rand(d, dtype=torch.float64) * 0.5  # minibatch noise, diagonal covariance
    s_block = torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)
    s = torch.repeat_interleave(s_block, torch.tensor(sizes))
    eta = 0.05
    # Exact terms, block by block.
    G, noise, tau, gHg, start = [], [], [], [], 0
    for k in sizes:
        sl = slice(start, start + k)
        C = torch.diag(noise_sd[sl] ** 2)
        G.append(float(grad[sl] @ grad[sl]))
        noise.append(float(C.trace()))
        tau.append(float(H[sl, sl].trace()))
        gHg.append(float(grad[sl] @ H[sl, sl] @ grad[sl] + (H[sl, sl] * C).sum()))
        start += k
    stats = block_stats(G, noise, tau, gHg, sizes)
    predicted = float(step_terms(s_block, stats).expected_change(eta))
    # Monte Carlo: L(theta + delta) - L(theta) = grad^T delta + 0.5 delta^T H delta, delta = -eta (u^T g_t) u.
    n = 400_000
    z = torch.randn(n, d, dtype=torch.float64)
    u = z * s
    g_t = grad + torch.randn(n, d, dtype=torch.float64) * noise_sd
    delta = -eta * (u * g_t).sum(1, keepdim=True) * u
    dL = delta @ grad + 0.5 * ((delta @ H) * delta).sum(1)
    mc, se = float(dL.mean()), float(dL.std() / math.sqrt(n))
    assert se < 0.05 * abs(predicted)
    assert abs(mc - predicted) < 4 * se, (mc, se, predicted)


def test_gain_ratio_is_one_for_mezo_scale_free_and_matches_the_retuned_step():
    stats = block_stats([4.0, 1.0, 0.2], [1.0, 0.5, 0.1], [10.0, 2.0, 1.0], [30.0, 3.0, 0.5], [100, 20, 5])
    ones = torch.ones(3, dtype=torch.float64)
    assert float(gain_ratio(ones, stats)) == pytest.approx(1.0, abs=1e-15)
    s = normalize(torch.tensor([0.3, 2.0, 1.0], dtype=torch.float64), stats.n)
    assert float((stats.n * s * s).sum()) == pytest.approx(float(stats.n.sum()))
    assert float(gain_ratio(s, stats)) == pytest.approx(float(gain_ratio(7 * s, stats)), rel=1e-12)
    terms = step_terms(s, stats)
    # The gain is -E[dL] at the best eta, and no eta on a fine grid does better.
    assert float(terms.gain()) == pytest.approx(-float(terms.expected_change(terms.best_eta())), rel=1e-12)
    etas = torch.linspace(0, 3 * float(terms.best_eta()), 301, dtype=torch.float64)
    assert float(-terms.expected_change(etas).max()) <= float(terms.gain()) * (1 + 1e-12)


def _simulate_block_quadratic(w_block, l_block, sizes, f0_block, c_block, eta, steps, runs, seed=0):
    """Monte Carlo of ZO steps on sum_b 0.5 l_b ||x_b||^2 with isotropic noise tr(C_b) = c_b: mean f_K per block."""
    g = torch.Generator().manual_seed(seed)
    size_t = torch.tensor(sizes)
    l = torch.repeat_interleave(torch.tensor(l_block, dtype=torch.float64), size_t)
    s = torch.repeat_interleave(torch.tensor(w_block, dtype=torch.float64).sqrt(), size_t)
    sd = torch.repeat_interleave(torch.tensor([math.sqrt(c / k) for c, k in zip(c_block, sizes)]), size_t).double()
    # Start every run at a point with the block losses f0_b (random direction inside each block).
    x = torch.randn(runs, sum(sizes), generator=g, dtype=torch.float64)
    start = 0
    for k, f, lb in zip(sizes, f0_block, l_block):
        blk = x[:, start : start + k]
        x[:, start : start + k] = blk / blk.norm(dim=1, keepdim=True) * math.sqrt(2 * f / lb)
        start += k
    for _ in range(steps):
        u = torch.randn(runs, x.shape[1], generator=g, dtype=torch.float64) * s
        g_t = l * x + torch.randn(runs, x.shape[1], generator=g, dtype=torch.float64) * sd
        x = x - eta * (u * g_t).sum(1, keepdim=True) * u
    f = 0.5 * l * x * x
    out, start = [], 0
    for k in sizes:
        out.append(f[:, start : start + k].sum(1))
        start += k
    return torch.stack(out, 1)  # [runs, B]


def test_kstep_closed_form_matches_the_recursion_and_monte_carlo():
    sizes = (1, 3, 6)
    l_block, f0, c = [2.0, 0.5, 1.0], [1.0, 2.0, 0.5], [0.2, 0.1, 0.3]
    w = torch.tensor([0.5, 1.5, 0.9], dtype=torch.float64)
    model = QuadraticModel(n=torch.tensor(sizes, dtype=torch.float64), l=torch.tensor(l_block, dtype=torch.float64),
                           f0=torch.tensor(f0, dtype=torch.float64), c=torch.tensor(c, dtype=torch.float64))  # fmt: skip
    eta, steps = 0.08, 6
    closed = kstep_loss(w, eta, model, steps)
    # The recursion E[f_{t+1}] = M E[f_t] + d, step by step.
    M, d = transition(w, eta, model)
    f = model.f0.clone()
    for _ in range(steps):
        f = M @ f + d
    torch.testing.assert_close(closed, f, rtol=1e-12, atol=0)
    # Monte Carlo of the actual ZO steps (the size-1 block checks the "+2" of E||z||^4 = n (n + 2)).
    sim = _simulate_block_quadratic(w.tolist(), l_block, sizes, f0, c, eta, steps, runs=200_000)
    mean, se = sim.mean(0), sim.std(0) / math.sqrt(sim.shape[0])
    assert torch.all(se < 0.03 * mean)
    assert torch.all((mean - closed).abs() < 4 * se), (mean, se, closed)


def test_kstep_is_differentiable_in_w_and_the_tuned_eta_is_a_minimum():
    model = QuadraticModel(n=torch.tensor([10.0, 40.0, 5.0], dtype=torch.float64),
                           l=torch.tensor([1.0, 0.1, 3.0], dtype=torch.float64),
                           f0=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
                           c=torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))  # fmt: skip
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    res = kstep(w.sqrt(), model, 50)
    (grad,) = torch.autograd.grad(res.loss, w)
    # Finite differences of the closed form at the tuned eta.
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1e-6
        fd = kstep_loss(w.detach() + e, res.eta, model, 50).sum() - kstep_loss(w.detach() - e, res.eta, model, 50).sum()
        assert float(grad[i]) == pytest.approx(float(fd) / 2e-6, rel=1e-5, abs=1e-9)
    for factor in (0.8, 1.25):
        assert float(kstep_loss(w.detach(), res.eta * factor, model, 50).sum()) >= float(res.loss.detach())
    assert 0 < float(res.loss) < res.f0


def _toy_stats() -> BlockStats:
    # Block 2 has by far the largest G/tau; block 0 the largest G.
    return block_stats([5.0, 0.5, 2.0, 0.1], [1.0, 0.2, 0.3, 0.1], [50.0, 4.0, 1.0, 2.0], [40.0, 1.0, 1.0, 0.1],
                  [1000, 200, 50, 10])  # fmt: skip


def test_oracles_are_normalised_and_gsl_concentrates_on_the_best_ratio_block():
    stats = _toy_stats()
    n = stats.n
    for s in (gsl(stats, 1.0), gsl(stats, 0.1), hizoo(stats, 0.5), hizoo(stats, 1.0), water_filling(stats, 0.01)):
        assert float((n * s * s).sum()) == pytest.approx(float(n.sum()), rel=1e-10)
        assert bool((s >= 0).all())

    def energy(s: torch.Tensor) -> torch.Tensor:
        return n * s * s / n.sum()

    assert int(energy(gsl(stats, 0.05)).argmax()) == 2 and float(energy(gsl(stats, 0.05))[2]) > 0.99
    # Temperature -> inf is MeZO; gamma = 0 is MeZO.
    torch.testing.assert_close(gsl(stats, 1e6), torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(hizoo(stats, 0.0), torch.ones(4, dtype=torch.float64))
    # gamma = 1: s_b^2 ~ n_b / tau_b.
    s = hizoo(stats, 1.0)
    ratio = s * s / (stats.n / stats.tau)
    torch.testing.assert_close(ratio, ratio[0].expand(4))


def test_water_filling_minimises_the_fixed_eta_one_step_model():
    stats = _toy_stats()
    n, total = stats.n, stats.n.sum()
    for eta in (0.002, 0.02, 0.2):
        s = water_filling(stats, eta)
        best = float(step_terms(s, stats).expected_change(eta))
        assert best <= float(step_terms(torch.ones(4, dtype=torch.float64), stats).expected_change(eta))
        # No random allocation on the simplex does better.
        g = torch.Generator().manual_seed(0)
        x = torch.distributions.Dirichlet(torch.full((4,), 0.3, dtype=torch.float64)).sample((20_000,))
        w = x * total / n
        A = (w * stats.G).sum(1)
        T = (w * stats.tau).sum(1)
        V = (w * stats.noise).sum(1)
        Bq = (w * w * stats.gHg).sum(1)
        rand = -eta * A + 0.5 * eta * eta * ((A + V) * T + 2 * Bq)
        del g
        assert best <= float(rand.min()) + 1e-9 * abs(best)


def test_project_simplex():
    y = torch.tensor([0.5, 2.0, -1.0, 0.7], dtype=torch.float64)
    x = project_simplex(y)
    assert float(x.sum()) == pytest.approx(1.0) and bool((x >= 0).all())
    # The projection is the closest point: any other simplex point is farther from y.
    other = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((5000,))
    assert float((x - y).norm()) <= float((other - y).norm(dim=1).min()) + 1e-12


def _simulate_two_scale(w_block, l_block, rho_block, sizes, f0_block, c_block, eta, steps, runs, seed=0):
    """Monte Carlo on sum_b 0.5 (rho_b x_b0^2 + l_b ||x_b,1:||^2), starting with the bulk at 0; noise in the bulk."""
    g = torch.Generator().manual_seed(seed)
    size_t = torch.tensor(sizes)
    k = torch.repeat_interleave(torch.tensor(l_block, dtype=torch.float64), size_t)
    sd = torch.repeat_interleave(
        torch.tensor([math.sqrt(c / (m - 1)) for c, m in zip(c_block, sizes)]), size_t
    ).double()
    first = torch.zeros(sum(sizes), dtype=torch.bool)
    first[torch.cumsum(size_t, 0) - size_t] = True
    k = torch.where(first, torch.repeat_interleave(torch.tensor(rho_block, dtype=torch.float64), size_t), k)
    sd = torch.where(first, torch.zeros_like(sd), sd)
    s = torch.repeat_interleave(torch.tensor(w_block, dtype=torch.float64).sqrt(), size_t)
    x = torch.zeros(runs, sum(sizes), dtype=torch.float64)
    x[:, first] = torch.tensor([math.sqrt(2 * f / r) for f, r in zip(f0_block, rho_block)], dtype=torch.float64)
    for _ in range(steps):
        u = torch.randn(runs, x.shape[1], generator=g, dtype=torch.float64) * s
        g_t = k * x + torch.randn(runs, x.shape[1], generator=g, dtype=torch.float64) * sd
        x = x - eta * (u * g_t).sum(1, keepdim=True) * u
    f = 0.5 * k * x * x
    return torch.stack([blk.sum(1) for blk in torch.split(f, list(sizes), dim=1)], 1)


def test_two_scale_kstep_matches_monte_carlo_and_reduces_to_the_isotropic_model():
    sizes = (2, 4, 6)
    l_block, rho_block, f0, c = [0.2, 0.1, 0.3], [3.0, 1.0, 5.0], [0.5, 1.0, 0.3], [0.1, 0.2, 0.1]
    w = torch.tensor([0.6, 1.4, 0.8], dtype=torch.float64)

    def t(x: list[float] | tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float64)

    model = QuadraticModel(n=t(sizes), l=t(l_block), f0=t(f0), c=t(c), rho=t(rho_block))
    eta, steps = 0.05, 8
    closed = kstep_loss(w, eta, model, steps)
    sim = _simulate_two_scale(w.tolist(), l_block, rho_block, sizes, f0, c, eta, steps, runs=200_000)
    mean, se = sim.mean(0), sim.std(0) / math.sqrt(sim.shape[0])
    assert torch.all(se < 0.03 * mean)
    assert torch.all((mean - closed).abs() < 4 * se), (mean, se, closed)
    # With rho = l every direction of a block is alike: the two-scale model is the isotropic one.
    iso = QuadraticModel(n=t(sizes), l=t(l_block), f0=t(f0), c=t(c))
    same = QuadraticModel(n=t(sizes), l=t(l_block), f0=t(f0), c=t(c), rho=t(l_block))
    torch.testing.assert_close(kstep_loss(w, eta, same, steps), kstep_loss(w, eta, iso, steps), rtol=1e-12, atol=0)


def test_two_scale_model_from_stats_puts_the_gradient_in_its_sharp_direction():
    # gHg = rho G + l c with rho = 50 x l: the model recovers rho and f0 = G / (2 rho).
    n = [100.0, 400.0]
    tau, G, c = [10.0, 8.0], [2.0, 0.5], [0.4, 0.3]
    l = [tau[0] / n[0], tau[1] / n[1]]
    rho = [50 * l[0], 50 * l[1]]
    gHg = [rho[i] * G[i] + l[i] * c[i] for i in range(2)]
    m = QuadraticModel.from_stats(block_stats(G, c, tau, gHg, n))
    assert m.rho is not None
    torch.testing.assert_close(m.rho, torch.tensor(rho, dtype=torch.float64))
    torch.testing.assert_close(m.f0, torch.tensor([G[i] / (2 * rho[i]) for i in range(2)], dtype=torch.float64))
    iso = QuadraticModel.from_stats(block_stats(G, c, tau, gHg, n), two_scale=False)
    assert iso.rho is None and float(iso.f0.sum()) > 40 * float(m.f0.sum())


def test_water_filling_eta_is_skipped_not_fatal_where_the_gradient_is_unresolved():
    from l2zo.blockstats.oracles import water_filling_eta

    stats = _toy_stats()
    eta = water_filling_eta(stats, None)
    assert eta is not None and eta == pytest.approx(
        float(step_terms(torch.ones(4, dtype=torch.float64), stats).best_eta())
    )
    assert water_filling_eta(stats, 0.01) == 0.01
    # sum_b G_b <= 0 (the minibatch noise swamps the gradient, as on SmolLM2 x RTE with 4 pairs of 8): no
    # positive one-step eta, so no water-filling allocation; the probe reports the others instead of failing.
    unresolved = block_stats([-5.0, 0.5, 2.0, 0.1], [1.0, 0.2, 0.3, 0.1], [50.0, 4.0, 1.0, 2.0], [40.0, 1.0, 1.0, 0.1],
                        [1000, 200, 50, 10])  # fmt: skip
    assert water_filling_eta(unresolved, None) is None
