"""The hyperparameters a run hands its optimizer: flags, ``--opt-args``, seed and block patterns, typed and checked.

Values typed as text (``--opt-args eps=1e-4``, ``--optimizers mezo:eps=1e-4``, quoted YAML) are read the
same way wherever they come from: by the optimizer's hyperparameter dataclass when it declares one (each
field's type, one-line errors naming the key, the type and the optimizer), else by ``parse_scalar``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from l2zo.config import parse_scalar
from l2zo.errors import L2ZOError
from l2zo.optim.registry import OptimizerSpec

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

    from l2zo.config import FinetuneConfig


@functools.cache
def _schema_parser(schema: type) -> ArgumentParser:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(schema)
    return parser


def coerce_hparams(optimizer: str, schema: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` typed by the dataclass ``schema`` (a class or an instance; None: ``parse_scalar`` for text)."""
    loose = {k: parse_scalar(v) if isinstance(v, str) else v for k, v in values.items()}
    if schema is None:
        return loose
    schema = schema if isinstance(schema, type) else type(schema)
    typed = {f.name for f in dataclasses.fields(schema)} & set(values)
    if not typed:
        return loose
    from l2zo.config.checks import field_types
    from l2zo.config.parser import explain

    try:
        ns = _schema_parser(schema).parse_object({k: values[k] for k in typed})
    except argparse.ArgumentError as exc:
        raise L2ZOError(explain(str(exc), field_types(schema), f" of optimizer {optimizer!r}")) from None
    return {**loose, **{k: ns[k] for k in typed}}


def optimizer_hparams(cfg: FinetuneConfig, spec: OptimizerSpec) -> dict[str, Any]:
    """The hyperparameters to pass to the optimizer: explicit flags, opt_args, seed and block patterns; with a PEFT
    adapter, MeZO's lr and eps for its scheme where the user gave none (``l2zo.config.peft.scheme_defaults``)."""
    from l2zo.config.peft import scheme_defaults
    from l2zo.optim.hparams import ZOHParams, field_defaults

    hp: dict[str, Any] = {k: getattr(cfg, k) for k in ("lr", "eps", "weight_decay") if getattr(cfg, k) is not None}
    hp.update(cfg.opt_args)
    for key, value in scheme_defaults(cfg.adapter.peft, spec.defaults, field_defaults(ZOHParams)).items():
        hp.setdefault(key, value)
    allowed = spec.hyperparameters()
    for key, value in (
        ("seed", cfg.seed),
        ("include", cfg.include),
        ("exclude", cfg.exclude),
        ("artifact", cfg.artifact),
    ):
        if value is not None and key in allowed and key not in hp:
            hp[key] = value
    if cfg.artifact is not None and "artifact" not in allowed:
        raise L2ZOError(f"--artifact is only for learned optimizers; {spec.name!r} takes none")
    bad = sorted(set(hp) - set(allowed))
    if bad:
        raise L2ZOError(
            f"optimizer {spec.name!r} has no hyperparameter {', '.join(map(repr, bad))}; valid: {', '.join(allowed)}"
        )
    return coerce_hparams(spec.name, getattr(spec, "hparams", None), hp)
