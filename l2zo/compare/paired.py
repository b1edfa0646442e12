"""Paired statistics of two optimizers over the same seeds: the difference of their final dev losses with a
Student-t confidence interval, a win / tie / loss verdict, and the forward passes one needs to reach the
other's final dev loss.

Seed k of every optimizer sees the same batches and z seeds, so the per-seed differences
``d_k = final_k(a) - final_k(b)`` remove most of the seed-to-seed spread both share; their mean gets a
two-sided Student-t interval with n - 1 degrees of freedom. Lower dev loss is better: ``a`` wins when the
whole interval lies below 0, loses when it lies above 0, and ties otherwise (one seed, no interval: a tie).

Pure functions of plain numbers (no torch, no files): :mod:`l2zo.compare.summary` and
:mod:`l2zo.compare.heldout` feed them the dev curves read back from the runs' events.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["win", "tie", "loss"]
CI_LEVEL = 0.95


def t_two_sided_mass(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's T with ``dof`` (integer >= 1) degrees of freedom.

    The finite series of Abramowitz & Stegun 26.7.3-4 in theta = atan(t / sqrt(dof)): exact for integer dof,
    which is all a paired CI over seeds needs.
    """
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2 == 1:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(dof-3)))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    term = total = 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(dof-2))
    for k in range(1, dof // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's T with ``dof`` degrees of freedom, e.g. t(0.975, 2) = 4.303.

    Bisection on :func:`t_two_sided_mass` (monotone in t) to float precision.
    """
    if not 0.5 < p < 1:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    mass = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, dof) < mass:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided_mass(mid, dof) < mass else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedCI:
    """The mean of paired differences over n seeds and its two-sided CI (``lo``/``hi`` None when n < 2)."""

    n: int
    mean: float | None
    sd: float | None  # sample sd of the differences
    lo: float | None
    hi: float | None

    @property
    def verdict(self) -> Verdict:
        """'win' when the CI lies below 0 (lower loss is better), 'loss' above 0, else 'tie'."""
        if self.lo is None or self.hi is None:
            return "tie"
        return "win" if self.hi < 0 else "loss" if self.lo > 0 else "tie"


def paired_ci(diffs: Sequence[float], level: float = CI_LEVEL) -> PairedCI:
    """Mean of ``diffs`` with its Student-t CI: mean ± t((1+level)/2, n-1) * sd / sqrt(n)."""
    n = len(diffs)
    if n == 0:
        return PairedCI(0, None, None, None, None)
    mean = statistics.fmean(diffs)
    if n == 1:
        return PairedCI(1, mean, None, None, None)
    sd = statistics.stdev(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return PairedCI(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Curve:
    """One run's dev-loss curve: ``loss[i]`` after ``forwards[i]`` training forward passes (increasing; None when
    the run's forward passes per step are unknown)."""

    forwards: tuple[float, ...] | None
    loss: tuple[float, ...]

    @property
    def final(self) -> float:
        return self.loss[-1]

    @property
    def budget(self) -> float:
        """The forward passes the run spent (at its last evaluation)."""
        if self.forwards is None:
            raise ValueError("this curve has no forward-pass counts")
        return self.forwards[-1]


def forwards_to_reach(curve: Curve, target: float) -> float | None:
    """Forward passes at which ``curve`` first comes down to ``target``, interpolated linearly between the two
    evaluations around the crossing; None when it never does."""
    if curve.forwards is None:
        raise ValueError("this curve has no forward-pass counts")
    for i, (f, loss) in enumerate(zip(curve.forwards, curve.loss)):
        if loss <= target:
            if i == 0:
                return f
            f0, l0 = curve.forwards[i - 1], curve.loss[i - 1]  # l0 > target >= loss
            return f0 + (l0 - target) / (l0 - loss) * (f - f0)
    return None


@dataclass(frozen=True)
class Paired:
    """Optimizer ``a`` against ``b`` over the seeds both finished.

    Attributes:
        ci: the paired CI of final dev loss a - b (negative: a is better).
        reach: per paired seed, a's forwards to reach b's final dev loss at that seed (None: not reached);
            empty when a run's forwards per step is unknown.
        budget: per paired seed, b's forward passes (its whole run); empty likewise.
    """

    ci: PairedCI
    reach: tuple[float | None, ...]
    budget: tuple[float, ...]

    @property
    def forwards_known(self) -> bool:
        return len(self.reach) == self.ci.n > 0

    @property
    def reached(self) -> int:
        return sum(r is not None for r in self.reach)

    @property
    def forwards(self) -> float | None:
        """a's mean forwards to reach b's final dev loss, over the seeds where it did (None: none did)."""
        hits = [r for r in self.reach if r is not None]
        return statistics.fmean(hits) if hits else None

    @property
    def ratio(self) -> float | None:
        """Mean over seeds of a's forwards to reach b's final / b's forwards; None unless reached at every seed."""
        if not self.reach or self.reached < len(self.reach):
            return None
        return statistics.fmean(r / b for r, b in zip(self.reach, self.budget) if r is not None)


def compare_paired(a: Mapping[int, Curve], b: Mapping[int, Curve], level: float = CI_LEVEL) -> Paired:
    """``a`` against ``b`` on the seeds both have (seed -> curve): paired CI of final dev loss, forwards to reach.

    A curve with ``forwards`` None (forward passes per step unknown) leaves the forwards out (``reach`` empty).
    """
    seeds = sorted(set(a) & set(b))
    ci = paired_ci([a[k].final - b[k].final for k in seeds], level)
    if any(a[k].forwards is None or b[k].forwards is None for k in seeds):
        return Paired(ci, (), ())
    return Paired(ci, tuple(forwards_to_reach(a[k], b[k].final) for k in seeds), tuple(b[k].budget for k in seeds))
