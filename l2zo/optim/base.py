"""``ZOOptimizer``: the one optimizer interface shared by MeZO, the ZO baselines and the learned optimizer.

It is a ``torch.optim.Optimizer`` with one param group per block (``group["name"]``), so LR schedulers,
``state_dict`` and Lightning work unchanged. ``step(closure)`` runs two forward passes (under
``no_grad``, dropout off when the optimizer was built from a module) and then the subclass's update.
Subclasses override ``sigma()`` (per-block perturbation scale) and ``_update()`` (the update rule).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from l2zo.engine import Block, Probe, ZSource, axpby_z_, mix_seed, partition, perturb_, zo_probe
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError


class NonFiniteLossError(L2ZOError):
    """A ZO forward returned NaN or inf; the parameters were restored before raising."""


@contextlib.contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Dropout off for the ZO forwards (both must see the same function), then each submodule's mode back."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: seeded two-point probe plus an update rule.

    Args:
        params: the model (preferred: names, tied-weight de-duplication, dropout control), its
            ``named_parameters()``, or bare tensors.
        lr: learning rate eta.
        eps: perturbation radius.
        weight_decay: decoupled-from-nothing L2 decay as MeZO applies it (theta -= lr*wd*theta),
            on matrices only: biases and norm gains (1-D blocks) get none.
        seed: base seed; step t uses ``mix_seed(seed, t)``, so a run replays from (seed, g) pairs.
        include, exclude: regexes on parameter names selecting the blocks to train.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **defaults: Any,
    ) -> None:
        if not lr >= 0.0:
            raise L2ZOError(f"lr must be >= 0, got {lr}")
        if not eps > 0.0:
            raise L2ZOError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise L2ZOError(f"weight_decay must be >= 0, got {weight_decay}")
        self.module = params if isinstance(params, nn.Module) else None
        self.blocks: list[Block] = partition(params, include, exclude)
        groups = [
            {"params": [b.param], "name": b.name, "weight_decay": weight_decay if b.is_matrix else 0.0}
            for b in self.blocks
        ]
        super().__init__(groups, dict(lr=lr, eps=eps, weight_decay=weight_decay, **defaults))
        self.seed = int(seed)
        self.step_count = 0
        self.zsrc = ZSource()
        self.last_probe: Probe | None = None

    def set_z_source(self, *, workers: int | None = None, cache: bool = False) -> None:
        """How z is regenerated: on ``workers`` CPU threads (default: torch's thread count), and with ``cache``
        one parameter-sized copy of the step's z, so a step draws z once instead of three times. Either way
        the parameters after a step are bit for bit those of the plain sequential path (tests/test_speed_paths.py).
        """
        self.zsrc = ZSource(workers=workers, cache=cache)

    # -- hooks for subclasses -------------------------------------------------------------------
    def sigma(self) -> Sequence[float] | None:
        """Per-block perturbation scale [B]; None means 1 everywhere (MeZO)."""
        return None

    def _update(self, probe: Probe, sigma: Sequence[float] | None) -> None:
        """Restore theta from theta - eps*u and apply the update. Default: MeZO's SGD, fused."""
        g = probe.projected_grad
        eps = self.eps
        coef, decay = [], []
        for b, group in zip(self.blocks, self.param_groups):
            s = 1.0 if sigma is None else float(sigma[b.index])
            d = 1.0 - group["lr"] * group["weight_decay"]
            # d * (theta_minus + eps*s*z) - lr*g*s*z, i.e. restore, decay and step in one pass.
            coef.append(s * (eps * d - group["lr"] * g))
            decay.append(d)
        axpby_z_(self.blocks, probe.seed, self.zsrc, coef, decay)

    # -- the step -------------------------------------------------------------------------------
    @property
    def eps(self) -> float:
        return float(self.param_groups[0]["eps"])

    def step_seed(self, step: int) -> int:
        return mix_seed(self.seed, step)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step. ``closure`` runs a forward pass and returns the loss; it is called twice.

        Returns (L+ + L-)/2 as an fp32 scalar tensor.
        """
        if closure is None:
            raise L2ZOError(
                f"{type(self).__name__}.step needs a closure that returns the loss, e.g. "
                "opt.step(lambda: loss_fn(model, batch)); ZO optimizers evaluate it twice"
            )
        seed = self.step_seed(self.step_count)
        sigma = self.sigma()
        with eval_mode(self.module):
            probe = zo_probe(closure, self.blocks, seed, self.eps, self.zsrc, sigma)
        if not math.isfinite(probe.projected_grad):
            perturb_(self.blocks, seed, self.zsrc, +self.eps, sigma)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step_count} (L+={probe.loss_plus.item():.4g}, "
                f"L-={probe.loss_minus.item():.4g}); parameters were restored. Lower the learning rate or eps, "
                "or use --precision 32"
            )
        self._update(probe, sigma)
        self.step_count += 1
        self.last_probe = probe
        return probe.loss

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = {"step_count": self.step_count, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.step_count = int(zo["step_count"])
            self.seed = int(zo["seed"])
