"""Held-out aggregation (l2zo.compare.heldout) on compares built from TensorBoard events written here.

Each (model, task) folder holds per-seed events, and the compare's own ``write_report`` turns them into its
summary.csv, as ``l2zo compare`` does; the held-out tables are then read from those.
"""

from __future__ import annotations

import csv
import io
import runpy
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from l2zo.compare.heldout import (
    HeldoutRow,
    PairedCount,
    WinCount,
    initial_dev_loss,
    model_label,
    paired_counts,
    read_heldout,
    read_paired,
    render_csv,
    render_md,
    win_counts,
    write_heldout,
)
from l2zo.compare.summary import write_report
from tests.tb_events import write_scalars

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["base", "runs/derivatives/deriv"]
TASKS = ["wic", "wsc"]
DEV0 = 0.75
# (model label, task) -> optimizer -> final dev loss per seed; test accuracy per optimizer (every seed).
FINAL = {
    ("base", "wic"): {"learned": [0.70, 0.71, 0.72], "mezo": [0.72, 0.73, 0.74], "learned-random": [0.69, 0.70, 0.71]},
    ("base", "wsc"): {"learned": [0.60, 0.62], "mezo": [0.60, 0.62], "learned-random": [0.65, 0.66]},
    ("deriv", "wic"): {"learned": [0.50], "mezo": [0.55], "learned-random": [0.52]},
}  # ("deriv", "wsc") never ran: no folder
ACC = {"learned": 0.625, "mezo": 0.5, "learned-random": 0.625}
STEP_TIME = {"learned": 0.25, "mezo": 0.125, "learned-random": 0.5}


def f32(x: float) -> float:
    """What TensorBoard stores (float32), as a Python float."""
    return float(np.float32(x))


@pytest.fixture(scope="module")
def heldout_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "out"
    for (model, task), finals in FINAL.items():
        for opt, losses in finals.items():
            for seed, loss in enumerate(losses):
                write_scalars(out / model / task / opt / f"seed{seed}", {
                    "val/loss": [(0, DEV0), (10, loss)], "test/acc": [(10, ACC[opt])],
                    "train/step_time_s": [(s, STEP_TIME[opt]) for s in range(10)]})  # fmt: skip
        write_report(out / model / task)  # the compare's summary.csv and plots
    (out / "base" / "wic" / "command.txt").write_text("l2zo compare --as-recorded\n")
    return out


def test_rows_hold_mean_and_std_over_seeds_per_model_task_optimizer(heldout_out):
    rows = read_heldout(heldout_out, MODELS, TASKS)
    assert [(r.model, r.task) for r in rows] == [("base", "wic")] * 3 + [("base", "wsc")] * 3 + [("deriv", "wic")] * 3
    for r in rows:
        losses = [f32(x) for x in FINAL[(r.model, r.task)][r.optimizer]]
        assert r.status == "ok" and r.seeds_ok == len(losses)
        assert r.dev_loss_final_mean == pytest.approx(statistics.fmean(losses), abs=1e-12)
        if len(losses) > 1:
            assert r.dev_loss_final_std == pytest.approx(statistics.stdev(losses), abs=1e-12)
            assert r.test_acc_std == 0.0
        else:  # one seed: no std, not a zero one
            assert r.dev_loss_final_std is None and r.test_acc_std is None
        assert r.test_acc_mean == f32(ACC[r.optimizer])
        assert r.time_per_step_s == STEP_TIME[r.optimizer]
        assert r.dev_loss_initial == f32(DEV0)


def test_initial_dev_loss_is_read_from_the_events(heldout_out, tmp_path):
    assert initial_dev_loss(heldout_out / "deriv" / "wic") == f32(DEV0)
    write_scalars(tmp_path / "mezo" / "seed0", {"val/loss": [(5, 0.5), (10, 0.4)]})  # no evaluation before step 1
    assert initial_dev_loss(tmp_path) is None
    write_scalars(tmp_path / "zo-adam" / "seed0", {"val/loss": [(10, 0.3), (0, 0.9)]})
    assert initial_dev_loss(tmp_path) == f32(0.9)


def row(model: str, task: str, run: str, dev: float | None, acc: float | None = None) -> HeldoutRow:
    return HeldoutRow(model=model, task=task, run=run, status="ok", seeds_ok=1, dev_loss_initial=None,
                      dev_loss_final_mean=dev, dev_loss_final_std=None, test_acc_mean=acc, test_acc_std=None,
                      time_per_step_s=None)  # fmt: skip


def test_win_counts_wins_losses_ties_and_missing_pairs():
    rows = [
        row("a", "t1", "learned", 0.50, 0.70), row("a", "t1", "mezo", 0.60, 0.60),  # learned wins both
        row("a", "t2", "learned", 0.50, 0.60), row("a", "t2", "mezo", 0.40, 0.70),  # learned loses both
        row("b", "t1", "learned", 0.50, 0.60), row("b", "t1", "mezo@lr=1e-05", 0.5000005, 0.60),  # ties (1e-6)
        row("b", "t2", "learned", None, None), row("b", "t2", "mezo", 0.30, 0.90),  # learned failed: no pair
        row("b", "t3", "mezo", 0.30, 0.90),  # learned did not run here: no pair
        row("c", "t1", "zo-adam", 0.1, 0.9),  # never beside learned: counted as no pairs
    ]  # fmt: skip
    assert win_counts(rows, "learned", "dev_loss_final_mean", lower_is_better=True) == {
        "mezo": WinCount(wins=1, losses=1, ties=1, pairs=3), "zo-adam": WinCount(0, 0, 0, 0)}  # fmt: skip
    assert win_counts(rows, "learned", "test_acc_mean", lower_is_better=False) == {
        "mezo": WinCount(wins=1, losses=1, ties=1, pairs=3), "zo-adam": WinCount(0, 0, 0, 0)}  # fmt: skip
    assert win_counts(rows, "mezo", "dev_loss_final_mean", lower_is_better=True)["learned"] == WinCount(1, 1, 1, 3)


def test_win_counts_on_the_built_compares(heldout_out):
    rows = read_heldout(heldout_out, MODELS, TASKS)
    assert win_counts(rows, "learned", "dev_loss_final_mean", lower_is_better=True) == {
        "learned-random": WinCount(wins=2, losses=1, ties=0, pairs=3),  # loses on base/wic only
        "mezo": WinCount(wins=2, losses=0, ties=1, pairs=3)}  # base/wsc: the same losses, a tie # fmt: skip
    assert win_counts(rows, "learned", "test_acc_mean", lower_is_better=False) == {
        "learned-random": WinCount(0, 0, 3, 3), "mezo": WinCount(3, 0, 0, 3)}  # fmt: skip


def test_markdown_table_and_win_count_lines():
    rows = [
        HeldoutRow("m", "t", "learned", "ok", 2, 0.75, 0.5, 0.01, 0.625, 0.125, 1.234),
        HeldoutRow("m", "t", "mezo", "ok", 1, None, 0.6, None, 0.5, None, None),
        HeldoutRow("m", "t", "learned-random", "failed (1/1 seeds): diverged", 0, 0.75, None, None, None, None, 2.0),
    ]  # fmt: skip
    md = render_md(rows, "Held-out evaluation: 10 steps").splitlines()
    assert md[0] == "# Held-out evaluation: 10 steps"
    assert md[4:7] == ["| m | t | learned | 2 | 0.7500 | 0.5000 ± 0.0100 | 0.625 ± 0.125 | 1.23 |",
                       "| m | t | mezo | 1 | - | 0.6000 | 0.500 | - |",
                       "| m | t | learned-random | 0 | 0.7500 | - | - | 2.00 |"]  # fmt: skip
    assert md[-2:] == ["| learned-random | 0 / 0 / 0 | 0 / 0 / 0 | 0 |", "| mezo | 1 / 0 / 0 | 1 / 0 / 0 | 1 |"]


def test_csv_keeps_full_precision_and_empty_cells(heldout_out):
    rows = read_heldout(heldout_out, MODELS, TASKS)
    text = render_csv(rows)
    assert text.count("\r\n") == len(rows) + 1
    back = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [float(r["dev_loss_final_mean"]) for r in back] == [r.dev_loss_final_mean for r in rows]
    assert [r["dev_loss_final_std"] for r in back if r["model"] == "deriv"] == ["", "", ""]


def test_write_heldout_writes_tables_plots_and_commands(heldout_out, tmp_path):
    docs = tmp_path / "docs"
    md = write_heldout(heldout_out, docs, MODELS, TASKS, "T", lambda m, t: f"l2zo compare --model {m} --task {t}")
    assert (docs / "summary.md").read_text() == md
    assert (docs / "summary.csv").read_bytes().decode() == render_csv(read_heldout(heldout_out, MODELS, TASKS))
    for m, t in FINAL:
        for png in ("dev_loss_vs_steps.png", "test_acc.png"):
            assert (docs / m / t / png).read_bytes() == (heldout_out / m / t / png).read_bytes()
    assert not (docs / "deriv" / "wsc").exists()
    assert (docs / "commands.txt").read_text().splitlines() == [
        "l2zo compare --as-recorded",  # recorded by the script when it ran the compare
        "l2zo compare --model base --task wsc", "l2zo compare --model runs/derivatives/deriv --task wic"]  # fmt: skip
    assert not list(docs.rglob("*.tmp"))


def test_model_label():
    assert model_label("smollm2-135m") == "smollm2-135m"
    assert model_label("runs/derivatives/smollm2-135m-sst2lm") == "smollm2-135m-sst2lm"
    assert model_label("./local") == "local"


def test_script_aggregate_only_prints_and_writes_the_tables(heldout_out, tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["evaluate_heldout.py", "--artifact", "art", "--models", ",".join(MODELS),
                                      "--tasks", ",".join(TASKS), "--steps", "10", "--seeds", "0,1,2",
                                      "--out", str(heldout_out), "--docs", str(docs), "--aggregate-only"])  # fmt: skip
    runpy.run_path(str(ROOT / "scripts" / "evaluate_heldout.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed == (docs / "summary.md").read_text()
    assert printed.startswith("# Held-out evaluation: 10 steps, lr 1e-5, batch 8, 32\n")
    assert "| mezo | 2 / 0 / 1 | 3 / 0 / 0 | 3 |" in printed
    commands = (docs / "commands.txt").read_text().splitlines()
    assert commands[1].startswith("l2zo compare --model base --task wsc --data-dir ../shared/data --optimizers "
                                  "learned=art:lr=1e-5,mezo:lr=1e-5,learned-random=art:lr=1e-5,")  # fmt: skip
    assert commands[1].endswith(f"--logdir {heldout_out / 'base' / 'wsc'}")


def test_script_puts_each_task_into_an_optimizer_item_that_names_it(heldout_out, tmp_path, monkeypatch):
    """``{task}`` in --optimizers becomes the task of each compare (a per-task fixed-sigma file)."""
    docs = tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["evaluate_heldout.py", "--artifact", "art", "--models", "base",
                                      "--tasks", ",".join(TASKS), "--out", str(heldout_out), "--docs", str(docs),
                                      "--optimizers", "mezo,fixed-sigma:sigma_file=s/{task}.json:label=own",
                                      "--lr-grid", "1e-4,2e-4", "--aggregate-only"])  # fmt: skip
    runpy.run_path(str(ROOT / "scripts" / "evaluate_heldout.py"), run_name="__main__")
    commands = (docs / "commands.txt").read_text().splitlines()
    assert commands[0] == "l2zo compare --as-recorded"  # base/wic ran and recorded its own command
    assert (
        "--task wsc " in commands[1] and "--optimizers mezo,fixed-sigma:sigma_file=s/wsc.json:label=own " in commands[1]
    )


# ----------------------------------------------------------------------------- paired verdicts by CI
def test_paired_counts_by_ci_on_the_built_compares(heldout_out):
    paired = read_paired(heldout_out, MODELS, TASKS, "learned")
    assert [(r.model, r.task, r.against, r.paired.ci.n) for r in paired] == [
        ("base", "wic", "learned-random", 3), ("base", "wic", "mezo", 3), ("base", "wsc", "learned-random", 2),
        ("base", "wsc", "mezo", 2), ("deriv", "wic", "learned-random", 1), ("deriv", "wic", "mezo", 1)]  # fmt: skip
    assert [r.paired.ci.verdict for r in paired] == ["loss", "win", "tie", "tie", "tie", "tie"]
    # By mean, learned beats mezo on 2 pairs; by CI only base/wic counts: base/wsc has equal losses, deriv/wic
    # one seed, and learned's 0.045 lead over learned-random on base/wsc has a CI that holds 0 with 2 seeds.
    assert paired_counts(paired) == {"learned-random": PairedCount(0, 2, 1, 3, 0, 0),
                                     "mezo": PairedCount(1, 2, 0, 3, 0, 0)}  # fmt: skip
    md = render_md(read_heldout(heldout_out, MODELS, TASKS), "T", "learned", paired)
    assert "| mezo | 1 / 2 / 0 | 3 | not recorded |" in md
    assert "| base | wsc | learned-random | 2 | -0.0450 [-0.1085, +0.0185] | tie | not recorded |" in md


def test_fast_pairs_need_half_the_forwards_at_every_seed(tmp_path):
    out = tmp_path / "out"
    mezo = [(0, 1.0), (10, 0.8), (20, 0.6)]
    learned = {
        "t1": [(0, 1.0), (10, 0.58), (20, 0.5)],  # below mezo's final 0.6 before step 10: ratio < 1/2
        "t2": [(0, 1.0), (10, 0.7), (20, 0.55)],
    }  # crosses 0.6 between steps 10 and 20: ratio 3/4
    for task, curve in learned.items():
        for seed in range(3):
            for opt, dev in (("mezo", mezo), ("learned", curve)):
                write_scalars(out / "m" / task / opt / f"seed{seed}", {
                    "val/loss": [(s, v + 0.01 * seed) for s, v in dev], "test/acc": [(20, 0.5)],
                    "train/forward_passes": [(0, 2.0)]})  # 2 forwards per step  # fmt: skip
        write_report(out / "m" / task)
    paired = read_paired(out, ["m"], ["t1", "t2"], "learned")
    assert [r.paired.ratio for r in paired] == [pytest.approx(0.5 * (1.0 - 0.6) / (1.0 - 0.58)),
                                                pytest.approx(0.5 + 0.5 * (0.7 - 0.6) / (0.7 - 0.55))]  # fmt: skip
    assert paired_counts(paired) == {"mezo": PairedCount(wins=2, ties=0, losses=0, pairs=2, fast=1, fast_known=2)}
    docs = tmp_path / "docs"
    md = write_heldout(out, docs, ["m"], ["t1", "t2"], "T", lambda m, t: "")
    assert "| mezo | 2 / 0 / 0 | 2 | 1/2 |" in md and "| m | t2 | mezo | 3 |" in md
    rows = list(csv.DictReader(io.StringIO((docs / "paired.csv").read_text(), newline="")))
    assert [(r["task"], r["verdict"], r["reached"]) for r in rows] == [("t1", "win", "3/3"), ("t2", "win", "3/3")]


def test_several_champions_each_get_their_counts(heldout_out):
    paired = [r for c in ("learned", "mezo") for r in read_paired(heldout_out, MODELS, TASKS, c)]
    md = render_md(read_heldout(heldout_out, MODELS, TASKS), "T", ["learned", "mezo"], paired)
    assert "## Paired verdicts of `learned`" in md and "## Paired verdicts of `mezo`" in md
    mezo_part = md.split("## Win counts of `mezo`")[1]
    # mezo's section counts mezo against learned (the mirror of learned's 1 win, 2 ties against mezo)
    assert "| learned | 0 / 2 / 1 | 3 | not recorded |" in mezo_part
