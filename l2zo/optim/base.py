"""``ZOOptimizer``: the one optimizer interface, and the one step, of MeZO, the ZO baselines and the learned optimizer.

It is a ``torch.optim.Optimizer`` with one param group per block (``group["name"]``), so LR schedulers,
``state_dict`` and Lightning work unchanged. ``step(closure)`` is the only step there is. It checks the
closure, draws the step seed, switches dropout off, runs the method's queries, checks that what they
measured is finite (else restores theta and raises ``NonFiniteLossError``), applies the update, counts the
step and keeps ``last_probe``. A method says only what is different, through these hooks:

* ``hparams_cls``: its hyperparameter dataclass (defaults, types, range checks), read into ``self.hp``.
* ``sigma()``: per-block scale of z (learned optimizers).
* ``_perturb(seed, scale, sigma)``: theta += scale * u(seed) in place, u the method's direction
  (LOZO's low-rank U V^T, Sparse MeZO's masked z, HiZOO's z / sqrt(H)).
* ``_probe(closure, seed, sigma) -> Measurement``: the step's queries. Default: the two-point probe along
  ``_perturb``, leaving theta at theta - eps*u. Methods with other queries (an extra L(theta), N one-sided
  directions, candidate points, a second probe at an anchor, a JVP) override it; when a first measurement
  is already non-finite they skip the rest and return it, and ``step`` restores and raises.
* ``_restore(meas, sigma)``: take theta back from where ``_probe`` left it (default: ``_perturb(+eps)``).
* ``_update(meas, sigma)``: the update, with the restore fused in (default: MeZO's SGD).
* ``_step_scope(seed)``: scratch that lives for one step (LOZO's V, Sparse MeZO's mask).

Two passes (``set_two_pass``): a method whose step is MeZO's (no hook above overridden) and whose sigma does not
read the weights (``sigma_reads_weights``) can fuse the restore and update of step t with the +eps perturbation of
step t+1: theta += (eps*d - lr*g)*u_t + eps*u_{t+1} (and theta *= d for weight decay), so that a step is the
-2*eps pass and that one, two passes over the weights instead of three. Between steps theta then sits at
theta + eps*u_{t+1}; ``restore_()`` takes it back (one pass), and the training loop calls it before every
evaluation, checkpoint and the end of training. lr does not enter the look-ahead perturbation, so an lr
schedule needs no restore. The parameters equal the three-pass path's to rounding (tests/test_two_pass.py).

Data parallelism needs no hook of its own: the loop sets ``reduce_fn`` (sum a tensor over the processes) and the
closure returns a :class:`BatchLoss` (the mean over this process's slice of the batch, and its count); ``step``
then hands every query the mean over the whole batch, sum(mean * count) / sum(count), so that every process
measures the same losses and applies the same update, whatever its method and however uneven the slices.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from l2zo.engine import Block, Probe, ZSource, axpby2_z_, axpby_z_, eval_mode, mix_seed, partition, perturb_, probe_with
from l2zo.engine.blocks import ParamsLike
from l2zo.errors import L2ZOError
from l2zo.optim.hparams import HParams, ZOHParams, make_hparams
from l2zo.optim.state import restore_state_dtypes

LossFn = Callable[[], Tensor]
ReduceFn = Callable[[Tensor], Tensor]  # a tensor summed over the data-parallel processes
# The hooks of the step (see the module doc); a method overriding none of them steps exactly as MeZO does.
STEP_HOOKS = ("_step_scope", "_perturb", "_two_point", "_probe", "_restore", "_update")


class BatchLoss(NamedTuple):
    """What a closure may return instead of a bare loss: the mean loss over this process's slice of the batch
    and the number of terms it averages (examples, or tokens for an LM loss), an int or a scalar tensor."""

    mean: Tensor
    count: int | Tensor


def batch_mean(loss: Tensor | BatchLoss, reduce_fn: ReduceFn | None) -> Tensor:
    """The loss over the whole batch: a closure's output as it is on one process (``reduce_fn`` None), else
    sum(mean * count) / sum(count) over the processes (an fp32 scalar)."""
    if not isinstance(loss, BatchLoss):
        loss = BatchLoss(loss, 1)
    if reduce_fn is None:
        return loss.mean
    mean = torch.as_tensor(loss.mean).detach().float()
    count = torch.as_tensor(loss.count, dtype=torch.float32, device=mean.device)
    total = reduce_fn(torch.stack([mean * count, count]))  # [2]: (sum of losses, count) over the processes
    return total[0] / total[1]


class NonFiniteLossError(L2ZOError):
    """A ZO forward returned NaN or inf; the parameters were restored before raising."""


@dataclass(frozen=True)
class Measurement:
    """What one step's queries measured: ``_probe`` returns it, ``step`` checks it, ``_update`` consumes it.

    Methods that measure more subclass it (HiZOO's L(theta), FZOO's N losses, SVRG's anchor probe).

    Attributes:
        probe: the two-point summary (seed, L+, L-, g), kept as ``last_probe`` for logging.
    """

    probe: Probe

    @property
    def loss(self) -> Tensor:
        """What ``step`` returns: (L+ + L-)/2 by default, L(theta) where the method measures it."""
        return self.probe.loss

    def finite(self) -> bool:
        """Whether every measured loss is finite, from values already on the host (no extra sync)."""
        return math.isfinite(self.probe.projected_grad)

    def describe(self) -> str:
        """The measured losses, for the error message (called only when ``finite()`` is False)."""
        return f"L+={self.probe.loss_plus.item():.4g}, L-={self.probe.loss_minus.item():.4g}"


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: seeded queries plus an update rule (see the module doc for the hooks).

    Args:
        params: the model (preferred: names, tied-weight de-duplication, dropout control), its
            ``named_parameters()``, or bare tensors.
        seed: base seed; step t uses ``mix_seed(seed, t)``, so a run replays from (seed, g) pairs.
        include, exclude: regexes on parameter names selecting the blocks to train.
        **hparams: the fields of ``hparams_cls`` (for MeZO: lr, eps, weight_decay), each in every param group.
            Weight decay is MeZO's (theta -= lr*wd*theta) on matrices only: biases and norm gains
            (1-D blocks) get none.
    """

    hparams_cls: ClassVar[type[HParams]] = ZOHParams
    # Whether the method only reads loss values off the closure, so that ``reduce_fn`` gives it the whole batch's
    # (data-parallel runs); False for a method that differentiates the closure.
    data_parallel: ClassVar[bool] = True
    # Whether ``sigma()`` reads the weights (the learned optimizer's features): then it is known only once theta
    # is restored, and neither the two-pass step nor a row shard can compute it ahead or alone.
    sigma_reads_weights: ClassVar[bool] = False

    def __init__(
        self,
        params: ParamsLike,
        *,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **hparams: Any,
    ) -> None:
        self.hp = make_hparams(self.hparams_cls, hparams, type(self).__name__)
        self.module = params if isinstance(params, nn.Module) else None
        self.blocks: list[Block] = partition(params, include, exclude)
        wd = self.hp.weight_decay
        groups = [
            {"params": [b.param], "name": b.name, "weight_decay": wd if b.is_matrix else 0.0} for b in self.blocks
        ]
        super().__init__(groups, self.hp.as_dict())
        self.seed = int(seed)
        self.step_count = 0
        self.zsrc = ZSource()
        self.last_probe: Probe | None = None
        self.reduce_fn: ReduceFn | None = None  # set by a data-parallel loop (see the module doc)
        self.two_pass = False
        # The look-ahead perturbation theta carries between two-pass steps: (seed, [B] coefficient of z), or None.
        self._ahead: tuple[int, list[float]] | None = None

    def set_z_source(self, *, workers: int | None = None, cache: bool = False, zsrc: ZSource | None = None) -> None:
        """How z is regenerated: on ``workers`` CPU threads (default: torch's thread count), and with ``cache``
        one parameter-sized copy of the step's z, so a step draws z once instead of three times. Either way
        the parameters after a step are bit for bit those of the plain sequential path (tests/test_speed_paths.py).
        ``zsrc``: a ready source instead (e.g. a noise table's, ``l2zo.config.ZArgs.make_source``).
        """
        self.restore_()  # a look-ahead perturbation must come off with the z it was made of
        self.zsrc = zsrc if zsrc is not None else ZSource(workers=workers, cache=cache)

    @classmethod
    def custom_hooks(cls) -> list[str]:
        """The step hooks this method overrides (empty: its step is MeZO's, along its sigma)."""
        return [h for h in STEP_HOOKS if getattr(cls, h) is not getattr(ZOOptimizer, h)]

    @classmethod
    def can_two_pass(cls) -> bool:
        """Whether the two-pass step applies: MeZO's step, and a sigma known before theta is restored."""
        return not cls.custom_hooks() and not cls.sigma_reads_weights

    def set_two_pass(self, on: bool = True) -> bool:
        """Switch the two-pass step (see the module doc) on or off; returns whether it is on (False for a method
        that cannot). Switching off restores theta first."""
        if not on:
            self.restore_()
        self.two_pass = bool(on) and self.can_two_pass()
        return self.two_pass

    @torch.no_grad()
    def restore_(self) -> None:
        """Take theta back from the two-pass step's look-ahead perturbation (a no-op when none is applied): call it
        before reading, evaluating or saving the weights between steps."""
        if self._ahead is not None:
            seed, coef = self._ahead
            self._ahead = None
            axpby_z_(self.blocks, seed, self.zsrc, [-c for c in coef])

    @property
    def eps(self) -> float:
        return float(self.param_groups[0]["eps"])

    def step_seed(self, step: int) -> int:
        return mix_seed(self.seed, step)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: LossFn | None = None) -> Tensor:  # type: ignore[override]
        """One step. ``closure`` runs a forward pass and returns the loss; the method evaluates it one or more
        times (``OptimizerSpec.forwards_per_step``). It may return a :class:`BatchLoss`; with ``reduce_fn`` set,
        every query sees the loss over all processes' batches. Returns the step's loss as an fp32 scalar tensor.
        """
        if closure is None:
            raise L2ZOError(
                f"{type(self).__name__}.step needs a closure that returns the loss, e.g. "
                "opt.step(lambda: loss_fn(model, batch)); ZO optimizers evaluate it several times a step"
            )
        seed = self.step_seed(self.step_count)
        local, reduce_fn = closure, self.reduce_fn
        with self._step_scope(seed):
            sigma = self.sigma()
            ahead = self._take_ahead(seed, sigma) if self.two_pass else False
            with eval_mode(self.module):
                loss_fn = lambda: batch_mean(local(), reduce_fn)  # noqa: E731
                meas = self._probe(loss_fn, seed, sigma, ahead=True) if ahead else self._probe(loss_fn, seed, sigma)
            if not meas.finite():
                self._restore(meas, sigma)
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step_count} ({meas.describe()}); parameters were restored. "
                    "Lower the learning rate or eps, or use --precision 32"
                )
            if self.two_pass:
                self._update_ahead(meas, sigma)
            else:
                self._update(meas, sigma)
        self.step_count += 1
        self.last_probe = meas.probe
        return meas.loss

    # -- hooks for subclasses -------------------------------------------------------------------
    def sigma(self) -> Sequence[float] | None:
        """Per-block perturbation scale [B]; None means 1 everywhere (MeZO). Called once a step, before the probe."""
        return None

    def _step_scope(self, seed: int) -> contextlib.AbstractContextManager[Any]:
        """A context around the whole step, for scratch that lives one step. Default: none."""
        return contextlib.nullcontext()

    def _perturb(self, seed: int, scale: float, sigma: Sequence[float] | None) -> None:
        """theta += scale * u(seed) in place. Default: u_b = sigma_b * z_b(seed), Gaussian z."""
        perturb_(self.blocks, seed, self.zsrc, scale, sigma)

    def _two_point(self, loss_fn: LossFn, seed: int, sigma: Sequence[float] | None, *, ahead: bool = False) -> Probe:
        """L(theta + eps*u) and L(theta - eps*u) along ``_perturb``; theta is left at theta - eps*u. ``ahead``: theta
        already sits at theta + eps*u (the two-pass step's look-ahead), so the first perturbation is skipped."""
        return probe_with(loss_fn, lambda scale: self._perturb(seed, scale, sigma), self.eps, seed, perturbed=ahead)

    def _probe(self, closure: LossFn, seed: int, sigma: Sequence[float] | None, *, ahead: bool = False) -> Measurement:
        """The step's queries (run in eval mode). Default: one two-point probe. ``ahead`` is only ever True for a
        method whose step is MeZO's (``can_two_pass``)."""
        return Measurement(self._two_point(closure, seed, sigma, ahead=ahead))

    # -- the two-pass step (see the module doc) ----------------------------------------------------
    def _take_ahead(self, seed: int, sigma: Sequence[float] | None) -> bool:
        """Whether theta already carries this step's +eps*u (else the probe applies it: the first step of a run,
        or the first after ``restore_``). A look-ahead for another seed or scale is undone first."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return False
        if ahead == (seed, self._ahead_coef(sigma)):
            return True
        self._ahead = ahead  # eps or sigma changed since it was applied (set by hand): undo it, start afresh
        self.restore_()
        return False

    def _ahead_coef(self, sigma: Sequence[float] | None) -> list[float]:
        return [self.eps * (1.0 if sigma is None else float(sigma[b.index])) for b in self.blocks]

    def _update_ahead(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """MeZO's fused restore and update of this step, plus the next step's +eps*u, in one pass."""
        coef, decay = self._update_coefs(meas, sigma)
        nxt = self.step_seed(self.step_count + 1)
        ahead = self._ahead_coef(self.sigma())  # sigma does not read the weights (can_two_pass)
        axpby2_z_(self.blocks, (meas.probe.seed, coef), (nxt, ahead), self.zsrc, decay)
        self._ahead = (nxt, ahead)

    def _restore(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """Undo what ``_probe`` left on theta, for a non-finite ``meas``. Default: theta - eps*u -> theta."""
        self._perturb(meas.probe.seed, +self.eps, sigma)

    def _update(self, meas: Measurement, sigma: Sequence[float] | None) -> None:
        """Restore theta from theta - eps*u and apply the update. Default: MeZO's SGD, fused."""
        coef, decay = self._update_coefs(meas, sigma)
        axpby_z_(self.blocks, meas.probe.seed, self.zsrc, coef, decay)

    def _update_coefs(self, meas: Measurement, sigma: Sequence[float] | None) -> tuple[list[float], list[float]]:
        """[B] coefficients of z and of theta of MeZO's fused restore-and-update."""
        g = meas.probe.projected_grad
        eps = self.eps
        coef, decay = [], []
        for b, group in zip(self.blocks, self.param_groups):
            s = 1.0 if sigma is None else float(sigma[b.index])
            d = 1.0 - group["lr"] * group["weight_decay"]
            # d * (theta_minus + eps*s*z) - lr*g*s*z, i.e. restore, decay and step in one pass.
            coef.append(s * (eps * d - group["lr"] * g))
            decay.append(d)
        return coef, decay

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = {"step_count": self.step_count, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)  # fp32 state (moments, H, M) stays fp32 next to bf16 weights
        if zo is not None:
            self.step_count = int(zo["step_count"])
            self.seed = int(zo["seed"])
