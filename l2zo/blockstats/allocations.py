"""The allocations ``l2zo probe-blocks`` compares, read off the registered optimizers at a model state.

A net's sigma depends on its recurrent inputs (the previous step's losses and sigma), which are the paper's
zeros and ones at step 0 and settle after one or two steps. So the net is run for ``settle`` ZO steps at
lr = 0 (the weights come back unchanged) and its effective sigma averaged over the steps after the first,
which is the sigma it applies in a running fine-tune from that state.

Every allocation is returned normalised with rule "numel" (sum n_b s_b^2 = sum n_b); the gain R is
scale-free, and the normalisation keeps lr's meaning when the allocation runs as ``fixed-sigma``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from l2zo.blockstats.gain import normalize
from l2zo.engine.blocks import Block, block_permutation
from l2zo.errors import L2ZOError
from l2zo.optim.registry import build_optimizer

LossFn = Callable[[], Tensor]


def _numel(blocks: Sequence[Block]) -> Tensor:
    return torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)


@torch.no_grad()
def net_sigma(name: str, model: nn.Module, blocks: Sequence[Block], losses: Sequence[LossFn], **hparams: Any) -> Tensor:
    """The settled effective sigma [B] of the learned optimizer ``name`` at the model's current weights.

    Args:
        name: a registered optimizer with ``last_sigma`` after a step ("learned", "learned-random").
        losses: one loss closure per settle step (>= 2); step k probes with ``losses[k]`` at lr = 0.
        hparams: the optimizer's hyperparameters (artifact, net_seed ...); lr is forced to 0.
    """
    if len(losses) < 2:
        raise L2ZOError(f"settling a net's sigma needs at least 2 steps, got {len(losses)}")
    saved = [b.param.detach().clone() for b in blocks]
    opt = build_optimizer(name, model, **{**hparams, "lr": 0.0, "weight_decay": 0.0})
    names = [b.name for b in getattr(opt, "blocks", [])]
    if names != [b.name for b in blocks]:
        raise L2ZOError(f"optimizer {name!r} built other blocks than the probe's; use the same include/exclude")
    sigmas = []
    try:
        for loss in losses:
            opt.step(loss)
            sigmas.append(torch.as_tensor(opt.last_sigma, dtype=torch.float64).cpu())
    finally:
        # lr = 0 restores theta up to rounding (+eps, -2 eps, +eps); put the exact weights back anyway.
        for b, p in zip(blocks, saved):
            b.param.copy_(p)
    return normalize(torch.stack(sigmas[1:]).mean(dim=0), _numel(blocks))


def const_sigma(name: str, model: nn.Module, blocks: Sequence[Block], **hparams: Any) -> Tensor:
    """The fixed effective sigma [B] of a constant-allocation optimizer ("per-block-const"), renormalised."""
    opt = build_optimizer(name, model, **hparams)
    return normalize(torch.as_tensor(opt.last_sigma, dtype=torch.float64).cpu(), _numel(blocks))


def permuted(s: Tensor, blocks: Sequence[Block], seed: int = 0) -> Tensor:
    """The same sigmas shuffled across blocks (a fixed permutation from ``seed``), renormalised."""
    return permute_sigma(s, _numel(blocks), seed)


def permute_sigma(s: Tensor, n: Tensor, seed: int = 0) -> Tensor:
    """[B] ``s`` shuffled across the blocks by a fixed permutation from ``seed``, renormalised with numels ``n``."""
    return normalize(s[block_permutation(s.numel(), seed)], n)


def sigma_mapping(blocks: Sequence[Block], s: Tensor) -> dict[str, float]:
    """``{block name: sigma}``: the ``fixed-sigma`` file format."""
    return {b.name: float(v) for b, v in zip(blocks, s.tolist(), strict=True)}
