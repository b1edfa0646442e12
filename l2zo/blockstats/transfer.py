"""Is the best per-block allocation a property of the base model or of the task? Oracles compared across probes.

A variance net whose inputs carry no per-block gradient information (the paper's: weight mean and variance, two
losses, its previous sigma; plus a role embedding) gives nearly the same allocation on every task. Such an
allocation can transfer to a held-out task only if the best allocation is shared across tasks. This measures that
from the pairs a finished ``l2zo probe-blocks`` saved (OUTPUT/pairs), with no model:

- the tempered Gauss-Southwell-Lipschitz oracle per task, as log s_b;
- its split-half reliability: the oracle from the even-numbered batch pairs against the odd ones (how well the
  probe's pairs measure it; a task without gradient signal gives noise);
- the correlation of the oracles of two tasks: near 1 if one allocation serves both;
- the one-step gain over MeZO, R, of task i's oracle on task j's statistics, and of the consensus of the other
  tasks (their mean log s_b): what a static allocation learned from the other tasks could gain on this one.

Pure functions over saved statistics (``PairSample``); no Lightning, no model code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from l2zo.blockstats.gain import QuadraticModel, gain_ratio, kstep, positive_curvature
from l2zo.blockstats.kstep_opt import KStepOptimum, kstep_optimal
from l2zo.blockstats.oracles import gsl
from l2zo.blockstats.probe import load_pair, load_zo
from l2zo.blockstats.stats import BlockStats, PairSample, combine_named
from l2zo.blockstats.zo_energy import ZOEnergy
from l2zo.errors import L2ZOError

_PAIR = re.compile(r"state(\d+)-pair(\d+)\.pt")
_ZO = re.compile(r"state(\d+)-pair(\d+)-zo\.pt")


def read_pairs(pairs_dir: Path, num_blocks: int) -> list[tuple[int, int, PairSample]]:
    """Every saved pair of a probe as (state, pair index k, sample), sorted by state then k."""
    found = sorted(
        (int(m[1]), int(m[2]), p) for p in pairs_dir.glob("state*-pair*.pt") if (m := _PAIR.fullmatch(p.name))
    )
    if not found:
        raise L2ZOError(f"{pairs_dir} holds no probe pairs (state<S>-pair<K>.pt): pass a probe-blocks output folder "
                        "whose statistics were measured")  # fmt: skip
    return [(s, k, load_pair(p, num_blocks)) for s, k, p in found]


def read_zo(pairs_dir: Path, num_blocks: int) -> list[tuple[int, int, ZOEnergy]]:
    """Every forward-only G a probe saved (``--zo-probes``) as (state, pair index k, energy), sorted; [] if none."""
    found = sorted(
        (int(m[1]), int(m[2]), p) for p in pairs_dir.glob("state*-pair*-zo.pt") if (m := _ZO.fullmatch(p.name))
    )
    out = []
    for s, k, p in found:
        energy = load_zo(p, num_blocks)
        assert energy is not None  # the file exists
        out.append((s, k, energy))
    return out


def pooled_stats(
    names: Sequence[str], numels: Sequence[int], samples: Sequence[PairSample], curvature: str = "fisher"
) -> BlockStats:
    """The pairs combined, with tau_b the Fisher trace ("fisher") or Hutchinson's tr(H_b) ("hessian")."""
    stats = combine_named(names, numels, samples)
    if curvature == "fisher":
        return stats.with_fisher_curvature()
    if curvature != "hessian":
        raise L2ZOError(f"curvature must be fisher or hessian, got {curvature!r}")
    return stats


def oracle_log_s(
    names: Sequence[str],
    numels: Sequence[int],
    samples: Sequence[PairSample],
    *,
    temperature: float = 0.5,
    curvature: str = "fisher",
    floor: float = 1e-3,
) -> Tensor:
    """log s_b of the tempered GS-L oracle (s_b^2 ~ (G_b / tau_b)^(1/T), normalised) from pooled pairs. [B] float64.

    Blocks the oracle switches off (G_b <= 0) get log(floor), so that a correlation stays finite.
    """
    stats = pooled_stats(names, numels, samples, curvature)
    return torch.log(gsl(stats, temperature).clamp_min(floor))


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two [B] vectors (nan if either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def split_half(
    names: Sequence[str], numels: Sequence[int], pairs: Sequence[tuple[int, int, PairSample]], **oracle_kw: float | str
) -> float:
    """Correlation of the oracle from the pairs with even k against the one from odd k (all states pooled in each)."""
    even = [p for _, k, p in pairs if k % 2 == 0]
    odd = [p for _, k, p in pairs if k % 2 == 1]
    if not even or not odd:
        raise L2ZOError("a split-half needs at least two batch pairs per probe; measure with --pairs 2 or more")
    return pearson(oracle_log_s(names, numels, even, **oracle_kw), oracle_log_s(names, numels, odd, **oracle_kw))  # type: ignore[arg-type]


def agreement(log_s: Mapping[str, Tensor]) -> Tensor:
    """[T, T] Pearson correlations between the tasks' oracle allocations (``log_s``: task -> [B])."""
    keys = list(log_s)
    return torch.tensor([[pearson(log_s[a], log_s[b]) for b in keys] for a in keys], dtype=torch.float64)


def cross_gain(log_s: Mapping[str, Tensor], stats: Mapping[str, BlockStats]) -> Tensor:
    """[T, T]: R over MeZO of task i's allocation (row, ``log_s``) on task j's statistics (column, ``stats``)."""
    keys = list(log_s)
    return torch.tensor(
        [[float(gain_ratio(torch.exp(log_s[a]), stats[b])) for b in keys] for a in keys], dtype=torch.float64
    )


def leave_one_out_consensus(log_s: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """task -> the consensus of the *other* tasks' allocations, s_b = exp(mean log s_b) [B]: a static allocation
    that has never seen the task (unnormalised; every use of it is scale-free or normalises)."""
    if len(log_s) < 2:
        raise L2ZOError("a leave-one-out consensus needs at least two tasks")
    return {t: torch.exp(torch.stack([v for k, v in log_s.items() if k != t]).mean(dim=0)) for t in log_s}


def leave_one_out_gain(log_s: Mapping[str, Tensor], stats: Mapping[str, BlockStats]) -> dict[str, float]:
    """task -> R on it of ``leave_one_out_consensus``."""
    return {t: float(gain_ratio(s, stats[t])) for t, s in leave_one_out_consensus(log_s).items()}


# ------------------------------------------------------------------ which half of the oracle is the task's


def log_curvature(stats: BlockStats, floor: float = 1e-3) -> Tensor:
    """[B] log of the per-element curvature tau_b / n_b (floored as the oracles floor it)."""
    return torch.log(positive_curvature(stats.tau, stats.n, floor))


def log_gradient_share(stats: BlockStats, floor: float = 1e-3) -> Tensor:
    """[B] log of each block's share of the gradient energy, G_b / sum_c G_c, with G_b <= 0 (and shares below
    ``floor`` x the largest) raised to ``floor`` x the largest: the scale-free half of the GS-L ratio."""
    g = stats.G.clamp_min(0.0)
    if not float(g.max()) > 0:
        raise L2ZOError("no block has G_b > 0: the probe measured no gradient signal; measure more batch pairs")
    share = g / g.sum()
    return torch.log(share.clamp_min(floor * float(share.max())))


VARIANTS = ("own", "own-G", "own-curvature", "neither", "zo-G", "zo-own")


def leave_one_out_variants(
    stats: Mapping[str, BlockStats],
    temperature: float = 0.5,
    floor: float = 1e-3,
    measured_G: Mapping[str, Tensor] | None = None,
    measured_F: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """task -> variant -> [B] normalised s of the GS-L allocations s_b^2 ~ (G_b / tau_b)^(1/T) that take each half
    of the ratio from the task or from the other tasks:

    - ``own``: the task's G and curvature (its oracle);
    - ``own-G``: the task's G with the consensus curvature of the other tasks (exp of their mean log tau_b / n_b);
      what an allocation that measures G on the task and takes the curvature from elsewhere can reach;
    - ``own-curvature``: the consensus gradient shares of the other tasks with the task's own curvature;
    - ``neither``: both halves from the other tasks;
    - ``zo-G``, for the tasks in ``measured_G`` (task -> [B]): ``own-G`` with that G in place of the backprop one
      (the forward-only G of ``zo_energy``): what a fine-tune that measures G with forwards alone can reach;
    - ``zo-own``, for the tasks in both ``measured_G`` and ``measured_F`` (task -> [B] tr(F_bb)): the task's oracle
      with both halves measured by forward passes alone.
    """
    if len(stats) < 2:
        raise L2ZOError("a leave-one-out decomposition needs at least two tasks")
    curv = {t: log_curvature(s, floor) for t, s in stats.items()}
    share = {t: log_gradient_share(s, floor) for t, s in stats.items()}
    out: dict[str, dict[str, Tensor]] = {}
    for t, st in stats.items():
        l_other = torch.exp(torch.stack([v for k, v in curv.items() if k != t]).mean(dim=0))
        g_other = torch.exp(torch.stack([v for k, v in share.items() if k != t]).mean(dim=0))
        variants = {
            "own": st,
            "own-G": dataclasses.replace(st, tau=l_other * st.n),
            "own-curvature": dataclasses.replace(st, G=g_other),
            "neither": dataclasses.replace(st, G=g_other, tau=l_other * st.n),
        }
        if measured_G is not None and t in measured_G:
            variants["zo-G"] = dataclasses.replace(st, G=measured_G[t], tau=l_other * st.n)
            if measured_F is not None and t in measured_F:
                variants["zo-own"] = dataclasses.replace(st, G=measured_G[t], tau=measured_F[t])
        out[t] = {k: gsl(v, temperature, floor) for k, v in variants.items()}
    return out


def kstep_scorer(stats: BlockStats, horizon: int) -> Callable[[Tensor], float]:
    """s [B] -> R_K: the K-step expected loss decrease of allocation s over MeZO's, each at its re-tuned eta, under
    the two-scale block-quadratic model fitted to ``stats`` (the probe's ``kstep``; nan where MeZO's decrease is not
    positive). Unlike the one-step R, it sees a block's gradient deplete as the steps spend it. The model and MeZO's
    decrease (an eta search) are computed once here, for every allocation scored on the same statistics."""
    model = QuadraticModel.from_stats(stats)
    base = kstep(torch.ones_like(stats.n), model, horizon).decrease
    return lambda s: kstep(s, model, horizon).decrease / base if base > 0 else float("nan")


def kstep_ratio(s: Tensor, stats: BlockStats, horizon: int) -> float:
    """R_K of one allocation (``kstep_scorer``)."""
    return kstep_scorer(stats, horizon)(s)


def decompose_gain(
    stats: Mapping[str, BlockStats],
    temperature: float = 0.5,
    floor: float = 1e-3,
    measured_G: Mapping[str, Tensor] | None = None,
    horizon: int | None = None,
    measured_F: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """task -> variant -> R over MeZO on the task's own statistics of each ``leave_one_out_variants`` allocation,
    and with ``horizon``, also variant + "@K" -> its ``kstep_ratio`` over that many steps.

    If ``own-G`` kept most of ``own``'s gain, the task-specific part of the oracle would be its gradient, a
    first-order quantity that forward passes can measure on the task. On the tiny world the one-step R says so and
    R_K (and the measured runs) do not (docs/results/oracle-tiny).
    """
    out: dict[str, dict[str, float]] = {}
    for t, v in leave_one_out_variants(stats, temperature, floor, measured_G, measured_F).items():
        out[t] = {k: float(gain_ratio(s, stats[t])) for k, s in v.items()}
        if horizon is not None:
            score = kstep_scorer(stats[t], horizon)
            out[t].update({f"{k}@K": score(s) for k, s in v.items()})
    return out


def leave_one_out_kstep(
    stats: Mapping[str, BlockStats], horizon: int, tasks: Sequence[str] | None = None, iters: int = 300
) -> dict[str, dict[str, KStepOptimum]]:
    """task -> {"kopt-own": the allocation maximising R_K on the task's own statistics, "kopt-others": the one
    maximising the mean log R_K over the *other* tasks' (``kstep_optimal``)}, for ``tasks`` (default: all). The
    second is a static allocation learned from the other tasks that never saw this one; score it on the task with
    ``kstep_scorer``."""
    if len(stats) < 2:
        raise L2ZOError("a leave-one-out K-step allocation needs at least two tasks")
    unknown = [t for t in tasks or () if t not in stats]
    if unknown:
        raise L2ZOError(f"no statistics for task(s) {', '.join(unknown)}; have {', '.join(stats)}")
    out: dict[str, dict[str, KStepOptimum]] = {}
    for t in tasks if tasks is not None else list(stats):
        others = [s for k, s in stats.items() if k != t]
        out[t] = {"kopt-own": kstep_optimal([stats[t]], horizon, iters=iters),
                  "kopt-others": kstep_optimal(others, horizon, iters=iters)}  # fmt: skip
    return out


def zo_budget_gain(
    stats: Mapping[str, BlockStats],
    zo: Mapping[str, Sequence[ZOEnergy]],
    budgets: Sequence[int],
    temperature: float = 0.5,
    floor: float = 1e-3,
    horizon: int = 300,
) -> dict[str, dict[int, dict[str, float]]]:
    """task -> pairs P -> {"forwards", and per forward-only variant its R and R_K ("zo-G", "zo-G@K", and where the
    Fisher was measured "zo-own", "zo-own@K")}: the allocations from the first P forward-only batch pairs of the task
    (``zo[task]``, in measurement order: a fine-tune would measure at its start), scored on the task's pooled backprop
    statistics. Budgets above the pairs measured are left out; an estimate with no positive block (too few pairs to
    resolve any) scores nan."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for t, energies in zo.items():
        out[t] = {}
        score = kstep_scorer(stats[t], horizon)
        for p in budgets:
            if p > len(energies):
                continue
            first = energies[:p]
            G = {t: torch.stack([e.G for e in first]).mean(dim=0)}
            F = ({t: torch.stack([e.fisher for e in first]).mean(dim=0)}  # type: ignore[misc]
                 if all(e.fisher is not None for e in first) else None)  # fmt: skip
            row: dict[str, float] = {"forwards": float(sum(e.forwards for e in first))}
            try:
                variants = leave_one_out_variants(stats, temperature, floor, G, F)[t]
            except L2ZOError:
                variants = {}
            for name in ("zo-G", "zo-own"):
                if name in variants:
                    row[name] = float(gain_ratio(variants[name], stats[t]))
                    row[f"{name}@K"] = score(variants[name])
                elif name == "zo-G" or F is not None:
                    row[name] = row[f"{name}@K"] = float("nan")
            out[t][p] = row
    return out
