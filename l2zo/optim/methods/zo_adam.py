"""ZO-Adam (ZO-Bench, Zhang et al., 2024; MeZO-Adam in Malladi et al., 2023): Adam fed the SPSA estimate.

Reference: ZO-Bench/ZO-LLM ``zo-bench/trainer.py`` (``--trainer zo_adam``: ``torch.optim.Adam`` with
``p.grad = g * z`` set per parameter tensor), read for understanding, not copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2zo.engine import Block, for_each_z
from l2zo.errors import L2ZOError
from l2zo.optim.base import Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer
from l2zo.optim.state import lr_and_decay, state_buffer


@dataclass(kw_only=True)
class ZOAdamHParams(ZOHParams):
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8  # Adam's epsilon (``eps`` is the perturbation radius)

    def __post_init__(self) -> None:
        super().__post_init__()
        b1, b2 = (float(b) for b in self.betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise L2ZOError(f"betas must be in [0, 1), got {self.betas}")
        if not self.adam_eps > 0.0:
            raise L2ZOError(f"adam_eps must be > 0, got {self.adam_eps}")
        self.betas = (b1, b2)


class ZOAdam(ZOOptimizer):
    """Adam on the two-point estimate g * z (z ~ N(0, I) from the step seed)::

        m <- b1 m + (1 - b1) g z;     v <- b2 v + (1 - b2) (g z)^2;     t = step + 1
        theta <- (1 - lr wd) theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + adam_eps)

    (torch ``Adam``'s arithmetic: denominator ``sqrt(v) / sqrt(1 - b2^t) + adam_eps``.)

    Extra memory: 2 parameter-sized buffers (m, v), always fp32, plus one z-chunk-sized fp32 scratch
    for the denominator. Seed trick: kept for z; the moments are the state. Restore and update are one
    fused pass (3 regenerations of z per step).

    Deliberate differences from ZO-Bench: the moments are fp32 (ZO-Bench keeps them in the parameter
    dtype, where fp16 underflows adam_eps and can overflow v); weight decay (0 in every ZO-Bench sweep)
    is decoupled, AdamW-style, on matrices only, as ``ZOOptimizer`` defines it; Adam's epsilon is called
    ``adam_eps`` because ``eps`` is the perturbation radius.
    """

    hparams_cls = ZOAdamHParams

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        g, eps, t = meas.probe.projected_grad, self.eps, self.step_count + 1
        lrs, decays = lr_and_decay(self, self.blocks)

        def visit(b: Block, start: int, end: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            group = self.param_groups[b.index]
            b1, b2 = group["betas"]
            m = state_buffer(self, b, "exp_avg")[start:end]
            v = state_buffer(self, b, "exp_avg_sq")[start:end]
            theta.add_(z, alpha=eps)  # restore theta from theta - eps*z
            if decays[b.index] != 1.0:
                theta.mul_(decays[b.index])
            m.mul_(b1).add_(z, alpha=(1.0 - b1) * g)
            v.mul_(b2).addcmul_(z, z, value=(1.0 - b2) * g * g)
            denom = v.sqrt().div_(math.sqrt(1.0 - b2**t)).add_(group["adam_eps"])  # chunk-sized scratch
            theta.addcdiv_(m, denom, value=-lrs[b.index] / (1.0 - b1**t))

        for_each_z(self.blocks, meas.probe.seed, self.zsrc, visit)


register_optimizer(
    OptimizerSpec(
        name="zo-adam",
        factory=ZOAdam,
        description="ZO-Adam (ZO-Bench / MeZO-Adam): Adam moments on the SPSA estimate (2 fp32 buffers)",
        hparams=ZOAdamHParams,
    )
)
