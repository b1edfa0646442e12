"""Held-out evaluation tables: many compares (one per model and task) gathered into one table and win counts.

A held-out evaluation is one ``l2zo compare`` per (model, task), each in ``<out>/<model label>/<task>/``
(``scripts/evaluate_heldout.py`` runs them). This module reads back what those compares wrote (their
summary.csv rows, which hold the mean ± std over seeds, and the step-0 dev loss from their events) and
builds the headline outputs: summary.md / summary.csv, the win counts of one optimizer over each other
one, the compares' plots and the commands that made them.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from l2zo.compare.events import find_run_folders, read_folder
from l2zo.utils.io import write_text_atomic

TIE_TOL = 1e-6  # differences this small are ties (the compare CSVs store float32 metrics)
CSV_COLUMNS = ("model", "task", "run", "status", "seeds_ok", "dev_loss_initial", "dev_loss_final_mean",
               "dev_loss_final_std", "test_acc_mean", "test_acc_std", "time_per_step_s")  # fmt: skip
PLOTS = ("dev_loss_vs_steps.png", "test_acc.png")


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


def render_md(rows: Sequence[HeldoutRow], title: str, champion: str = "learned") -> str:
    """summary.md: the per-row table (mean ± std over seeds), then ``champion``'s win counts."""
    lines = [f"# {title}", "", "| model | task | optimizer | seeds | dev loss at step 0 | dev loss final | test acc | s/step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.run} | {r.seeds_ok} | {_fmt(r.dev_loss_initial, '.4f')} | "
                     f"{_pm(r.dev_loss_final_mean, r.dev_loss_final_std, '.4f')} | "
                     f"{_pm(r.test_acc_mean, r.test_acc_std, '.3f')} | {_fmt(r.time_per_step_s, '.2f')} |")  # fmt: skip
    lines += ["", f"## Win counts of `{champion}`, per model-task pair", "",
              "| against | by mean final dev loss (lower): wins / losses / ties | by mean test accuracy (higher): wins / losses / ties | pairs |",
              "|---|---|---|---|"]  # fmt: skip
    by_dev = win_counts(rows, champion, "dev_loss_final_mean", lower_is_better=True)
    by_acc = win_counts(rows, champion, "test_acc_mean", lower_is_better=False)
    for other, d in by_dev.items():
        a = by_acc[other]
        lines.append(f"| {other} | {d.wins} / {d.losses} / {d.ties} | {a.wins} / {a.losses} / {a.ties} | {d.pairs} |")
    return "\n".join(lines) + "\n"


def write_heldout(out: Path, docs: Path, models: Sequence[str], tasks: Sequence[str], title: str,
                  command_for: Callable[[str, str], str]) -> str:  # fmt: skip
    """Write summary.csv, summary.md, each compare's plots and commands.txt under ``docs``; return summary.md.

    ``command_for(model, task)``: the compare's command line, used when its folder holds no command.txt.
    """
    rows = read_heldout(out, models, tasks)
    docs.mkdir(parents=True, exist_ok=True)
    for m in models:
        for t in tasks:
            for png in PLOTS:
                src = compare_dir(out, m, t) / png
                if src.is_file():
                    (docs / model_label(m) / t).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, docs / model_label(m) / t / png)
    write_text_atomic(docs / "summary.csv", render_csv(rows))
    md = render_md(rows, title)
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
