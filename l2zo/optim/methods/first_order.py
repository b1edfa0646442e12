"""First-order references (backprop): FO-SGD and FO-Adam(W), as in ZO-Bench and MeZO's FT baseline.

Thin wrappers over ``torch.optim.SGD`` / ``torch.optim.AdamW`` that take the model, select the same
blocks as the ZO optimizers (``include``/``exclude``, tied weights once) and decay matrices only.
``step(closure)`` is torch's: the closure zeroes the grads, computes the loss and calls backward
(``l2zo.train.module`` builds it so); one forward + one backward per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from l2zo.engine import partition
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.hparams import HParams, make_hparams
from l2zo.optim.registry import OptimizerSpec, register_optimizer

FO_RUN_ARGS = ("include", "exclude")


def _groups(params: ParamsLike, weight_decay: float, include: Any, exclude: Any) -> list[dict[str, Any]]:
    blocks = partition(params, include, exclude)
    decay = [b.param for b in blocks if b.is_matrix]
    no_decay = [b.param for b in blocks if not b.is_matrix]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass(kw_only=True)
class FOSGDHParams(HParams):
    lr: float = 1e-4  # the middle of ZO-Bench's FO-SGD grid
    momentum: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.momentum >= 0.0:
            raise L2ZOError(f"momentum must be >= 0, got {self.momentum}")


@dataclass(kw_only=True)
class FOAdamHParams(HParams):
    lr: float = 1e-5  # MeZO's FT baseline
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8  # Adam's epsilon (``eps`` is the ZO radius elsewhere in l2zo)


class FOSGD(torch.optim.SGD):
    """Backprop SGD: theta <- theta - lr * buf, buf = momentum * buf + (grad + wd * theta) (torch SGD).

    Extra memory: gradients (1 parameter-sized buffer) plus the momentum buffer when momentum > 0, and
    the backward's activations. No seed trick (not zeroth order). Defaults: ZO-Bench's FO-SGD sweeps
    grid lr over {1e-3 .. 1e-7} with wd 0 and no momentum; there is no single published lr, 1e-4 is
    the middle of that grid.
    """

    def __init__(
        self, params: nn.Module | ParamsLike, *, include: Any = None, exclude: Any = None, **hparams: Any
    ) -> None:
        hp = make_hparams(FOSGDHParams, hparams, "FOSGD")
        super().__init__(_groups(params, hp.weight_decay, include, exclude), lr=hp.lr, momentum=hp.momentum)


class FOAdam(torch.optim.AdamW):
    """Backprop AdamW: decoupled weight decay on matrices only, torch ``AdamW`` arithmetic.

    Extra memory: gradients plus 2 moment buffers (3 parameter-sized buffers, in the parameter dtype,
    as torch keeps them), and the backward's activations. No seed trick. Defaults from MeZO's FT
    baseline (Malladi et al. 2023, App. E.3: Adam, lr in {1e-5, 5e-5, 8e-5}, linear schedule):
    lr 1e-5, betas (0.9, 0.999), wd 0. Adam's epsilon is ``adam_eps`` (``eps`` is the ZO radius
    elsewhere in l2zo, and a first-order method has none).
    """

    def __init__(
        self, params: nn.Module | ParamsLike, *, include: Any = None, exclude: Any = None, **hparams: Any
    ) -> None:
        hp = make_hparams(FOAdamHParams, hparams, "FOAdam")
        groups = _groups(params, hp.weight_decay, include, exclude)
        super().__init__(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps, weight_decay=0.0)


register_optimizer(
    OptimizerSpec(
        name="fo-sgd",
        factory=FOSGD,
        description="First-order SGD (backprop reference; gradients stored, 1 fwd + 1 bwd per step)",
        hparams=FOSGDHParams,
        run_args=FO_RUN_ARGS,
        zeroth_order=False,
        forwards_per_step=1,
    )
)
register_optimizer(
    OptimizerSpec(
        name="fo-adam",
        factory=FOAdam,
        description="First-order AdamW (backprop reference, decay on matrices only; grads + 2 moment buffers)",
        hparams=FOAdamHParams,
        run_args=FO_RUN_ARGS,
        zeroth_order=False,
        forwards_per_step=1,
    )
)
