"""Per-block input features of the variance network (ZO Fine-tuner, reference §1.3).

For block b at step t the paper feeds, in this order (the order matters for released weights):

    [ mean(W_b), var(W_b), L+_{t-1}, L-_{t-1}, sigma_{b,t-1} ]

with the unbiased variance of the *current* weights, the previous step's two ZO losses (0 at step 0)
and the block's previous raw sigma (1 at step 0). Everything here is detached: the net is trained
through its own parameters only, never through the features.

Beyond the paper (``FeatureSpec``, both off by default): a signed log scale for the heavy-tailed
inputs, and normalisation by reference values (first observed loss, initial per-block variance), so
one net sees comparable inputs on models whose losses and weight scales differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from l2zo.engine.blocks import Block
from l2zo.engine.seeding import Z_CHUNK

FEATURE_NAMES: tuple[str, ...] = ("weight_mean", "weight_var", "loss_plus_prev", "loss_minus_prev", "sigma_prev")
NUM_FEATURES = len(FEATURE_NAMES)


@dataclass(frozen=True)
class FeatureSpec:
    """Feature options beyond the paper (both False reproduces the paper's raw features).

    Attributes:
        log_scale: apply sign(x)*log1p(|x|) to weight_var and the two losses.
        normalize: divide the losses by the first observed loss and each block's var by its initial var.
    """

    log_scale: bool = False
    normalize: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"log_scale": self.log_scale, "normalize": self.normalize}


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
) -> Tensor:
    """Assemble the per-block feature matrix in the paper's order (``FEATURE_NAMES``).

    Args:
        stats: [B, 2] from ``weight_stats``.
        loss_plus_prev, loss_minus_prev: the previous step's L+ and L- (0.0 before the first step).
        sigma_prev: [B] the previous raw sigma (ones before the first step).
        spec: feature options.
        ref: reference values, used only when ``spec.normalize`` (None: nothing to normalise by yet).

    Returns:
        [B, 5] fp32 on ``stats``' device, detached.
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
    return torch.stack((mean, var, losses[0].expand(num_blocks), losses[1].expand(num_blocks), sigma_prev), dim=1)
