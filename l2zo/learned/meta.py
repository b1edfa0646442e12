"""Meta-objectives for the variance network: pure, typed functions (no Lightning, no data code).

Greedy (the paper, reference §3.1), at trajectory state theta with minibatch B:

    sigma = net(features(theta))            raw [B], with grad into the net; features detached
    c, u = normalize(sigma)                 c detached: no gradient through the normalization
    g = (L(theta + eps*u) - L(theta - eps*u)) / (2 eps)     in place, no_grad, detached
    L_meta = L(theta.detach() - eta * c * g * sigma * z; B_outer)

so dL_meta/dsigma_b = -eta * c * g * <grad_b L(theta'), z_b>. theta' is built out of place and the model
is called on it with ``torch.func.functional_call(..., tie_weights=True)``, which follows whatever weight
tying the module has (no re-tying by parameter name). z is regenerated from the step seed with the engine's
``ZSource``; only autograd keeps it (it needs z_b for dL/dsigma_b).

Unrolled (beyond the paper): K ZO steps theta_{k+1} = theta_k - eta * c_k * g_k * sigma_k * z_k, each with
sigma_k = net(features(theta_k, L+-_{k-1}, sigma_{k-1})) and its own inner batch, then L_meta = L(theta_K).
The meta-gradient flows through every sigma_k and, with ``differentiable_g``, through g_k as well (the
finite difference is a smooth function of sigma_k and theta_k). Built with torch.func.functional_call,
not ``higher``: higher.monkeypatch fails on transformers' Llama, whose forward slices ``self.layers[:n]``
and so re-instantiates higher's patched ModuleList class without its ``root`` argument (TypeError).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l2zo.engine import Block, Probe, ZSource, block_kind, eval_mode, mix_seed, two_point_estimate
from l2zo.errors import L2ZOError
from l2zo.learned.drift import DriftSource
from l2zo.learned.features import FeatureRef, GradRMS, build_features, extras_for, weight_stats
from l2zo.learned.net import VarianceNet
from l2zo.learned.normalization import normalize_sigma

ModelLike = Callable[..., Any]
LossFn = Callable[[ModelLike], Tensor]  # loss_fn(model_like) -> fp32 scalar; model_like(**inputs) is a forward


class FunctionalModel:
    """``model`` called with some parameters replaced by tensors (which may carry a graph).

    ``tie_weights=True``: a parameter tied to a replaced one (lm_head.weight to embed_tokens.weight) is
    replaced too, found by identity in the module, not by name.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        self.model = model
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.params, args, kwargs, tie_weights=True, strict=False)


@dataclass
class TaskState:
    """What the learned optimizer carries from step to step, kept per task (the paper's multi-task recipe).

    Attributes:
        loss_plus, loss_minus: the previous step's L+ and L- (0 before the first step, as the paper).
        sigma_prev: [B] the previous raw sigma on CPU, or None for ones.
        ref: reference values for ``FeatureSpec.normalize``.
        grad: the running projected-gradient RMS (``grad_rms`` feature).
        anchor: theta_0 for the ``drift`` feature (``ExactAnchor`` over the pretrained copy); shared by the tasks,
            set by the owner, not saved.
    """

    loss_plus: float = 0.0
    loss_minus: float = 0.0
    sigma_prev: Tensor | None = None
    ref: FeatureRef = field(default_factory=FeatureRef)
    grad: GradRMS = field(default_factory=GradRMS)
    anchor: DriftSource | None = field(default=None, compare=False, repr=False)

    def record(self, probe: Probe, sigma_raw: Tensor) -> None:
        self.loss_plus, self.loss_minus = float(probe.loss_plus), float(probe.loss_minus)
        self.sigma_prev = sigma_raw.detach().float().cpu().clone()
        self.ref.observe_loss(self.loss_plus, self.loss_minus)
        self.grad.observe(probe.projected_grad)

    def reset_losses(self) -> None:
        """At a trajectory reset the loss history is stale; sigma_prev is kept (as the paper keeps it)."""
        self.loss_plus = self.loss_minus = 0.0
        self.grad = GradRMS()  # a new run starts: as a fresh LearnedZO's

    def state_dict(self) -> dict[str, Any]:
        return {"loss_plus": self.loss_plus, "loss_minus": self.loss_minus,
                "sigma_prev": self.sigma_prev, "ref": self.ref.state_dict(), "grad": self.grad.state_dict()}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TaskState:
        return cls(
            float(state["loss_plus"]),
            float(state["loss_minus"]),
            state["sigma_prev"],
            FeatureRef.from_state(state["ref"]),
            GradRMS.from_state(state.get("grad")),
        )


@dataclass(frozen=True)
class SigmaNorm:
    """The normalization of the learned optimizer: block weights n [B] and the rule ("none": c = 1)."""

    n: Tensor
    rule: str = "numel"


@dataclass
class SigmaOut:
    """The net's sigma for one state: raw [B] (graph into the net), c (detached scalar), eff = c*raw [B]."""

    raw: Tensor
    c: Tensor
    eff: Tensor


@dataclass
class MetaResult:
    """One meta-objective evaluation.

    Attributes:
        meta_loss: fp32 scalar with a graph into the net's parameters.
        probe: the ZO probe at the real trajectory state theta (inner step 0).
        sigma: sigma at theta (inner step 0); ``sigma.eff`` is what an on-policy step uses.
    """

    meta_loss: Tensor
    probe: Probe
    sigma: SigmaOut


def task_features(net: VarianceNet, blocks: Sequence[Block], state: TaskState, *, loss_plus: float | None = None,
                  loss_minus: float | None = None, sigma_prev: Tensor | None = None,
                  grad: GradRMS | None = None) -> Tensor:  # fmt: skip
    """[B, F] the net's features at ``blocks``' current values with the task's history (overridable for unrolled
    steps); the same as ``LearnedZO.features`` at the same state (the drift exact, from ``state.anchor``)."""
    stats = weight_stats(blocks)  # [B, 2], detached
    spec = net.spec.features
    if spec.normalize:
        state.ref.observe_stats(stats)
    prev = state.sigma_prev if sigma_prev is None else sigma_prev
    prev = torch.ones(len(blocks)) if prev is None else prev
    extras = extras_for(spec, blocks, static_curvature=getattr(net, "static_curvature", None),
                        drift_source=state.anchor, grad=state.grad if grad is None else grad)  # fmt: skip
    return build_features(
        stats,
        state.loss_plus if loss_plus is None else loss_plus,
        state.loss_minus if loss_minus is None else loss_minus,
        prev,
        spec,
        state.ref,
        extras,
    )


def predict_sigma(net: VarianceNet, blocks: Sequence[Block], state: TaskState, norm: SigmaNorm, *,
                  loss_plus: float | None = None, loss_minus: float | None = None,
                  sigma_prev: Tensor | None = None, grad: GradRMS | None = None) -> SigmaOut:  # fmt: skip
    """sigma for ``blocks``' current values with the task's feature history (overridable for unrolled steps).

    Features are cast to the net's dtype inside the net (fp64 nets work, for gradient checks).
    """
    feats = task_features(net, blocks, state, loss_plus=loss_plus, loss_minus=loss_minus, sigma_prev=sigma_prev,
                          grad=grad)  # fmt: skip
    raw = net(feats)  # [B]
    if norm.rule == "none":
        return SigmaOut(raw=raw, c=torch.ones((), dtype=torch.float64), eff=raw)
    c, eff = normalize_sigma(raw, norm.n)
    return SigmaOut(raw=raw, c=c.detach(), eff=eff)


def z_of(block: Block, seed: int, zsrc: ZSource) -> Tensor:
    """z_b(seed), regenerated: the same z the in-place engine applies to this block."""
    return zsrc.full(block.param, seed, block.index)


def lookahead_params(blocks: Sequence[Block], thetas: Sequence[Tensor], coef: Tensor, seed: int,
                     zsrc: ZSource) -> dict[str, Tensor]:  # fmt: skip
    """theta'_b = theta_b - coef_b * z_b(seed) for every block; ``coef`` [B] carries the graph."""
    return {b.name: t - coef[b.index].to(t.dtype) * z_of(b, seed, zsrc) for b, t in zip(blocks, thetas, strict=True)}


def _check_finite(probe: Probe, where: str) -> None:
    if not math.isfinite(probe.projected_grad):
        raise L2ZOError(f"non-finite ZO loss during {where} (L+={float(probe.loss_plus):.4g}, "
                        f"L-={float(probe.loss_minus):.4g}); lower --inner-lr, --teacher-lr or --eps")  # fmt: skip


def greedy_meta_loss(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState, norm: SigmaNorm,
                     inner: LossFn, outer: LossFn, *, seed: int, eps: float, lr: float,
                     zsrc: ZSource) -> MetaResult:  # fmt: skip
    """The paper's greedy look-ahead objective at the model's current weights (see the module docstring).

    ``inner`` gives the probe's loss, ``outer`` the look-ahead loss (the same batch in the paper). The model's
    weights are unchanged on return (up to the engine's one-ulp probe round trip).
    """
    sig = predict_sigma(net, blocks, state, norm)
    u = sig.eff.detach().tolist()
    with eval_mode(model):
        probe = two_point_estimate(lambda: inner(model), blocks, seed, eps, zsrc, u)
    _check_finite(probe, "the greedy meta-step's probe")
    coef = lr * probe.projected_grad * sig.eff  # [B]: g and c are constants, sigma carries the graph
    params = lookahead_params(blocks, [b.param.detach() for b in blocks], coef, seed, zsrc)
    with eval_mode(model):
        meta = outer(FunctionalModel(model, params))
    return MetaResult(meta_loss=meta, probe=probe, sigma=sig)


def _functional_probe(model: nn.Module, blocks: Sequence[Block], thetas: Sequence[Tensor], eff: Tensor,
                      z: Sequence[Tensor], eps: float, loss: LossFn) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(L(theta + eps*u), L(theta - eps*u)) out of place; differentiable if the inputs carry graphs."""
    plus = {b.name: t + eps * eff[b.index].to(t.dtype) * zb for b, t, zb in zip(blocks, thetas, z, strict=True)}
    minus = {b.name: t - eps * eff[b.index].to(t.dtype) * zb for b, t, zb in zip(blocks, thetas, z, strict=True)}
    return loss(FunctionalModel(model, plus)).float(), loss(FunctionalModel(model, minus)).float()


def unrolled_meta_loss(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState, norm: SigmaNorm,
                       inners: Sequence[LossFn], outer: LossFn, *, seeds: Sequence[int], eps: float, lr: float,
                       zsrc: ZSource, differentiable_g: bool = False) -> MetaResult:  # fmt: skip
    """K = len(inners) differentiable ZO steps from the model's current weights, then ``outer`` at theta_K.

    With K = 1 and ``differentiable_g`` False this is the greedy objective (up to float rounding of the
    out-of-place probe). The model's own parameters are never modified.
    """
    if len(inners) != len(seeds) or not inners:
        raise L2ZOError("unrolled_meta_loss needs one seed per inner loss, and at least one inner loss")
    thetas: list[Tensor] = [b.param.detach() for b in blocks]
    lp_prev, lm_prev, sigma_prev = state.loss_plus, state.loss_minus, state.sigma_prev
    grad = state.grad.copy()  # advanced by each inner step, as a running LearnedZO's
    first: tuple[Probe, SigmaOut] | None = None
    with eval_mode(model):
        for inner, seed in zip(inners, seeds, strict=True):
            views = [Block(b.index, b.name, t.detach()) for b, t in zip(blocks, thetas, strict=True)]
            sig = predict_sigma(net, views, state, norm, loss_plus=lp_prev, loss_minus=lm_prev, sigma_prev=sigma_prev,
                                grad=grad)  # fmt: skip
            z = [z_of(b, seed, zsrc) for b in blocks]
            if differentiable_g:
                lp, lm = _functional_probe(model, blocks, thetas, sig.eff, z, eps, inner)
                g: Tensor | float = (lp - lm) / (2 * eps)
            else:
                with torch.no_grad():
                    lp, lm = _functional_probe(
                        model, blocks, [t.detach() for t in thetas], sig.eff.detach(), z, eps, inner
                    )
                g = float((lp - lm) / (2 * eps))
            g_value = float(g.detach()) if isinstance(g, Tensor) else g
            probe = Probe(seed=seed, loss_plus=lp.detach(), loss_minus=lm.detach(), projected_grad=g_value)
            _check_finite(probe, "an unrolled inner step")
            first = first or (probe, sig)
            coef = lr * g * sig.eff  # [B]
            thetas = [t - coef[b.index].to(t.dtype) * zb for b, t, zb in zip(blocks, thetas, z, strict=True)]
            lp_prev, lm_prev, sigma_prev = float(probe.loss_plus), float(probe.loss_minus), sig.raw.detach()
            grad.observe(g_value)
        meta = outer(FunctionalModel(model, {b.name: t for b, t in zip(blocks, thetas, strict=True)}))
    assert first is not None
    return MetaResult(meta_loss=meta, probe=first[0], sigma=first[1])


# ---------------------------------------------------------------------------------------------- step plan


@dataclass(frozen=True)
class StepPlan:
    """Everything random about meta-step t, a pure function of (seed, t): resuming replays it exactly.

    Attributes:
        task: index into the task family.
        inner: K lists of train-example indices (one inner batch per unrolled step; K = 1 for greedy).
        outer: dev-example indices of the held-out outer batch, or None (outer = the last inner batch).
        z_seeds: K seeds of the inner ZO steps (z_seeds[0] is the probe at the real theta).
        teacher: whether the trajectory advances by the first-order teacher (else on-policy).
    """

    task: int
    inner: tuple[tuple[int, ...], ...]
    outer: tuple[int, ...] | None
    z_seeds: tuple[int, ...]
    teacher: bool


def plan_step(seed: int, step: int, *, sizes: Sequence[tuple[int, int]], weights: Sequence[float] | None,
              batch_size: int, unroll: int, heldout: bool, p_teacher: float) -> StepPlan:  # fmt: skip
    """Draw meta-step ``step``'s task, batches, z seeds and trajectory source.

    Args:
        sizes: per task (num_train, num_dev).
        weights: per-task sampling weights, or None for uniform.
    """
    rng = random.Random(mix_seed(seed, step, 0x4D455441))
    task = rng.choices(range(len(sizes)), weights=weights)[0]
    n_train, n_dev = sizes[task]
    inner = tuple(tuple(rng.sample(range(n_train), min(batch_size, n_train))) for _ in range(unroll))
    outer = tuple(rng.sample(range(n_dev), min(batch_size, n_dev))) if heldout else None
    z_seeds = tuple(mix_seed(seed, step, k) for k in range(unroll))
    return StepPlan(task=task, inner=inner, outer=outer, z_seeds=z_seeds, teacher=rng.random() < p_teacher)


def group_by_kind(blocks: Sequence[Block], eff: Tensor) -> dict[str, list[float]]:
    """Group effective sigmas [B] by ``block_kind`` (for histograms and the artifact's ``sigma_by_kind``)."""
    out: dict[str, list[float]] = {}
    for b, s in zip(blocks, eff.detach().float().cpu().tolist(), strict=True):
        out.setdefault(block_kind(b.name), []).append(s)
    return out
