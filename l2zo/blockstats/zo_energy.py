"""Per-block gradient energy G_b from forward passes only: the half of the GS-L oracle that is the task's.

``l2zo.blockstats.transfer.decompose_gain`` finds on the tiny world that the per-element curvature of the blocks is
shared across tasks (it can come from meta-training or the artifact) while the gradient shares are what a task
changes. A ZO fine-tune has no backward pass, so G_b must then be measured with forwards. For a block b, a probe
direction z ~ N(0, I) on that block alone and two independent batches a, b:

    c^x = (L_x(theta + eps z) - L_x(theta - eps z)) / (2 eps) = <g^x_b, z> + O(eps^2)   (x = a, b)
    E_z[c^a c^b] = <g^a_b, g^b_b>,  whose expectation over the batches is G_b = ||grad_b L||^2
    E_z[(c^a)^2 + (c^b)^2] / 2 = (||g^a_b||^2 + ||g^b_b||^2) / 2 = G_b + tr(C_b)   (the noise, as in ``stats``)

Where the loss is a cross-entropy whose labels can be drawn from the model (classification), the same directions
also give the Fisher trace: with labels y ~ p_theta drawn once per batch at theta and held fixed (``fisher_a``,
``fisher_b``), c~^x = the antithetic difference of that loss, and B E_z[(c~^x)^2] = B ||g~^x_b||^2, unbiased for
tr(F_bb) of the mean loss as in ``stats`` (4 more forwards per block and probe, and one per batch for the labels).
That is the curvature half of the GS-L oracle, so the whole oracle can be measured without a backward pass.

The z is restricted to the block because a full-model z mixes the blocks in one scalar: the per-block estimate
that can be read off full-model probes has a variance ~ n_b (sum_c G_c / G_b)^2 times larger. The product of two
batches removes the minibatch noise from the mean (it stays in the variance). Cost: 4 forwards per block and probe,
4 * probes * B in all, on top of which nothing else is needed. The antithetic difference is exact on a quadratic,
so the estimate is unbiased there for any eps.

Pure function over loss closures; no Lightning, no model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.engine.blocks import Block
from l2zo.engine.hashing import mix_seed
from l2zo.errors import L2ZOError

LossFn = Callable[[], Tensor]


@dataclass(frozen=True)
class ZOEnergy:
    """Forward-only per-block statistics at one model state (all [B] float64 on CPU).

    Attributes:
        G: mean over probes of c^a c^b, unbiased for <g^a_b, g^b_b>.
        sq: mean over probes of ((c^a)^2 + (c^b)^2) / 2, unbiased for G_b + tr(C_b) over batches.
        G_se: standard error of G over the probes (nan with one probe).
        probes: probe directions per block.
        forwards: forward passes spent (4 * probes * B, twice that with the Fisher, plus its 2 label draws).
        fisher: batch_size x the mean over probes and both batches of (c~)^2, unbiased for tr(F_bb); None without
            ``fisher_a`` / ``fisher_b``.
    """

    G: Tensor
    sq: Tensor
    G_se: Tensor
    probes: int
    forwards: int
    fisher: Tensor | None = None


def _direction(block: Block, seed: int, k: int) -> Tensor:
    """z ~ N(0, I) over the block's entries, drawn on CPU from (seed, block index, probe k): device-independent."""
    gen = torch.Generator().manual_seed(mix_seed(seed, block.index, k))
    return torch.randn(block.param.shape, generator=gen, dtype=torch.float32).to(block.param.device, block.param.dtype)


def _difference(block: Block, saved: Tensor, z: Tensor, eps: float, loss: LossFn) -> float:
    """(L(theta + eps z) - L(theta - eps z)) / (2 eps) along z on ``block``; theta copied back from ``saved``."""
    block.param.add_(z, alpha=eps)
    plus = float(loss())
    block.param.copy_(saved).sub_(z, alpha=eps)
    minus = float(loss())
    block.param.copy_(saved)
    if not (math.isfinite(plus) and math.isfinite(minus)):
        raise L2ZOError(f"a probe of block {block.name} gave a non-finite loss ({plus:.4g}, {minus:.4g}); lower eps")
    return (plus - minus) / (2 * eps)


@torch.no_grad()
def zo_block_energy(
    blocks: Sequence[Block],
    loss_a: LossFn,
    loss_b: LossFn,
    *,
    eps: float = 1e-3,
    probes: int = 4,
    seed: int = 0,
    fisher_a: LossFn | None = None,
    fisher_b: LossFn | None = None,
    batch_size: int = 1,
) -> ZOEnergy:
    """G_b (and, with ``fisher_a`` and ``fisher_b``, tr(F_bb)) per block from block-restricted antithetic probes
    on two batches (see the module doc).

    ``loss_a`` and ``loss_b`` evaluate the mean loss of two independent, fixed batches at the current parameters
    (dropout off); ``fisher_a`` / ``fisher_b`` the same batches' loss at labels drawn from the model once and held
    fixed, over ``batch_size`` examples each. The parameters are copied back block by block, so they end
    bit-identical to how they started.
    """
    if not eps > 0 or not math.isfinite(eps):
        raise L2ZOError(f"the probe eps must be a finite number > 0, got {eps}")
    if probes < 1:
        raise L2ZOError(f"the forward-only G probe needs probes >= 1 per block, got {probes}")
    if (fisher_a is None) != (fisher_b is None):
        raise L2ZOError("the forward-only Fisher needs the sampled-label loss of both batches (fisher_a, fisher_b)")
    fisher_losses = () if fisher_a is None or fisher_b is None else (fisher_a, fisher_b)
    prod = torch.zeros(len(blocks), probes, dtype=torch.float64)
    sq = torch.zeros(len(blocks), probes, dtype=torch.float64)
    fisher = torch.zeros(len(blocks), probes, dtype=torch.float64)
    for i, block in enumerate(blocks):
        saved = block.param.detach().clone()
        for k in range(probes):
            z = _direction(block, seed, k)
            ca, cb = (_difference(block, saved, z, eps, loss) for loss in (loss_a, loss_b))
            prod[i, k] = ca * cb
            sq[i, k] = (ca**2 + cb**2) / 2
            if fisher_losses:
                fisher[i, k] = batch_size * sum(_difference(block, saved, z, eps, f) ** 2 for f in fisher_losses) / 2
    nan = torch.full((len(blocks),), math.nan, dtype=torch.float64)
    se = prod.std(dim=1) / math.sqrt(probes) if probes > 1 else nan
    per_direction = 4 * probes * len(blocks)
    return ZOEnergy(
        G=prod.mean(dim=1), sq=sq.mean(dim=1), G_se=se, probes=probes,
        forwards=per_direction * 2 + 2 if fisher_losses else per_direction,
        fisher=fisher.mean(dim=1) if fisher_losses else None,
    )  # fmt: skip
