"""The Hessian Gram of the block gradients, gram_bc = g_b^T H_bc g_c: what ``coupled.CoupledModel`` needs.

The probe's gHg_b (``stats``) is the diagonal of this matrix: its per-block random signs cancel the cross-block terms
by design. Their size decides whether the blocks' signal losses add up (the separable K-step model) or are one loss
seen from several blocks (the coupled one). The full matrix costs one Hessian-vector product per block.

Here g is the gradient of the mean loss over the given loss closures (equal-sized chunks of one data set, so
their mean is that set's loss) and H its Hessian. Two passes: the first sums the chunks' gradients (no graph
kept), the second rebuilds one chunk's double-backward graph at a time and applies H to g_b e_b for every block
b, so memory is one graph and three parameter-sized buffers (g, zeros, one HVP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.blockstats.stats import LossFn, _block_dots, _Graph, double_backward_attention
from l2zo.engine.blocks import Block
from l2zo.errors import L2ZOError


@dataclass(frozen=True)
class Gram:
    """The measured gradient and its Hessian Gram (float64, CPU).

    Attributes:
        G: [B] ||g_b||^2 of the mean gradient.
        gram: [B, B] g_b^T H_bc g_c (symmetric up to rounding; may be indefinite).
        loss: the mean loss over the chunks.
        chunks: how many loss closures were averaged.
    """

    G: Tensor
    gram: Tensor
    loss: float
    chunks: int

    def coupling(self) -> float:
        """g^T H g over the sum of its diagonal blocks: 1 when the blocks' gradients do not interact."""
        return float(self.gram.sum() / torch.diagonal(self.gram).sum())


def gradient_gram(blocks: Sequence[Block], loss_fns: Sequence[LossFn]) -> Gram:
    """``Gram`` of the mean of ``loss_fns`` (each a closure returning a scalar loss; see the module doc)."""
    if not loss_fns:
        raise L2ZOError("the Gram needs at least one loss closure (one chunk of the data)")
    params = [b.param for b in blocks]
    k = len(loss_fns)
    g = [torch.zeros_like(p) for p in params]
    total = 0.0
    for fn in loss_fns:
        with double_backward_attention():
            loss = fn()
            if not bool(torch.isfinite(loss)):
                raise L2ZOError(f"the loss is not finite ({float(loss):.4g}); the Gram needs a finite one")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        total += float(loss.detach())
        for acc, gr in zip(g, grads, strict=True):
            if gr is not None:
                acc.add_(gr.detach(), alpha=1.0 / k)
    B = len(blocks)
    zeros = [torch.zeros_like(x) for x in g]
    gram = torch.zeros(B, B, dtype=torch.float64)
    for fn in loss_fns:
        graph = _Graph(blocks, fn)
        for b in range(B):
            hv = graph.hvp([*zeros[:b], g[b], *zeros[b + 1 :]])  # H (g_b e_b)
            gram[b] += _block_dots(g, hv) / k
        del graph
    G = _block_dots(g, g)
    return Gram(G=G, gram=gram, loss=total / k, chunks=k)
