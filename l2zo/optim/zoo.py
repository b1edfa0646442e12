"""Registration of the built-in optimizers (one line of description each, for ``l2zo optimizers``)."""

from __future__ import annotations

from l2zo.optim.mezo import MeZO
from l2zo.optim.registry import OptimizerSpec, register_optimizer

register_optimizer(
    OptimizerSpec(
        name="mezo",
        factory=MeZO,
        description="MeZO / ZO-SGD: two-point SPSA with seed replay, in-place and fused (0 extra buffers)",
        defaults=dict(lr=1e-6, eps=1e-3),
    )
)
