"""The optimizer protocol: ``ZOOptimizer.step`` is the only step, methods customise it through hooks.

A method that overrides one hook gets the rest for free: the closure check, the step seed, dropout off
during its forwards (and every submodule's mode back afterwards), the finiteness check, the restore of
theta on a non-finite loss (to the engine's one-ulp round trip) with one ``NonFiniteLossError`` naming the
step, and the step count. Each hook kind is exercised below by a small subclass that overrides only it.
The registry side: one hyperparameter dataclass per method is the only place defaults are written, and
what the training loop must provide is a declared capability (``needs_anchor_batch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from l2zo.engine import Block, Probe, ZSource, evaluate_loss, mix_seed
from l2zo.errors import L2ZOError
from l2zo.optim import Measurement, MeZO, NonFiniteLossError, ZOOptimizer
from l2zo.optim.registry import build_optimizer, optimizer_specs
from tests.helpers import Quadratic
from tests.test_optimizer_table import BUILD_KWARGS

LR, EPS, SEED = 0.05, 1e-3, 5


class Net(nn.Module):
    """A linear map with dropout (so eval mode matters) and a 1-D bias block; loss = MSE on fixed data."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.x = torch.randn(8, 4, generator=g)
        self.y = torch.randn(8, 3, generator=g)

    def loss(self) -> torch.Tensor:
        return ((self.drop(self.lin(self.x)) - self.y) ** 2).mean()


class Seen:
    """What the hooks and the closure observed during a step."""

    def __init__(self) -> None:
        self.seeds: list[int] = []  # seeds handed to the hook under test
        self.eval_mode: list[bool] = []  # per closure call: every submodule in eval mode
        self.calls = 0


def _closure(model: Net, seen: Seen, nan_at: int | None = None) -> Callable[[], torch.Tensor]:
    """The model's loss; returns NaN at the ``nan_at``-th call of this step (1-based)."""

    def closure() -> torch.Tensor:
        seen.calls += 1
        seen.eval_mode.append(not any(m.training for m in model.modules()))
        loss = model.loss()
        return loss * float("nan") if seen.calls == nan_at else loss

    return closure


# -- one subclass per hook kind, each overriding only that hook ---------------------------------------
class RademacherZO(ZOOptimizer):
    """``_perturb``: u(seed) is a Rademacher sign vector from its own generator (not the engine's z).

    Its update stays MeZO's (along z): a real method would override ``_update`` too; here only the step's
    machinery around the hook is under test.
    """

    seen: Seen

    def u(self, b: Block, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(seed, b.index))
        return torch.randint(0, 2, b.param.shape, generator=g).float().mul_(2).sub_(1)

    def _perturb(self, seed: int, scale: float, sigma: Sequence[float] | None) -> None:
        self.seen.seeds.append(seed)
        for b in self.blocks:
            b.param.data.add_(self.u(b, seed), alpha=scale)


@dataclasses.dataclass(frozen=True)
class WithL0(Measurement):
    l0: torch.Tensor

    def finite(self) -> bool:
        return super().finite() and math.isfinite(float(self.l0))

    def describe(self) -> str:
        return f"L0={float(self.l0):.4g}, {super().describe()}"


class L0ProbeZO(ZOOptimizer):
    """``_probe``: measures L(theta) before the two-point probe (as HiZOO does) and checks it too."""

    seen: Seen

    def _probe(self, closure, seed: int, sigma: Sequence[float] | None) -> Measurement:
        self.seen.seeds.append(seed)
        l0 = evaluate_loss(closure)
        return WithL0(self._two_point(closure, seed, sigma), l0)


class OneSidedZO(ZOOptimizer):
    """``_probe`` + ``_restore``: one-sided queries L(theta), L(theta + eps z); theta is left at theta + eps z."""

    seen: Seen

    def _probe(self, closure, seed: int, sigma: Sequence[float] | None) -> Measurement:
        self.seen.seeds.append(seed)
        l0 = evaluate_loss(closure)
        self._perturb(seed, +self.eps, sigma)
        lp = evaluate_loss(closure)
        return Measurement(Probe(seed, lp, l0, float((lp - l0) / self.eps)))

    def _restore(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        self.seen.seeds.append(meas.probe.seed)
        self._perturb(meas.probe.seed, -self.eps, sigma)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        self._perturb(meas.probe.seed, -self.eps - self.param_groups[0]["lr"] * meas.probe.projected_grad, sigma)


class UnfusedSGDZO(ZOOptimizer):
    """``_update``: restore and step in two passes instead of MeZO's fused one."""

    seen: Seen

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        self.seen.seeds.append(meas.probe.seed)
        self._perturb(meas.probe.seed, +self.eps, sigma)
        self._perturb(meas.probe.seed, -self.param_groups[0]["lr"] * meas.probe.projected_grad, sigma)


class FixedSigmaZO(ZOOptimizer):
    """``sigma``: u_b = sigma_b z_b with a fixed sigma per block."""

    seen: Seen

    def sigma(self) -> list[float]:
        return [0.5 + i for i in range(len(self.blocks))]


class ScopedZO(ZOOptimizer):
    """``_step_scope``: per-step scratch, entered before the queries and left however the step ends."""

    seen: Seen
    scratch: list[int] | None = None

    @contextlib.contextmanager
    def _step_scope(self, seed: int) -> Iterator[None]:
        self.seen.seeds.append(seed)
        self.scratch = [seed]
        try:
            yield
        finally:
            self.scratch = None


KINDS = {
    "perturb": (RademacherZO, 2),
    "probe": (L0ProbeZO, 3),
    "probe+restore": (OneSidedZO, 2),
    "update": (UnfusedSGDZO, 2),
    "sigma": (FixedSigmaZO, 2),
    "step_scope": (ScopedZO, 2),
}


def _direction(opt: ZOOptimizer, b: Block, seed: int) -> torch.Tensor:
    """The dense u_b(seed) the optimizer perturbs along."""
    if isinstance(opt, RademacherZO):
        return opt.u(b, seed)
    sigma = opt.sigma()
    return ZSource().full(b.param, seed, b.index) * (1.0 if sigma is None else sigma[b.index])


def _spacing(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def _build(kind: str) -> tuple[Net, ZOOptimizer]:
    model = Net()
    model.train()
    opt = KINDS[kind][0](model, lr=LR, eps=EPS, seed=SEED)
    opt.seen = Seen()
    return model, opt


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hook_subclass_gets_seed_eval_mode_and_count_for_free(kind: str):
    model, opt = _build(kind)
    theta0 = [b.param.detach().clone() for b in opt.blocks]
    with pytest.raises(L2ZOError, match="needs a closure"):
        opt.step()
    for step in range(2):
        seen = opt.seen = Seen()
        loss = opt.step(_closure(model, seen))
        assert opt.step_count == step + 1
        assert opt.last_probe is not None and opt.last_probe.seed == mix_seed(SEED, step)
        if kind != "sigma":  # sigma() takes no seed
            assert seen.seeds and set(seen.seeds) == {mix_seed(SEED, step)}, "the hook got the step seed"
        assert seen.calls == KINDS[kind][1] and all(seen.eval_mode), "every forward ran with dropout off"
        assert model.training and model.drop.training, "modes restored after the step"
        assert isinstance(loss, torch.Tensor) and math.isfinite(float(loss))
    assert any(not torch.equal(b.param, t) for b, t in zip(opt.blocks, theta0)), "the step moved theta"
    if kind == "step_scope":
        assert opt.scratch is None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hook_subclass_restores_and_raises_on_nan(kind: str):
    """NaN at each forward of a step: theta back within the one-ulp round trip, one error naming the step."""
    for nan_at in range(1, KINDS[kind][1] + 1):
        model, opt = _build(kind)
        opt.step(_closure(model, Seen()))  # one good step first: the failing one is step 1
        probe_before = opt.last_probe
        theta0 = [b.param.detach().clone() for b in opt.blocks]
        seen = opt.seen = Seen()
        with pytest.raises(
            NonFiniteLossError, match=r"^non-finite loss at step 1 \(.*nan.*\); parameters were restored"
        ):
            opt.step(_closure(model, seen, nan_at=nan_at))
        seed = mix_seed(SEED, 1)
        for b, t0 in zip(opt.blocks, theta0):
            bound = 2 * _spacing(t0.abs() + 2 * EPS * _direction(opt, b, seed).abs())
            assert ((b.param - t0).abs() <= bound).all(), (kind, nan_at, b.name)
        assert opt.step_count == 1 and opt.last_probe is probe_before, "a failed step is not counted"
        assert all(seen.eval_mode) and model.training and model.drop.training
        if kind == "update":
            assert seen.seeds == [], "no update after a non-finite loss"
        if kind == "step_scope":
            assert seen.seeds == [seed] and opt.scratch is None, "the scope was left on the error"


def test_an_exception_in_the_closure_leaves_the_modes_and_theta():
    model, opt = _build("probe")
    theta0 = [b.param.detach().clone() for b in opt.blocks]

    def boom() -> torch.Tensor:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(boom)
    assert model.training and opt.step_count == 0
    assert all(torch.equal(b.param, t) for b, t in zip(opt.blocks, theta0))


def test_unfused_update_matches_the_formula():
    """The ``_update`` hook alone makes a working method: theta1 = theta0 - lr * g * z."""
    model, opt = _build("update")
    theta0 = [b.param.detach().clone() for b in opt.blocks]
    opt.step(_closure(model, Seen()))
    g, seed = opt.last_probe.projected_grad, opt.last_probe.seed
    for b, t0 in zip(opt.blocks, theta0):
        expected = t0 - LR * g * ZSource().full(b.param, seed, b.index)
        torch.testing.assert_close(b.param.detach(), expected, rtol=0, atol=1e-6)


# -- the registered methods ---------------------------------------------------------------------------
def _build_registered(name: str, tmp_path: Path, **hp) -> torch.optim.Optimizer:
    model = Quadratic()
    kwargs = BUILD_KWARGS[name](model, tmp_path) if name in BUILD_KWARGS else {}  # the learned artifact
    return build_optimizer(name, model, **kwargs, **hp)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def _own_step(cls: type) -> bool:
    """Whether ``cls`` defines a step of its own. torch.optim.Optimizer puts a profiling wrapper of the
    inherited step on each class it instantiates, so a ``step`` entry that unwraps to ZOOptimizer's is not one."""
    step = vars(cls).get("step")
    return step is not None and inspect.unwrap(step) is not inspect.unwrap(vars(ZOOptimizer)["step"])


def test_no_registered_zo_method_overrides_step(tmp_path):
    specs = optimizer_specs()
    zo = [n for n, s in specs.items() if s.zeroth_order]
    assert len(zo) >= 14
    for name in zo:
        opt = _build_registered(name, tmp_path)
        assert isinstance(opt, ZOOptimizer), name
        assert inspect.unwrap(type(opt).step) is inspect.unwrap(vars(ZOOptimizer)["step"]), name
        for cls in type(opt).__mro__[: type(opt).__mro__.index(ZOOptimizer)]:
            assert not _own_step(cls), f"{name}: {cls.__name__} overrides step()"
    for cls in _subclasses(ZOOptimizer):  # every method class in the package, registered or not
        if cls.__module__.startswith("l2zo."):
            assert not _own_step(cls), f"{cls.__qualname__} overrides step()"


@pytest.mark.parametrize("name", sorted(optimizer_specs()))
def test_spec_defaults_are_the_dataclass_defaults(name: str, tmp_path):
    spec = optimizer_specs()[name]
    fields = dataclasses.fields(spec.hparams)
    assert all(f.default is not dataclasses.MISSING for f in fields), "every hyperparameter has a default"
    assert spec.defaults == {f.name: f.default for f in fields}
    assert spec.hyperparameters() == [f.name for f in fields] + list(spec.run_args)
    # Written once: no factory signature repeats a hyperparameter with its own default.
    params = inspect.signature(spec.factory).parameters
    assert not {f.name for f in fields} & set(params), "a default is written in the factory signature too"
    # The defaults are what a default-built optimizer runs with.
    opt = _build_registered(name, tmp_path)
    if isinstance(opt, ZOOptimizer):
        for key, value in opt.hp.as_dict().items():
            assert spec.defaults[key] == value, key
    group = opt.param_groups[0]
    for key in ("lr", "eps", "momentum", "betas", "sparsity", "hessian_smooth", "lr_full", "beta"):
        if key in spec.defaults and key in group:
            assert group[key] == spec.defaults[key], key
    # The run arguments are accepted by name.
    run = {"seed": 3, "include": None, "exclude": None}
    _build_registered(name, tmp_path, **{k: v for k, v in run.items() if k in spec.run_args})


def test_hyperparameters_are_checked_where_they_are_read():
    q = Quadratic()
    with pytest.raises(L2ZOError, match="MeZO has no hyperparameter 'momentum'; valid: lr, weight_decay, eps"):
        MeZO(q, momentum=0.9)
    with pytest.raises(L2ZOError, match="momentum must be in"):
        build_optimizer("zo-sgd-mmt", q, momentum=1.0)
    with pytest.raises(L2ZOError, match="num_directions must be >= 2"):
        build_optimizer("fzoo", q, num_directions=1)


def test_needs_anchor_batch_is_declared_not_guessed(tmp_path):
    specs = optimizer_specs()
    assert [n for n, s in specs.items() if s.needs_anchor_batch] == ["mezo-svrg"]
    for name, spec in specs.items():
        opt = _build_registered(name, tmp_path)
        assert hasattr(opt, "set_anchor_loss_fn") == spec.needs_anchor_batch, name


def test_finetune_gives_the_anchor_batch_to_the_optimizer_that_declares_it(tmp_path):
    """End to end: mezo-svrg through `l2zo finetune` gets its large-batch loss from the training loop."""
    from l2zo.cli.main import main

    logdir = tmp_path / "svrg"
    argv = ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--optimizer", "mezo-svrg", "--steps", "3",
            "--eval-every", "3", "--num-train", "64", "--num-dev", "16", "--num-test", "16", "--batch-size", "8",
            "--no-progress", "--logdir", str(logdir)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps_done"] == 3
