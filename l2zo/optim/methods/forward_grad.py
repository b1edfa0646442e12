"""Forward gradient (Baydin et al., 2022), the exact-JVP baseline of ZO-Bench.

Update (one step, z ~ N(0, I) seeded as MeZO's z)::

    g = grad L(theta) . z          (exact directional derivative, one JVP: eps = 0)
    theta <- theta - lr * (g * z + wd * theta)       (wd on matrices only, as MeZO)

The JVP is ``torch.func.jvp`` over ``torch.func.functional_call`` of the model, so the model's own
parameters are never replaced or modified until the update. The zero-argument closure is kept: it is
run inside a thin wrapper module whose only child is the model, so ``functional_call`` swaps the
parameters for the duration of the closure and restores them afterwards (also on error).

Supported models: every op in the forward must implement forward-mode AD. Hugging Face models built
with ``attn_implementation="eager"`` work (tested: Llama). On CPU,
``attn_implementation="sdpa"`` fails (``_scaled_dot_product_flash_attention_for_cpu`` has no forward
AD in torch 2.x); flash-attention kernels and fused/compiled custom kernels fail too. Such failures
raise an ``L2ZOError`` naming the fix. The optimizer must be built from an ``nn.Module`` (it needs
``functional_call``).

Extra memory: 1 parameter-sized buffer (the tangent z of every block, materialised for the JVP; it
is regenerated from the step seed, so a run still replays from (seed, g) pairs) plus the JVP's
tangent activations (about one extra set of forward activations). Weights stay in place.

Differences from ZO-Bench ``forward_grad_step`` (deliberate): z comes from l2zo's seeded per-block
generators (not ``torch.manual_seed``); primals and tangents are passed as tuples (ZO-LLM issue #16);
weight decay skips 1-D blocks by shape, not by name; dropout is off during the JVP (as in MeZO's
forwards), and there is no ``eps`` hyperparameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from l2zo.engine import Probe
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.base import LossFn, Measurement, ZOOptimizer
from l2zo.optim.hparams import HParams
from l2zo.optim.registry import OptimizerSpec, register_optimizer

_FWD_AD_HINTS = ("forward ad", "forward-mode", "forward mode", "jvp", "dual")


def _storage_key(p: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))


class _CallClosure(nn.Module):
    """Holds the model as child ``m`` so ``functional_call`` can swap its parameters around a closure."""

    def __init__(self, model: nn.Module, closure: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.m = model
        self._closure = closure

    def forward(self) -> torch.Tensor:
        loss = self._closure()
        if not isinstance(loss, torch.Tensor):
            raise L2ZOError("forward-grad's closure must return the loss as a tensor (it is differentiated)")
        return loss.float()


@dataclass(kw_only=True)
class ForwardGradHParams(HParams):
    """No eps: the directional derivative is exact."""

    lr: float = 5e-7


@dataclass(frozen=True)
class JVPMeasurement(Measurement):
    """L(theta) and g = grad L . z from one JVP (``probe`` holds L as both L+ and L-); theta never moved.

    ``tangents`` are the step's z, one per block, kept for the update (the method's one extra buffer).
    """

    lossf: float
    tangents: tuple[torch.Tensor, ...]

    @property
    def loss(self) -> torch.Tensor:
        return self.probe.loss_plus

    def finite(self) -> bool:
        return math.isfinite(self.probe.projected_grad) and math.isfinite(self.lossf)

    def describe(self) -> str:
        return f"L={self.lossf:.4g}, JVP g={self.probe.projected_grad:.4g}"


class ForwardGrad(ZOOptimizer):
    """Forward gradient: theta <- theta - lr * ((grad L . z) z + wd * theta), exact JVP, one per step.

    Use it like MeZO (``opt.step(lambda: loss_fn(model, batch))``), but build it from the model.
    """

    hparams_cls = ForwardGradHParams
    data_parallel = False  # it differentiates the closure (a JVP): a sum of loss values over processes is not that

    def __init__(self, params: ParamsLike, **kwargs: Any) -> None:
        if not isinstance(params, nn.Module):
            raise L2ZOError(
                "forward-grad needs the model itself (an nn.Module), not a parameter list: the JVP runs "
                "torch.func.functional_call over it"
            )
        super().__init__(params, **kwargs)
        # Every name under which a block is reachable (tied weights, storage-sharing aliases), so the
        # functional call replaces all of them with the same primal.
        index = {id(b.param): b.index for b in self.blocks}
        by_storage = {_storage_key(b.param): b.index for b in self.blocks}
        self._names: list[list[str]] = [[] for _ in self.blocks]
        for name, p in params.named_parameters(remove_duplicate=False):
            i = index.get(id(p), by_storage.get(_storage_key(p)) if p.numel() > 0 else None)
            if i is not None:
                self._names[i].append("m." + name)

    def _probe(self, closure: LossFn, seed: int, sigma: Sequence[float] | None) -> Measurement:
        """One JVP of ``closure`` along z (theta untouched): L(theta) and g = grad L . z."""
        assert self.module is not None
        tangents = tuple(self.zsrc.full(b.param, seed, b.index) for b in self.blocks)
        primals = tuple(b.param.detach() for b in self.blocks)
        wrapper = _CallClosure(self.module, closure)

        def loss_of(*ps: torch.Tensor) -> torch.Tensor:
            mapping = {n: p for names, p in zip(self._names, ps) for n in names}
            return functional_call(wrapper, mapping, (), tie_weights=False)

        torch.clear_autocast_cache()
        try:
            loss, dloss = jvp(loss_of, primals, tangents)
        except (NotImplementedError, RuntimeError) as exc:
            if any(h in str(exc).lower() for h in _FWD_AD_HINTS):
                raise L2ZOError(
                    f"forward-grad: an op in the model has no forward-mode AD ({str(exc).splitlines()[0]}). "
                    "Build the model with attn_implementation='eager' and without fused/flash kernels"
                ) from exc
            raise
        finally:
            torch.clear_autocast_cache()
        loss = loss.detach()
        g = float(dloss)  # the step's one host sync
        return JVPMeasurement(
            Probe(seed=seed, loss_plus=loss, loss_minus=loss, projected_grad=g), float(loss), tangents
        )

    def _restore(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """Nothing to undo: the JVP never moves theta."""

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """theta <- d theta - lr g z, with the tangents z of the probe."""
        assert isinstance(meas, JVPMeasurement)
        g = meas.probe.projected_grad
        for b, group, z in zip(self.blocks, self.param_groups, meas.tangents):
            lr = group["lr"]
            d = 1.0 - lr * group["weight_decay"]
            if d != 1.0:
                b.param.mul_(d)
            b.param.add_(z, alpha=-lr * g)


register_optimizer(
    OptimizerSpec(
        name="forward-grad",
        factory=ForwardGrad,
        description="Forward gradient: exact JVP along a seeded Gaussian z (torch.func.jvp; eager attention; "
        "1 buffer + JVP activations)",
        hparams=ForwardGradHParams,
        forwards_per_step=1,
    )
)
