"""The evaluation protocol's tables, from runs read back from events: the lr-tuning table (what each lr scored
on dev, which one was picked) and the paired table (each optimizer against the baseline, seed by seed).

Paired table, per optimizer: the final dev loss (mean ± sd over seeds), the mean paired difference to the
baseline with its 95% Student-t CI and the verdict (win / tie / loss: a win only when the CI lies below 0),
the forward passes it needs to reach the baseline's final dev loss (per seed, the baseline's own final at
that seed; linear interpolation between dev evaluations) and their ratio to the baseline's forwards (its
whole run). See :mod:`l2zo.compare.paired` for the statistics.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from l2zo.compare.events import RunRecord
from l2zo.compare.paired import CI_LEVEL, Curve, Paired, compare_paired
from l2zo.compare.spec import fmt_value
from l2zo.compare.tuning import TunePoint, at_edge, pick_lr, pool_seeds


def dev_score(runs: list[RunRecord], select: str) -> float | None:
    """Mean over the ok seeds of the final (or best) dev loss: the sweep and lr-tuning criterion."""
    pick: Callable[[RunRecord], float] = (lambda r: r.series("val/loss")[-1][1]) if select == "final" else (
        lambda r: min(v for _, v in r.series("val/loss")))  # fmt: skip
    vals = [pick(r) for r in runs if r.ok and r.series("val/loss")]
    return statistics.fmean(vals) if vals else None


def dev_start(run: RunRecord) -> float | None:
    """The dev loss a run evaluated at step 0 (None: no evaluation there)."""
    dev = run.series("val/loss")
    return dev[0][1] if dev and dev[0][0] == 0 else None


def run_curve(run: RunRecord) -> Curve | None:
    """The dev-loss curve of a run that finished ok, in training forward passes (None: failed or no dev loss)."""
    dev = run.series("val/loss")
    if not run.ok or not dev:
        return None
    fps = run.forwards_per_step
    forwards = tuple(float(step * fps) for step, _ in dev) if fps else None
    return Curve(forwards, tuple(v for _, v in dev))


def curves(runs: Sequence[RunRecord]) -> dict[int, Curve]:
    """Seed -> curve of the runs that finished ok."""
    return {r.seed: c for r in runs if (c := run_curve(r)) is not None}


# -- lr tuning ----------------------------------------------------------------------------------------------
def tuning_rows(tune_runs: Sequence[RunRecord], select: str, ran: Mapping[str, Mapping[str, Any]] | None = None
                ) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (optimizer, lr) of the tuning runs, in --optimizers order, with the pick marked. An lr that ran
    on several tuning seeds scores their mean, and is out if any of its runs failed (see ``pool_seeds``).

    ``ran``: base label -> the ``tuned`` record of its runs ({"grid", "picked"}); where given, only the lrs of
    that grid are shown (a folder resumed with another grid keeps the old points' runs) and the picked lr is
    the one the runs ran at; elsewhere the pick is made here by ``select``.
    """
    ran = ran or {}
    out = []
    for base, (by_lr, points) in _pooled(tune_runs, select, ran).items():
        picked = ran[base].get("picked") if base in ran else pick_lr(points)
        grid = [p.lr for p in points]
        for p in points:
            runs = by_lr[p.lr]
            bad = [r for r in runs if not r.ok]
            on = [f"seed {r.seed} " if len(runs) > 1 else "" for r in bad]  # which tuning seed failed, when several
            status = "; ".join(f"{o}{r.status}: {r.reason}" for o, r in zip(on, bad)) if bad else "ok"
            out.append({"run": base, "lr": p.lr, "seeds": ",".join(str(r.seed) for r in runs),
                        "steps": runs[0].config.get("tune_steps"), "score": p.score, "status": status,
                        "picked": p.lr == picked, "edge": p.lr == picked and at_edge(p.lr, grid),
                        "tolerance": ran.get(base, {}).get("tolerance", 0.0)})  # fmt: skip
    return out


def _pooled(tune_runs: Sequence[RunRecord], select: str, ran: Mapping[str, Mapping[str, Any]]
            ) -> dict[str, tuple[dict[float, list[RunRecord]], list[TunePoint]]]:  # fmt: skip
    """Base label -> (lr -> its tuning runs, the pooled points), in --optimizers order; only the lrs of the grid
    its runs ran with where ``ran`` records one."""
    bases: dict[str, dict[float, list[RunRecord]]] = {}
    for r in sorted(tune_runs, key=lambda r: (r.order, r.base, r.sweep.get("lr", 0.0), r.seed)):
        if r.base not in ran or r.sweep.get("lr") in ran[r.base].get("grid", []):
            bases.setdefault(r.base, {}).setdefault(r.sweep["lr"], []).append(r)
    return {base: (by_lr, pool_seeds([TunePoint(lr, dev_score([r], select), r.ok, dev_start(r))
                                      for lr, runs in by_lr.items() for r in runs]))
            for base, by_lr in bases.items()}  # fmt: skip


def repick(runs: Sequence[RunRecord], tolerance: float, select: str = "final") -> dict[str, tuple[Any, Any, Any]]:
    """Base label -> (the lr its runs ran at, None before any ran; the lowest-score pick; the pick with
    ``tolerance``), all from the same tuning runs: what another pick rule would change, without running."""
    ran = {r.base: r.tuned for r in runs if r.phase != "tune" and r.tuned}
    tune_runs = [r for r in runs if r.phase == "tune"]
    return {base: (ran.get(base, {}).get("picked"), pick_lr(points), pick_lr(points, tolerance))
            for base, (_, points) in _pooled(tune_runs, select, ran).items()}  # fmt: skip


# -- paired table -------------------------------------------------------------------------------------------
def find_baseline(labels: Sequence[str], bases: Sequence[str], wanted: str | None) -> int | None:
    """Index of the baseline row: the recorded ``wanted`` label (or base, for a sweep's chosen point), else 0."""
    if not labels:
        return None
    for i, (label, base) in enumerate(zip(labels, bases)):
        if wanted in (label, base):
            return i
    return 0


def lr_text(runs: Sequence[RunRecord]) -> str:
    """The lr that ran ('0.0001'; several: joined), '(tuned)' when picked on dev, 'at grid edge' when it should
    be widened."""
    lrs = sorted({r.hparams["lr"] for r in runs if r.hparams and "lr" in r.hparams})
    text = ", ".join(fmt_value(v) for v in lrs) if lrs else "—"
    tuned = next((r.tuned for r in runs if r.tuned), None)
    if tuned:
        if tuned.get("picked") is None:
            return "none (no lr of the grid finished)"
        text += " (tuned" + (", at grid edge)" if at_edge(tuned["picked"], tuned.get("grid", [])) else ")")
    return text


def paired_stats(runs: Sequence[RunRecord], base_runs: Sequence[RunRecord], is_baseline: bool) -> dict[str, Any]:
    """The paired columns of one row against the baseline's runs (see the module docstring)."""
    mine, ref = curves(runs), curves(base_runs)
    finals = [c.final for c in mine.values()]
    out: dict[str, Any] = {
        "lr": lr_text(runs), "paired_seeds": None, "diff_vs_baseline_mean": None, "diff_ci_low": None,
        "diff_ci_high": None, "verdict": "baseline" if is_baseline else None, "forwards_to_baseline_final": None,
        "baseline_final_reached": None, "forwards_ratio": None,
        "dev_loss_final_sd": statistics.stdev(finals) if len(finals) > 1 else None,
    }  # fmt: skip
    if is_baseline:
        budgets = [c.budget for c in ref.values() if c.forwards is not None]
        out.update(paired_seeds=len(ref), forwards_to_baseline_final=statistics.fmean(budgets) if budgets else None,
                   baseline_final_reached=f"{len(budgets)}/{len(ref)}", forwards_ratio=1.0 if budgets else None)  # fmt: skip
        return out
    p: Paired = compare_paired(mine, ref)
    out.update(paired_seeds=p.ci.n, diff_vs_baseline_mean=p.ci.mean, diff_ci_low=p.ci.lo, diff_ci_high=p.ci.hi,
               verdict=p.ci.verdict if p.ci.n else None)  # fmt: skip
    if p.forwards_known:
        out.update(forwards_to_baseline_final=p.forwards, baseline_final_reached=f"{p.reached}/{p.ci.n}",
                   forwards_ratio=p.ratio)  # fmt: skip
    return out


def _num(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _ci(s: dict[str, Any]) -> str:
    if s["diff_vs_baseline_mean"] is None:
        return "—"
    ci = "" if s["diff_ci_low"] is None else f" [{s['diff_ci_low']:+.4f}, {s['diff_ci_high']:+.4f}]"
    return f"{s['diff_vs_baseline_mean']:+.4f}{ci}"


def _reach(s: dict[str, Any]) -> str:
    if s["verdict"] == "baseline":
        return "—" if s["forwards_to_baseline_final"] is None else f"{s['forwards_to_baseline_final']:.0f} (its run)"
    if s["baseline_final_reached"] is None:
        return "not recorded" if s["paired_seeds"] else "—"  # no paired seed: nothing to say
    seen, total = s["baseline_final_reached"].split("/")
    if seen == "0":
        return "not reached"
    return f"{s['forwards_to_baseline_final']:.0f}" + ("" if seen == total else f" ({seen}/{total} seeds)")


def render_paired_md(stats: Sequence[dict[str, Any]], baseline: str) -> list[str]:
    """The paired table's markdown lines (stats: the rows' ``row_stats`` with the paired columns)."""
    n = max((s["paired_seeds"] or 0 for s in stats), default=0)
    pct = round(100 * CI_LEVEL)
    lines = [f"## Paired against `{baseline}` ({n} paired seeds, {pct}% CI)", "",
             (f"| optimizer | lr | dev loss final mean ± sd | diff vs {baseline} [{pct}% CI] | verdict | "
              f"forwards to {baseline}'s final | ratio |"), "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in stats:
        mean, sd = s["dev_loss_final_mean"], s["dev_loss_final_sd"]
        dev = "—" if mean is None else f"{mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}")
        cells = [s["run"], s["lr"], dev, _ci(s), s["verdict"] or "—", _reach(s), _num(s["forwards_ratio"], ".2f")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", (f"- diff: final dev loss minus `{baseline}`'s at the same seed (same batches and z seeds), mean "
                   f"over the seeds both finished, with a {pct}% Student-t CI (n-1 dof). Verdict: win when the CI lies "
                   "below 0 (lower dev loss), loss when above 0, else tie (one seed: tie)."),
              (f"- forwards to {baseline}'s final: training forward passes until the dev loss first comes down to "
               f"`{baseline}`'s final dev loss at that seed, interpolated linearly between dev evaluations; mean over "
               f"the seeds that reached it. ratio: mean over seeds of that over `{baseline}`'s forward passes (its "
               "whole run), shown only when every seed reached it.")]  # fmt: skip
    return lines


def render_tuning_md(rows: Sequence[dict[str, Any]], select: str) -> list[str]:
    """The lr-tuning table's markdown lines."""
    seeds = sorted({int(k) for r in rows for k in r["seeds"].split(",")})
    steps = ", ".join(map(str, sorted({r["steps"] for r in rows if r["steps"] is not None})))
    on = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}, mean"
    lines = [(f"## lr tuning ({on}, {steps or '?'} steps per lr; picked on the {select} dev loss, never on "
              "test)"), "",
             f"| optimizer | lr | dev loss {select} | status | picked |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        picked = ("**yes** (at the grid's edge: widen the grid)" if r["edge"] else "**yes**") if r["picked"] else ""
        cells = [r["run"], fmt_value(r["lr"]), _num(r["score"]), r["status"], picked]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", ("- An lr whose tuning run failed or diverged (on any tuning seed) never wins; every seed of the "
                   "comparison then runs at the picked lr.")]  # fmt: skip
    for tol in sorted({r.get("tolerance") or 0.0 for r in rows} - {0.0}):
        lines.append(f"- Picked with --lr-tolerance {tol:g}: the smallest lr whose dev-loss decrease from step 0 is "
                     f"within {tol:.0%} of the lowest-scoring lr's.")  # fmt: skip
    return lines
