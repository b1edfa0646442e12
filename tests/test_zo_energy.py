"""The forward-only per-block G probe (``l2zo.blockstats.zo_energy``) against brute force on a least-squares model."""

from __future__ import annotations

import math

import pytest
import torch

from l2zo.blockstats.zo_energy import _direction, zo_block_energy
from l2zo.engine.blocks import partition
from l2zo.errors import L2ZOError
from tests.test_blockstats import LeastSquares


def _setup(size: int = 4):
    """A least-squares model, its blocks, two fixed batches and their exact per-block gradients."""
    model = LeastSquares()
    blocks = partition(model)
    gen = torch.Generator().manual_seed(3)
    a, b = model.batch(gen, size), model.batch(gen, size)
    ga = torch.autograd.grad(a.loss(), [blk.param for blk in blocks])
    gb = torch.autograd.grad(b.loss(), [blk.param for blk in blocks])
    return blocks, a, b, ga, gb


def test_each_probe_is_the_exact_product_of_directional_derivatives_on_a_quadratic():
    """The antithetic difference is exact on a quadratic: one probe's c^a c^b is <g^a_b, z><g^b_b, z> to rounding."""
    blocks, a, b, ga, gb = _setup()
    before = [blk.param.detach().clone() for blk in blocks]
    got = zo_block_energy(blocks, a.loss, b.loss, eps=0.5, probes=1, seed=7)
    for i, blk in enumerate(blocks):
        z = _direction(blk, 7, 0)
        want = float(ga[i] @ z) * float(gb[i] @ z)
        assert float(got.G[i]) == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert float(got.sq[i]) == pytest.approx((float(ga[i] @ z) ** 2 + float(gb[i] @ z) ** 2) / 2, rel=1e-9)
        assert torch.equal(blk.param, before[i])  # copied back bit for bit
    assert got.forwards == 4 * len(blocks) and got.probes == 1 and bool(torch.isnan(got.G_se).all())


def test_the_mean_over_probes_is_unbiased_for_the_two_batch_gradient_product():
    blocks, a, b, ga, gb = _setup()
    got = zo_block_energy(blocks, a.loss, b.loss, eps=1e-2, probes=3000, seed=0)
    for i in range(len(blocks)):
        exact = float(ga[i] @ gb[i])
        assert abs(float(got.G[i]) - exact) < 4 * float(got.G_se[i]) + 1e-9
        exact_sq = float(ga[i] @ ga[i] + gb[i] @ gb[i]) / 2
        assert float(got.sq[i]) == pytest.approx(exact_sq, rel=0.15)
    assert got.forwards == 4 * 3000 * len(blocks)


def test_bad_settings_and_non_finite_losses_are_refused_in_one_line():
    blocks, a, b, _, _ = _setup()
    with pytest.raises(L2ZOError, match="eps must be"):
        zo_block_energy(blocks, a.loss, b.loss, eps=0.0)
    with pytest.raises(L2ZOError, match="probes >= 1"):
        zo_block_energy(blocks, a.loss, b.loss, probes=0)
    before = [blk.param.detach().clone() for blk in blocks]
    with pytest.raises(L2ZOError, match="non-finite loss"):
        zo_block_energy(blocks, a.loss, lambda: torch.tensor(math.inf))
    assert all(torch.equal(blk.param, p) for blk, p in zip(blocks, before))  # restored before the raise


def test_the_fisher_half_is_the_batch_size_times_the_squared_derivative_at_fixed_sampled_labels():
    """With labels drawn once and held fixed, each probe's Fisher term is B * mean_x <g~^x_b, z>^2 exactly on a
    quadratic (g~: the gradient at those labels), the parameters come back bit for bit, and the forwards are
    counted (twice the G probe's, plus one label draw per batch)."""
    model = LeastSquares()
    blocks = partition(model)
    gen = torch.Generator().manual_seed(5)
    size = 4
    fixed = []
    for _ in range(2):
        idx = torch.randint(0, model.X.shape[0], (size,), generator=gen)
        with torch.no_grad():  # Gaussian labels from the model itself, drawn once
            y = model.X[idx] @ model.theta() + torch.randn(size, 4, generator=gen, dtype=torch.float64)
        fixed.append((lambda i, t: lambda: model.loss(i, t))(idx, y))
    grads = [torch.autograd.grad(f(), [blk.param for blk in blocks]) for f in fixed]
    before = [blk.param.detach().clone() for blk in blocks]
    a, b = model.batch(gen, size), model.batch(gen, size)
    got = zo_block_energy(blocks, a.loss, b.loss, eps=0.5, probes=1, seed=2, fisher_a=fixed[0], fisher_b=fixed[1],
                          batch_size=size)  # fmt: skip
    assert got.fisher is not None
    for i, blk in enumerate(blocks):
        z = _direction(blk, 2, 0)
        want = size * sum(float(g[i] @ z) ** 2 for g in grads) / 2
        assert float(got.fisher[i]) == pytest.approx(want, rel=1e-9)
        assert torch.equal(blk.param, before[i])
    assert got.forwards == 8 * len(blocks) + 2
    with pytest.raises(L2ZOError, match="both batches"):
        zo_block_energy(blocks, a.loss, b.loss, fisher_a=fixed[0])
