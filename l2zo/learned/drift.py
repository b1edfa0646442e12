"""The ``drift`` feature, ||theta_b - theta_b0|| / ||theta_b0|| (DiZO), theta_b0 the weights at the start of the run.

Exact needs theta_b0, and ZO fine-tuning exists to save the memory a copy of the weights costs. Every ZO update is
a multiple of a z regenerated from a seed, theta_{t+1} = theta_t + a_t z_t (a_{t,b} = -lr g_t sigma_{t,b}), so

    ||delta_{t+1}||^2 = ||delta_t||^2 + 2 a_t <delta_t, z_t> + a_t^2 ||z_t||^2,    delta_t = theta_t - theta_0.

The cross term needs <delta_t, z_t> = sum_{s<t} a_s <z_s, z_t>: t regenerations of z per step (O(t^2) in all), or
<theta_0, z_t>, i.e. theta_0. Neither is affordable, so there is no exact memory-free form. What each side does:

* meta-training (``ExactAnchor``): exact. It already holds the pretrained weights (``PretrainedCopy``, the point
  every restart period begins at), so the drift is measured against them, with no further copy.
* the learned optimizer (``DriftTracker``): exact for blocks of at most ``exact_numel`` entries, whose theta_b0 it
  copies (norm gains and biases; all blocks of the tiny model; about 0.1% of a 135M model's weights); for the
  larger blocks the random-walk estimate sqrt(sum_t a_{t,b}^2 n_b), the terms above without the cross term and
  with ||z_b||^2 at its mean n_b. Trade-off: no memory and no extra pass, but the cross term is dropped. Its
  zero-mean part is a relative error of about 1/sqrt(n_b); its systematic part, the drift along the gradient
  (E[a_t z_t] = -lr sigma^2 grad_b), adds about t / n_b to the squared drift after t steps, so the estimate runs
  low by that fraction (< 1% for a 576 x 576 matrix over 3000 steps). Weight decay's shrink of theta is ignored.
  With ``exact_numel`` >= the largest block the two sides compute the same number (tests/test_features_v2.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from l2zo.engine.blocks import Block
from l2zo.engine.seeding import Z_CHUNK

# Blocks up to this many entries keep an exact copy of theta_b0 in the learned optimizer (256 KiB in fp32 at most).
DRIFT_EXACT_NUMEL = 1 << 16


def sq_distance(param: Tensor, anchor: Tensor | None) -> float:
    """||param - anchor||^2 (||param||^2 for None) in fp32 chunks of ``Z_CHUNK``, summed in fp64 (bounded temporaries).

    Both sides of the drift feature go through this one function, so they agree bit for bit.
    """
    flat = param.detach().reshape(-1)
    ref = None if anchor is None else anchor.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), Z_CHUNK):
        d = flat[start : start + Z_CHUNK].float()
        if ref is not None:
            d = d - ref[start : start + Z_CHUNK].to(d.device, torch.float32)
        total += float(torch.dot(d, d))
    return total


def _ratio(sq: Sequence[float], norm0: Tensor) -> Tensor:
    """[B] fp32 sqrt(sq_b) / ||theta_b0||; a block that started at zero is divided by 1 (as ``FeatureRef`` does)."""
    d = torch.tensor(list(sq), dtype=torch.float64).clamp_min(0).sqrt()
    return (d / torch.where(norm0 > 0, norm0, torch.ones_like(norm0))).float()


class DriftSource(Protocol):
    def drift(self, params: Sequence[Tensor]) -> Tensor:
        """[B] fp32 drift of ``params`` (one tensor per block, in block order), on CPU."""
        ...


class ExactAnchor:
    """theta_0 held in full by someone else (meta-training's ``PretrainedCopy.values``; nothing is copied here)."""

    def __init__(self, values: Sequence[Tensor]) -> None:
        self.values = list(values)
        self.norm0 = torch.tensor([sq_distance(v, None) for v in self.values], dtype=torch.float64).sqrt()

    def drift(self, params: Sequence[Tensor]) -> Tensor:
        return _ratio([sq_distance(p, v) for p, v in zip(params, self.values, strict=True)], self.norm0)


class DriftTracker:
    """The learned optimizer's drift: exact on small blocks, the random-walk estimate on large ones (module doc).

    Args:
        blocks: the optimizer's blocks at the start of the run (theta_0).
        exact_numel: blocks with at most this many entries keep an fp32 copy of theta_b0.
    """

    def __init__(self, blocks: Sequence[Block], exact_numel: int = DRIFT_EXACT_NUMEL) -> None:
        self.numel = [b.numel for b in blocks]
        self.norm0 = torch.tensor([sq_distance(b.param, None) for b in blocks], dtype=torch.float64).sqrt()
        self.theta0: dict[int, Tensor] = {
            i: b.param.detach().to(torch.float32, copy=True) for i, b in enumerate(blocks) if b.numel <= exact_numel
        }
        self.walk = [0.0] * len(self.numel)  # sum_t a_{t,b}^2 n_b of the estimated blocks

    def observe_step(self, steps: Sequence[float]) -> None:
        """Record one update theta_b += steps_b * z_b (steps [B], e.g. -lr * g * sigma_b)."""
        for i, a in enumerate(steps):
            if i not in self.theta0:
                self.walk[i] += float(a) ** 2 * self.numel[i]

    def drift(self, params: Sequence[Tensor]) -> Tensor:
        sq = [sq_distance(p, self.theta0[i]) if i in self.theta0 else self.walk[i] for i, p in enumerate(params)]
        return _ratio(sq, self.norm0)

    def state_dict(self) -> dict[str, Any]:
        return {"norm0": self.norm0.clone(), "walk": list(self.walk),
                "theta0": {i: v.detach().cpu().clone() for i, v in self.theta0.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norm0 = torch.as_tensor(state["norm0"], dtype=torch.float64).clone()
        self.walk = [float(x) for x in state["walk"]]
        devices = {i: v.device for i, v in self.theta0.items()}
        self.theta0 = {int(i): torch.as_tensor(v).to(devices.get(int(i), "cpu"), torch.float32).clone()
                       for i, v in state["theta0"].items()}  # fmt: skip
