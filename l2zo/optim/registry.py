"""The optimizer registry behind ``--optimizer NAME`` and ``l2zo optimizers``.

Every entry builds a ``torch.optim.Optimizer`` from a model and keyword hyperparameters; the
hyperparameters a user may set are the factory's keyword arguments, checked before building.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from l2zo.errors import L2ZOError, unknown_choice


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: how to build it and what to say about it."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # the method's published defaults
    zeroth_order: bool = True
    forwards_per_step: int = 2

    def hyperparameters(self) -> list[str]:
        sig = inspect.signature(self.factory)
        return [n for n, p in list(sig.parameters.items())[1:] if p.kind is p.KEYWORD_ONLY or p.default is not p.empty]


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
    return spec.factory(model, **{**spec.defaults, **hparams})
