"""Per-block input features of the variance network (ZO Fine-tuner, reference §1.3).

For block b at step t the paper feeds, in this order (the order matters for released weights):

    [ mean(W_b), var(W_b), L+_{t-1}, L-_{t-1}, sigma_{b,t-1} ]

with the unbiased variance of the *current* weights, the previous step's two ZO losses (0 at step 0)
and the block's previous raw sigma (1 at step 0). Everything here is detached: the net is trained
through its own parameters only, never through the features.

Beyond the paper (``FeatureSpec``, both off by default): a signed log scale for the heavy-tailed
inputs, and normalisation by reference values (first observed loss, initial per-block variance), so
one net sees comparable inputs on models whose losses and weight scales differ.

Features version 2 (issue 15, item 3; each off by default, appended after the paper's five in the
order of ``EXTRA_FEATURES``; ``FeatureSpec.names()`` is the list an artifact records):

    log_numel         log n_b                                          static, from the block's shape
    weight_norm       ||theta_b|| / sqrt(n_b)                          from ``weight_stats``' moments
    drift             ||theta_b - theta_b0|| / ||theta_b0||            DiZO; ``l2zo.learned.drift``
    static_curvature  log l_b - mean_c log l_c, l_b = tr(H_b)/n_b or tr(F_b)/n_b, measured once per base
                      model at meta-training time and stored in the net (``l2zo.blockstats.static``)
    grad_rms          log1p of the running RMS of the projected gradient g (global; no extra forward)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from l2zo.engine.blocks import Block
from l2zo.engine.seeding import Z_CHUNK
from l2zo.errors import L2ZOError
from l2zo.learned.drift import DriftSource

FEATURE_NAMES: tuple[str, ...] = ("weight_mean", "weight_var", "loss_plus_prev", "loss_minus_prev", "sigma_prev")
NUM_FEATURES = len(FEATURE_NAMES)
# The per-block features beyond the paper's, in the order they follow it (never reorder: released nets).
EXTRA_FEATURES: tuple[str, ...] = ("log_numel", "weight_norm", "drift", "static_curvature", "grad_rms")
KNOWN_FEATURES: tuple[str, ...] = FEATURE_NAMES + EXTRA_FEATURES
# 1: the paper's five (artifacts written before versioning record none and read as 1); 2: + EXTRA_FEATURES.
FEATURES_VERSION = 2
CURVATURE_KINDS: tuple[str, ...] = ("none", "fisher", "hessian")
# Decay of the running mean of g^2 behind ``grad_rms``: a window of about 10 steps.
GRAD_RMS_BETA = 0.9


@dataclass(frozen=True)
class FeatureSpec:
    """Feature options beyond the paper (all off reproduces the paper's raw features).

    Attributes:
        log_scale: apply sign(x)*log1p(|x|) to weight_var and the two losses.
        normalize: divide the losses by the first observed loss and each block's var by its initial var.
        log_numel, weight_norm, drift, grad_rms: append that feature (module docstring).
        curvature: "none", or the static per-element curvature the net sees: "fisher" (tr(F_b)/n_b, classification
            tasks) or "hessian" (Hutchinson tr(H_b)/n_b).
    """

    log_scale: bool = False
    normalize: bool = False
    log_numel: bool = False
    weight_norm: bool = False
    drift: bool = False
    curvature: str = "none"
    grad_rms: bool = False

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURE_KINDS:
            raise L2ZOError(f"unknown curvature feature {self.curvature!r}; choose one of {', '.join(CURVATURE_KINDS)}")

    @property
    def static_curvature(self) -> bool:
        return self.curvature != "none"

    def names(self) -> tuple[str, ...]:
        """The ordered names of the columns ``build_features`` returns for this spec."""
        on = {"log_numel": self.log_numel, "weight_norm": self.weight_norm, "drift": self.drift,
              "static_curvature": self.static_curvature, "grad_rms": self.grad_rms}  # fmt: skip
        return FEATURE_NAMES + tuple(name for name in EXTRA_FEATURES if on[name])

    @property
    def num_features(self) -> int:
        """F, the number of feature columns (5 for the paper's)."""
        return len(self.names())

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FeatureExtras:
    """The per-block inputs of the features beyond the paper's, each needed only when its feature is on.

    Attributes:
        numel: [B] n_b (log_numel, weight_norm).
        drift: [B] ||theta_b - theta_b0|| / ||theta_b0|| (``l2zo.learned.drift``).
        static_curvature: [B] the net's stored static curvature feature (``VarianceNet.static_curvature``).
        grad_rms: ``GradRMS.feature()``, one number for every block.
    """

    numel: Tensor | None = None
    drift: Tensor | None = None
    static_curvature: Tensor | None = None
    grad_rms: float = 0.0


@dataclass
class GradRMS:
    """Running RMS of the projected gradient g = (L+ - L-)/(2 eps), the ``grad_rms`` feature.

    E[g^2] = A + V (the ZO step's signal plus minibatch noise, reference learning-signal.md §2): how much
    gradient energy the current allocation sees, which sets how far a step can go. It costs no forward: g is
    the probe's. Global (one number for all blocks), bias-corrected like Adam's moments; 0 before the first step.
    """

    mean_sq: float = 0.0
    steps: int = 0

    def observe(self, g: float) -> None:
        self.mean_sq = GRAD_RMS_BETA * self.mean_sq + (1.0 - GRAD_RMS_BETA) * float(g) ** 2
        self.steps += 1

    def feature(self) -> float:
        if self.steps == 0:
            return 0.0
        return math.log1p(math.sqrt(self.mean_sq / (1.0 - GRAD_RMS_BETA**self.steps)))

    def copy(self) -> GradRMS:
        return GradRMS(self.mean_sq, self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"mean_sq": self.mean_sq, "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> GradRMS:
        return cls(float(state["mean_sq"]), int(state["steps"])) if state else cls()


@dataclass
class FeatureRef:
    """Reference values for ``FeatureSpec.normalize``, set once and kept in optimizer state.

    Attributes:
        loss0: the first observed loss ((L+ + L-)/2 of the first step); None until a step was taken.
        var0: [B] fp32 per-block weight variance at the first call; None until then.
    """

    loss0: float | None = None
    var0: Tensor | None = field(default=None)

    def observe_stats(self, stats: Tensor) -> None:
        """Record the initial variances from ``stats`` [B, 2] if not yet set."""
        if self.var0 is None:
            self.var0 = stats[:, 1].detach().float().clone()

    def observe_loss(self, loss_plus: float, loss_minus: float) -> None:
        """Record the first observed loss if not yet set."""
        if self.loss0 is None:
            self.loss0 = 0.5 * (float(loss_plus) + float(loss_minus))

    def state_dict(self) -> dict[str, Any]:
        return {"loss0": self.loss0, "var0": None if self.var0 is None else self.var0.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> FeatureRef:
        if not state:
            return cls()
        var0 = state.get("var0")
        return cls(loss0=state.get("loss0"), var0=None if var0 is None else torch.as_tensor(var0).float())


# Refine a block exactly when mean^2 > _ILL_CONDITIONED * var: there E[x^2] - mean^2 loses
# log10(1 + mean^2/var) digits of fp32 (e.g. norm gains near 1 with a tiny spread).
_ILL_CONDITIONED = 10.0
# _foreach_norm accumulates sequentially on CPU (relative error ~4e-5 over 1.5M fp32 entries); summing the
# squares of the norms of 256K-entry views in fp64 keeps it ~1e-5 at a negligible cost in launches.
_NORM_CHUNK = 1 << 18


def _two_pass_var(flat: Tensor, mean: float) -> float:
    """Unbiased var of a 1-D tensor around ``mean``, in fp32 chunks of ``Z_CHUNK`` (bounded temporary).

    The corrected two-pass formula (sum d^2 - (sum d)^2 / n) / (n - 1), d = x - mean, is exact to
    fp32 rounding even when mean >> std.
    """
    n = flat.numel()
    ss, s = 0.0, 0.0
    for start in range(0, n, Z_CHUNK):
        d = flat[start : start + Z_CHUNK].float() - mean
        ss += float(torch.dot(d, d))
        s += float(d.sum())
    return (ss - s * s / n) / (n - 1)


@torch.no_grad()
def weight_stats(blocks: Sequence[Block], device: torch.device | str | None = None) -> Tensor:
    """Mean and unbiased variance of every block's current weights: one read of the weights.

    ``torch.var_mean`` (Welford) is ~20x slower than a sum on CPU, so the moments come from a sum per
    block and one batched ``_foreach_norm`` (sum of squares), accumulated in fp32 (also for bf16/fp16
    weights, without a converted copy) and combined in fp64. Blocks where that formula would cancel
    (mean^2 >> var, e.g. norm gains) are recomputed with an exact two-pass formula; they are small.

    Args:
        blocks: the optimizer's blocks.
        device: where the result lives; default the first block's device.

    Returns:
        [B, 2] fp32: column 0 the mean, column 1 the unbiased variance (0 for blocks of < 2 entries).
    """
    device = torch.device(device) if device is not None else blocks[0].param.device
    params = [b.param.detach() for b in blocks]
    sums = torch.stack([p.sum(dtype=torch.float32).to(device, non_blocking=True) for p in params])
    pieces = [p.reshape(-1).split(_NORM_CHUNK) for p in params]
    norms = torch._foreach_norm([c for ps in pieces for c in ps], 2, dtype=torch.float32)
    sq = torch.stack([x.to(device, non_blocking=True) for x in norms]).double().square()
    owner = torch.tensor([i for i, ps in enumerate(pieces) for _ in ps], device=device)
    sumsq = torch.zeros(len(params), dtype=torch.float64, device=device).index_add_(0, owner, sq)
    n = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=device)
    mean = sums.double() / n.clamp_min(1)
    var = ((sumsq - sums.double() * mean) / (n - 1).clamp_min(1)).clamp_min(0)
    var = torch.where(n < 2, torch.zeros_like(var), var)  # var of one entry is undefined: report no spread
    ill = ((mean * mean > _ILL_CONDITIONED * var) & (n >= 2)).nonzero().flatten().tolist()  # one host sync
    if ill:
        exact = [_two_pass_var(params[i].reshape(-1), float(mean[i])) for i in ill]
        var[ill] = torch.tensor(exact, dtype=torch.float64, device=device)
    return torch.stack((mean, var), dim=1).float()


def _signed_log1p(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def build_features(
    stats: Tensor,
    loss_plus_prev: float,
    loss_minus_prev: float,
    sigma_prev: Tensor,
    spec: FeatureSpec,
    ref: FeatureRef | None = None,
    extras: FeatureExtras | None = None,
) -> Tensor:
    """Assemble the per-block feature matrix in the order of ``spec.names()`` (the paper's five first).

    Args:
        stats: [B, 2] from ``weight_stats``.
        loss_plus_prev, loss_minus_prev: the previous step's L+ and L- (0.0 before the first step).
        sigma_prev: [B] the previous raw sigma (ones before the first step).
        spec: feature options.
        ref: reference values, used only when ``spec.normalize`` (None: nothing to normalise by yet).
        extras: the inputs of the features beyond the paper's (``FeatureExtras``); None when all are off.

    Returns:
        [B, F] fp32 on ``stats``' device, detached, F = ``spec.num_features``.
    """
    stats = stats.detach().float()
    num_blocks = stats.shape[0]
    mean, var = stats[:, 0], stats[:, 1]
    losses = torch.tensor([float(loss_plus_prev), float(loss_minus_prev)], dtype=torch.float32, device=stats.device)
    if spec.normalize and ref is not None:
        if ref.var0 is not None:
            var0 = ref.var0.to(stats.device)
            # A block that started constant (a norm gain of ones) has var0 = 0: leave its var unscaled.
            var = var / torch.where(var0 > 0, var0, torch.ones_like(var0))
        if ref.loss0 is not None and ref.loss0 != 0.0:
            losses = losses / abs(ref.loss0)
    if spec.log_scale:
        var = _signed_log1p(var)
        losses = _signed_log1p(losses)
    sigma_prev = sigma_prev.detach().float().to(stats.device).reshape(num_blocks)
    cols = [mean, var, losses[0].expand(num_blocks), losses[1].expand(num_blocks), sigma_prev]
    cols += _extra_columns(stats, spec, extras or FeatureExtras())
    return torch.stack(cols, dim=1)


def _need(x: Tensor | None, what: str, num_blocks: int, device: torch.device) -> Tensor:
    if x is None:
        raise L2ZOError(f"the {what} feature is on but no {what} input was given (FeatureExtras.{what})")
    return x.detach().to(device=device, dtype=torch.float32).reshape(num_blocks)


def _extra_columns(stats: Tensor, spec: FeatureSpec, extras: FeatureExtras) -> list[Tensor]:
    """The columns after the paper's five, in ``EXTRA_FEATURES`` order; [B] fp32 each."""
    num_blocks, device = stats.shape[0], stats.device
    cols: list[Tensor] = []
    if spec.log_numel or spec.weight_norm:
        n = _need(extras.numel, "numel", num_blocks, device).double()
    if spec.log_numel:
        cols.append(torch.log(n).float())
    if spec.weight_norm:
        # ||theta||^2 / n = E[x^2] = mean^2 + var * (n - 1) / n, from the unbiased var of weight_stats.
        mean, var = stats[:, 0].double(), stats[:, 1].double()
        cols.append((mean * mean + var * (n - 1) / n).clamp_min(0).sqrt().float())
    if spec.drift:
        cols.append(_need(extras.drift, "drift", num_blocks, device))
    if spec.static_curvature:
        cols.append(_need(extras.static_curvature, "static_curvature", num_blocks, device))
    if spec.grad_rms:
        cols.append(torch.full((num_blocks,), float(extras.grad_rms), dtype=torch.float32, device=device))
    return cols


def block_numel(blocks: Sequence[Block], device: torch.device | str | None = None) -> Tensor:
    """[B] fp32 numel per block (``FeatureExtras.numel``)."""
    return torch.tensor([float(b.numel) for b in blocks], dtype=torch.float32, device=device)


def extras_for(
    spec: FeatureSpec,
    blocks: Sequence[Block],
    *,
    static_curvature: Tensor | None = None,
    drift_source: DriftSource | None = None,
    grad: GradRMS | None = None,
) -> FeatureExtras:
    """The ``FeatureExtras`` of ``spec`` at ``blocks``' current values: the one place both the learned optimizer and
    meta-training (``predict_sigma``) get them from, so both compute the same features at the same state.

    Args:
        static_curvature: [B] ``VarianceNet.static_curvature`` (needed with ``spec.curvature``).
        drift_source: theta_0's stand-in (``l2zo.learned.drift``; needed with ``spec.drift``).
        grad: the running projected-gradient RMS (None: no step yet).
    """
    numel = block_numel(blocks) if spec.log_numel or spec.weight_norm else None
    drift = None
    if spec.drift:
        if drift_source is None:
            raise L2ZOError("the drift feature needs the run's starting weights theta_0 (a DriftTracker or an "
                            "ExactAnchor from l2zo.learned.drift); none was given")  # fmt: skip
        drift = drift_source.drift([b.param for b in blocks])
    if spec.static_curvature and static_curvature is None:
        raise L2ZOError("the static_curvature feature is on but the net holds no measured curvature")
    return FeatureExtras(numel=numel, drift=drift, static_curvature=static_curvature if spec.static_curvature else None,
                         grad_rms=grad.feature() if grad is not None and spec.grad_rms else 0.0)  # fmt: skip
