"""The optimizer registry behind ``--optimizer NAME`` and ``l2zo optimizers``.

Every entry builds a ``torch.optim.Optimizer`` from a model and keyword arguments: the fields of its
hyperparameter dataclass (``OptimizerSpec.hparams``, whose defaults are the method's) plus the run
arguments it takes (``run_args``: seed, block selection, an artifact). Names are checked before building.
What the training loop must do for a method is declared on the spec (``needs_anchor_batch``), not guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from l2zo.errors import L2ZOError, unknown_choice
from l2zo.optim.hparams import HParams, field_defaults

ZO_RUN_ARGS = ("seed", "include", "exclude")  # the keyword arguments of ZOOptimizer.__init__ itself


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: how to build it, what it takes, what it needs, and what to say about it.

    Attributes:
        hparams: the hyperparameter dataclass; its field defaults are the method's published defaults and
            its field types say how to read a value given as text.
        run_args: keyword arguments the factory takes besides the hyperparameters (seed, include/exclude,
            artifact): set by the run, not tuned.
        zeroth_order: False for backprop references (the closure must call backward).
        forwards_per_step: forward passes per step (for forward-matched comparisons).
        needs_anchor_batch: the optimizer needs ``set_anchor_loss_fn(fn)`` before its first step, fn the loss
            over a fixed large training batch (variance-reduced methods: mezo-svrg).
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    hparams: type[HParams]
    run_args: tuple[str, ...] = ZO_RUN_ARGS
    zeroth_order: bool = True
    forwards_per_step: int = 2
    needs_anchor_batch: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter name -> the method's default, from ``hparams`` (the only place defaults are written)."""
        return field_defaults(self.hparams)

    def hyperparameters(self) -> list[str]:
        """Every keyword argument the factory accepts: the hyperparameters, then the run arguments."""
        return [f.name for f in fields(self.hparams)] + list(self.run_args)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    from l2zo.optim import zoo  # noqa: F401  (registers the built-in optimizers)


def optimizer_specs() -> dict[str, OptimizerSpec]:
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def get_optimizer_spec(name: str) -> OptimizerSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise unknown_choice("optimizer", name, _REGISTRY, "Run `l2zo optimizers` for descriptions")
    return _REGISTRY[name]


def build_optimizer(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model`` with its defaults overridden by ``hparams``."""
    spec = get_optimizer_spec(name)
    allowed = spec.hyperparameters()
    bad = sorted(set(hparams) - set(allowed))
    if bad:
        raise L2ZOError(
            f"optimizer {name!r} has no hyperparameter {', '.join(map(repr, bad))}; valid: {', '.join(allowed)}"
        )
    return spec.factory(model, **hparams)
