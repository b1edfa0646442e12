"""``fixed-sigma``: MeZO with one fixed perturbation scale per block, read from a JSON file.

The file maps every block name to its sigma_b, e.g. ``{"model.embed_tokens.weight": 0.5, ...}`` (``l2zo
probe-blocks`` writes one per allocation it evaluates). The sigmas are normalised like the learned optimizer's
(sum_b n_b sigma_b^2 = sum_b n_b with rule "numel"), so the learning rate keeps MeZO's meaning; normalization
"none" applies them as written. It exists to measure an allocation: ``l2zo compare --optimizers
"mezo,fixed-sigma:sigma_file=gsl.json" --sweep lr=...``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2zo.engine.blocks import ParamsLike, block_kind
from l2zo.errors import L2ZOError
from l2zo.learned.normalization import block_weights, normalize_sigma
from l2zo.optim.base import ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import ZO_RUN_ARGS, OptimizerSpec, register_optimizer
from l2zo.utils.io import write_text_atomic

_RULES = ("numel", "none")


def write_sigma_file(path: str | Path, names: Sequence[str], sigma: Sequence[float] | torch.Tensor) -> None:
    """Write the ``{block name: sigma}`` file that ``read_sigma_file`` reads (``sigma``: [B], in ``names``' order)."""
    values = sigma.tolist() if isinstance(sigma, torch.Tensor) else list(sigma)
    mapping = {name: float(v) for name, v in zip(names, values, strict=True)}
    write_text_atomic(path, json.dumps(mapping, indent=1) + "\n")


def kind_sigma(names: Sequence[str], scales: Mapping[str, float], default: float = 1.0) -> list[float]:
    """[B] raw sigma per block: ``scales[block_kind(name)]``, else ``default`` (e.g. MeZO with one kind damped:
    ``{"embed_tokens": 0.25}``). A kind that names no block, or a negative or non-finite scale, is refused."""
    kinds = {block_kind(n) for n in names}
    unknown = sorted(set(scales) - kinds)
    if unknown:
        raise L2ZOError(
            f"no block of kind {', '.join(map(repr, unknown))}; this model's kinds: {', '.join(sorted(kinds))}"
        )
    bad = [k for k, v in {**scales, "(default)": default}.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise L2ZOError(f"sigma scales must be finite numbers >= 0; check {', '.join(map(repr, bad))}")
    return [float(scales.get(block_kind(n), default)) for n in names]


def read_sigma_file(path: str | Path) -> dict[str, float]:
    """The ``{block name: sigma}`` mapping of a sigma file; every value a finite number >= 0."""
    path = Path(path)
    if not path.is_file():
        raise L2ZOError(
            f"sigma file not found: {path} (write one with `l2zo probe-blocks`, or a JSON {{block: sigma}})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise L2ZOError(f"sigma file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise L2ZOError(f"sigma file {path} must be a non-empty JSON object mapping block names to sigmas")
    out: dict[str, float] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise L2ZOError(
                f"sigma file {path}: block {name!r} has sigma {value!r}; sigmas must be finite numbers >= 0"
            )
        out[str(name)] = float(value)
    return out


@dataclass(kw_only=True)
class FixedSigmaHParams(ZOHParams):
    """MeZO's hyperparameters, plus how the file's sigmas are normalised: "numel" (sum_b n_b sigma_b^2 = sum_b n_b,
    so the lr keeps MeZO's meaning) or "none" (as written)."""

    normalization: str = "numel"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalization not in _RULES:
            raise L2ZOError(f"fixed-sigma normalization must be one of {', '.join(_RULES)}, got {self.normalization!r}")


class FixedSigmaZO(ZOOptimizer):
    """ZO-SGD with u_b = sigma_b z_b for a fixed, normalised sigma per block: only ``sigma()`` differs from MeZO.

    Args:
        params: the model, or its named parameters.
        sigma: block name -> sigma; must name exactly this optimizer's blocks.
        seed, include, exclude, hparams: as every ``ZOOptimizer`` (``FixedSigmaHParams``).

    Attributes:
        last_sigma: [B] the effective (normalised) sigma, float64.
    """

    hparams_cls = FixedSigmaHParams

    def __init__(self, params: ParamsLike, sigma: dict[str, float], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        names = [b.name for b in self.blocks]
        unknown = sorted(set(sigma) - set(names))
        missing = [n for n in names if n not in sigma]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} unknown block(s) (first: {unknown[0]!r})")
            if missing:
                parts.append(f"{len(missing)} block(s) of this model missing (first: {missing[0]!r})")
            raise L2ZOError(f"the sigma file does not match this model's {len(names)} blocks: {'; '.join(parts)}. "
                            "Write it for this model with `l2zo probe-blocks`")  # fmt: skip
        raw = torch.tensor([sigma[n] for n in names], dtype=torch.float64)
        if not bool((raw > 0).any()):
            raise L2ZOError("the sigma file gives every block sigma 0; at least one block must be perturbed")
        if self.hp.normalization == "numel":
            _, raw = normalize_sigma(raw, block_weights(self.blocks, "numel"))
        self.last_sigma = raw
        self._sigma = raw.tolist()

    def sigma(self) -> list[float]:
        return self._sigma


def build_fixed_sigma(model: torch.nn.Module, *, sigma_file: str | None = None, **kwargs: Any) -> FixedSigmaZO:
    """FixedSigmaZO from a JSON sigma file (``sigma_file``); ``kwargs``: run arguments and hyperparameters."""
    if sigma_file is None:
        raise L2ZOError("optimizer 'fixed-sigma' needs a sigma file: fixed-sigma:sigma_file=FILE.json "
                        "(written by `l2zo probe-blocks`)")  # fmt: skip
    return FixedSigmaZO(model, read_sigma_file(sigma_file), **kwargs)


register_optimizer(
    OptimizerSpec(
        name="fixed-sigma",
        factory=build_fixed_sigma,
        hparams=FixedSigmaHParams,
        run_args=(*ZO_RUN_ARGS, "sigma_file"),
        description="MeZO with a fixed normalised sigma per block from a JSON file (sigma_file=FILE, from probe-blocks)",
    )
)
