"""Held-out evaluation tables: many compares (one per model and task) gathered into one table and win counts.

A held-out evaluation is one ``l2zo compare`` per (model, task), each in ``<out>/<model label>/<task>/``
(``scripts/evaluate_heldout.py`` runs them). This module reads back what those compares wrote (their
summary.csv rows, which hold the mean ± std over seeds, and the step-0 dev loss from their events) and
builds the headline outputs: summary.md / summary.csv, the win counts of one optimizer over each other
one, the compares' plots and the commands that made them.

Win counts come two ways. By mean (:func:`win_counts`): the lower mean final dev loss wins, however small
the margin. By paired CI (:func:`paired_counts`, from the compares' per-seed dev curves read back from
their events): a pair is a win only when the 95% CI of the paired difference over seeds lies below 0, a
loss when above, else a tie; beside it, the pairs where the optimizer reaches the other's final dev loss
in at most half the other's forward passes (:data:`FAST_RATIO`).
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from l2zo.compare.events import find_run_folders, load_experiment, read_folder
from l2zo.compare.paired import CI_LEVEL, Curve, Paired, compare_paired
from l2zo.compare.protocol import curves
from l2zo.utils.io import write_text_atomic

TIE_TOL = 1e-6  # differences this small are ties (the compare CSVs store float32 metrics)
CSV_COLUMNS = ("model", "task", "run", "status", "seeds_ok", "dev_loss_initial", "dev_loss_final_mean",
               "dev_loss_final_std", "test_acc_mean", "test_acc_std", "time_per_step_s")  # fmt: skip
PLOTS = ("dev_loss_vs_steps.png", "test_acc.png")
FAST_RATIO = 0.5  # the target: reach the other's final dev loss in at most half its forward passes
PAIRED_CSV_COLUMNS = ("model", "task", "optimizer", "against", "seeds", "diff_mean", "diff_ci_low", "diff_ci_high",
                      "verdict", "forwards_ratio", "reached")  # fmt: skip


@dataclass(frozen=True)
class HeldoutRow:
    """One optimizer configuration of one compare (model, task): its summary.csv row, over the seeds."""

    model: str  # the model's label (see model_label)
    task: str
    run: str  # the compare's run label, e.g. "mezo" or "mezo@lr=1e-05" for a sweep's chosen point
    status: str
    seeds_ok: int
    dev_loss_initial: float | None  # the dev loss before the first step (None: not in the events)
    dev_loss_final_mean: float | None
    dev_loss_final_std: float | None  # None with one seed
    test_acc_mean: float | None
    test_acc_std: float | None
    time_per_step_s: float | None

    @property
    def optimizer(self) -> str:
        """The run label without its sweep point: what win counts compare."""
        return self.run.split("@")[0]


@dataclass(frozen=True)
class WinCount:
    """How one optimizer fared against another over the (model, task) pairs where both have the metric."""

    wins: int
    losses: int
    ties: int
    pairs: int


@dataclass(frozen=True)
class PairedRow:
    """``optimizer`` against ``against`` on one (model, task), seed by seed (see :mod:`l2zo.compare.paired`)."""

    model: str
    task: str
    optimizer: str
    against: str
    paired: Paired


@dataclass(frozen=True)
class PairedCount:
    """Paired-CI verdicts of one optimizer against another over the (model, task) pairs where both finished.

    ``fast``: pairs where it reached the other's final dev loss within ``FAST_RATIO`` of the other's forwards,
    at every seed on average (``Paired.ratio``); ``fast_known``: pairs where the forwards were recorded.
    """

    wins: int
    ties: int
    losses: int
    pairs: int
    fast: int
    fast_known: int


def model_label(model: str) -> str:
    """A model's folder name in the results: a path's last part (``runs/derivatives/x`` -> ``x``), else the name."""
    return Path(model).name if ("/" in model or model.startswith(".")) else model


def _num(text: str | None) -> float | None:
    return float(text) if text not in ("", "None", None) else None


def initial_dev_loss(logdir: Path) -> float | None:
    """The dev loss at step 0 of a compare (``<logdir>/<run>/seed<k>/``): the same model and dev set for every
    optimizer, so the first run (by folder) that logged it is taken; None when no run did."""
    for folder in find_run_folders(logdir):
        if folder.parent.parent != logdir or not folder.name.startswith("seed"):
            continue
        dev = read_folder(folder)[0].get("val/loss")
        if dev and dev[0][0] == 0:
            return dev[0][1]
    return None


def read_compare(logdir: Path, model: str, task: str) -> list[HeldoutRow]:
    """The rows of one compare's summary.csv (in its order); [] when the compare has not finished one."""
    path = logdir / "summary.csv"
    if not path.is_file():
        return []
    start = initial_dev_loss(logdir)
    with path.open(newline="", encoding="utf-8") as f:
        return [HeldoutRow(model=model_label(model), task=task, run=r["run"], status=r["status"],
                           seeds_ok=int(r["seeds_ok"]), dev_loss_initial=start,
                           dev_loss_final_mean=_num(r["dev_loss_final_mean"]),
                           dev_loss_final_std=_num(r["dev_loss_final_std"]), test_acc_mean=_num(r["test_acc_mean"]),
                           test_acc_std=_num(r["test_acc_std"]), time_per_step_s=_num(r["time_per_step_s"]))
                for r in csv.DictReader(f)]  # fmt: skip


def compare_dir(out: Path, model: str, task: str) -> Path:
    """Where the compare of ``model`` on ``task`` lives under the evaluation's ``out`` folder."""
    return out / model_label(model) / task


def read_heldout(out: Path, models: Sequence[str], tasks: Sequence[str]) -> list[HeldoutRow]:
    """Every finished compare's rows, model by model, then task by task (compares not run yet are left out)."""
    return [row for m in models for t in tasks for row in read_compare(compare_dir(out, m, t), m, t)]


def win_counts(rows: Sequence[HeldoutRow], champion: str, metric: str, lower_is_better: bool) -> dict[str, WinCount]:
    """Wins / losses / ties of ``champion`` against every other optimizer, one per (model, task) pair.

    ``metric``: a HeldoutRow field of means (``dev_loss_final_mean``, ``test_acc_mean``). A pair counts when
    both optimizers have the metric there; a difference within ``TIE_TOL`` is a tie. Keys: every other
    optimizer in ``rows`` (sorted), also those with no pair in common (then all zeros).
    """
    pairs: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        value = getattr(r, metric)
        if value is not None:
            pairs.setdefault((r.model, r.task), {})[r.optimizer] = value
    sign = 1.0 if lower_is_better else -1.0
    out = {}
    for other in sorted({r.optimizer for r in rows} - {champion}):
        w = lo = ti = n = 0
        for p in pairs.values():
            if champion in p and other in p:
                diff = sign * (p[champion] - p[other])  # < 0: the champion is better
                w, lo, ti, n = w + (diff < -TIE_TOL), lo + (diff > TIE_TOL), ti + (abs(diff) <= TIE_TOL), n + 1
        out[other] = WinCount(w, lo, ti, n)
    return out


def compare_curves(logdir: Path) -> dict[str, dict[int, Curve]]:
    """Optimizer (the run label without its sweep point or ``@`` settings) -> seed -> dev curve, for the runs of
    one compare that finished ok (each optimizer's chosen sweep point; lr-tuning runs are not rows)."""
    from l2zo.compare.summary import build_tables

    runs = load_experiment(logdir)
    if not any(r.phase != "tune" for r in runs):
        return {}
    return {row.runs[0].base.split("@")[0]: curves(row.runs) for row in build_tables(runs)["rows"]}


def read_paired(out: Path, models: Sequence[str], tasks: Sequence[str], champion: str) -> list[PairedRow]:
    """``champion`` against every other optimizer on each finished compare (one that wrote its summary.csv)."""
    rows = []
    for m in models:
        for t in tasks:
            folder = compare_dir(out, m, t)
            if not (folder / "summary.csv").is_file():
                continue
            by_opt = compare_curves(folder)
            if not by_opt.get(champion):
                continue
            for other, theirs in by_opt.items():
                if other != champion and theirs:
                    rows.append(PairedRow(model_label(m), t, champion, other, compare_paired(by_opt[champion], theirs)))
    return rows


def paired_counts(rows: Sequence[PairedRow]) -> dict[str, PairedCount]:
    """Per other optimizer (sorted): wins / ties / losses by the paired CI, and the fast pairs; pairs with no
    common seed are left out."""
    out = {}
    for other in sorted({r.against for r in rows}):
        mine = [r.paired for r in rows if r.against == other and r.paired.ci.n > 0]
        verdicts = [p.ci.verdict for p in mine]
        known = [p for p in mine if p.forwards_known]
        fast = sum(p.ratio is not None and p.ratio <= FAST_RATIO for p in known)
        out[other] = PairedCount(verdicts.count("win"), verdicts.count("tie"), verdicts.count("loss"), len(mine), fast,
                                 len(known))  # fmt: skip
    return out


def render_paired_csv(rows: Sequence[PairedRow]) -> str:
    """paired.csv: one line per (model, task, other optimizer); CRLF line ends like summary.csv."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(PAIRED_CSV_COLUMNS)
    for r in rows:
        p = r.paired
        cells = [r.model, r.task, r.optimizer, r.against, p.ci.n, p.ci.mean, p.ci.lo, p.ci.hi, p.ci.verdict, p.ratio,
                 f"{p.reached}/{p.ci.n}" if p.forwards_known else None]  # fmt: skip
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in cells])
    return buf.getvalue()


def ci_text(p: Paired) -> str:
    """'+0.0123 [-0.0050, +0.0296]': the paired mean difference and its CI ('-' without seeds)."""
    if p.ci.mean is None:
        return "-"
    return f"{p.ci.mean:+.4f}" + ("" if p.ci.lo is None else f" [{p.ci.lo:+.4f}, {p.ci.hi:+.4f}]")


def _ratio_text(p: Paired) -> str:
    if not p.forwards_known:
        return "not recorded"
    return "not reached" + (f" ({p.reached}/{p.ci.n} seeds)" if p.reached else "") if p.ratio is None else (
        f"{p.ratio:.2f}")  # fmt: skip


def render_paired_md(rows: Sequence[PairedRow], champion: str) -> list[str]:
    """The paired sections of summary.md: counts per other optimizer, then every pair's CI."""
    pct = round(100 * CI_LEVEL)
    frac = f"1/{round(1 / FAST_RATIO)}" if FAST_RATIO < 1 else f"{FAST_RATIO:g}x"
    lines = ["", f"## Paired verdicts of `{champion}` ({pct}% CI over seeds of the final dev-loss difference)", "",
             f"| against | wins / ties / losses | pairs | reaches its final dev loss in <= {frac} of its forwards |",
             "|---|---|---|---|"]  # fmt: skip
    for other, c in paired_counts(rows).items():
        fast = f"{c.fast}/{c.fast_known}" if c.fast_known else "not recorded"
        lines.append(f"| {other} | {c.wins} / {c.ties} / {c.losses} | {c.pairs} | {fast} |")
    lines += ["", (f"| model | task | against | seeds | diff {champion} - other [{pct}% CI] | verdict | "
                   "forwards ratio |"), "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.against} | {r.paired.ci.n} | {ci_text(r.paired)} | "
                     f"{r.paired.ci.verdict} | {_ratio_text(r.paired)} |")  # fmt: skip
    lines += ["", ("A win needs the whole CI below 0 (lower dev loss); one seed, or a CI that holds 0, is a tie. "
                   f"Forwards ratio: {champion}'s forward passes to reach the other's final dev loss over the other's "
                   "forward passes (mean over seeds; shown when every seed reached it).")]  # fmt: skip
    return lines


def render_csv(rows: Sequence[HeldoutRow]) -> str:
    """summary.csv: one line per row (None as an empty cell, floats at full precision), CRLF line ends."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow(["" if (v := getattr(r, c)) is None else repr(v) if isinstance(v, float) else v
                    for c in CSV_COLUMNS])  # fmt: skip
    return buf.getvalue()


def _pm(mean: float | None, std: float | None, spec: str) -> str:  # one seed has no std: none is shown
    return "-" if mean is None else format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_md(rows: Sequence[HeldoutRow], title: str, champion: str | Sequence[str] = "learned",
              paired: Sequence[PairedRow] | None = None) -> str:  # fmt: skip
    """summary.md: the per-row table (mean ± std over seeds), then for each champion (one label or several) its
    win counts by mean and (given ``paired``, the champions' paired rows) its verdicts by paired CI."""
    champions = [champion] if isinstance(champion, str) else list(champion)
    lines = [f"# {title}", "", "| model | task | optimizer | seeds | dev loss at step 0 | dev loss final | test acc | s/step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.run} | {r.seeds_ok} | {_fmt(r.dev_loss_initial, '.4f')} | "
                     f"{_pm(r.dev_loss_final_mean, r.dev_loss_final_std, '.4f')} | "
                     f"{_pm(r.test_acc_mean, r.test_acc_std, '.3f')} | {_fmt(r.time_per_step_s, '.2f')} |")  # fmt: skip
    for champion in champions:
        lines += ["", f"## Win counts of `{champion}`, per model-task pair", "",
                  "| against | by mean final dev loss (lower): wins / losses / ties | by mean test accuracy (higher): wins / losses / ties | pairs |",
                  "|---|---|---|---|"]  # fmt: skip
        by_dev = win_counts(rows, champion, "dev_loss_final_mean", lower_is_better=True)
        by_acc = win_counts(rows, champion, "test_acc_mean", lower_is_better=False)
        for other, d in by_dev.items():
            a = by_acc[other]
            lines.append(
                f"| {other} | {d.wins} / {d.losses} / {d.ties} | {a.wins} / {a.losses} / {a.ties} | {d.pairs} |"
            )
        if paired is not None:
            lines += render_paired_md([r for r in paired if r.optimizer == champion], champion)
    return "\n".join(lines) + "\n"


def write_heldout(out: Path, docs: Path, models: Sequence[str], tasks: Sequence[str], title: str,
                  command_for: Callable[[str, str], str], champions: Sequence[str] = ("learned",)) -> str:  # fmt: skip
    """Write summary.csv, paired.csv, summary.md, each compare's plots and commands.txt under ``docs``; return
    summary.md (``champions``: the run labels whose wins are counted, each against every other).

    ``command_for(model, task)``: the compare's command line, used when its folder holds no command.txt.
    """
    rows = read_heldout(out, models, tasks)
    docs.mkdir(parents=True, exist_ok=True)
    for m in models:
        for t in tasks:
            for png in (*PLOTS, "tuning.csv"):  # the plots, and what each lr scored on dev and which was picked
                src = compare_dir(out, m, t) / png
                if src.is_file():
                    (docs / model_label(m) / t).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, docs / model_label(m) / t / png)
    write_text_atomic(docs / "summary.csv", render_csv(rows))
    paired = [r for c in champions for r in read_paired(out, models, tasks, c)]
    write_text_atomic(docs / "paired.csv", render_paired_csv(paired))
    md = render_md(rows, title, champions, paired)
    write_text_atomic(docs / "summary.md", md)
    cmds = []
    for m in models:
        for t in tasks:
            folder = compare_dir(out, m, t)
            if (folder / "summary.csv").is_file():
                recorded = folder / "command.txt"
                cmds.append(recorded.read_text(encoding="utf-8").strip() if recorded.is_file() else command_for(m, t))
    write_text_atomic(docs / "commands.txt", "\n".join(cmds) + "\n")
    return md
