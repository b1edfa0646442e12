"""The compare tables (summary.md, summary.csv, sweep.csv), built only from runs read back from events.

``l2zo compare`` and ``l2zo report`` both call :func:`write_report`, so a report on a copied experiment
folder writes the same tables byte for byte. Aggregates are over seeds; quality numbers (dev loss,
test accuracy, steps to the reference) use the seeds that finished ok, cost numbers (time, memory,
forwards) every seed that logged them. Sweeps are decided on dev loss only, never on test.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2zo.compare.events import RunRecord, load_experiment
from l2zo.compare.protocol import (
    dev_score,
    find_baseline,
    paired_stats,
    render_paired_md,
    render_tuning_md,
    tuning_rows,
)
from l2zo.compare.spec import fmt_hparams, fmt_value
from l2zo.errors import L2ZOError
from l2zo.utils.io import write_text_atomic


@dataclass
class Row:
    """One optimizer configuration over its seeds (for a sweep: the chosen point)."""

    label: str
    runs: list[RunRecord]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.ok]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def choose_sweeps(groups: dict[str, list[RunRecord]], select: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Labels for the main table (one per sweep base) and the sweep table's rows."""
    chosen: list[str] = []
    sweep_rows: list[dict[str, Any]] = []
    bases: dict[str, list[str]] = {}
    for label, runs in groups.items():
        if runs[0].sweep:
            bases.setdefault(runs[0].base, []).append(label)
        else:
            chosen.append(label)
    for base, labels in bases.items():
        scored = []
        for label in labels:
            runs = groups[label]
            score = dev_score(runs, select)
            all_ok = all(r.ok for r in runs)
            scored.append((label, score, all_ok))
        eligible = [(s, i) for i, (_, s, ok) in enumerate(scored) if ok and s is not None]
        best = min(eligible)[1] if eligible else 0  # none finished: show the first point, failed
        chosen.append(labels[best])
        for i, (label, score, _ok) in enumerate(scored):
            runs = groups[label]
            sweep_rows.append({"base": base, "point": " ".join(f"{k}={fmt_value(v)}" for k, v in runs[0].sweep.items()),
                               "score": score, "seeds_ok": sum(r.ok for r in runs), "seeds": len(runs),
                               "chosen": i == best, "status": status_text(runs)})  # fmt: skip
    order = {label: min(r.order for r in runs) for label, runs in groups.items()}
    return sorted(chosen, key=lambda lab: (order[lab], lab)), sweep_rows


def status_text(runs: list[RunRecord]) -> str:
    """ "ok", or per way of ending (failed, interrupted, ...) its share of the seeds and their reasons."""
    bad = [r for r in runs if not r.ok]
    if not bad:
        return "ok"
    parts = []
    for status in dict.fromkeys(r.status for r in bad):  # in order of appearance
        reasons: dict[str, list[int]] = {}
        these = [r for r in bad if r.status == status]
        for r in these:
            reasons.setdefault(r.reason or "unknown", []).append(r.seed)
        detail = "; ".join(f"seed{','.join(map(str, s))}: {why}" for why, s in reasons.items())
        parts.append(f"{status} ({len(these)}/{len(runs)} seeds): {detail}")
    return "; ".join(parts)


def first_reach(run: RunRecord, target: float) -> int | None:
    return next((s for s, v in run.series("val/loss") if v <= target), None)


def row_stats(row: Row, target: float | None) -> dict[str, Any]:
    ok = [r for r in row.ok_runs if r.series("val/loss")]
    finals = mean_std([r.series("val/loss")[-1][1] for r in ok])
    bests = mean_std([min(v for _, v in r.series("val/loss")) for r in ok])
    accs = mean_std([v for r in ok if (v := r.last("test/acc")) is not None])
    step_times = [statistics.median(v for _, v in r.series("train/step_time_s")) for r in row.runs
                  if r.series("train/step_time_s")]  # fmt: skip
    mems = [max(v for _, v in r.series("train/peak_mem_mb")) for r in row.runs if r.series("train/peak_mem_mb")]
    fps = next((r.forwards_per_step for r in row.runs if r.forwards_per_step is not None), None)
    reach = [first_reach(r, target) for r in ok] if target is not None else []
    hits = [s for s in reach if s is not None]
    hp = sorted({fmt_hparams(r.hparams) if r.hparams is not None else "n/a (not recorded)" for r in row.runs})
    return {
        "run": row.label, "optimizer": row.runs[0].optimizer, "hyperparameters": " | ".join(hp),
        "status": status_text(row.runs), "seeds": len(row.runs), "seeds_ok": len(row.ok_runs),
        "dev_loss_final_mean": finals[0], "dev_loss_final_std": finals[1],
        "dev_loss_best_mean": bests[0], "dev_loss_best_std": bests[1],
        "test_acc_mean": accs[0], "test_acc_std": accs[1],
        "steps_to_ref": statistics.fmean(hits) if hits else None, "ref_reached": f"{len(hits)}/{len(reach)}",
        "forwards_to_ref": statistics.fmean(hits) * fps if hits and fps else None,
        "time_per_step_s": statistics.fmean(step_times) if step_times else None,
        "peak_mem_mb": max(mems) if mems else None, "forwards_per_step": fps,
    }  # fmt: skip


def pick_reference(rows: list[Row]) -> Row | None:
    """MeZO's row (the run labelled plain 'mezo' first), else the first row with an ok seed."""
    candidates = [r for r in rows if r.ok_runs]
    mezo = [r for r in candidates if r.runs[0].optimizer == "mezo"]
    mezo.sort(key=lambda r: (r.runs[0].base != "mezo", rows.index(r)))
    return (mezo or candidates or [None])[0]


def build_tables(runs: list[RunRecord], select: str | None = None) -> dict[str, Any]:
    """Everything the report shows: rows, the reference, the sweep rows, the header facts."""
    tune_runs = [r for r in runs if r.phase == "tune"]  # lr tuning: a table of its own, never a row
    runs = [r for r in runs if r.phase != "tune"]
    if not runs:
        raise L2ZOError("no runs found: expected TensorBoard event files under <logdir>/<run>/seed<k>/")
    groups = group(runs)
    select = select or next((r.config.get("select") for r in runs if r.config.get("select")), None) or "final"
    chosen, sweep_rows = choose_sweeps(groups, select)
    rows = [Row(label, groups[label]) for label in chosen]
    ref = pick_reference(rows)
    target = None
    if ref is not None:
        target = statistics.fmean(r.series("val/loss")[-1][1] for r in ref.ok_runs if r.series("val/loss"))
    wanted = next((r.config.get("baseline") for r in runs if r.config.get("baseline")), None)
    b = find_baseline([row.label for row in rows], [row.runs[0].base for row in rows], wanted)
    baseline = rows[b] if b is not None else None
    for row in rows:
        row.stats = row_stats(row, target)
        if baseline is not None:
            row.stats.update(baseline=baseline.label, **paired_stats(row.runs, baseline.runs, row is baseline))
    return {"rows": rows, "ref": ref, "target": target, "sweep_rows": sweep_rows, "select": select,
            "digests": digest_check(runs), "config": runs[0].config, "baseline": baseline,
            "tuning_rows": tuning_rows(tune_runs, select, {r.base: r.tuned for r in runs if r.tuned}),
            "seeds": sorted({r.seed for r in runs})}  # fmt: skip


def digest_check(runs: list[RunRecord]) -> str:
    """Whether every complete run at a seed saw the same batch sequence (equal ``batch_digest``)."""
    by_seed: dict[int, set[str]] = {}
    for r in runs:
        if r.ok and r.batch_digest:
            by_seed.setdefault(r.seed, set()).add(r.batch_digest)
    if not by_seed:
        return "not recorded"
    bad = [s for s, d in sorted(by_seed.items()) if len(d) > 1]
    if bad:
        return f"NO: the runs at seed {', '.join(map(str, bad))} saw different batches"
    return "yes (equal batch digests across optimizers at each seed)"


# -- rendering ----------------------------------------------------------------------------------------
CSV_COLUMNS = ("run", "optimizer", "hyperparameters", "status", "seeds", "seeds_ok", "dev_loss_final_mean",
               "dev_loss_final_std", "dev_loss_best_mean", "dev_loss_best_std", "test_acc_mean", "test_acc_std",
               "steps_to_ref", "ref_reached", "forwards_to_ref", "time_per_step_s", "peak_mem_mb",
               "forwards_per_step", "lr", "baseline", "paired_seeds", "diff_vs_baseline_mean", "diff_ci_low",
               "diff_ci_high", "verdict", "forwards_to_baseline_final", "baseline_final_reached",
               "forwards_ratio")  # fmt: skip
TUNING_CSV_COLUMNS = ("run", "lr", "seeds", "steps", "score", "status", "picked")


def _num(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _pm(mean: float | None, std: float | None, spec: str = ".4f") -> str:
    if mean is None:
        return "—"
    return _num(mean, spec) if std is None else f"{_num(mean, spec)} ± {_num(std, spec)}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _reach(s: dict[str, Any]) -> str:
    if s["steps_to_ref"] is None:
        return "not reached" if s["seeds_ok"] else "—"
    seen, total = s["ref_reached"].split("/")
    return _num(s["steps_to_ref"], ".0f") + ("" if seen == total else f" ({s['ref_reached']} seeds)")


def render_csv(tables: dict[str, Any]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in tables["rows"]:
        w.writerow(["" if (v := row.stats.get(c)) is None else repr(v) if isinstance(v, float) else v
                    for c in CSV_COLUMNS])  # fmt: skip
    return out.getvalue()


def render_tuning_csv(tables: dict[str, Any]) -> str:
    """tuning.csv: every lr of every grid (score: the mean over its tuning seeds of the final or best dev loss, per
    the compare's --select; none when a run of it failed)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(TUNING_CSV_COLUMNS)
    for r in tables["tuning_rows"]:
        w.writerow(["" if (v := r[c]) is None else int(v) if isinstance(v, bool) else repr(v) if isinstance(v, float)
                    else v for c in TUNING_CSV_COLUMNS])  # fmt: skip
    return out.getvalue()


def render_sweep_csv(tables: dict[str, Any]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["run", "point", f"dev_loss_{tables['select']}_mean", "seeds_ok", "seeds", "chosen", "status"])
    for s in tables["sweep_rows"]:
        w.writerow([s["base"], s["point"], "" if s["score"] is None else repr(s["score"]), s["seeds_ok"], s["seeds"],
                    int(s["chosen"]), s["status"]])  # fmt: skip
    return out.getvalue()


def render_md(tables: dict[str, Any], name: str, plots: list[str]) -> str:
    c, ref, rows = tables["config"], tables["ref"], tables["rows"]
    lines = [f"# l2zo compare: {name}", ""]
    if c:
        lines.append(f"Model `{c.get('model')}`, task `{c.get('task')}`, {c.get('steps')} steps, batch size "
                     f"{c.get('batch_size')}, dev every {c.get('eval_every')} steps, splits {c.get('num_train')}/"
                     f"{c.get('num_dev') or 'default'}/{c.get('num_test')} (train/dev/test, data seed "
                     f"{c.get('data_seed')}), precision {c.get('precision')}.")  # fmt: skip
    lines += [f"Seeds: {', '.join(map(str, tables['seeds']))}. Same batches: {tables['digests']}.", ""]
    head = ["run", "hyperparameters (what ran)", "status", "seeds ok", "dev loss final", "dev loss best", "test acc",
            "steps to ref", "fwd to ref", "s/step", "peak MiB", "fwd/step"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.stats
        cells = [s["run"], s["hyperparameters"], s["status"], f"{s['seeds_ok']}/{s['seeds']}",
                 _pm(s["dev_loss_final_mean"], s["dev_loss_final_std"]),
                 _pm(s["dev_loss_best_mean"], s["dev_loss_best_std"]),
                 _pm(s["test_acc_mean"], s["test_acc_std"], ".3f"), _reach(s), _num(s["forwards_to_ref"], ".0f"),
                 _num(s["time_per_step_s"], ".3f"), _num(s["peak_mem_mb"], ".0f"),
                 _num(s["forwards_per_step"], "d")]  # fmt: skip
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    ref_text = (
        "none (no run finished)"
        if ref is None
        else (
            f"`{ref.label}`'s final dev loss {tables['target']:.4f} (mean over its ok seeds)"
            + (
                ""
                if ref.runs[0].optimizer == "mezo"
                else "; mezo is not in this compare, so the first optimizer is used"
            )
        )
    )
    lines += [
        "",
        "- Mean ± std over seeds (sample std); dev loss and test accuracy over the seeds that finished ok. "
        "Test accuracy is of the final model; nothing is selected on test.",
        f"- Steps to ref: first dev evaluation at or below {ref_text}; resolution: the dev interval. "
        "fwd to ref = steps to ref x forward passes per step.",
        "- s/step: median optimizer-step time per run, mean over seeds (evaluation excluded). Peak MiB: max over "
        "seeds; CUDA allocator peak, or on CPU the process's peak RSS.",
        "- A run fails on an error (e.g. a non-finite loss) or when its dev loss is non-finite or above 10x "
        "the initial.",
    ]  # fmt: skip
    if tables["baseline"] is not None:
        lines += ["", *render_paired_md([row.stats for row in rows], tables["baseline"].label)]
    if tables["tuning_rows"]:
        lines += ["", *render_tuning_md(tables["tuning_rows"], tables["select"])]
    if tables["sweep_rows"]:
        lines += ["", f"## Sweep (picked on the {tables['select']} dev loss, mean over seeds; never on test)", "",
                  f"| run | point | dev loss {tables['select']} | seeds ok | chosen | status |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for s in tables["sweep_rows"]:
            cells = [s["base"], s["point"], _num(s["score"]), f"{s['seeds_ok']}/{s['seeds']}",
                     "**yes**" if s["chosen"] else "", s["status"]]  # fmt: skip
            lines.append("| " + " | ".join(_cell(str(x)) for x in cells) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(root: Path, select: str | None = None) -> dict[str, Any]:
    """Read every run under ``root`` from its events; write summary.md, summary.csv (sweep.csv) and the PNGs."""
    from l2zo.compare.plots import write_plots

    tables = build_tables(load_experiment(root), select)
    plots = write_plots(root, tables["rows"])
    write_text_atomic(root / "summary.csv", render_csv(tables))
    if tables["sweep_rows"]:
        write_text_atomic(root / "sweep.csv", render_sweep_csv(tables))
    if tables["tuning_rows"]:
        write_text_atomic(root / "tuning.csv", render_tuning_csv(tables))
    md = render_md(tables, root.resolve().name, plots)
    write_text_atomic(root / "summary.md", md)
    return {**tables, "markdown": md, "plots": plots}
