"""The ``es`` meta-objective: antithetic evolution strategies over the variance net's parameters phi.

The reward of a parameter vector phi [d] (all of the net's parameters, or a subset: ``ES_SPACES``) is the
dev-loss drop of a K-step ZO fine-tune driven by the net with parameters phi, from a start state theta_s:

    theta_0 = theta_s;  for k < K:  sigma_k = c_k * net_phi(features(theta_k, L+-_{k-1}, sigma_{k-1}))
                                    g_k = (L_k(theta_k + eps*u_k) - L_k(theta_k - eps*u_k)) / (2 eps), u_k = sigma_k z_k
                                    theta_{k+1} = theta_k - lr * g_k * u_k
    R(phi) = L_dev(theta_s) - L_dev(theta_K)

which is LearnedZO's step (weight decay 0; probe and fused restore+update with the in-place engine), with
inner batch k and z seed k shared by every run (common random numbers: R is a deterministic function of phi).
For P pairs e_i ~ N(0, I_d) the antithetic estimate of grad R is

    g_phi = 1 / (2 s P) * sum_i e_i (R(phi + s e_i) - R(phi - s e_i))

Only the differences R+ - R- enter, so a mean-reward baseline would cancel exactly: none is subtracted.
With several start states R is their mean (the same e_i for each). The meta-loss handed to the meta-optimizer
is a surrogate whose value is the mean of -R over the 2P runs and whose gradient in phi is -g_phi, so the
existing backward, gradient clipping and Adam step apply unchanged.

Every run starts by copying theta_s into the blocks, and the caller's theta is copied back at the end: the
model is bit for bit what it was (no one-ulp probe round trip). No Lightning here.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from l2zo.engine import Block, ZSource, axpby_z_, eval_mode, evaluate_loss, mix_seed, zo_probe
from l2zo.errors import L2ZOError
from l2zo.learned.meta import LossFn, MetaResult, SigmaNorm, TaskState, _check_finite, predict_sigma
from l2zo.learned.net import VarianceNet

# Which of the net's parameters ES searches over (the rest keep their values and get no gradient):
#   all: every parameter (B * (F'H + 2H + 1) for per-block MLPs);  last: the output layer (w2, b2);
#   bias: the output bias b2 only, one scalar per block (an additive shift of each block's raw sigma);
#   kind: the per-kind log-scale of a net built with kind_scale (d = the number of block kinds, 11 on a Llama):
#   the per-kind table that the shipped tiny net's win comes down to (EVALUATION.md §0b, stop 29), fitted directly.
# The estimate's noise grows with d: with P pairs two independent estimates have cosine ~ P / (P + d), so at P = 8
# (measured on a 20-block Llama, hidden 64, K = 5) bias (d = 20) gives ~0.4, last (d = 1300) ~0.02, all (d = 8980)
# ~0.005. bias is the default; the wider spaces need far more pairs or many meta-steps of averaging.
ES_SPACES: dict[str, tuple[str, ...] | None] = {
    "all": None, "last": ("w2", "b2"), "bias": ("b2",), "kind": ("kind_log_scale",)
}  # fmt: skip
ES_NOISE_TAG = 0x45534E5A  # "ESNZ": the direction draws' own stream, apart from every other seed of the step


@dataclass(frozen=True)
class ESConfig:
    """The ES estimate's knobs.

    Attributes:
        pairs: P, the number of antithetic pairs.
        sigma: s, the standard deviation of the perturbation of phi.
        space: which net parameters are searched (``ES_SPACES``).
        eps, lr: the inner ZO runs' probe radius and step size.
    """

    pairs: int
    sigma: float
    space: str = "bias"
    eps: float = 1e-3
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.space not in ES_SPACES:
            raise L2ZOError(f"unknown ES space {self.space!r}; choose one of {', '.join(ES_SPACES)}")
        if self.pairs < 1 or not self.sigma > 0:
            raise L2ZOError(f"ES needs pairs >= 1 and sigma > 0, got {self.pairs} and {self.sigma}")


@dataclass
class StartState:
    """Where the ZO runs start: theta [one tensor per block], the task's recurrent state, L_dev(theta)."""

    theta: list[Tensor]
    state: TaskState
    dev_loss: float


@dataclass
class ESEstimate:
    """The antithetic estimate: grad [d] of the mean reward, r_plus and r_minus [P] the pairs' rewards."""

    grad: Tensor
    r_plus: Tensor
    r_minus: Tensor

    @property
    def mean_reward(self) -> float:
        return float(torch.cat((self.r_plus, self.r_minus)).mean())

    @property
    def spread(self) -> float:
        """mean_i |R+_i - R-_i|: the size of the reward differences the estimate is made of."""
        return float((self.r_plus - self.r_minus).abs().mean())


@dataclass
class ESResult(MetaResult):
    """A ``MetaResult`` whose meta-loss is the ES surrogate, with the estimate's numbers for the logs."""

    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ phi as a vector


def space_params(net: VarianceNet, space: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of ``net`` that ES searches over, in ``named_parameters`` order."""
    names = ES_SPACES[space]
    params = [(n, p) for n, p in net.named_parameters() if names is None or n in names]
    if not params:  # only the kind space can be empty: its parameter exists only with kind_scale
        raise L2ZOError(f"ES space {space!r} searches {', '.join(names or ())}, which this net does not have: "
                        "build it with kind_scale (meta-train --kind-scale)")  # fmt: skip
    return params


def get_phi(net: VarianceNet, space: str) -> Tensor:
    """[d] the searched parameters, flattened and concatenated (a detached copy)."""
    return torch.cat([p.detach().reshape(-1) for _, p in space_params(net, space)]).clone()


@torch.no_grad()
def set_phi_(net: VarianceNet, space: str, phi: Tensor) -> None:
    """Copy ``phi`` [d] into the searched parameters of ``net``, in place."""
    params = [p for _, p in space_params(net, space)]
    if phi.numel() != sum(p.numel() for p in params):
        raise L2ZOError(f"phi has {phi.numel()} entries for {sum(p.numel() for p in params)} searched parameters")
    torch.nn.utils.vector_to_parameters(phi.to(params[0]), params)


def es_noise(seed: int, pairs: int, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[P, d] e_i ~ N(0, I), drawn in fp32 (the same directions whatever ``dtype``), a pure function of (seed, P, d)."""
    return torch.randn((pairs, dim), generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------- the K-step run


def restore_(blocks: Sequence[Block], values: Sequence[Tensor]) -> None:
    """blocks <- values, exactly (a copy, not arithmetic)."""
    with torch.no_grad():
        for b, v in zip(blocks, values, strict=True):
            b.param.copy_(v)


@torch.no_grad()
def zo_run(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState, norm: SigmaNorm,
           inners: Sequence[LossFn], seeds: Sequence[int], *, eps: float, lr: float, zsrc: ZSource) -> None:  # fmt: skip
    """K = len(inners) LearnedZO steps on the blocks, in place, from their current values.

    ``state`` is the recurrent state the first step's features see; it is advanced (pass a copy to keep it).
    Step k probes ``inners[k]`` along z(seeds[k]) and applies theta -= lr * g * c*sigma * z with the restore fused,
    as ``ZOOptimizer._update`` does (weight decay 0).
    """
    if len(inners) != len(seeds) or not inners:
        raise L2ZOError("zo_run needs one seed per inner loss, and at least one inner loss")
    with eval_mode(model):
        for inner, seed in zip(inners, seeds, strict=True):
            sig = predict_sigma(net, blocks, state, norm)
            eff = sig.eff.tolist()
            # theta is left at theta - eps*u: the update below fuses the restore, as LearnedZO's does
            probe = zo_probe(functools.partial(inner, model), blocks, seed, eps, zsrc, eff)
            if not math.isfinite(probe.projected_grad):
                axpby_z_(blocks, seed, zsrc, [eps * s for s in eff])  # back to theta before raising
                _check_finite(probe, "an ES inner run")
            axpby_z_(blocks, seed, zsrc, [s * (eps - lr * probe.projected_grad) for s in eff])
            state.record(probe, sig.raw)


def reward(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, start: StartState, norm: SigmaNorm,
           inners: Sequence[LossFn], seeds: Sequence[int], dev: LossFn, *, eps: float, lr: float,
           zsrc: ZSource) -> float:  # fmt: skip
    """R = L_dev(theta_s) - L_dev(theta_K) for the run from ``start`` with ``net``; the blocks end at theta_s exactly."""
    restore_(blocks, start.theta)
    try:
        zo_run(model, blocks, net, copy.deepcopy(start.state), norm, inners, seeds, eps=eps, lr=lr, zsrc=zsrc)
        with torch.no_grad(), eval_mode(model):
            final = float(evaluate_loss(lambda: dev(model)))
    finally:
        restore_(blocks, start.theta)
    if not math.isfinite(final):
        raise L2ZOError(f"non-finite dev loss after an ES inner run ({final}); lower --inner-lr or --es-sigma")
    return start.dev_loss - final


# ------------------------------------------------------------------------------------ the estimate


def antithetic_estimate(reward_fn: Callable[[Tensor], float], phi: Tensor, noise: Tensor, sigma: float) -> ESEstimate:
    """g = 1/(2 s P) sum_i e_i (R(phi + s e_i) - R(phi - s e_i)) for ``noise`` [P, d] = (e_i); phi [d]."""
    r_plus = torch.tensor([reward_fn(phi + sigma * e) for e in noise], dtype=torch.float64)
    r_minus = torch.tensor([reward_fn(phi - sigma * e) for e in noise], dtype=torch.float64)
    diff = (r_plus - r_minus).to(noise.dtype)
    grad = (noise * diff[:, None]).sum(dim=0) / (2 * sigma * len(noise))
    return ESEstimate(grad=grad, r_plus=r_plus, r_minus=r_minus)


def surrogate(net: VarianceNet, space: str, grad: Tensor, value: float) -> Tensor:
    """A scalar whose value is ``value`` and whose gradient in the searched parameters is -``grad`` [d] (0 elsewhere).

    Minimising it with the net's optimizer ascends the reward.
    """
    phi = torch.cat([p.reshape(-1) for _, p in space_params(net, space)])
    lin = -(grad.detach().to(phi) * phi).sum()
    return lin - lin.detach() + value


def es_meta_loss(model: nn.Module, blocks: Sequence[Block], net: VarianceNet, state: TaskState, norm: SigmaNorm,
                 inners: Sequence[LossFn], dev: LossFn, *, seeds: Sequence[int], cfg: ESConfig, zsrc: ZSource,
                 extra_starts: Sequence[tuple[Sequence[Tensor], TaskState]] = ()) -> ESResult:  # fmt: skip
    """The ES meta-objective at the model's current weights (see the module docstring).

    Args:
        inners: K inner losses (one batch per ZO step, shared by every run).
        dev: the held-out loss the reward is measured on.
        seeds: K z seeds; seeds[0] also seeds the directions e_i (``ES_NOISE_TAG``) and the probe at theta.
        extra_starts: further start states (theta values per block, recurrent state), e.g. the pretrained ones.

    Returns:
        meta_loss: the surrogate (value mean(-R), gradient -g_phi into the searched parameters of ``net``);
        probe, sigma: the probe of inner step 0 at the current theta with the current net (for the trajectory);
        metrics: meta/es_reward (mean R), meta/es_reward_spread (mean |R+ - R-|), meta/es_dev_loss (mean final
        dev loss of the runs, over all starts), meta/es_grad_norm (||g_phi||).
    The model's weights are bit for bit the same on return.
    """
    theta = [b.param.detach().clone() for b in blocks]
    try:
        with eval_mode(model):
            sig = predict_sigma(net, blocks, state, norm)  # with grad: the result's sigma, as greedy's
            probe = zo_probe(lambda: inners[0](model), blocks, seeds[0], cfg.eps, zsrc, sig.eff.detach().tolist())
            restore_(blocks, theta)
            _check_finite(probe, "the ES meta-step's probe")
            starts = []
            for values, st in [(theta, state), *extra_starts]:
                restore_(blocks, values)
                with torch.no_grad():
                    starts.append(StartState(list(values), copy.deepcopy(st), float(evaluate_loss(lambda: dev(model)))))
        twin = copy.deepcopy(net)

        def mean_reward(phi: Tensor) -> float:
            set_phi_(twin, cfg.space, phi)
            rs = [reward(model, blocks, twin, s, norm, inners, seeds, dev, eps=cfg.eps, lr=cfg.lr, zsrc=zsrc)
                  for s in starts]  # fmt: skip
            return sum(rs) / len(rs)

        phi = get_phi(net, cfg.space)
        noise = es_noise(mix_seed(seeds[0], ES_NOISE_TAG), cfg.pairs, phi.numel(), phi.dtype)
        est = antithetic_estimate(mean_reward, phi, noise, cfg.sigma)
    finally:
        restore_(blocks, theta)
    dev0 = sum(s.dev_loss for s in starts) / len(starts)
    metrics = {"meta/es_reward": est.mean_reward, "meta/es_reward_spread": est.spread,
               "meta/es_dev_loss": dev0 - est.mean_reward, "meta/es_grad_norm": float(est.grad.norm())}  # fmt: skip
    loss = surrogate(net, cfg.space, est.grad, -est.mean_reward)
    return ESResult(meta_loss=loss, probe=probe, sigma=sig, metrics=metrics)
