"""Sparse MeZO (S-MeZO; Liu et al., 2024, arXiv 2402.15751): MeZO on the smallest-magnitude weights only.

No reference code was read (baselines.md §3.9 works from a paraphrase of the paper). The paper fixes a
per-layer threshold h_b before training, by percentile at a target sparsity, and recomputes the mask
m = 1[|theta| <= h_b] from the current weights every step ("GetMask").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from l2zo.engine import Block, for_each_z
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.base import Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer
from l2zo.optim.state import lr_and_decay

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack(mask: torch.Tensor, out: torch.Tensor) -> None:
    """Pack a bool [n] into uint8 [ceil(n/8)], little-endian bits."""
    n = mask.numel()
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(-1, 8)
    out.copy_((m * _BITS.to(mask.device)).sum(dim=1, dtype=torch.uint8))


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = _BITS.to(packed.device)
    return (packed.unsqueeze(1) & bits).ne(0).view(-1)[:n]


@dataclass(kw_only=True)
class SparseMeZOHParams(ZOHParams):
    sparsity: float = 0.8  # the fraction of each block left untouched (0.8: the 20% smallest |theta| are tuned)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise L2ZOError(f"sparsity must be in [0, 1), got {self.sparsity}")


class SparseMeZO(ZOOptimizer):
    """Sparse MeZO: MeZO restricted to the entries with |theta| <= h_b::

        m = 1[|theta| <= h_b];   u = m * z;   g = (L(theta + eps u) - L(theta - eps u)) / (2 eps)
        theta <- theta - lr * m * (g z + wd theta)

    h_b is the ``(1 - sparsity)`` quantile of |theta_b|, computed per block at the first step (the
    paper fixes it before training) and kept in the state; ``sparsity`` is the fraction left untouched
    (0.8: the 20% smallest weights are tuned). Entries outside the mask are never written.

    The mask must be the one computed from the unperturbed theta in all three passes (+eps, -2eps, and
    the fused restore + update). It cannot be recomputed from the perturbed weights: an entry near h_b
    can cross it under +eps*z, and no rule on (theta + eps*m*z, z) can tell "masked, moved" from
    "unmasked, not moved". So the first pass computes m chunk by chunk from theta before perturbing it
    and keeps it bit-packed until the update: 1 bit per entry (1/32 of fp32 weights, 1/16 of bf16),
    held only during the step, never saved. Extra memory: 0 parameter-sized buffers, that transient bit
    mask, and the one-off |theta_b| copy of the largest block when the thresholds are computed.

    Seed trick: kept. Restore and update fused (3 regenerations of z per step). Weight decay, if any,
    acts on masked matrix entries only, so masked-out weights stay bit-identical.
    """

    hparams_cls = SparseMeZOHParams

    def __init__(self, params: ParamsLike, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._mask: list[torch.Tensor] | None = None  # packed masks, alive during one step only

    # -- thresholds and masks -------------------------------------------------------------------
    @torch.no_grad()
    def threshold(self, b: Block) -> float:
        """h_b, computed once from the current weights on first use."""
        st = self.state[b.param]
        if "threshold" not in st:
            sparsity = float(self.param_groups[b.index]["sparsity"])
            a = b.param.detach().reshape(-1).abs().float()
            k = max(1, math.ceil((1.0 - sparsity) * a.numel()))  # keep at least one entry
            st["threshold"] = torch.kthvalue(a, k).values.clone()
        return float(st["threshold"])

    def mask(self, b: Block) -> torch.Tensor:
        """The dense bool mask of block b for the current weights (tests, analysis)."""
        return b.param.detach().abs() <= self.threshold(b)

    @contextlib.contextmanager
    def _step_scope(self, seed: int) -> Iterator[None]:
        """The mask is computed by the step's first pass and dropped when the step ends, however it ends."""
        self._mask = None
        try:
            yield
        finally:
            self._mask = None

    def _perturb(self, seed: int, scale: float, sigma: Sequence[float] | None) -> None:
        first = self._mask is None
        if first:
            self._mask = [
                torch.empty((b.numel + 7) // 8, dtype=torch.uint8, device=b.param.device) for b in self.blocks
            ]
        masks, h = self._mask, [self.threshold(b) for b in self.blocks]

        def visit(b: Block, start: int, end: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            # Z_CHUNK is a multiple of 8, so chunk boundaries fall on byte boundaries.
            packed = masks[b.index][start // 8 : (end + 7) // 8]
            if first:
                m = theta.abs() <= h[b.index]
                _pack(m, packed)
            else:
                m = _unpack(packed, end - start)
            theta.add_(z.mul_(m), alpha=scale)  # z is scratch: mask it in place

        for_each_z(self.blocks, seed, self.zsrc, visit)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """Restore and step on the masked entries, one fused pass with the step's mask."""
        g, eps, masks = meas.probe.projected_grad, self.eps, self._mask
        assert masks is not None
        lrs, decays = lr_and_decay(self, self.blocks)

        def visit(b: Block, start: int, end: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            m = _unpack(masks[b.index][start // 8 : (end + 7) // 8], end - start)
            z.mul_(m)
            theta.add_(z, alpha=eps)  # restore
            if decays[b.index] != 1.0:
                theta.sub_(theta * m, alpha=1.0 - decays[b.index])  # decay masked entries only
            theta.add_(z, alpha=-lrs[b.index] * g)

        for_each_z(self.blocks, meas.probe.seed, self.zsrc, visit)


register_optimizer(
    OptimizerSpec(
        name="sparse-mezo",
        factory=SparseMeZO,
        description="Sparse MeZO: MeZO on the smallest-|theta| entries per block (0 buffers; 1-bit mask per step)",
        hparams=SparseMeZOHParams,
    )
)
