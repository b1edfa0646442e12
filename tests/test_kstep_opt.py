"""The allocation that maximises the K-step prediction (l2zo.blockstats.kstep_opt), on small block models whose
optimum can be found by brute force."""

from __future__ import annotations

import math

import pytest
import torch

from l2zo.blockstats import BlockStats, gsl
from l2zo.blockstats.gain import QuadraticModel, kstep, normalize
from l2zo.blockstats.kstep_opt import kstep_optimal
from l2zo.blockstats.transfer import kstep_scorer, leave_one_out_kstep
from l2zo.errors import L2ZOError
from tests.helpers import block_stats

# Two blocks: the first holds most of the gradient at low curvature, the second is large and sharp.
TWO = block_stats(G=[1.0, 0.2], noise=[0.5, 0.5], tau=[10.0, 400.0], gHg=[2.0, 4.0], n=[100.0, 400.0])


def _brute_force_two_blocks(stats: BlockStats, horizon: int) -> float:
    """max R_K over the one free ratio s_1 / s_0 of a two-block allocation (normalisation fixes the scale)."""
    model = QuadraticModel.from_stats(stats)
    base = kstep(torch.ones(2, dtype=torch.float64), model, horizon).decrease
    best = -math.inf
    for log_ratio in torch.linspace(-6, 6, 241).tolist():
        s = normalize(torch.tensor([1.0, math.exp(log_ratio)], dtype=torch.float64), stats.n)
        best = max(best, kstep(s, model, horizon).decrease / base)
    return best


def test_kstep_optimal_finds_the_brute_force_optimum_of_two_blocks():
    res = kstep_optimal([TWO], 50, iters=200, lr=0.1)
    assert float((TWO.n * res.s**2).sum()) == pytest.approx(float(TWO.n.sum()), rel=1e-9)  # normalised
    brute = _brute_force_two_blocks(TWO, 50)
    assert brute > 1.2  # the problem has headroom over MeZO, so the check is informative
    assert res.ratios[0] == pytest.approx(brute, rel=0.01)
    # never worse than its start (MeZO, R_K = 1) and the best iterate is what it returns
    assert res.objective[0] == pytest.approx(0.0, abs=1e-12)
    assert math.log(res.ratios[0]) == pytest.approx(float(res.objective.max()), rel=1e-6)
    # as good as the GS-L oracle on the criterion it optimises (here both sit on the flat top, s_1 -> 0)
    assert res.ratios[0] >= 0.995 * kstep_scorer(TWO, 50)(gsl(TWO, 0.5))


def test_kstep_optimal_over_tasks_maximises_the_mean_log_ratio_and_loo_never_sees_the_task():
    # three tasks on the same blocks: two favour block 0, one block 1 (swapped gradients)
    a = TWO
    b = block_stats(G=[0.9, 0.25], noise=[0.5, 0.5], tau=[12.0, 380.0], gHg=[2.0, 4.0], n=[100.0, 400.0])
    c = block_stats(G=[0.05, 1.0], noise=[0.5, 0.5], tau=[10.0, 400.0], gHg=[0.5, 40.0], n=[100.0, 400.0])
    both = kstep_optimal([a, b], 50, iters=200)
    for single in (kstep_optimal([a], 50, iters=200), kstep_optimal([b], 50, iters=200)):
        # the joint optimum of the mean log R_K beats each single-task optimum on that mean
        joint = sum(math.log(r) for r in both.ratios) / 2
        other = [kstep_scorer(x, 50)(single.s) for x in (a, b)]
        assert joint >= sum(math.log(r) for r in other) / 2 - 1e-3  # Adam on a flat top: 0.1%
    loo = leave_one_out_kstep({"a": a, "b": b, "c": c}, 50, tasks=["c"], iters=200)["c"]
    # kopt-others of c is fitted to a and b only: the same allocation as optimising on them directly
    torch.testing.assert_close(loo["kopt-others"].s, both.s)
    # on c, its own optimum beats the allocation learned from the tasks that favour the other block
    assert loo["kopt-own"].ratios[0] > kstep_scorer(c, 50)(loo["kopt-others"].s)


def test_kstep_optimal_refuses_bad_input_with_one_line():
    with pytest.raises(L2ZOError, match="at least one task"):
        kstep_optimal([], 50)
    with pytest.raises(L2ZOError, match="horizon >= 1"):
        kstep_optimal([TWO], 0)
    other_blocks = block_stats(G=[1.0, 0.2], noise=[0.5, 0.5], tau=[10.0, 400.0], gHg=[2.0, 4.0], n=[100.0, 300.0])
    with pytest.raises(L2ZOError, match="different blocks"):
        kstep_optimal([TWO, other_blocks], 50)
    flat = block_stats(G=[0.0, -0.1], noise=[0.5, 0.5], tau=[10.0, 400.0], gHg=[2.0, 4.0], n=[100.0, 400.0])
    with pytest.raises(L2ZOError, match="no decrease for MeZO"):
        kstep_optimal([flat], 50)
    with pytest.raises(L2ZOError, match="no statistics for task"):
        leave_one_out_kstep({"a": TWO, "b": TWO}, 50, tasks=["c"])


def test_kstep_optimal_under_the_coupled_model_finds_its_brute_force_optimum():
    from l2zo.blockstats.coupled import CoupledModel, coupled_kstep
    from l2zo.blockstats.coupling_stats import Gram

    # the two blocks' gradients share curvature: moving one spends loss the other points at
    gram = Gram(G=TWO.G, gram=torch.tensor([[2.0, 1.5], [1.5, 4.0]], dtype=torch.float64), loss=1.0, chunks=1)
    model = CoupledModel.from_gram(TWO, gram.G, gram.gram)
    base = coupled_kstep(torch.ones(2, dtype=torch.float64), model, 30).decrease
    brute = (
        max(
            coupled_kstep(normalize(torch.tensor([1.0, math.exp(r)], dtype=torch.float64), TWO.n), model, 30).decrease
            for r in torch.linspace(-6, 6, 61).tolist()
        )
        / base
    )
    assert brute > 1.1
    res = kstep_optimal([TWO], 30, iters=60, lr=0.2, grams=[gram])
    assert res.ratios[0] == pytest.approx(brute, rel=0.01)
    with pytest.raises(L2ZOError, match="one Gram per statistics"):
        kstep_optimal([TWO], 30, grams=[gram, gram])
