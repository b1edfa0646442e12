"""ZO-SGD variants from ZO-Bench (Zhang et al., 2024, arXiv 2402.11592): momentum, conservative, sign.

All three keep MeZO's estimator: z ~ N(0, I) regenerated from the step seed, and
g = (L(theta + eps z) - L(theta - eps z)) / (2 eps). Reference: ZO-Bench/ZO-LLM ``zo-bench/trainer.py``
(``zo_step`` + ``torch.optim.SGD``, ``zo_conserv_step``, the ``zo_sign_opt`` branch), read, not copied.

Differences from ZO-Bench shared by all three (deliberate): z from per-(step, block, chunk) generators
instead of ``torch.manual_seed``; in-place updates fused with the restore; the update is applied in one
pass over the blocks instead of one ``optimizer.step()`` per parameter tensor; weight decay (0 in every
ZO-Bench sweep) follows ``ZOOptimizer`` (matrices only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2zo.engine import Block, axpby_z_, evaluate_loss, for_each_z
from l2zo.errors import L2ZOError
from l2zo.optim.base import LossFn, Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer
from l2zo.optim.state import lr_and_decay, state_buffer


@dataclass(kw_only=True)
class ZOSGDMomentumHParams(ZOHParams):
    momentum: float = 0.9  # ZO-Bench's heavy-ball beta

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.momentum < 1.0:
            raise L2ZOError(f"momentum must be in [0, 1), got {self.momentum}")


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD with heavy-ball momentum (ZO-SGD-MMT), torch ``SGD(momentum=beta)`` semantics::

        d = g * z + wd * theta;   m <- beta * m + d;   theta <- theta - lr * m

    Extra memory: 1 parameter-sized buffer (m, fp32 whatever the weight dtype). Seed trick: kept for z
    (z is never stored; the momentum buffer is the only state). One fused pass restores theta and
    applies the update (3 regenerations of z per step). Difference from ZO-Bench: the momentum buffer is
    fp32 (ZO-Bench keeps it in the parameter dtype).
    """

    hparams_cls = ZOSGDMomentumHParams

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        g, eps = meas.probe.projected_grad, self.eps
        lrs, _ = lr_and_decay(self, self.blocks)

        def visit(b: Block, start: int, end: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            group = self.param_groups[b.index]
            mom = state_buffer(self, b, "momentum")[start:end]
            theta.add_(z, alpha=eps)  # restore theta from theta - eps*z
            mom.mul_(group["momentum"]).add_(z, alpha=g)
            if group["weight_decay"] != 0.0:
                mom.add_(theta, alpha=group["weight_decay"])
            theta.add_(mom, alpha=-lrs[b.index])

        for_each_z(self.blocks, meas.probe.seed, self.zsrc, visit)


@dataclass(kw_only=True)
class ZOSGDSignHParams(ZOHParams):
    elementwise: bool = False  # True: the paper's sign(g * z); False: ZO-Bench's sign(g) * z


class ZOSGDSign(ZOOptimizer):
    """ZO-SGD-Sign: theta <- theta - lr * (sign(g) * z + wd * theta), ZO-Bench's default branch.

    ``elementwise=True`` gives the paper's formula instead, theta <- theta - lr * sign(g * z), i.e. the
    step has magnitude lr on every coordinate. The default keeps ZO-Bench's "signOpt_orig" (the sign of
    the scalar projected gradient times the Gaussian z), the variant its published numbers come from.

    Extra memory: 0 parameter-sized buffers. Seed trick: kept. Restore and update fused (3
    regenerations per step).
    """

    hparams_cls = ZOSGDSignHParams

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        g = meas.probe.projected_grad
        s = math.copysign(1.0, g) if g != 0.0 else 0.0
        lrs, decays = lr_and_decay(self, self.blocks)
        eps = self.eps
        if not self.hp.elementwise:
            # d * (theta_minus + eps*z) - lr*sign(g)*z in one pass.
            coef = [eps * d - lr * s for lr, d in zip(lrs, decays)]
            axpby_z_(self.blocks, meas.probe.seed, self.zsrc, coef, decays)
            return

        def visit(b: Block, start: int, end: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            theta.add_(z, alpha=eps)
            if decays[b.index] != 1.0:
                theta.mul_(decays[b.index])
            theta.add_(z.sign_(), alpha=-lrs[b.index] * s)  # z is a scratch buffer: sign in place

        for_each_z(self.blocks, meas.probe.seed, self.zsrc, visit)


@dataclass(frozen=True)
class ConsMeasurement(Measurement):
    """L(theta) = l0, the probe, and the candidate losses l1 = L(theta - lr*g*z), l2 = L(theta + lr*g*z)."""

    l0: torch.Tensor
    step: tuple[float, ...] = ()  # lr_b * g per block
    l1: torch.Tensor | None = None  # None when the probe was non-finite (no candidates evaluated)
    l2: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.l0


@dataclass(kw_only=True)
class ZOSGDConservativeHParams(ZOHParams):
    """ZO-SGD-Cons has no hyperparameter of its own."""


class ZOSGDConservative(ZOOptimizer):
    """ZO-SGD-Cons: keep whichever of theta, theta - lr*g*z, theta + lr*g*z has the lowest batch loss.

    Five forwards on the same batch: L(theta) = l0, the two-point probe, l1 = L(theta - lr*g*z) and
    l2 = L(theta + lr*g*z). Decision exactly as ZO-Bench (ties go to theta + lr*g*z)::

        if l1 > l0:  theta if l0 < l2 else theta + lr*g*z
        else:        theta - lr*g*z if l1 < l2 else theta + lr*g*z

    A non-finite candidate loss counts as +inf. Weight decay (not in ZO-Bench) is applied after the
    choice: theta <- (1 - lr*wd) * theta on matrices.

    Extra memory: 0 parameter-sized buffers. Seed trick: kept. The restore is fused into the move to
    the first candidate: 4 or 5 regenerations of z per step (ZO-Bench: 6 or 7). ``step`` returns l0, the
    exact loss at theta; ``last_losses`` holds (l0, l1, l2) and ``last_choice`` the index kept (0: theta,
    1: theta - lr*g*z, 2: theta + lr*g*z).
    """

    hparams_cls = ZOSGDConservativeHParams
    last_losses: tuple[float, float, float] | None = None
    last_choice: int | None = None

    @staticmethod
    def choose(l0: float, l1: float, l2: float) -> int:
        l0, l1, l2 = (x if math.isfinite(x) else math.inf for x in (l0, l1, l2))
        if l1 > l0:
            return 0 if l0 < l2 else 2
        return 1 if l1 < l2 else 2

    def _move(self, seed: int, coef: list[float], decay: list[float] | None = None) -> None:
        axpby_z_(self.blocks, seed, self.zsrc, coef, decay)

    def _eval_at(self, closure: LossFn, seed: int, back: list[float]) -> torch.Tensor:
        try:
            return evaluate_loss(closure)
        except BaseException:
            self._move(seed, back)  # back to theta before re-raising
            raise

    def _probe(self, closure: LossFn, seed: int, sigma: Sequence[float] | None) -> Measurement:
        """l0, the probe, then the two candidates (skipped when the probe is non-finite: the step restores)."""
        l0 = evaluate_loss(closure)
        probe = self._two_point(closure, seed, sigma)
        if not math.isfinite(probe.projected_grad):
            return ConsMeasurement(probe, l0)
        lrs, _ = lr_and_decay(self, self.blocks)
        step = [lr * probe.projected_grad for lr in lrs]
        self._move(seed, [self.eps - s for s in step])  # theta - eps*z -> theta - lr*g*z (restore fused)
        l1 = self._eval_at(closure, seed, step)
        self._move(seed, [2 * s for s in step])  # -> theta + lr*g*z
        l2 = self._eval_at(closure, seed, [-s for s in step])
        torch.clear_autocast_cache()
        return ConsMeasurement(probe, l0, tuple(step), l1, l2)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        assert isinstance(meas, ConsMeasurement) and meas.l1 is not None and meas.l2 is not None
        _, decays = lr_and_decay(self, self.blocks)
        losses = (float(meas.l0), float(meas.l1), float(meas.l2))
        choice = self.choose(*losses)
        back = {0: -1.0, 1: -2.0, 2: 0.0}[choice]
        if back != 0.0 or any(d != 1.0 for d in decays):
            # d * (theta_B + back*lr*g*z): one pass, no regeneration when only decaying.
            self._move(meas.probe.seed, [d * back * s for d, s in zip(decays, meas.step)], decays)
        self.last_losses = losses
        self.last_choice = choice


register_optimizer(
    OptimizerSpec(
        name="zo-sgd-mmt",
        factory=ZOSGDMomentum,
        description="ZO-SGD with momentum (ZO-Bench): SPSA estimate into heavy-ball SGD (1 fp32 buffer)",
        hparams=ZOSGDMomentumHParams,
    )
)
register_optimizer(
    OptimizerSpec(
        name="zo-sgd-cons",
        factory=ZOSGDConservative,
        description="ZO-SGD-Cons (ZO-Bench): greedy pick among theta, theta -/+ lr*g*z on the batch (5 fwd, 0 buffers)",
        hparams=ZOSGDConservativeHParams,
        forwards_per_step=5,
    )
)
register_optimizer(
    OptimizerSpec(
        name="zo-sgd-sign",
        factory=ZOSGDSign,
        description="ZO-SGD-Sign (ZO-Bench): step along sign(g) * z (elementwise=True: sign(g*z)); 0 buffers",
        hparams=ZOSGDSignHParams,
    )
)
