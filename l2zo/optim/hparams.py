"""Hyperparameter dataclasses: the one place each method writes its defaults.

Every optimizer declares one dataclass (``MeZO.hparams_cls``, ``OptimizerSpec.hparams``); its field defaults are
the method's published defaults (``OptimizerSpec.defaults`` is derived from them), its field types tell a
config layer how to read a value given as text, and ``__post_init__`` checks the ranges. The run's seed and
block selection (``seed``, ``include``, ``exclude``) are not hyperparameters of the method: they are keyword
arguments of the optimizer itself (``ZOOptimizer.__init__``), listed in ``OptimizerSpec.run_args``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from l2zo.errors import L2ZOError

H = TypeVar("H", bound="HParams")


@dataclass(kw_only=True)
class HParams:
    """Shared by every method: learning rate and MeZO-style weight decay (theta -= lr*wd*theta, matrices only)."""

    lr: float = 1e-6
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr >= 0.0:
            raise L2ZOError(f"lr must be >= 0, got {self.lr}")
        if not self.weight_decay >= 0.0:
            raise L2ZOError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value, in declaration order (shallow: tuples and mappings are kept as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(kw_only=True)
class ZOHParams(HParams):
    """A two-point ZO method: adds the perturbation radius eps."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0.0:
            raise L2ZOError(f"eps must be > 0, got {self.eps}")


def field_defaults(cls: type[HParams]) -> dict[str, Any]:
    """The defaults of every field of ``cls`` (all fields have one)."""
    return cls().as_dict()


def make_hparams(cls: type[H], values: Mapping[str, Any], owner: str) -> H:
    """``cls(**values)`` with an unknown name reported as a one-line ``L2ZOError`` naming the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(values) - set(names))
    if bad:
        raise L2ZOError(f"{owner} has no hyperparameter {', '.join(map(repr, bad))}; valid: {', '.join(names)}")
    return cls(**values)


def pick(hp: HParams, cls: type[HParams]) -> dict[str, Any]:
    """The values in ``hp`` of ``cls``'s fields (e.g. the ``ZOHParams`` part of a builder's hyperparameters)."""
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(cls)}
