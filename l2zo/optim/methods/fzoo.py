"""FZOO (ICLR 2026): one-sided differences along N Rademacher directions, normalised by the loss spread.

Update (one step, N directions z_i in {-1, +1}^d, each regenerated from its own seed)::

    l0 = L(theta);   l_i = L(theta + eps z_i),  i = 1..N
    sigma = std(l_1..l_N)        (population std, as FZOO)
    c_i = (l_i - l0) / (N sigma) (no division by eps: sigma absorbs it)
    theta <- theta - lr (sum_i c_i z_i + wd theta)      (wd on matrices only, as MeZO)

N + 1 forwards a step. Passes are fused: moving from theta + eps z_i to theta + eps z_{i+1} is one
pass (two regenerations), and the last restore is fused with the update (N regenerations, one pass
over the weights). If sigma == 0 (all N losses equal) the step leaves theta unchanged.

Seed trick per direction: z_i is Rademacher, chunk c of block b drawn from
``G(mix(mix(step_seed, i), b, c))`` with the engine's chunking; nothing is stored.
Extra memory: 0 parameter-sized buffers (one chunk buffer per device and dtype).

Deliberate differences from DKmiyan/FZOO: directions come from l2zo's per-device generators; the
N forwards run sequentially (no batched ``ParallelOPTForCausalLM``); the lr follows the scheduler
(FZOO's trainer ignores it); sigma == 0 gives a no-op step instead of a division by zero; wd skips
1-D blocks. ``last_probe.projected_grad`` logs mean_i (l_i - l0) / eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from l2zo.engine import Z_CHUNK, Probe, evaluate_loss, mix_seed
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.base import LossFn, Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer


@dataclass(kw_only=True)
class FZOOHParams(ZOHParams):
    lr: float = 1e-5
    num_directions: int = 8  # N one-sided Rademacher directions a step

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.num_directions) < 2:
            raise L2ZOError(
                f"num_directions must be >= 2 (FZOO normalises by the std of the N losses), got {self.num_directions}"
            )
        self.num_directions = int(self.num_directions)


@dataclass(frozen=True)
class FZOOMeasurement(Measurement):
    """l0 = L(theta) and the N one-sided losses l_i = L(theta + eps z_i); theta is left at theta + eps z_N.

    ``values`` holds [l_1 - l0 .. l_N - l0, std(l), l0] on the host (the step's one sync).
    """

    l0: torch.Tensor
    losses: torch.Tensor  # [N]
    seeds: tuple[int, ...]  # [N] direction seeds
    values: tuple[float, ...]

    @property
    def loss(self) -> torch.Tensor:
        return self.l0

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    def describe(self) -> str:
        return f"L0={self.values[-1]:.4g}, l_i - L0={list(self.values[:-2])}"


class FZOO(ZOOptimizer):
    """FZOO: theta <- theta - lr * sum_i (l_i - l0) / (N std(l)) z_i, z_i Rademacher (see module doc)."""

    hparams_cls = FZOOHParams
    last_losses: torch.Tensor | None = None  # [N] the last step's l_i

    def __init__(self, params: ParamsLike, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.num_directions = self.hp.num_directions
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # -- directions -------------------------------------------------------------------------------
    def direction_seed(self, step_seed: int, i: int) -> int:
        return mix_seed(step_seed, i)

    def _z(self, param: torch.Tensor, seed: int, index: int, c: int, n: int) -> torch.Tensor:
        """Chunk ``c`` (``n`` entries) of block ``index``'s Rademacher z(seed), in a reused buffer."""
        key = (param.device, param.dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(min(Z_CHUNK, max(n, 1)), device=param.device, dtype=param.dtype)
        gen = self.zsrc.generator(param.device)
        gen.manual_seed(mix_seed(seed, index, c))
        return buf[:n].bernoulli_(0.5, generator=gen).mul_(2).sub_(1)

    def full_direction(self, param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """The whole Rademacher z(seed) of one block as a new tensor (tests, dense references)."""
        out = torch.empty_like(param).view(-1)
        for c, start in enumerate(range(0, out.numel(), Z_CHUNK)):
            end = min(start + Z_CHUNK, out.numel())
            out[start:end].copy_(self._z(param, seed, index, c, end - start))
        return out.view_as(param)

    def _axpy(self, terms: Sequence[tuple[int, Sequence[float]]], decay: Sequence[float] | None = None) -> None:
        """theta_b <- decay_b theta_b + sum_k coef_k[b] z(seed_k)_b for (seed_k, coef_k) in terms, one pass."""
        for b in self.blocks:
            flat = b.param.data.view(-1)
            d = 1.0 if decay is None else float(decay[b.index])
            if d != 1.0:
                flat.mul_(d)
            live = [(s, float(c[b.index])) for s, c in terms if float(c[b.index]) != 0.0]
            for c, start in enumerate(range(0, flat.numel(), Z_CHUNK) if live else ()):
                end = min(start + Z_CHUNK, flat.numel())
                for s, coef in live:
                    flat[start:end].add_(self._z(b.param, s, b.index, c, end - start), alpha=coef)

    # -- the step hooks ---------------------------------------------------------------------------
    def _perturb(self, seed: int, scale: float, sigma: Sequence[float] | None) -> None:
        """theta += scale * z(seed), z Rademacher (``seed`` is a direction seed)."""
        self._axpy([(seed, [scale] * len(self.blocks))])

    def _probe(self, closure: LossFn, seed: int, sigma: Sequence[float] | None) -> Measurement:
        """l0, then theta + eps z_i for i = 1..N, moving from one direction to the next in one pass."""
        seeds = [self.direction_seed(seed, i) for i in range(self.num_directions)]
        nb, eps = len(self.blocks), self.eps

        def const(v: float) -> list[float]:
            return [v] * nb

        losses = []
        l0 = evaluate_loss(closure)
        for i, s in enumerate(seeds):
            self._axpy([(s, const(eps))] + ([(seeds[i - 1], const(-eps))] if i else []))
            try:
                losses.append(evaluate_loss(closure))
            except BaseException:
                self._perturb(s, -eps, sigma)
                raise
        torch.clear_autocast_cache()
        ls = torch.stack(losses)
        diffs = ls - l0
        spread = ls.std(correction=0)
        vals = torch.cat([diffs, spread.view(1), l0.view(1)]).tolist()  # the step's one host sync
        g = sum(vals[: self.num_directions]) / (self.num_directions * eps)  # logged: mean_i (l_i - l0) / eps
        return FZOOMeasurement(Probe(seed, l0, l0, g), l0, ls, tuple(seeds), tuple(vals))

    def _restore(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """theta + eps z_N -> theta."""
        assert isinstance(meas, FZOOMeasurement)
        self._perturb(meas.seeds[-1], -self.eps, sigma)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """theta + eps z_N -> d theta - lr sum_i c_i z_i, c_i = (l_i - l0) / (N std), in one pass."""
        assert isinstance(meas, FZOOMeasurement)
        n, nb, eps = self.num_directions, len(self.blocks), self.eps
        diffs_f, sigma_f = meas.values[:n], meas.values[-2]
        cs = [dv / (n * sigma_f) for dv in diffs_f] if sigma_f > 0.0 else [0.0] * n
        terms, decay = [], []
        for group in self.param_groups:
            decay.append(1.0 - group["lr"] * group["weight_decay"])
        lrs = [group["lr"] for group in self.param_groups]
        for i, (s, c) in enumerate(zip(meas.seeds, cs)):
            # The last direction also carries the restore: d (theta + eps z_N - eps z_N) - lr sum c_i z_i.
            restore = [-eps * d for d in decay] if i == n - 1 else [0.0] * nb
            terms.append((s, [r - lr * c for r, lr in zip(restore, lrs)]))
        self._axpy(terms, decay)
        self.last_losses = meas.losses


register_optimizer(
    OptimizerSpec(
        name="fzoo",
        factory=FZOO,
        description="FZOO: one-sided differences along N=8 Rademacher directions, normalised by the loss std "
        "(N+1 forwards, 0 buffers)",
        hparams=FZOOHParams,
        forwards_per_step=9,
    )
)
