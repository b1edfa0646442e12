"""MeZO (Malladi et al., 2023): ZO-SGD with the seed trick, at inference memory.

Differences from the reference implementation (princeton-nlp/MeZO ``large_models/trainer.py``), all
deliberate: z comes from per-device generators seeded by (step seed, block, chunk) instead of
``torch.manual_seed`` (the global RNG stays untouched); perturbations are in place with fused
scaling instead of out-of-place copies; restore and update are one pass (3 regenerations, not 4);
weight decay skips 1-D tensors (biases and norm gains) by shape, not by name.

Extra memory: 0 parameter-sized buffers (one 4 MB z chunk buffer per device and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from l2zo.optim.base import ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer


@dataclass(kw_only=True)
class MeZOHParams(ZOHParams):
    """MeZO's hyperparameters: exactly the shared ZO ones, whose defaults are MeZO's published values."""


class MeZO(ZOOptimizer):
    """ZO-SGD: theta <- theta - lr * (g * z + wd * theta), g = (L(theta+eps z) - L(theta-eps z)) / (2 eps).

    Use it like any optimizer, with a closure::

        opt = MeZO(model, lr=1e-6, eps=1e-3)
        for batch in loader:
            loss = opt.step(lambda: loss_fn(model, batch))
    """

    hparams_cls = MeZOHParams


register_optimizer(
    OptimizerSpec(
        name="mezo",
        factory=MeZO,
        description="MeZO / ZO-SGD: two-point SPSA with seed replay, in-place and fused (0 extra buffers)",
        hparams=MeZOHParams,
    )
)
