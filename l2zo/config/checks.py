"""Choices and checks shared by the config dataclasses.

A choice is a ``Literal`` annotation: jsonargparse checks it on the command line and in YAML, and
``check_fields`` checks it again for configs built in Python, with the same one-line message.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

from l2zo.errors import L2ZOError

Precision = Literal["32", "bf16-mixed"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["constant", "linear"]

PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)


def flag(key: str) -> str:
    """The command-line flag of a config key: 'data.batch_size' -> '--batch-size'."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise L2ZOError(f"bad {flag(key)} {value!r}; valid choices: {', '.join(map(str, choices))}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` annotation (also inside ``Optional``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [choices_of(a) for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return None


def check_fields(cfg: Any, positive: tuple[str, ...] = ()) -> None:
    """Every ``Literal`` field of the dataclass ``cfg`` holds one of its values; the ``positive`` ones are > 0."""
    for f in dataclasses.fields(cfg):
        choices = choices_of(field_types(type(cfg))[f.name])
        value = getattr(cfg, f.name)
        if choices is not None and value is not None:
            check_choice(f.name, value, choices)
    for key in positive:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise L2ZOError(f"{flag(key)} must be positive, got {value}")
