"""The evaluation protocol of `l2zo compare`: lr tuned on dev (tuning seeds, short budget), paired seeds, the paired
95% CI against a baseline, win / tie / loss, forwards to reach the baseline's final dev loss, and --resume."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from l2zo.cli.main import main
from l2zo.compare.events import RunRecord, read_run
from l2zo.compare.paired import (
    Curve,
    compare_paired,
    forwards_to_reach,
    paired_ci,
    t_quantile,
    t_two_sided_mass,
)
from l2zo.compare.spec import CompareConfig
from l2zo.compare.summary import build_tables, render_csv, render_md
from l2zo.compare.tuning import DEFAULT_KEY, TunePoint, at_edge, grids_for, parse_grid_text, pick_lr, pool_seeds
from l2zo.config.parser import build_config
from l2zo.errors import L2ZOError

SMALL = ["--model", "tiny", "--task", "synth-color", "--num-train", "32", "--num-dev", "16", "--num-test", "16",
         "--batch-size", "4", "--max-length", "64"]  # fmt: skip


# -------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(("p", "dof", "table"), [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182),
                                                 (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
                                                 (0.995, 5, 4.032), (0.95, 10, 1.812)])  # fmt: skip
def test_t_quantile_matches_the_table(p, dof, table):
    assert t_quantile(p, dof) == pytest.approx(table, abs=5e-4)


def test_t_mass_closed_forms_and_large_dof():
    for t in (0.1, 1.0, 3.0, 20.0):
        assert t_two_sided_mass(t, 1) == pytest.approx(2 / math.pi * math.atan(t), rel=1e-12)  # Cauchy
        assert t_two_sided_mass(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-12)
    assert t_quantile(0.975, 2000) == pytest.approx(1.9600, abs=2e-3)  # toward the normal's 1.95996
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_paired_ci_by_hand():
    ci = paired_ci([-0.05, -0.04, -0.06])  # mean -0.05, sd 0.01, half = 4.3027 * 0.01 / sqrt(3) = 0.024841
    assert ci.n == 3 and ci.mean == pytest.approx(-0.05) and ci.sd == pytest.approx(0.01)
    assert ci.lo == pytest.approx(-0.074841, abs=1e-6) and ci.hi == pytest.approx(-0.025159, abs=1e-6)
    assert ci.verdict == "win"
    wide = paired_ci([0.02, -0.01, 0.005])  # mean 0.005, sd 0.015, half 0.037263: holds 0
    assert (wide.lo, wide.hi) == (pytest.approx(-0.032263, abs=1e-6), pytest.approx(0.042263, abs=1e-6))
    assert wide.verdict == "tie"
    assert paired_ci([0.05, 0.04, 0.06]).verdict == "loss"
    assert paired_ci([0.1, 0.3]).lo == pytest.approx(0.2 - 12.7062 * math.sqrt(0.02) / math.sqrt(2), abs=1e-4)
    one = paired_ci([-0.5])  # one seed: no interval, so never a win
    assert (one.n, one.mean, one.lo, one.hi, one.verdict) == (1, -0.5, None, None, "tie")
    assert paired_ci([]).verdict == "tie" and paired_ci([]).mean is None


def test_forwards_to_reach_interpolates_and_says_not_reached():
    c = Curve(forwards=(0.0, 100.0, 200.0, 300.0), loss=(1.0, 0.8, 0.5, 0.4))
    assert forwards_to_reach(c, 0.6) == pytest.approx(100 + 0.2 / 0.3 * 100)  # between 100 (0.8) and 200 (0.5)
    assert forwards_to_reach(c, 0.8) == 100.0  # exactly at an evaluation
    assert forwards_to_reach(c, 1.5) == 0.0  # already there before the first step
    assert forwards_to_reach(c, 0.39) is None
    bumpy = Curve(forwards=(0.0, 100.0, 200.0), loss=(1.0, 0.5, 0.7))
    assert forwards_to_reach(bumpy, 0.6) == pytest.approx(80.0)  # the first crossing counts


def test_compare_paired_per_seed_targets_ratio_and_unknown_forwards():
    base = {k: Curve((0.0, 100.0, 200.0), (1.0, 0.8, 0.6 + 0.01 * k)) for k in (0, 1, 2)}
    fast = {k: Curve((0.0, 100.0, 200.0), (1.0, 0.5, 0.4 + 0.01 * k)) for k in (0, 1, 2, 3)}  # seed 3: unpaired
    p = compare_paired(fast, base)
    assert p.ci.n == 3 and p.ci.mean == pytest.approx(-0.2) and p.ci.verdict == "win"
    # seed k: base's final 0.6 + 0.01k is crossed between (0, 1.0) and (100, 0.5)
    want = [100 * (0.4 - 0.01 * k) / 0.5 for k in (0, 1, 2)]
    assert p.reach == pytest.approx(tuple(want)) and p.budget == (200.0, 200.0, 200.0)
    assert p.forwards == pytest.approx(statistics.fmean(want)) and p.ratio == pytest.approx(
        statistics.fmean(want) / 200
    )
    slow = {k: Curve((0.0, 100.0, 200.0), (1.0, 0.9, 0.7)) for k in (0, 1, 2)}
    q = compare_paired(slow, base)
    assert q.reached == 0 and q.forwards is None and q.ratio is None and q.ci.verdict == "loss"
    unknown = {k: Curve(None, c.loss) for k, c in fast.items()}
    u = compare_paired(unknown, base)
    assert u.ci.verdict == "win" and not u.forwards_known and u.ratio is None


# -------------------------------------------------------------------------------------------- lr tuning
def test_pick_lr_lowest_dev_loss_among_finished_runs():
    points = [TunePoint(1e-5, 0.60, True), TunePoint(1e-4, 0.40, False),  # lower, but it diverged: never wins
              TunePoint(1e-3, 0.50, True), TunePoint(1e-2, None, False)]  # fmt: skip
    assert pick_lr(points) == 1e-3
    assert pick_lr([TunePoint(1e-4, 0.5, True), TunePoint(1e-5, 0.5, True)]) == 1e-5  # a tie: the smaller lr
    assert pick_lr([TunePoint(1e-4, None, False), TunePoint(1e-3, float("nan"), True)]) is None
    assert at_edge(1e-3, [1e-5, 1e-4, 1e-3]) and at_edge(1e-5, [1e-5, 1e-4]) and not at_edge(1e-4, [1e-5, 1e-4, 1e-3])
    assert not at_edge(1e-4, [1e-4])


def test_pooled_tuning_seeds_score_the_mean_and_drop_an_lr_that_fails_on_any_seed():
    runs = [TunePoint(1e-4, 0.50, True), TunePoint(1e-4, 0.70, True),  # mean 0.60
            TunePoint(1e-3, 0.30, True), TunePoint(1e-3, 0.20, False),  # the best on one seed, diverged on the other
            TunePoint(1e-5, 0.65, True), TunePoint(1e-5, float("nan"), True)]  # fmt: skip
    pooled = pool_seeds(runs)
    assert [p.lr for p in pooled] == [1e-5, 1e-4, 1e-3]
    assert pooled[1] == TunePoint(1e-4, pytest.approx(0.60), True)
    assert not pooled[0].ok and pooled[0].score is None and not pooled[2].ok and pooled[2].score is None
    assert pick_lr(pooled) == 1e-4  # with one seed alone 1e-3 would have won
    assert pick_lr(pool_seeds(runs[2:3] + runs[:1])) == 1e-3


def test_lr_tolerance_picks_the_smallest_lr_within_a_fraction_of_the_best_decrease():
    # start 1.0: decreases 0.40, 0.70, 0.72 (the best), and a larger lr that diverged
    points = [TunePoint(1e-4, 0.60, True, 1.0), TunePoint(2e-4, 0.30, True, 1.0), TunePoint(4e-4, 0.28, True, 1.0),
              TunePoint(8e-4, 0.10, False, 1.0)]  # fmt: skip
    assert pick_lr(points) == pick_lr(points, 0.0) == 4e-4
    assert pick_lr(points, 0.05) == 2e-4  # 0.70 >= 0.95 * 0.72
    assert pick_lr(points, 0.02) == 4e-4  # 0.70 < 0.98 * 0.72
    assert pick_lr(points, 0.5) == 1e-4  # 0.40 >= 0.5 * 0.72
    no_start = [TunePoint(p.lr, p.score, p.ok) for p in points]
    assert pick_lr(no_start, 0.5) == 4e-4  # nothing to measure a decrease from: the lowest score
    rising = [TunePoint(1e-4, 1.10, True, 1.0), TunePoint(2e-4, 1.05, True, 1.0)]
    assert pick_lr(rising, 0.5) == 2e-4  # no lr lowered the loss: the lowest score
    pooled = pool_seeds([TunePoint(1e-4, 0.5, True, 1.0), TunePoint(1e-4, 0.7, True, 0.8),
                         TunePoint(2e-4, 0.4, True, 1.0), TunePoint(2e-4, 0.4, True, None)])  # fmt: skip
    assert (
        pooled[0].start == pytest.approx(0.9) and pooled[1].start is None
    )  # a start is pooled only when every run has one
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(L2ZOError, match=r"--lr-tolerance must be in \[0, 1\)"):
            CompareConfig(lr_grid="1e-4", lr_tolerance=bad)


def test_grid_forms_and_errors():
    assert parse_grid_text("5e-5,1e-5,2e-5") == {DEFAULT_KEY: [1e-5, 2e-5, 5e-5]}
    assert parse_grid_text("1e-5;learned=5e-5,1e-4") == {DEFAULT_KEY: [1e-5], "learned": [5e-5, 1e-4]}
    assert parse_grid_text([1e-5, "2e-5"]) == {DEFAULT_KEY: [1e-5, 2e-5]}
    assert parse_grid_text({"mezo": [1e-5], "default": "1e-4,2e-4"}) == {"mezo": [1e-5], DEFAULT_KEY: [1e-4, 2e-4]}
    assert parse_grid_text(None) == {} and parse_grid_text("") == {}
    labels = ["mezo", "mezo@eps=0.01", "learned", "fo-adam"]
    opt = {"mezo": "mezo", "mezo@eps=0.01": "mezo", "learned": "learned", "fo-adam": "fo-adam"}
    grids = grids_for("1e-3;mezo=1e-5,2e-5;mezo@eps=0.01=3e-5;learned=1e-4", labels, opt)  # a label may hold '='
    assert grids == {"mezo": [1e-5, 2e-5], "mezo@eps=0.01": [3e-5], "learned": [1e-4], "fo-adam": [1e-3]}
    assert grids_for("mezo=1e-5", labels, opt) == {"mezo": [1e-5], "mezo@eps=0.01": [1e-5]}  # fo-adam: not tuned
    for bad, message in [("1e-5,-1", "not a positive number"), ("1e-5,x", "not a positive number"),
                         ("1e-5,1e-5", "repeats"), ("adam=1e-5", "names 'adam', not an optimizer"),
                         ("mezo=;", "no values"), ("mezo=1e-5;mezo=2e-5", "given twice")]:  # fmt: skip
        with pytest.raises(L2ZOError, match=message):
            grids_for(bad, labels, opt)


def test_config_keys_reach_the_compare_config(tmp_path):
    cfg_file = tmp_path / "cmp.yaml"
    cfg_file.write_text("lr_grid: {mezo: [1.0e-5, 2.0e-5], default: [1.0e-4]}\ntune-steps: 7\nbaseline: mezo\n")
    cfg = build_config(CompareConfig, cfg_file, {"tune_seeds": 3})
    assert (cfg.lr_grid, cfg.tune_steps, cfg.tune_seeds, cfg.baseline) == (
        {"mezo": [1e-5, 2e-5], "default": [1e-4]}, 7, 3, "mezo")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr-grid", "1e-4", "--sweep", "eps=1e-3"], "--lr-grid and --sweep do not combine"),
        (["--optimizers", "mezo:lr=1e-4", "--lr-grid", "1e-5"], "fixes lr=0.0001 and --lr-grid tunes it"),
        (["--tune-steps", "3"], "give --lr-grid too"),
        (["--tune-seeds", "3"], "give --lr-grid too"),
        (["--lr-tolerance", "0.05"], "give --lr-grid too"),
        (["--lr-grid", "1e-4", "--lr-tolerance", "1.5"], "--lr-tolerance must be in [0, 1)"),
        (["--lr-grid", "1e-4", "--tune-seeds", "3,3"], "--tune-seeds repeats a seed"),
        (["--lr-grid", "adam=1e-4"], "--lr-grid names 'adam', not an optimizer of this compare"),
        (["--lr-grid", "1e-4,-1"], "not a positive number"),
        (["--lr-grid", "1e-4", "--tune-steps", "0"], "--tune-steps must be positive"),
        (["--baseline", "zo-adam"], "--baseline 'zo-adam' is not an optimizer of this compare"),
    ],
)
def test_tuning_mistakes_fail_fast_with_one_line(tmp_path, capsys, args, message):
    logdir = tmp_path / "e"
    rc = main(["compare", *SMALL, "--optimizers", "mezo", "--steps", "1", "--logdir", str(logdir), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("l2zo: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not logdir.exists()


# ------------------------------------------------------------------------------------------ paired table
def _run(label: str, seed: int, dev: list[tuple[int, float]], order: int, **config) -> RunRecord:
    return RunRecord(label=label, seed=seed, path=f"{label}/seed{seed}", optimizer=label, base=label, order=order,
                     hparams={"lr": 1e-4}, forwards_per_step=2, config=config, scalars={"val/loss": dev},
                     tuned={"grid": [1e-5, 1e-4, 1e-3], "picked": 1e-4, "tune_steps": 50, "tune_seeds": [0]})  # fmt: skip


def _fake_compare(baseline: str | None) -> list[RunRecord]:
    """learned (listed first) wins, learned-random ties, zo-adam loses against mezo, seed by seed."""
    cfg = {"baseline": baseline} if baseline else {}
    runs = []
    for k in (0, 1, 2):
        ref = 0.6 + 0.01 * k
        runs += [_run("learned", k, [(0, 1.0), (50, 0.5), (100, ref - 0.2)], 0, **cfg),
                 _run("mezo", k, [(0, 1.0), (50, 0.8), (100, ref)], 1, **cfg),
                 _run("learned-random", k, [(0, 1.0), (50, 0.9), (100, ref + [0.02, -0.01, 0.005][k])], 2, **cfg),
                 _run("zo-adam", k, [(0, 1.0), (50, 0.9), (100, ref + 0.1 + 0.01 * k)], 3, **cfg)]  # fmt: skip
    return runs


def test_paired_table_against_the_recorded_baseline():
    tables = build_tables(_fake_compare("mezo"))
    stats = {row.label: row.stats for row in tables["rows"]}
    assert tables["baseline"].label == "mezo"
    assert [stats[x]["verdict"] for x in ("learned", "mezo", "learned-random", "zo-adam")] == [
        "win", "baseline", "tie", "loss"]  # fmt: skip
    s = stats["learned"]
    assert s["paired_seeds"] == 3 and s["diff_vs_baseline_mean"] == pytest.approx(-0.2)
    assert s["diff_ci_low"] == pytest.approx(-0.2, abs=1e-9) and s["diff_ci_high"] < 0
    reach = [2 * 50 * (0.4 - 0.01 * k) / 0.5 for k in (0, 1, 2)]  # steps to cross, x 2 forwards per step
    assert s["forwards_to_baseline_final"] == pytest.approx(statistics.fmean(reach))
    assert s["forwards_ratio"] == pytest.approx(statistics.fmean(reach) / 200) and s["baseline_final_reached"] == "3/3"
    r = stats["learned-random"]
    assert (r["diff_ci_low"], r["diff_ci_high"]) == (
        pytest.approx(-0.032263, abs=1e-6),
        pytest.approx(0.042263, abs=1e-6),
    )
    assert r["baseline_final_reached"] == "1/3" and r["forwards_ratio"] is None  # only seed 1 got below mezo
    assert r["forwards_to_baseline_final"] == pytest.approx(2 * (50 + (0.9 - 0.61) / (0.9 - 0.60) * 50))
    assert (
        stats["zo-adam"]["baseline_final_reached"] == "0/3" and stats["zo-adam"]["forwards_to_baseline_final"] is None
    )
    assert stats["mezo"]["forwards_to_baseline_final"] == 200.0 and stats["mezo"]["forwards_ratio"] == 1.0

    md = render_md(tables, "exp", [])
    assert "## Paired against `mezo` (3 paired seeds, 95% CI)" in md
    assert "| learned | 0.0001 (tuned) | 0.4100 ± 0.0100 | -0.2000 [-0.2000, -0.2000] | win | 78 | 0.39 |" in md
    assert "| mezo | 0.0001 (tuned) | 0.6100 ± 0.0100 | — | baseline | 200 (its run) | 1.00 |" in md
    assert "| learned-random | 0.0001 (tuned) | 0.6150 ± 0.0132 | +0.0050 [-0.0323, +0.0423] | tie | 197 (1/3 seeds) | — |" in md  # fmt: skip
    assert "| zo-adam | 0.0001 (tuned) | 0.7200 ± 0.0200 | +0.1100 [+0.0852, +0.1348] | loss | not reached | — |" in md
    rows = {r["run"]: r for r in csv.DictReader(render_csv(tables).splitlines())}
    assert rows["learned"]["verdict"] == "win" and rows["zo-adam"]["baseline"] == "mezo"
    assert float(rows["learned-random"]["diff_ci_high"]) == pytest.approx(0.042263, abs=1e-6)


def test_baseline_defaults_to_the_first_optimizer_listed():
    tables = build_tables(_fake_compare(None))
    assert tables["baseline"].label == "learned"
    assert {row.label: row.stats["verdict"] for row in tables["rows"]} == {
        "learned": "baseline", "mezo": "loss", "learned-random": "loss", "zo-adam": "loss"}  # fmt: skip


# -------------------------------------------------------------------------- end to end on the tiny model
ARGV = [*SMALL, "--optimizers", "mezo,zo-sgd-sign", "--lr-grid", "mezo=1e-4,1e-3,1e9;zo-sgd-sign=1e9", "--steps",
        "4", "--tune-steps", "2", "--eval-every", "2", "--seeds", "0,1,2"]  # fmt: skip


@pytest.fixture(scope="module")
def tuned_compare(tmp_path_factory) -> tuple[Path, int]:
    """mezo tuned over 3 lrs (1e9 diverges), zo-sgd-sign over 1e9 alone (nothing finishes), then 3 seeds each."""
    logdir = tmp_path_factory.mktemp("tuned") / "exp"
    return logdir, main(["compare", *ARGV, "--logdir", str(logdir)])


def _tuning(logdir: Path) -> list[dict[str, str]]:
    with open(logdir / "tuning.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tuning_picks_the_lowest_dev_loss_and_every_seed_runs_it(tuned_compare, capsys):
    logdir, rc = tuned_compare
    assert rc == 1  # zo-sgd-sign had no lr to run at: its seeds failed; failed tuning runs alone would not count
    tuning = _tuning(logdir)
    assert [(r["run"], r["lr"]) for r in tuning] == [("mezo", "0.0001"), ("mezo", "0.001"),
                                                     ("mezo", "1000000000.0"), ("zo-sgd-sign", "1000000000.0")]  # fmt: skip
    assert all(r["seeds"] == "0" and r["steps"] == "2" for r in tuning)
    for r in tuning:
        run = read_run(logdir / "tune" / r["run"] / f"lr={r['lr']}" / "seed0", logdir)
        assert run.phase == "tune" and run.hparams["lr"] == float(r["lr"]) and run.config["tune_steps"] == 2
        if run.ok:
            assert json.loads((logdir / run.path / "summary.json").read_text())["steps_done"] == 2
    diverged = [r for r in tuning if r["lr"] == "1000000000.0"]
    assert all(r["status"].startswith("failed") and r["score"] == "" and r["picked"] == "0" for r in diverged)
    finished = [r for r in tuning if r["run"] == "mezo" and r["status"] == "ok"]
    best = min(finished, key=lambda r: float(r["score"]))
    assert [r["picked"] for r in finished] == ["1" if r is best else "0" for r in finished]
    picked = float(best["lr"])
    state = json.loads((logdir / "compare.json").read_text())
    assert state["tuning"]["mezo"]["picked"] == picked and state["tuning"]["zo-sgd-sign"]["picked"] is None

    digests = set()
    for seed in (0, 1, 2):  # the picked lr at every seed, the full budget, the seed's own batches
        run = read_run(logdir / "mezo" / f"seed{seed}", logdir)
        assert run.ok and run.phase == "run" and run.hparams["lr"] == picked and run.tuned["picked"] == picked
        summary = json.loads((logdir / "mezo" / f"seed{seed}" / "summary.json").read_text())
        assert summary["steps_done"] == 4
        digests.add(summary["batch_digest"])
        other = read_run(logdir / "zo-sgd-sign" / f"seed{seed}", logdir)
        assert other.status == "failed" and other.reason.startswith("lr tuning: no lr of the grid [1000000000.0]")
    assert len(digests) == 3

    md = (logdir / "summary.md").read_text()
    assert "## lr tuning (seed 0, 2 steps per lr; picked on the final dev loss, never on test)" in md
    assert "## Paired against `mezo` (3 paired seeds, 95% CI)" in md
    assert "| zo-sgd-sign | none (no lr of the grid finished) | — | — | — | — | — |" in md
    assert "Same batches: yes" in md  # the tuning runs (2 steps) are not mixed into the check


def test_several_tuning_seeds_run_every_lr_on_each_and_pick_the_lowest_mean(tmp_path):
    logdir = tmp_path / "exp"
    argv = [*SMALL, "--optimizers", "mezo", "--lr-grid", "1e-4,1e-3", "--tune-seeds", "5,6", "--steps", "2",
            "--tune-steps", "2", "--eval-every", "2", "--seeds", "0", "--logdir", str(logdir)]  # fmt: skip
    assert main(["compare", *argv]) == 0
    tuning = _tuning(logdir)
    assert [(r["lr"], r["seeds"]) for r in tuning] == [("0.0001", "5,6"), ("0.001", "5,6")]
    means = {}
    for r in tuning:
        finals = [read_run(logdir / "tune" / "mezo" / f"lr={r['lr']}" / f"seed{k}", logdir).series("val/loss")[-1][1]
                  for k in (5, 6)]  # fmt: skip
        means[r["lr"]] = statistics.fmean(finals)
        assert float(r["score"]) == pytest.approx(means[r["lr"]])
    picked = min(means, key=means.__getitem__)
    assert [r["lr"] for r in tuning if r["picked"] == "1"] == [picked]
    run = read_run(logdir / "mezo" / "seed0", logdir)
    assert run.hparams["lr"] == float(picked) and run.tuned["tune_seeds"] == [5, 6]
    assert "## lr tuning (seeds 5, 6, mean, 2 steps per lr;" in (logdir / "summary.md").read_text()


def _spy_runs(monkeypatch) -> list[Path]:
    """The run folders that fine-tune from now on (each compare run goes through ``run_finetune``), in order."""
    from l2zo.train import finetune

    trained: list[Path] = []
    original = finetune.run_finetune

    def spy(cfg, overwrite=False):
        trained.append(Path(cfg.logdir))
        return original(cfg, overwrite=overwrite)

    monkeypatch.setattr(finetune, "run_finetune", spy)
    return trained


def test_resume_skips_finished_tuning_and_seed_runs(tuned_compare, tmp_path, monkeypatch):
    src, _ = tuned_compare
    logdir = tmp_path / "exp"
    shutil.copytree(src, logdir)
    picked = next(r["lr"] for r in _tuning(logdir) if r["picked"] == "1")
    killed = [logdir / "tune" / "mezo" / f"lr={picked}" / "seed0", logdir / "mezo" / "seed1"]
    for folder in killed:  # what a kill leaves: a summary that never got past "running"
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    events = {
        p: p.stat().st_mtime_ns
        for p in logdir.rglob("events.out.tfevents.*")
        if (p.parent / "summary.json").is_file() and p.parent not in killed
    }  # the runs that ran and finished
    trained = _spy_runs(monkeypatch)
    assert main(["compare", *ARGV, "--logdir", str(logdir)]) == 2  # without --resume: refused
    assert main(["compare", *ARGV, "--logdir", str(logdir), "--resume"]) == 1
    assert trained == killed  # only the killed runs ran again; diverged and finished tuning runs were kept
    assert {p: p.stat().st_mtime_ns for p in events if p.exists()} == events
    assert read_run(logdir / "mezo" / "seed1", logdir).hparams["lr"] == float(picked)
    assert json.loads((logdir / "compare.json").read_text())["tuning"]["mezo"]["picked"] == float(picked)

    # Resumed with another grid (the pick's lr left out): no tuning run again, every seed again at the new pick.
    other = next(r["lr"] for r in _tuning(logdir) if r["run"] == "mezo" and r["status"] == "ok" and r["picked"] == "0")
    grid = ARGV.index("--lr-grid") + 1
    argv = [*ARGV[:grid], f"mezo={other},1e9;zo-sgd-sign=1e9", *ARGV[grid + 1 :]]
    trained.clear()
    assert main(["compare", *argv, "--logdir", str(logdir), "--resume"]) == 1
    assert trained == [logdir / "mezo" / f"seed{k}" for k in (0, 1, 2)]
    assert all(read_run(logdir / "mezo" / f"seed{k}", logdir).hparams["lr"] == float(other) for k in (0, 1, 2))
    shown = [(r["lr"], r["picked"]) for r in _tuning(logdir) if r["run"] == "mezo"]
    assert shown == [(other, "1"), ("1000000000.0", "0")]  # the grid that ran, not the old points still on disk


def test_resume_with_lr_tolerance_repicks_from_the_kept_tuning_runs(tuned_compare, tmp_path, monkeypatch):
    """The sensitivity check of the pick rule: the same tuning runs, picked with --lr-tolerance; only the seeds
    of an optimizer whose pick moves run again, at the new lr, and the record says which rule picked it."""
    src, _ = tuned_compare
    logdir = tmp_path / "exp"
    shutil.copytree(src, logdir)
    runs = {lr: read_run(logdir / "tune" / "mezo" / f"lr={lr}" / "seed0", logdir) for lr in ("0.0001", "0.001")}
    drop = {lr: r.series("val/loss")[0][1] - r.series("val/loss")[-1][1] for lr, r in runs.items()}
    assert runs["0.001"].series("val/loss")[0][0] == 0 and 0 < drop["0.0001"] < drop["0.001"]  # the premise
    assert json.loads((logdir / "compare.json").read_text())["tuning"]["mezo"]["picked"] == 1e-3
    tolerance = 1 - drop["0.0001"] / drop["0.001"] + 1e-3  # just wide enough to let 1e-4 in
    trained = _spy_runs(monkeypatch)
    argv = ["compare", *ARGV, "--logdir", str(logdir), "--resume", "--lr-tolerance", f"{tolerance:.6f}"]
    assert main(argv) == 1  # zo-sgd-sign still has no lr that finished
    assert trained == [logdir / "mezo" / f"seed{k}" for k in (0, 1, 2)]  # no tuning run again
    for k in (0, 1, 2):
        run = read_run(logdir / "mezo" / f"seed{k}", logdir)
        assert run.hparams["lr"] == 1e-4 and run.tuned["tolerance"] == pytest.approx(tolerance, abs=1e-6)
    assert [(r["lr"], r["picked"]) for r in _tuning(logdir) if r["run"] == "mezo"] == [
        ("0.0001", "1"), ("0.001", "0"), ("1000000000.0", "0")]  # fmt: skip
    assert "- Picked with --lr-tolerance 0." in (logdir / "summary.md").read_text()


def test_repick_says_which_picks_a_tolerance_would_move_without_running(tuned_compare, capsys):
    import importlib.util

    from l2zo.compare.events import load_experiment
    from l2zo.compare.protocol import repick

    logdir, _ = tuned_compare
    runs = load_experiment(logdir)
    assert repick(runs, 0.0) == {"mezo": (1e-3, 1e-3, 1e-3), "zo-sgd-sign": (None, None, None)}
    assert repick(runs, 0.999)["mezo"] == (1e-3, 1e-3, 1e-4)  # 1e-4 lowered the loss a little (the premise above)
    spec = importlib.util.spec_from_file_location(
        "lr_tolerance", Path(__file__).parents[1] / "scripts" / "lr_tolerance.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(logdir), "--tolerance", "0.999"]) == 0
    out = capsys.readouterr().out
    assert f"| {logdir} | mezo | 0.001 | 0.001 | **0.0001** |" in out and "1 of 2 picks move." in out
    assert script.main([str(logdir / "mezo"), "--tolerance", "0.05"]) == 2  # not a compare folder
    assert script.main([str(logdir), "--tolerance", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_resume_refuses_a_kept_run_made_with_another_optimizer_or_other_artifact_weights(tmp_path, capsys):
    """A label reused for another optimizer or other settings, or a re-made artifact at the same path, would mix two
    experiments."""
    repo = Path(__file__).resolve().parents[1]
    art = tmp_path / "art"
    shutil.copytree(repo / "docs" / "results" / "meta-tiny" / "tiny-greedy", art)
    logdir = tmp_path / "exp"
    argv = [*SMALL, "--steps", "2", "--eval-every", "2", "--seeds", "0", "--logdir", str(logdir)]
    assert main(["compare", *argv, "--optimizers", f"mezo:lr=1e-4,learned={art}:lr=1e-4"]) == 0
    summary = json.loads((logdir / "learned" / "seed0" / "summary.json").read_text())
    assert summary["artifact_sha256"] == json.loads((art / "l2zo_artifact.json").read_text())["weights_sha256"]
    assert main(["compare", *argv, "--optimizers", f"mezo:lr=1e-4,learned={art}:lr=1e-4", "--resume"]) == 0
    capsys.readouterr()

    assert main(["compare", *argv, "--optimizers", "zo-sgd-mmt:lr=1e-4:label=mezo", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "mezo/seed0 holds a finished run of 'mezo' made with mezo, not zo-sgd-mmt; give the item another label" in err
    )

    # the same optimizer and label with a setting edited (what a script's edit does): its kept runs are not these
    assert main(["compare", *argv, "--optimizers", "mezo:lr=1e-4:eps=0.01", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mezo/seed0 holds a finished run of 'mezo' made with eps=0.001, not eps=0.01; give the item another" in err
    assert main(["compare", *argv, "--optimizers", f"learned={art}:lr=1e-4:permute_seed=0", "--resume"]) == 2
    assert "made with permute_seed=None, not permute_seed=0" in capsys.readouterr().err
    assert main(["compare", *argv, "--optimizers", "mezo:lr=2e-4", "--resume"]) == 2  # a fixed lr is a setting too
    assert "made with lr=0.0001, not lr=0.0002" in capsys.readouterr().err

    shutil.rmtree(art)  # the same path, another net
    shutil.copytree(repo / "docs" / "results" / "meta-tiny" / "tiny-greedy-role", art)
    assert main(["compare", *argv, "--optimizers", f"learned={art}:lr=1e-4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"learned/seed0 holds a finished run of 'learned' made with other weights at {art}" in err
    assert len(err.splitlines()) == 1
