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
