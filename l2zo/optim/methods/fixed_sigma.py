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
from collections.abc import Sequence
from pathlib import Path

import torch

from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.learned.normalization import block_weights, normalize_sigma
from l2zo.optim.base import ZOOptimizer
from l2zo.optim.registry import OptimizerSpec, register_optimizer

_RULES = ("numel", "none")


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


class FixedSigmaZO(ZOOptimizer):
    """ZO-SGD with u_b = sigma_b z_b for a fixed, normalised sigma per block.

    Args:
        params: the model, or its named parameters.
        sigma: block name -> sigma; must name exactly this optimizer's blocks.
        normalization: "numel" (sum n_b sigma_b^2 = sum n_b) or "none" (as given).
        lr, eps, weight_decay, seed, include, exclude: as ``MeZO``.

    Attributes:
        last_sigma: [B] the effective (normalised) sigma, float64.
    """

    def __init__(
        self,
        params: ParamsLike,
        sigma: dict[str, float],
        normalization: str = "numel",
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, include=include, exclude=exclude)
        if normalization not in _RULES:
            raise L2ZOError(f"fixed-sigma normalization must be one of {', '.join(_RULES)}, got {normalization!r}")
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
        if normalization == "numel":
            _, raw = normalize_sigma(raw, block_weights(self.blocks, "numel"))
        self.last_sigma = raw
        self._sigma = raw.tolist()

    def sigma(self) -> list[float]:
        return self._sigma


def build_fixed_sigma(
    model: torch.nn.Module,
    *,
    sigma_file: str | None = None,
    normalization: str = "numel",
    lr: float = 1e-6,
    eps: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> FixedSigmaZO:
    """FixedSigmaZO from a JSON sigma file (``sigma_file``)."""
    if sigma_file is None:
        raise L2ZOError("optimizer 'fixed-sigma' needs a sigma file: fixed-sigma:sigma_file=FILE.json "
                        "(written by `l2zo probe-blocks`)")  # fmt: skip
    return FixedSigmaZO(
        model, read_sigma_file(sigma_file), normalization=normalization, lr=lr, eps=eps, weight_decay=weight_decay,
        seed=seed, include=include, exclude=exclude,
    )  # fmt: skip


register_optimizer(OptimizerSpec(
    name="fixed-sigma", factory=build_fixed_sigma, defaults={"lr": 1e-6, "eps": 1e-3},
    description="MeZO with a fixed normalised sigma per block from a JSON file (sigma_file=FILE, from probe-blocks)",
))  # fmt: skip
