"""LOZO and LOZO-M (Chen et al., ICLR 2025): ZO-SGD with low-rank perturbations.

Each matrix block W (m x n; higher-rank tensors are viewed as shape[0] x rest) is perturbed along
Z = U V^T with U ~ N(0,1)^{m x r} fresh every step and V ~ N(0,1)^{n x r} resampled every ``nu``
steps (lazy sampling). 1-D blocks (biases, norm gains) get a plain Gaussian z, as in MeZO::

    g = (L(theta + eps Z) - L(theta - eps Z)) / (2 eps)
    LOZO:    W <- W - lr (g U V^T + wd W)
    LOZO-M:  M <- beta M + (1 - beta) g U             (M is m x r; on a resample step first
                                                       M <- M V_old^T V_new / n)
             W <- W - lr (M V^T + wd W);   1-D blocks: m <- beta m + (1 - beta) g z, theta -= lr m

Every pass is ``W.addmm_(A, V^T, beta=d, alpha=c)`` (BLAS accumulates in place: no m x n
temporary). Restore and update are fused: d (W_minus + eps U V^T) - lr g U V^T is one addmm_.

Seed trick: U and the 1-D z are regenerated from the step seed (never stored); V is stored in the
optimizer state (n x r per matrix, in ``state_dict``), drawn from its own seed stream
(seed, resample index, block), so drawing V never shifts the stream U comes from.

Extra memory: ~0 parameter-sized buffers: V (n x r per matrix); LOZO-M adds M (m x r per matrix, fp32)
and a full fp32 momentum for 1-D blocks only (a few vectors per layer).

Deliberate differences from optsuite/LOZO:
* The V/U offset bug is fixed (baselines.md 3.8.3): in the public code, on resample steps the
  perturbation draws V then U from one seeded RNG while the update draws only U, so 1 in nu updates
  moves along a direction unrelated to the measured g. Here the update direction is always exactly
  the measured U V^T.
* As the public code (and unlike the paper's estimator) there is no 1/r factor, so the published lr
  grids apply; each entry of U V^T has variance r (effective perturbation eps * sqrt(r)), and the
  paper's lr for rank r is r times ours (LOZO issue #1).
* LOZO-M's momentum is kept in fp32; z comes from l2zo's per-device generators; wd skips 1-D blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from l2zo.engine import axpby_z_, for_each_z, mix_seed
from l2zo.engine.blocks import Block, ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.base import Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer

_U_STREAM = (1 << 62) + 0x55  # never a chunk index, so U's seeds never meet z's
_V_STREAM = (1 << 62) + 0x56


@dataclass(kw_only=True)
class LOZOHParams(ZOHParams):
    rank: int = 2  # r, the rank of each matrix perturbation U V^T
    nu: int = 50  # V is resampled every nu steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise L2ZOError(f"rank must be >= 1, got {self.rank}")
        if int(self.nu) < 1:
            raise L2ZOError(f"nu (the V resampling interval) must be >= 1, got {self.nu}")
        self.rank, self.nu = int(self.rank), int(self.nu)


@dataclass(kw_only=True)
class LOZOMHParams(LOZOHParams):
    rank: int = 4
    beta: float = 0.9  # momentum of the factor-space M

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 1.0:
            raise L2ZOError(f"beta must be in [0, 1), got {self.beta}")
        self.beta = float(self.beta)


class LOZO(ZOOptimizer):
    """Low-rank ZO-SGD: W <- W - lr (g U V^T + wd W), V resampled every ``nu`` steps (see module doc)."""

    hparams_cls = LOZOHParams

    def __init__(self, params: ParamsLike, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.rank, self.nu = self.hp.rank, self.hp.nu
        self._mats = [b for b in self.blocks if b.is_matrix]
        self._vecs = [b for b in self.blocks if not b.is_matrix]
        self._vs: dict[int, torch.Tensor] = {}  # V of every matrix for the current step
        self._fresh = False  # whether this step resampled V

    # -- directions -------------------------------------------------------------------------------
    @staticmethod
    def _mat(b: Block) -> torch.Tensor:
        return b.param.data.view(b.shape[0], -1)

    def _randn(self, b: Block, seed: int, rows: int) -> torch.Tensor:
        gen = self.zsrc.generator(b.param.device)
        gen.manual_seed(seed)
        return torch.randn(rows, self.rank, generator=gen, device=b.param.device, dtype=b.param.dtype)

    def factor_u(self, b: Block, step_seed: int) -> torch.Tensor:
        """U (m x r) of matrix block ``b`` at the step with seed ``step_seed``, regenerated."""
        return self._randn(b, mix_seed(step_seed, b.index, _U_STREAM), b.shape[0])

    def _sample_v(self, b: Block, k: int) -> torch.Tensor:
        return self._randn(b, mix_seed(self.seed, _V_STREAM, k, b.index), self._mat(b).shape[1])

    def _step_vs(self) -> tuple[dict[int, torch.Tensor], bool]:
        """V of every matrix for this step: resampled when step % nu == 0 (or when missing)."""
        k, r = divmod(self.step_count, self.nu)
        vs, fresh = {}, r == 0
        for b in self._mats:
            v = self.state[b.param].get("V")
            vs[b.index] = self._sample_v(b, k) if fresh or v is None else v
        return vs, fresh

    def _axpby(
        self, seed: int, vs: dict[int, torch.Tensor], coef: list[float], decay: list[float] | None = None
    ) -> None:
        """theta_b <- decay_b theta_b + coef_b u_b with u = U V^T (matrices) or z (vectors)."""
        for b in self._mats:
            c, d = coef[b.index], 1.0 if decay is None else decay[b.index]
            if c != 0.0 or d != 1.0:
                self._mat(b).addmm_(self.factor_u(b, seed), vs[b.index].t(), beta=d, alpha=c)
        axpby_z_(self._vecs, seed, self.zsrc, coef, decay)

    # -- the step hooks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _step_scope(self, seed: int) -> Iterator[None]:
        """V for this step: resampled when step % nu == 0, else the stored one."""
        self._vs, self._fresh = self._step_vs()
        try:
            yield
        finally:
            self._vs = {}

    def _perturb(self, seed: int, scale: float, sigma: Sequence[float] | None) -> None:
        """theta += scale * u: U V^T on matrices, z on 1-D blocks."""
        self._axpby(seed, self._vs, [scale] * len(self.blocks))

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """The fused restore and update, then this step's V is kept (in the state)."""
        self._apply(meas.probe.seed, self._vs, self._fresh, meas.probe.projected_grad)
        for b in self._mats:
            self.state[b.param]["V"] = self._vs[b.index]

    def _apply(self, seed: int, vs: dict[int, torch.Tensor], fresh: bool, g: float) -> None:
        """Restore theta from theta - eps u and step: d (theta_minus + eps u) - lr g u, one pass."""
        coef, decay = [], []
        for group in self.param_groups:
            d = 1.0 - group["lr"] * group["weight_decay"]
            coef.append(self.eps * d - group["lr"] * g)
            decay.append(d)
        self._axpby(seed, vs, coef, decay)


class LOZOM(LOZO):
    """LOZO-M: momentum in the low-rank factor space, M <- beta M + (1 - beta) g U (see module doc)."""

    hparams_cls = LOZOMHParams

    def _apply(self, seed: int, vs: dict[int, torch.Tensor], fresh: bool, g: float) -> None:
        for b, group in zip(self.blocks, self.param_groups):
            lr, beta = group["lr"], group["beta"]
            d = 1.0 - lr * group["weight_decay"]
            st = self.state[b.param]
            if b.is_matrix:
                u = self.factor_u(b, seed).float()
                m = st.get("M")
                if m is None:
                    m = st["M"] = torch.zeros_like(u)
                elif fresh and "V" in st:  # carry M into the new V's coordinates
                    v_old, v_new = st["V"].float(), vs[b.index].float()
                    m.copy_(m @ (v_old.t() @ v_new) / v_new.shape[0])
                m.mul_(beta).add_(u, alpha=(1.0 - beta) * g)
                # d (W_minus + eps U V^T) - lr M V^T = d W_minus + (d eps U - lr M) V^T
                a = (u.mul_(d * self.eps).sub_(m, alpha=lr)).to(b.param.dtype)
                self._mat(b).addmm_(a, vs[b.index].t(), beta=d, alpha=1.0)
            else:
                if "m" not in st:
                    st["m"] = torch.zeros_like(b.param, dtype=torch.float32)
                self._vector_step(b, seed, st["m"].view(-1), g, lr, beta, d)

    def _vector_step(self, b: Block, seed: int, mom: torch.Tensor, g: float, lr: float, beta: float, d: float) -> None:
        """A 1-D block: m <- beta m + (1 - beta) g z;  theta <- d (theta_minus + eps z) - lr m, one pass."""

        def visit(blk: Block, s: int, e: int, theta: torch.Tensor, z: torch.Tensor) -> None:
            mom[s:e].mul_(beta).add_(z, alpha=(1.0 - beta) * g)
            if d != 1.0:
                theta.mul_(d)
            theta.add_(z, alpha=d * self.eps).sub_(mom[s:e], alpha=lr)

        for_each_z([b], seed, self.zsrc, visit)


register_optimizer(
    OptimizerSpec(
        name="lozo",
        factory=LOZO,
        description="LOZO: ZO-SGD along low-rank U V^T per matrix (V resampled every nu steps; ~0 extra buffers)",
        hparams=LOZOHParams,
    )
)
register_optimizer(
    OptimizerSpec(
        name="lozo-m",
        factory=LOZOM,
        description="LOZO-M: LOZO with momentum kept in the m x r factor space (~0 extra buffers)",
        hparams=LOZOMHParams,
    )
)
