"""MeZO-SVRG (Gautam et al., ICML 2024): SPSA with an SVRG control variate around an anchor theta~.

Update (q = full-batch period, D = a fixed large training batch, I = the step's minibatch)::

    step t % q == 0:  g_D = SPSA(theta; D, z_D);  theta~ <- theta;  theta <- theta - lr_full (g_D z_D + wd theta)
    other steps:      g1 = SPSA(theta; I, z),  g2 = SPSA(theta~; I, z)            (same z for both)
                      theta <- theta - lr ((g1 - g2) z + g_D z_D + wd theta)
    SPSA(x; B, z) = (L_B(x + eps z) - L_B(x - eps z)) / (2 eps)

Protocol (what the training loop must provide):
    ``opt.set_anchor_loss_fn(fn)`` once, before the first step. ``fn()`` takes no arguments and returns
    the mean loss (fp32 scalar tensor) over the *same* fixed large training batch D every call (e.g.
    the first 512 training examples, accumulated over micro-batches under no_grad), evaluated with
    the model's current parameters. The optimizer calls it twice on full-batch steps (every q-th step,
    starting with step 0) and never on the others. ``step(closure)`` then needs nothing more: the
    minibatch closure is evaluated at the anchor by swapping theta~ into the parameters in place
    (chunked copies, no new storage) and swapping back. Steps without the hook raise ``L2ZOError``.
    Forward counts: 2 forwards over D on full-batch steps, 4 over the minibatch otherwise;
    ``opt.forward_counts`` accumulates {"minibatch": n, "full_batch": n}.

The lr (eta2, minibatch steps) follows the scheduler; lr_full (eta1) is scaled by the same factor
(lr / initial_lr, when a scheduler has set initial_lr).

Extra memory: 1 parameter-sized buffer, the anchor theta~ (in ``state_dict``). The full-batch
estimate g_D z_D is not stored: it is regenerated from (seed_D, g_D) (seed trick), which the public
code and the paper's memory-efficient algorithm keep as a second buffer. Two chunk buffers besides.

Deliberate differences from amazon-science/mezo_svrg: a real anchor copy (the public code's shallow
list ``.copy()`` makes theta~ alias theta, baselines.md 3.10); the two minibatch estimates share z
(the control variate (g1 - g2) z then vanishes as theta -> theta~; the public code draws a fresh z2);
g_D z_D is regenerated rather than stored; no loss-ratio lr annealing (use an lr schedule);
wd on matrices only, as MeZO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from l2zo.engine import Z_CHUNK, Probe, ZSource
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.base import LossFn, Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer


@dataclass(kw_only=True)
class MeZOSVRGHParams(ZOHParams):
    lr: float = 1e-5  # eta2, the minibatch-step lr
    lr_full: float = 1e-4  # eta1, the full-batch-step lr
    q: int = 2  # a full-batch step every q steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.q) < 1:
            raise L2ZOError(f"q (the full-batch period) must be >= 1, got {self.q}")
        if not self.lr_full >= 0.0:
            raise L2ZOError(f"lr_full must be >= 0, got {self.lr_full}")
        self.q = int(self.q)


@dataclass(frozen=True)
class SVRGMeasurement(Measurement):
    """A full-batch probe (``anchor`` None, ``full``), or a minibatch probe at theta plus, unless that one is
    already non-finite, the same probe at the anchor theta~ (``anchor``; theta and theta~ are then swapped).
    """

    full: bool
    anchor: Probe | None = None

    def finite(self) -> bool:
        return super().finite() and (self.anchor is None or math.isfinite(self.anchor.projected_grad))

    def describe(self) -> str:
        if self.full:
            return f"full batch: {super().describe()}"
        if not super().finite() or self.anchor is None:
            return f"minibatch: {super().describe()}"
        return f"minibatch at the anchor: L+={self.anchor.loss_plus.item():.4g}, L-={self.anchor.loss_minus.item():.4g}"


class MeZOSVRG(ZOOptimizer):
    """MeZO-SVRG with a real anchor copy; call ``set_anchor_loss_fn`` before stepping (see module doc)."""

    hparams_cls = MeZOSVRGHParams

    def __init__(self, params: ParamsLike, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.q = self.hp.q
        self._anchor_loss_fn: Callable[[], torch.Tensor] | None = None
        self._full: tuple[int, float] | None = None  # (seed_D, g_D): the full-batch estimate g_D z_D
        self._zsrc_full = ZSource()  # its own chunk buffer, so z and z_D can be regenerated side by side
        self._tmp: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.forward_counts = {"minibatch": 0, "full_batch": 0}
        self.last_anchor_probe: Probe | None = None

    def set_anchor_loss_fn(self, fn: Callable[[], torch.Tensor]) -> None:
        """Register ``fn()``: the loss over a fixed large training batch at the current parameters."""
        if not callable(fn):
            raise L2ZOError(
                f"set_anchor_loss_fn needs a zero-argument callable returning the loss, got {type(fn).__name__}"
            )
        self._anchor_loss_fn = fn

    # -- helpers ----------------------------------------------------------------------------------
    def _anchor(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "anchor" not in st:
            st["anchor"] = torch.empty_like(p)
        return st["anchor"].view(-1)

    def _tmp_chunk(self, p: torch.Tensor, n: int) -> torch.Tensor:
        key = (p.device, p.dtype)
        if key not in self._tmp or self._tmp[key].numel() < n:
            self._tmp[key] = torch.empty(min(Z_CHUNK, max(n, 1)), device=p.device, dtype=p.dtype)
        return self._tmp[key][:n]

    def _swap(self) -> None:
        """Exchange theta and theta~ in place, chunk by chunk (parameters keep their storage)."""
        for b in self.blocks:
            flat, anc = b.param.data.view(-1), self._anchor(b.param)
            for s in range(0, flat.numel(), Z_CHUNK):
                e = min(s + Z_CHUNK, flat.numel())
                tmp = self._tmp_chunk(b.param, e - s)
                tmp.copy_(flat[s:e])
                flat[s:e].copy_(anc[s:e])
                anc[s:e].copy_(tmp)

    @staticmethod
    def _lr_full(group: dict[str, Any]) -> float:
        init = group.get("initial_lr")
        return group["lr_full"] * (group["lr"] / init if init else 1.0)

    # -- the step hooks ---------------------------------------------------------------------------
    def _probe(self, closure: LossFn, seed: int, sigma: Sequence[float] | None) -> Measurement:
        """Every q-th step: a probe of the anchor loss fn (the fixed large batch). Otherwise a probe of the
        minibatch at theta, then (theta, theta~ swapped in place) the same probe, same z, at theta~."""
        if self.step_count % self.q == 0 or self._full is None:
            fn = self._anchor_loss_fn
            if fn is None:
                raise L2ZOError(
                    "mezo-svrg needs the loss over a fixed large training batch: call "
                    "opt.set_anchor_loss_fn(fn) before stepping, where fn() returns that loss at the current weights"
                )
            return SVRGMeasurement(self._two_point(fn, seed, sigma), full=True)
        p1 = self._two_point(closure, seed, sigma)  # theta -> theta - eps z
        if not math.isfinite(p1.projected_grad):
            return SVRGMeasurement(p1, full=False)
        self._swap()  # parameters = theta~, anchor = theta - eps z
        try:
            p2 = self._two_point(closure, seed, sigma)  # theta~ -> theta~ - eps z
        except BaseException:  # the probe put theta~ back
            self._swap()
            self._perturb(seed, +self.eps, sigma)
            raise
        return SVRGMeasurement(p1, full=False, anchor=p2)

    def _restore(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        assert isinstance(meas, SVRGMeasurement)
        seed, eps = meas.probe.seed, self.eps
        self._perturb(seed, +eps, sigma)
        if meas.anchor is not None:  # theta~ restored above; now theta, swapped back first
            self._swap()
            self._perturb(seed, +eps, sigma)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        assert isinstance(meas, SVRGMeasurement)
        if meas.full:
            self._full_update(meas.probe)
            self.forward_counts["full_batch"] += 2
        else:
            assert meas.anchor is not None
            self._svrg_update(meas.probe.seed, meas.probe.projected_grad - meas.anchor.projected_grad)
            self.forward_counts["minibatch"] += 4
        self.last_anchor_probe = meas.anchor

    def _full_update(self, probe: Probe) -> None:
        """Restore theta, copy it to theta~, and take the full-batch step, in one pass."""
        seed, eps, g = probe.seed, self.eps, probe.projected_grad
        for b, group in zip(self.blocks, self.param_groups):
            lr1 = self._lr_full(group)
            d = 1.0 - lr1 * group["weight_decay"]
            flat, anc = b.param.data.view(-1), self._anchor(b.param)
            for s, e, z in self.zsrc.chunks(b.param, seed, b.index):
                flat[s:e].add_(z, alpha=eps)  # restore theta
                anc[s:e].copy_(flat[s:e])  # theta~ <- theta
                if d != 1.0:
                    flat[s:e].mul_(d)
                flat[s:e].add_(z, alpha=-lr1 * g)
        self._full = (seed, g)

    def _svrg_update(self, seed: int, dg: float) -> None:
        """Swap back, restoring both points, and step, in one pass:
        theta <- d (theta_minus + eps z) - lr (dg z + g_D z_D);  theta~ <- theta~_minus + eps z."""
        assert self._full is not None
        seed_d, g_d = self._full
        eps = self.eps
        for b, group in zip(self.blocks, self.param_groups):
            lr = group["lr"]
            d = 1.0 - lr * group["weight_decay"]
            flat, anc = b.param.data.view(-1), self._anchor(b.param)
            pairs = zip(self.zsrc.chunks(b.param, seed, b.index), self._zsrc_full.chunks(b.param, seed_d, b.index))
            for (s, e, z), (_, _, z_d) in pairs:
                tmp = self._tmp_chunk(b.param, e - s)
                tmp.copy_(flat[s:e])  # theta~ - eps z
                flat[s:e].copy_(anc[s:e])  # theta - eps z
                if d != 1.0:
                    flat[s:e].mul_(d)
                flat[s:e].add_(z, alpha=d * eps - lr * dg).add_(z_d, alpha=-lr * g_d)
                anc[s:e].copy_(tmp).add_(z, alpha=eps)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["svrg"] = {"full": self._full, "forward_counts": dict(self.forward_counts)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        svrg = state_dict.pop("svrg", None)
        super().load_state_dict(state_dict)  # the anchor comes back as a private copy: it is updated in place
        if svrg is not None:
            self._full = None if svrg["full"] is None else (int(svrg["full"][0]), float(svrg["full"][1]))
            self.forward_counts = dict(svrg["forward_counts"])


register_optimizer(
    OptimizerSpec(
        name="mezo-svrg",
        factory=MeZOSVRG,
        description="MeZO-SVRG: SPSA with an SVRG control variate at a stored anchor, full-batch refresh every q steps "
        "(1 buffer; needs opt.set_anchor_loss_fn)",
        hparams=MeZOSVRGHParams,
        forwards_per_step=4,
        needs_anchor_batch=True,
    )
)
