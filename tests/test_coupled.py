"""The coupled K-step model (l2zo.blockstats.coupled) and the Hessian Gram it is fitted to (coupling_stats):
against the separable two-scale model when nothing couples, a Monte Carlo run of the ZO process on an explicit
quadratic, and brute force on a model whose Hessian is known."""

from __future__ import annotations

import math

import pytest
import torch

from l2zo.blockstats.coupled import CoupledModel, coupled_change, coupled_kstep, coupled_ratio, tune_coupled_eta
from l2zo.blockstats.coupling_stats import gradient_gram
from l2zo.blockstats.gain import QuadraticModel, kstep_loss
from l2zo.engine.blocks import Block
from l2zo.errors import L2ZOError
from tests.helpers import block_stats

STATS = block_stats(G=[1.0, 0.2, -0.1], noise=[0.5, 0.3, 0.2], tau=[10.0, 400.0, 30.0], gHg=[2.0, 4.0, 1.0],
                    n=[100.0, 400.0, 50.0])  # fmt: skip


def _f64(*xs):
    return [torch.tensor(x, dtype=torch.float64) for x in xs]


@pytest.mark.parametrize("steps", [1, 7, 40])
def test_without_coupling_it_is_the_two_scale_model(steps):
    qm = QuadraticModel.from_stats(STATS)
    cm = CoupledModel.diagonal(qm.n, qm.l, qm.c, STATS.G, qm.rho)
    for w, eta in [((1.0, 1.0, 1.0), 1e-3), ((2.0, 0.3, 1.1), 4e-4)]:
        w = torch.tensor(w, dtype=torch.float64)
        separable = kstep_loss(w, eta, qm, steps).sum() - qm.f0.sum()  # E[L_K] - L_0
        assert float(coupled_change(w, eta, cm, steps)) == pytest.approx(float(separable), rel=1e-9, abs=1e-12)


def test_a_gram_without_cross_terms_gives_the_two_scale_signal():
    qm = QuadraticModel.from_stats(STATS)
    G = STATS.G
    gram = torch.diag(G.clamp_min(0.0) * qm.rho)
    cm = CoupledModel.from_gram(STATS, G, gram)
    assert torch.allclose(torch.diagonal(cm.K), qm.rho)  # the unresolved block: rho = l there too
    assert float(cm.r[2]) == 0.0 and float(cm.K[0, 1]) == 0.0


def test_the_gram_is_projected_onto_the_psd_cone_and_checked():
    G = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    gram = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)  # eigenvalue -1
    cm = CoupledModel.from_gram(STATS, G, gram)
    assert float(torch.linalg.eigvalsh(cm.K).min()) > -1e-9
    with pytest.raises(L2ZOError, match="must be"):
        CoupledModel.from_gram(STATS, G, gram[:2, :2])
    with pytest.raises(L2ZOError, match="non-finite"):
        CoupledModel.from_gram(STATS, G, gram * math.nan)


def _explicit(n, r, K, l, c):
    """The coupled model's loss written out: block b's first coordinate is its signal direction."""
    starts = [sum(n[:b]) for b in range(len(n))]
    sig = torch.tensor(starts)
    H = torch.zeros(sum(n), sum(n), dtype=torch.float64)
    for b, s0 in enumerate(starts):
        H[s0 + 1 : s0 + n[b], s0 + 1 : s0 + n[b]] = torch.eye(n[b] - 1, dtype=torch.float64) * l[b]
    H[sig[:, None], sig[None, :]] = K
    lin = torch.zeros(sum(n), dtype=torch.float64)
    lin[sig] = -r
    bulk_noise = torch.zeros(sum(n), dtype=torch.float64)  # per-coordinate noise variance, bulk only
    for b, s0 in enumerate(starts):
        bulk_noise[s0 + 1 : s0 + n[b]] = c[b] / (n[b] - 1)
    return H, lin, bulk_noise


def test_it_matches_a_monte_carlo_run_of_the_zo_process():
    n = [3, 4]
    r, l, c = _f64([1.0, 0.7], [0.5, 0.8], [0.3, 0.2])
    K = torch.tensor([[2.0, 1.2], [1.2, 3.0]], dtype=torch.float64)
    model = CoupledModel(n=torch.tensor(n, dtype=torch.float64), l=l, c=c, r=r, K=K)
    H, lin, noise_var = _explicit(n, r, K, l, c)
    w = torch.tensor([1.5, 0.6], dtype=torch.float64)
    s = torch.cat([torch.full((nb,), float(w[b]) ** 0.5, dtype=torch.float64) for b, nb in enumerate(n)])
    eta, steps, runs = 0.05, 12, 200_000
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(runs, sum(n), dtype=torch.float64)
    for _ in range(steps):
        grad = theta @ H + lin + torch.randn(runs, sum(n), generator=gen, dtype=torch.float64) * noise_var.sqrt()
        u = torch.randn(runs, sum(n), generator=gen, dtype=torch.float64) * s
        theta = theta - eta * (u * grad).sum(dim=1, keepdim=True) * u
    loss = 0.5 * ((theta @ H) * theta).sum(dim=1) + theta @ lin
    predicted = float(coupled_change(w, eta, model, steps))
    se = float(loss.std()) / runs**0.5
    assert predicted < -0.1  # a real decrease, so the comparison is informative
    assert abs(float(loss.mean()) - predicted) < 4 * se + 1e-3


def test_coupling_lowers_what_the_gradient_directions_can_remove():
    n, l, c = _f64([10.0, 10.0], [0.1, 0.1], [0.0, 0.0])
    r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    apart = CoupledModel(n=n, l=l, c=c, r=r, K=torch.diag(torch.tensor([1.0, 1.0], dtype=torch.float64)))
    shared = CoupledModel(n=n, l=l, c=c, r=r, K=torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64))
    assert apart.reducible() == pytest.approx(1.0)  # 1/2 + 1/2
    assert shared.reducible() == pytest.approx(1.0 / 1.9)  # one loss seen from two blocks
    # at MeZO's allocation and a long horizon the predicted decrease tends to what can be removed
    assert coupled_kstep(torch.ones(2, dtype=torch.float64), shared, 2000).decrease == pytest.approx(
        shared.reducible(), rel=0.05
    )
    assert coupled_ratio(torch.ones(2, dtype=torch.float64), shared, 50) == pytest.approx(1.0)


def test_a_warm_started_eta_search_finds_the_full_searchs_optimum():
    n, l, c = _f64([50.0, 20.0, 5.0], [0.05, 0.2, 0.4], [0.3, 0.1, 0.0])
    r = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    K = torch.tensor([[1.0, 0.5, 0.1], [0.5, 2.0, 0.3], [0.1, 0.3, 0.7]], dtype=torch.float64)
    model = CoupledModel(n=n, l=l, c=c, r=r, K=K)
    w = torch.tensor([1.2, 0.8, 0.5], dtype=torch.float64)
    full = tune_coupled_eta(w, model, 40)
    nudged = tune_coupled_eta(w * torch.tensor([1.05, 0.97, 1.0], dtype=torch.float64), model, 40)
    assert tune_coupled_eta(w, model, 40, near=nudged) == pytest.approx(full, rel=1e-3)  # the last iterate's eta
    assert tune_coupled_eta(w, model, 40, near=full * 30) == pytest.approx(full, rel=1e-3)  # far off: full search


class _Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([[0.1, 0.4], [-0.3, 0.2]], dtype=torch.float64))

    def flat(self):
        return torch.cat([self.a, self.b.reshape(-1)])


def test_gradient_gram_matches_brute_force_on_a_known_hessian():
    model = _Quadratic()
    gen = torch.Generator().manual_seed(1)
    Hs, bs = [], []
    for _ in range(2):  # two chunks with their own quadratic (the mean is what is measured)
        m = torch.randn(7, 7, generator=gen, dtype=torch.float64)
        Hs.append(m @ m.T / 7 + torch.eye(7, dtype=torch.float64) * 0.1)
        bs.append(torch.randn(7, generator=gen, dtype=torch.float64))
    fns = [lambda H=H, b=b: 0.5 * model.flat() @ H @ model.flat() - b @ model.flat() for H, b in zip(Hs, bs)]
    blocks = [Block(0, "a", model.a), Block(1, "b", model.b)]
    got = gradient_gram(blocks, fns)
    H = (Hs[0] + Hs[1]) / 2
    g = H @ model.flat().detach() - (bs[0] + bs[1]) / 2
    parts = [slice(0, 3), slice(3, 7)]
    want = torch.tensor([[float(g[p] @ H[p, q] @ g[q]) for q in parts] for p in parts], dtype=torch.float64)
    assert torch.allclose(got.gram, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got.G, torch.tensor([float(g[p] @ g[p]) for p in parts], dtype=torch.float64))
    assert got.chunks == 2
    assert got.coupling() == pytest.approx(float(want.sum() / torch.diagonal(want).sum()))
    with pytest.raises(L2ZOError, match="at least one"):
        gradient_gram(blocks, [])
