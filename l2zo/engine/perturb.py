"""In-place, seeded updates of the form theta_b <- a_b * theta_b + c_b * z_b(seed).

Every ZO step is made of such passes: the +eps and -2*eps perturbations, and the fused restore and
update (MeZO's restore then update, in one pass: 3 regenerations of z a step instead of 4). Updates
are in place with fused scaling (``add_(z, alpha=c)``), so no parameter-sized temporary exists.

Exactness: in fp32, theta + eps*z - 2*eps*z + eps*z differs from theta by at most one ulp per
entry (rounding), whichever order is used. Returning bit for bit would need a copy of theta, which
is the memory ZO exists to save. The drift is a zero-mean random walk of ulp size, orders of
magnitude below an update lr*g*z (tests bound it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from l2zo.engine.blocks import Block
from l2zo.engine.seeding import ZSource

# visit(block, start, end, theta_chunk, z_chunk): theta_chunk is a flat view into the parameter.
ChunkVisitor = Callable[[Block, int, int, torch.Tensor, torch.Tensor], None]


def for_each_z(blocks: Sequence[Block], seed: int, zsrc: ZSource, visit: ChunkVisitor) -> None:
    """Regenerate z(seed) block by block, chunk by chunk, and hand each chunk to ``visit``.

    The generic pass for update rules that need z together with state (momentum, Adam moments):
    ``visit`` receives flat views ``theta[start:end]`` and ``z[start:end]`` ([n] each), of the local shard when the
    block is sharded (``Block.local``; ``start``/``end`` index it). Chunks are drawn
    ahead on ``zsrc``'s worker threads (``ZSource.stream``); ``visit`` runs on the caller's thread, in order.
    """
    for b, start, end, z in zsrc.stream(blocks, seed):
        visit(b, start, end, b.local.view(-1)[start:end], z)


@torch.no_grad()
def axpby_z_(
    blocks: Sequence[Block],
    seed: int,
    zsrc: ZSource,
    coef: Sequence[float],
    decay: Sequence[float] | None = None,
) -> None:
    """theta_b <- decay_b * theta_b + coef_b * z_b(seed) for every block, in place.

    Args:
        coef: [B] multiplier of z per block (e.g. eps * sigma_b).
        decay: [B] multiplier of theta per block (1 - lr*wd), or None for all ones.
    Blocks with coef 0 need no z and are not regenerated.
    """
    moving = []
    for b in blocks:
        d = 1.0 if decay is None else float(decay[b.index])
        if d != 1.0:
            b.local.mul_(d)
        if float(coef[b.index]) != 0.0:
            moving.append(b)
    for b, start, end, z in zsrc.stream(moving, seed):
        b.local.view(-1)[start:end].add_(z, alpha=float(coef[b.index]))


@torch.no_grad()
def axpby2_z_(
    blocks: Sequence[Block],
    first: tuple[int, Sequence[float]],
    second: tuple[int, Sequence[float]],
    zsrc: ZSource,
    decay: Sequence[float] | None = None,
) -> None:
    """theta_b <- decay_b * theta_b + a_b * z_b(seed_a) + c_b * z_b(seed_c) for every block, in place, where
    ``first`` = (seed_a, [B] a) and ``second`` = (seed_c, [B] c): the two-pass step's fused pass.

    With a noise table both windows are added chunk by chunk while theta's chunk is in cache: one pass over the
    weights. With ``randn`` the cost is drawing z, whatever the passes, so it is two ``axpby_z_`` passes.
    """
    (seed_a, a), (seed_c, c) = first, second
    if zsrc.table is None:
        axpby_z_(blocks, seed_a, zsrc, a, decay)
        axpby_z_(blocks, seed_c, zsrc, c)
        return
    for b in blocks:
        d = 1.0 if decay is None else float(decay[b.index])
        if d != 1.0:
            b.local.mul_(d)
    for (b, start, end, za), (_, _, _, zc) in zip(zsrc.stream(blocks, seed_a), zsrc.stream(blocks, seed_c)):
        chunk = b.local.view(-1)[start:end]
        chunk.add_(za, alpha=float(a[b.index]))
        chunk.add_(zc, alpha=float(c[b.index]))


def perturb_(
    blocks: Sequence[Block], seed: int, zsrc: ZSource, scale: float, sigma: Sequence[float] | None = None
) -> None:
    """theta_b += scale * sigma_b * z_b(seed); sigma None means 1 for every block (MeZO)."""
    coef = [scale * (1.0 if sigma is None else float(sigma[b.index])) for b in blocks]
    axpby_z_(blocks, seed, zsrc, coef)
