"""``ZOStepAdapter``: an l2zo optimizer as a training loop that calls ``optimizer.step()`` by itself sees it.

Loops written for backprop (transformers' Trainer, accelerate) call ``optimizer.step()`` with no closure after the
micro-batch's backward. A ZO step needs the closure, so it is taken where the loss is computed (the Trainer's
``training_step``), through ``adapter.step(closure)``; the loop's own closure-less ``step()`` that follows is then
a no-op. A closure-less ``step()`` with no ZO step before it is an error, never a silent no-op: that would be a
loop that never trains.

The adapter holds no state of its own: ``param_groups``, ``state`` and ``defaults`` are the l2zo optimizer's
(the same objects), so an lr scheduler built on the adapter, or on anything wrapping it, sets the lr the ZO
update reads, and ``state_dict`` / ``load_state_dict`` are the optimizer's (step count and seed included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2zo.errors import L2ZOError
from l2zo.optim.base import LossFn, ZOOptimizer


class ZOStepAdapter(torch.optim.Optimizer):
    """The optimizer a backprop loop holds: ``zo``'s step, taken once, through ``step(closure)``.

    ``torch.optim.Optimizer.__init__`` is deliberately not called (as accelerate's ``AcceleratedOptimizer`` does
    not): every field it would create is delegated to ``zo``.

    Args:
        zo: the l2zo optimizer that does the work.

    Attributes:
        zo: that optimizer.
        steps_taken: ZO steps taken through this adapter.
    """

    def __init__(self, zo: ZOOptimizer) -> None:
        if not isinstance(zo, ZOOptimizer):
            raise L2ZOError(
                f"expected an l2zo ZO optimizer, got {type(zo).__name__}; build one with "
                "l2zo.optim.build_optimizer(name, model, ...) (backprop optimizers belong to the plain Trainer)"
            )
        self.zo = zo
        self.steps_taken = 0
        self._unclaimed = 0  # ZO steps the loop's closure-less step() has not yet answered

    # -- what the loop and the lr scheduler read: the optimizer's own objects ---------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.zo.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.zo.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.zo.state

    @state.setter
    def state(self, value: Any) -> None:
        self.zo.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.zo.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.zo.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zo.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise L2ZOError("an l2zo optimizer's param groups are its blocks; choose them with include/exclude instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: a ZO step never allocates ``.grad``."""

    # -- the step ---------------------------------------------------------------------------------------
    def step(self, closure: LossFn | None = None) -> Tensor | None:  # type: ignore[override]
        """With ``closure``: one ZO step (``zo.step(closure)``), returning its loss. Without: the loop's own
        call after a ZO step, a no-op; without a ZO step before it, an error."""
        if closure is not None:
            loss = self.zo.step(closure)
            self.steps_taken += 1
            self._unclaimed += 1
            return loss
        if self._unclaimed == 0:
            raise L2ZOError(
                f"{type(self.zo).__name__} steps only with a closure that returns the loss; "
                "its step is taken in training_step (use ZOTrainer / ZOTrainerMixin, or call step(closure))"
            )
        self._unclaimed -= 1
        return None

    def __repr__(self) -> str:
        return f"ZOStepAdapter({self.zo!r})"
