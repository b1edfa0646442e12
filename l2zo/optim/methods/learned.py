"""LearnedZO (ZO Fine-tuner, arXiv 2510.00419): MeZO with a learned, normalised sigma per block.

Each step (reference §2.1): features [mean W_b, var W_b, L+_{t-1}, L-_{t-1}, sigma_{b,t-1}] -> the
variance net -> raw sigma_b -> c = sqrt(sum n_b / sum n_b sigma_b^2) -> u_b = c sigma_b z_b, then
MeZO's probe and fused update with that u. The raw sigma and (L+, L-) become the next step's
features. With sigma == 1 and c == 1 the step is MeZO's, bit for bit.

``permute_seed`` is a control, not a method: the net runs as it would (its features and recurrent state are its
own), but block b is perturbed with the sigma the net gave block perm(b), renormalised. A net whose win survives
the shuffle won by something other than which blocks it perturbs more (its scale over time, its dynamics).
With ``permute_within_kind`` blocks trade sigmas only with blocks of their kind (``block_kind``): what each kind
gets is kept, which layer gets what is shuffled.

Registered here, with the two ablations the paper lacks (reference §5.4, §7):
  learned          a meta-trained net from an artifact folder
  learned-random   a freshly initialised net (same spec, normalisation and seed handling)
  per-block-const  one fixed sigma per block kind (default all 1 = MeZO), normalised the same way

Extra cost over MeZO: one read of the weights per step (mean/var) and one tiny batched MLP. The
features beyond the paper (``l2zo.learned.features``) add no forward: the drift feature keeps a copy
of the small blocks' starting weights only (``l2zo.learned.drift.DriftTracker``), the static
curvature comes with the artifact's net, and grad_rms from the probe's g.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from l2zo.engine.blocks import ParamsLike, block_kind, block_permutation, partition
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import load_artifact, read_manifest, spec_from_manifest
from l2zo.learned.drift import DRIFT_EXACT_NUMEL, DriftTracker
from l2zo.learned.features import FeatureRef, GradRMS, build_features, extras_for, weight_stats
from l2zo.learned.net import NetSpec, VarianceNet
from l2zo.learned.normalization import block_weights, normalize_sigma
from l2zo.optim.base import Measurement, ZOOptimizer
from l2zo.optim.hparams import ZOHParams, make_hparams, pick
from l2zo.optim.registry import OptimizerSpec, register_optimizer


def _normalize(raw: Tensor, n: Tensor, rule: str) -> tuple[float, Tensor]:
    if rule == "none":
        return 1.0, raw
    c, eff = normalize_sigma(raw, n)
    return float(c), eff


class LearnedZO(ZOOptimizer):
    """ZO-SGD whose per-block perturbation scale comes from a ``VarianceNet``.

    Args:
        params: the model (needed by normalization "paper"), or its named parameters.
        net: the variance net; its ``block_names`` must be this optimizer's blocks, in order.
        **kwargs: as ``MeZO`` (lr, eps, weight_decay, seed, include, exclude).
        normalization: "numel", "paper" or "none" (``l2zo.learned.normalization``).
        batch_size: the global batch size, for the "paper" embedding weight.
        sigma_fallback: [B] True where the block gets raw sigma 1 instead of the net's (partial loads).
        drift_exact_numel: with the drift feature, blocks of at most this many entries keep an exact copy of their
            starting weights; larger ones use the random-walk estimate (``l2zo.learned.drift``).
        permute_seed: None, or the seed of a fixed shuffle of the blocks: the permutation control (module docstring).
        permute_within_kind: the shuffle moves a block's sigma only to blocks of its kind.

    Attributes:
        last_sigma: [B] effective sigma (c * sigma) of the last step, or None before the first step.
        last_c: the normalisation constant of the last step.
    """

    sigma_reads_weights = True  # the features' per-block weight mean and variance

    def __init__(
        self,
        params: ParamsLike,
        net: VarianceNet,
        *,
        normalization: str = "numel",
        batch_size: int = 16,
        sigma_fallback: Sequence[bool] | None = None,
        drift_exact_numel: int = DRIFT_EXACT_NUMEL,
        permute_seed: int | None = None,
        permute_within_kind: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        names = [b.name for b in self.blocks]
        if net.block_names != names:
            pairs = enumerate(zip(net.block_names, names))
            diff = next((i for i, (a, b) in pairs if a != b), min(len(names), net.num_blocks))
            raise L2ZOError(
                f"the variance net was built for other blocks ({net.num_blocks} vs {len(names)} here; first difference "
                f"at block {diff}); build it with VarianceNet(spec, [b.name for b in optimizer blocks]) or load the "
                "artifact against this model"
            )
        self.net = net
        self.normalization = normalization
        device = net.w1.device
        self.n = block_weights(self.blocks, normalization, model=self.module, batch_size=batch_size).to(device)
        fallback = [False] * len(names) if sigma_fallback is None else [bool(f) for f in sigma_fallback]
        if len(fallback) != len(names):
            raise L2ZOError(f"sigma_fallback has {len(fallback)} entries for {len(names)} blocks")
        self.sigma_fallback = torch.tensor(fallback, dtype=torch.bool, device=device)
        if permute_within_kind and permute_seed is None:
            raise L2ZOError(
                "permute_within_kind shuffles the blocks of a kind: give the shuffle's seed (permute_seed=0)"
            )
        groups = [block_kind(n) for n in names] if permute_within_kind else None
        self.perm = None if permute_seed is None else block_permutation(len(names), permute_seed, groups).to(device)
        # The paper's initial recurrent state: losses 0, sigma 1.
        self.loss_prev: tuple[float, float] = (0.0, 0.0)
        self.sigma_prev = torch.ones(len(names), dtype=torch.float32, device=device)
        self.ref = FeatureRef()
        self.grad_rms = GradRMS()
        # theta_0 of the drift feature, taken now: the start of the run (a resume restores it from the state).
        self.drift = DriftTracker(self.blocks, drift_exact_numel) if net.spec.features.drift else None
        self.last_sigma: Tensor | None = None
        self.last_c: float = 1.0
        self._raw: Tensor | None = None

    @torch.no_grad()
    def features(self) -> Tensor:
        """[B, F] the net's features for the current weights and recurrent state (as ``predict_sigma``'s)."""
        spec = self.net.spec.features
        stats = weight_stats(self.blocks, device=self.sigma_prev.device)
        if spec.normalize:
            self.ref.observe_stats(stats)
        extras = extras_for(spec, self.blocks, static_curvature=getattr(self.net, "static_curvature", None),
                            drift_source=self.drift, grad=self.grad_rms)  # fmt: skip
        return build_features(stats, *self.loss_prev, self.sigma_prev, spec, self.ref, extras)

    @torch.no_grad()
    def raw_sigma(self) -> Tensor:
        """[B] the net's sigma for the current weights and recurrent state (fallback blocks: 1)."""
        raw = self.net(self.features())
        return torch.where(self.sigma_fallback, torch.ones_like(raw), raw)

    def sigma(self) -> list[float]:
        raw = self.raw_sigma()
        # The control applies a shuffle of the net's sigmas; the net's recurrent input stays its own output (below).
        c, eff = _normalize(raw if self.perm is None else raw[self.perm], self.n, self.normalization)
        if not bool(torch.isfinite(eff).all()):
            bad = [self.blocks[i].name for i in torch.nonzero(~torch.isfinite(eff)).flatten().tolist()[:3]]
            raise L2ZOError(f"the variance net produced a non-finite sigma (blocks {bad}); the artifact may be broken")
        self._raw, self.last_c, self.last_sigma = raw, c, eff
        return eff.tolist()

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        super()._update(meas, sigma)
        # Only after a finite probe (the step raises before updating otherwise): the recurrent state moves on.
        assert self._raw is not None
        self.loss_prev = (float(meas.probe.loss_plus), float(meas.probe.loss_minus))
        self.sigma_prev = self._raw
        if self.net.spec.features.normalize:
            self.ref.observe_loss(*self.loss_prev)
        g = meas.probe.projected_grad
        self.grad_rms.observe(g)
        if self.drift is not None and sigma is not None:
            self.drift.observe_step([-group["lr"] * g * float(s) for group, s in zip(self.param_groups, sigma)])

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["learned"] = {
            "loss_prev": list(self.loss_prev),
            "sigma_prev": self.sigma_prev.detach().cpu().clone(),
            "ref": self.ref.state_dict(),
            "last_c": self.last_c,
            "last_sigma": None if self.last_sigma is None else self.last_sigma.detach().cpu().clone(),
            "grad_rms": self.grad_rms.state_dict(),
            "drift": None if self.drift is None else self.drift.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        learned = state_dict.pop("learned", None)
        super().load_state_dict(state_dict)
        if learned is None:
            return
        device = self.sigma_prev.device
        self.loss_prev = (float(learned["loss_prev"][0]), float(learned["loss_prev"][1]))
        self.sigma_prev = torch.as_tensor(learned["sigma_prev"], dtype=torch.float32).to(device).clone()
        self.ref = FeatureRef.from_state(learned.get("ref"))
        self.last_c = float(learned.get("last_c", 1.0))
        last = learned.get("last_sigma")
        self.last_sigma = None if last is None else torch.as_tensor(last).to(device).clone()
        self.grad_rms = GradRMS.from_state(learned.get("grad_rms"))
        if self.drift is not None and learned.get("drift") is not None:
            self.drift.load_state_dict(learned["drift"])


class PerBlockConstZO(ZOOptimizer):
    """MeZO with a fixed sigma per block kind, normalised once like LearnedZO's (the "no learning" ablation).

    Args:
        sigma_by_kind: kind (``block_kind``) -> raw sigma; kinds not listed get ``default_sigma``.
        normalization, batch_size: as ``LearnedZO``.
    """

    def __init__(
        self,
        params: ParamsLike,
        sigma_by_kind: Mapping[str, float] | None = None,
        default_sigma: float = 1.0,
        normalization: str = "numel",
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        mapping = dict(sigma_by_kind or {})
        raw = torch.tensor([float(mapping.get(block_kind(b.name), default_sigma)) for b in self.blocks])
        if not bool(torch.isfinite(raw).all()) or bool((raw < 0).any()):
            raise L2ZOError("per-block-const sigmas must be finite and >= 0")
        n = block_weights(self.blocks, normalization, model=self.module, batch_size=batch_size)
        self.last_c, self.last_sigma = _normalize(raw, n, normalization)
        self._sigma = self.last_sigma.tolist()

    def sigma(self) -> list[float]:
        return self._sigma


def _model_name(model: nn.Module) -> str | None:
    if getattr(model, "l2zo_name", None):  # set by l2zo.models.load_model
        return str(model.l2zo_name)
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


@dataclass(kw_only=True)
class NetHParams(ZOHParams):
    """A net's ZO hyperparameters, with the permutation control of ``LearnedZO`` (off by default)."""

    permute_seed: int | None = None  # the control: the net's sigmas on blocks shuffled by this seed
    permute_within_kind: bool = False  # the shuffle keeps each sigma on a block of the same kind

    def control(self) -> dict[str, Any]:
        """``LearnedZO``'s keyword arguments of the control."""
        return {"permute_seed": self.permute_seed, "permute_within_kind": self.permute_within_kind}


@dataclass(kw_only=True)
class LearnedHParams(NetHParams):
    partial: bool = False  # load an artifact trained on other blocks: unmatched blocks get raw sigma 1
    batch_size: int | None = None  # for normalization "paper"; None: the manifest's


@dataclass(kw_only=True)
class LearnedRandomHParams(NetHParams):
    net_seed: int = 0  # initialisation seed of the fresh net
    normalization: str | None = None  # None: the artifact's rule, else "numel"
    batch_size: int | None = None  # for normalization "paper"; None: the artifact's, else 16


@dataclass(kw_only=True)
class PerBlockConstHParams(ZOHParams):
    sigma_by_kind: dict[str, float] | None = None  # block kind -> raw sigma (over an artifact's record)
    default_sigma: float = 1.0  # for kinds not listed
    normalization: str | None = None  # None: the artifact's rule, else "numel"
    batch_size: int | None = None  # for normalization "paper"; None: the artifact's, else 16


Build = Callable[[nn.Module, Any, str | None, dict[str, Any]], ZOOptimizer]
_NORM_DEFAULT: Mapping[str, Any] = {"rule": "numel", "batch_size": 16}  # without an artifact to say otherwise


def learned_factory(hparams_cls: type[ZOHParams], build: Build) -> Callable[..., ZOOptimizer]:
    """A registry factory ``(model, *, artifact, seed, include, exclude, **hparams)``: reads the hyperparameters
    into ``hparams_cls``, then ``build(model, hp, artifact, run)``, ``run`` being the optimizer's own keyword
    arguments (seed, include, exclude and the ZO hyperparameters lr, eps, weight_decay)."""

    def factory(
        model: nn.Module,
        *,
        artifact: str | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **hparams: Any,
    ) -> ZOOptimizer:
        hp = make_hparams(hparams_cls, hparams, hparams_cls.__name__)
        run = {"seed": seed, "include": include, "exclude": exclude, **pick(hp, ZOHParams)}
        return build(model, hp, artifact, run)

    return factory


def _normalization(rule: str | None, batch_size: int | None, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """LearnedZO's normalization and batch_size: the ones given, else the recorded ones."""
    return {"normalization": rule or recorded["rule"], "batch_size": int(batch_size or recorded.get("batch_size", 16))}


def _build_learned(model: nn.Module, hp: LearnedHParams, artifact: str | None, run: dict[str, Any]) -> LearnedZO:
    """LearnedZO from an artifact folder, checked against ``model`` (normalisation from the manifest)."""
    if artifact is None:
        raise L2ZOError("optimizer 'learned' needs an artifact folder: pass --artifact DIR (see `l2zo inspect DIR`)")
    blocks = partition(model, run["include"], run["exclude"])
    loaded = load_artifact(artifact, blocks, model_name=_model_name(model), partial=bool(hp.partial),
                           adapter=getattr(model, "l2zo_adapter", None))  # set by l2zo.models.adapters  # fmt: skip
    norm = _normalization(None, hp.batch_size, loaded.manifest["normalization"])
    return LearnedZO(model, loaded.net, sigma_fallback=loaded.sigma_fallback, **hp.control(), **norm, **run)


def _build_learned_random(
    model: nn.Module, hp: LearnedRandomHParams, artifact: str | None, run: dict[str, Any]
) -> LearnedZO:
    """LearnedZO with a fresh ``VarianceNet(spec, blocks, net_seed)``; spec and normalisation from ``artifact``."""
    spec, recorded = NetSpec(), _NORM_DEFAULT
    blocks = partition(model, run["include"], run["exclude"])
    if artifact is not None:
        manifest = read_manifest(artifact)
        spec, recorded = spec_from_manifest(manifest, artifact), manifest["normalization"]
    net = VarianceNet(spec, [b.name for b in blocks], seed=hp.net_seed)
    if spec.features.static_curvature:
        # Measured per base model, not learned: the fresh net sees the artifact's (matched by block name and shape).
        loaded = load_artifact(artifact, blocks, model_name=_model_name(model), partial=True)
        net.static_curvature.copy_(loaded.net.static_curvature)
    norm = _normalization(hp.normalization, hp.batch_size, recorded)
    return LearnedZO(model, net, **hp.control(), **norm, **run)


def _build_per_block_const(
    model: nn.Module, hp: PerBlockConstHParams, artifact: str | None, run: dict[str, Any]
) -> PerBlockConstZO:
    """PerBlockConstZO from ``sigma_by_kind``, or from an artifact's recorded ``sigma_by_kind``; default all 1."""
    recorded = _NORM_DEFAULT
    mapping = dict(hp.sigma_by_kind or {})
    if artifact is not None:
        manifest = read_manifest(artifact)
        recorded = manifest["normalization"]
        mapping = {**manifest.get("sigma_by_kind", {}), **mapping}
    elif mapping:
        kinds = {block_kind(b.name) for b in partition(model, run["include"], run["exclude"])}
        unknown = sorted(set(mapping) - kinds)
        if unknown:
            raise L2ZOError(f"sigma_by_kind names unknown block kinds {unknown}; this model has {sorted(kinds)}")
    norm = _normalization(hp.normalization, hp.batch_size, recorded)
    return PerBlockConstZO(model, sigma_by_kind=mapping, default_sigma=hp.default_sigma, **norm, **run)


build_learned = learned_factory(LearnedHParams, _build_learned)
build_learned_random = learned_factory(LearnedRandomHParams, _build_learned_random)
build_per_block_const = learned_factory(PerBlockConstHParams, _build_per_block_const)

_RUN_ARGS = ("artifact", "seed", "include", "exclude")
register_optimizer(OptimizerSpec(
    name="learned", factory=build_learned, hparams=LearnedHParams, run_args=_RUN_ARGS,
    description="ZO Fine-tuner: MeZO with a meta-trained per-block sigma net from an artifact (--artifact DIR)",
))  # fmt: skip
register_optimizer(OptimizerSpec(
    name="learned-random", factory=build_learned_random, hparams=LearnedRandomHParams, run_args=_RUN_ARGS,
    description="ablation: LearnedZO with a freshly initialised net (net_seed), same normalisation",
))  # fmt: skip
register_optimizer(OptimizerSpec(
    name="per-block-const", factory=build_per_block_const, hparams=PerBlockConstHParams, run_args=_RUN_ARGS,
    description="ablation: a fixed normalised sigma per block kind (sigma_by_kind or an artifact's); default = MeZO",
))  # fmt: skip
