"""`l2zo compare` and `l2zo report` end to end on the shipped tiny model, plus the spec parser and the sweep rule."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from l2zo.cli.main import main
from l2zo.compare.events import RunRecord, divergence_reason
from l2zo.compare.spec import parse_optimizers, parse_sweep
from l2zo.compare.summary import build_tables
from l2zo.config import parse_scalar
from l2zo.errors import L2ZOError

SMALL = ["--model", "tiny", "--task", "synth-sentiment", "--num-train", "32", "--num-dev", "16", "--num-test", "16",
         "--batch-size", "4", "--max-length", "64"]  # fmt: skip
KNOWN = ["mezo", "zo-adam", "zo-sgd-sign", "learned"]
SUMMARY_FILES = ("summary.md", "summary.csv")
PNGS = ("dev_loss_vs_steps.png", "dev_loss_vs_forwards.png", "dev_loss_vs_time.png", "test_acc.png")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    """One compare shared by the tests below: 2 optimizers x 2 seeds x 6 steps."""
    logdir = tmp_path_factory.mktemp("cmp") / "exp"
    rc = main(["compare", *SMALL, "--optimizers", "mezo:lr=1e-3,zo-sgd-sign:lr=1e-4", "--steps", "6",
               "--eval-every", "3", "--seeds", "0,1", "--logdir", str(logdir)])  # fmt: skip
    assert rc == 0
    return logdir


def test_compare_layout_tables_plots_and_same_batches(compare_dir):
    for opt in ("mezo", "zo-sgd-sign"):
        for seed in (0, 1):
            run = compare_dir / opt / f"seed{seed}"
            assert list(run.glob("events.out.tfevents.*")), run
            assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    for name in (*SUMMARY_FILES, *PNGS):
        assert (compare_dir / name).stat().st_size > 0, name
    rows = _rows(compare_dir / "summary.csv")
    assert list(rows) == ["mezo", "zo-sgd-sign"]
    assert rows["mezo"]["status"] == "ok" and rows["mezo"]["seeds_ok"] == "2"
    assert "lr=0.001" in rows["mezo"]["hyperparameters"] and "lr=0.0001" in rows["zo-sgd-sign"]["hyperparameters"]
    assert 0.0 <= float(rows["zo-sgd-sign"]["test_acc_mean"]) <= 1.0
    assert rows["mezo"]["forwards_per_step"] == "2" and float(rows["mezo"]["time_per_step_s"]) > 0
    md = (compare_dir / "summary.md").read_text()
    assert "steps to ref" in md and "`mezo`'s final dev loss" in md and "Same batches: yes" in md

    # Every optimizer saw the same batches in the same order at a seed; another seed, another order.
    def digest(opt: str, seed: int) -> str:
        return json.loads((compare_dir / opt / f"seed{seed}" / "summary.json").read_text())["batch_digest"]

    assert digest("mezo", 0) == digest("zo-sgd-sign", 0)
    assert digest("mezo", 1) == digest("zo-sgd-sign", 1)
    assert digest("mezo", 0) != digest("mezo", 1)


def test_report_rebuilds_the_same_tables_from_events_alone(compare_dir, capsys):
    before = {n: (compare_dir / n).read_text() for n in SUMMARY_FILES}
    for f in [*(compare_dir / n for n in (*SUMMARY_FILES, *PNGS)), *compare_dir.rglob("summary.json"),
              *compare_dir.rglob("config.yaml"), *compare_dir.rglob("hparams.yaml")]:  # fmt: skip
        f.unlink()
    assert main(["report", str(compare_dir)]) == 0
    assert "| mezo |" in capsys.readouterr().out
    assert {n: (compare_dir / n).read_text() for n in SUMMARY_FILES} == before
    assert all((compare_dir / p).is_file() for p in PNGS)


def test_report_on_one_seed_folder_names_the_experiment_folder(compare_dir, capsys):
    seed = compare_dir / "mezo" / "seed0"
    before = sorted(p.name for p in seed.iterdir())
    assert main(["report", str(seed)]) == 2
    err = capsys.readouterr().err
    assert "is one run of a compare" in err and err.rstrip().endswith(str(compare_dir)) and err.count("\n") == 1
    assert sorted(p.name for p in seed.iterdir()) == before


def test_failing_optimizers_are_reported_and_the_others_finish(tmp_path, monkeypatch, capsys):
    from l2zo.optim.methods.zo_sgd_variants import ZOSGDSign

    def boom(self, closure=None):
        raise RuntimeError("boom in step")

    monkeypatch.setattr(ZOSGDSign, "step", boom)
    logdir = tmp_path / "fail"
    rc = main(["compare", *SMALL, "--optimizers", "mezo:lr=1e-3,mezo:lr=1e9,zo-sgd-sign", "--steps", "3",
               "--eval-every", "3", "--seeds", "0", "--logdir", str(logdir)])  # fmt: skip
    assert rc == 1  # the compare finished, but not every run did
    assert "2 of 3 runs failed" in capsys.readouterr().err
    rows = _rows(logdir / "summary.csv")
    assert list(rows) == ["mezo@lr=0.001", "mezo@lr=1000000000.0", "zo-sgd-sign"]
    assert rows["mezo@lr=0.001"]["status"] == "ok" and rows["mezo@lr=0.001"]["test_acc_mean"]
    assert re.match(r"failed \(1/1 seeds\): seed0: (non-finite loss|diverged)", rows["mezo@lr=1000000000.0"]["status"])
    assert rows["zo-sgd-sign"]["status"] == "failed (1/1 seeds): seed0: RuntimeError: boom in step"
    assert rows["zo-sgd-sign"]["test_acc_mean"] == ""
    assert (logdir / "mezo@lr=0.001" / "seed0" / "summary.json").is_file()


def test_sweep_picks_on_dev_and_reports_the_choice(tmp_path):
    logdir = tmp_path / "sweep"
    rc = main(["compare", *SMALL, "--optimizers", "mezo", "--sweep", "lr=1e-5,1e-2", "--steps", "2",
               "--eval-every", "2", "--seeds", "0", "--logdir", str(logdir)])  # fmt: skip
    assert rc == 0
    with open(logdir / "sweep.csv", newline="") as f:
        points = list(csv.DictReader(f))
    assert [p["point"] for p in points] == ["lr=1e-05", "lr=0.01"]
    best = min(points, key=lambda p: float(p["dev_loss_final_mean"]))
    assert [p["chosen"] for p in points] == ["1" if p is best else "0" for p in points]
    (chosen,) = _rows(logdir / "summary.csv")
    assert chosen == f"mezo/{best['point']}"
    assert (logdir / "mezo" / "lr=1e-05" / "seed0").is_dir()
    assert "## Sweep (picked on the final dev loss" in (logdir / "summary.md").read_text()


def _fake(dev_final: float, test_acc: float, lr: float) -> RunRecord:
    scalars = {"val/loss": [(0, 1.0), (5, dev_final)], "test/acc": [(5, test_acc)]}
    return RunRecord(label=f"mezo/lr={lr}", seed=0, path="", optimizer="mezo", base="mezo", sweep={"lr": lr},
                     hparams={"lr": lr}, scalars=scalars)  # fmt: skip


def test_sweep_selection_never_looks_at_test():
    runs = [_fake(0.60, 0.50, 1e-4), _fake(0.70, 0.99, 1e-3)]  # b is better on test, worse on dev
    tables = build_tables(runs)
    assert [r.label for r in tables["rows"]] == ["mezo/lr=0.0001"]
    assert [s["chosen"] for s in tables["sweep_rows"]] == [True, False]


def test_divergence_rule():
    assert divergence_reason([(0, 0.7), (3, 0.8)]) is None
    assert "10x the initial" in divergence_reason([(0, 0.7), (3, 7.5)])
    assert "nan" in divergence_reason([(0, 0.7), (3, float("nan"))])


def test_spec_parsing():
    specs = parse_optimizers("mezo:lr=1e-4,eps=1e-2,zo-adam,learned=/a/art", KNOWN, {"zo-adam": {"lr": "1e-3"}})
    assert [(s.label, s.optimizer, s.hparams) for s in specs] == [
        ("mezo", "mezo", {"lr": 1e-4, "eps": 1e-2}), ("zo-adam", "zo-adam", {"lr": "1e-3"}),
        ("learned", "learned", {"artifact": "/a/art"})]  # fmt: skip
    specs = parse_optimizers("mezo:lr=1e-5,mezo:lr=1e-4:eps=0.01", KNOWN, {"mezo": {"eps": 0.1}})
    assert [s.label for s in specs] == ["mezo@lr=1e-05", "mezo@lr=0.0001,eps=0.01"]
    assert specs[0].hparams == {"eps": 0.1, "lr": 1e-5}  # the file fills what the list leaves
    assert parse_scalar("1e-4") == 1e-4 and parse_scalar("3") == 3 and parse_scalar("true") is True
    assert parse_sweep("lr=1e-7,1e-6;eps=1e-3") == [{"lr": 1e-7, "eps": 1e-3}, {"lr": 1e-6, "eps": 1e-3}]
    with pytest.raises(L2ZOError, match="twice with the same settings"):
        parse_optimizers("mezo,mezo", KNOWN, {})
    # label= names a run: a repeat keeps the label it was given, and the file can address it
    specs = parse_optimizers("learned=/a/v1:label=learned,learned=/b/v2:label=learned-es", KNOWN,
                             {"learned-es": {"lr": 2e-4}})  # fmt: skip
    assert [(s.label, s.hparams) for s in specs] == [
        ("learned", {"artifact": "/a/v1"}), ("learned-es", {"lr": 2e-4, "artifact": "/b/v2"})]  # fmt: skip
    with pytest.raises(L2ZOError, match="plain name"):
        parse_optimizers("mezo:label=a/b", KNOWN, {})
    with pytest.raises(L2ZOError, match="twice with the same settings"):
        parse_optimizers("mezo:label=x,zo-adam:label=x", KNOWN, {})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "mezo,adamw"], "unknown optimizer 'adamw' in --optimizers; valid choices:"),
        (["--optimizers", "mezo:momentum=0.9"], "'mezo': optimizer 'mezo' has no hyperparameter 'momentum'"),
        (["--optimizers", "mezo:lr"], "bad --optimizers item 'mezo:lr'"),
        (["--optimizers", "mezo,mezo"], "'mezo' twice with the same settings"),
        (["--optimizers", "learned"], "'learned' needs an artifact folder"),
        (["--optimizers", "learned=/no/such/artifact"], "/no/such/artifact"),
        (["--optimizers", "mezo", "--sweep", "lr"], "bad --sweep 'lr'"),
        (["--optimizers", "mezo", "--seeds", "a,b"], "bad --seeds 'a,b'"),
        (["--optimizers", "mezo", "--opt-config", "/no/such.yaml"], "--opt-config file not found"),
        (["--optimizers", "mezo", "--select", "test"], "bad --select 'test'"),
        (["--optimizers", "mezo", "--task", "sst3"], "unknown task 'sst3'"),
    ],
)
def test_user_errors_fail_fast_with_one_line(tmp_path, capsys, args, message):
    logdir = tmp_path / "e"
    rc = main(["compare", "--steps", "1", "--logdir", str(logdir), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("l2zo: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not logdir.exists()  # nothing ran


def test_report_on_a_folder_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err


def test_config_file_keys_and_flags_win(tmp_path):
    import yaml

    from l2zo.compare.spec import CompareConfig, load_opt_config, parse_seeds
    from l2zo.config.parser import build_config

    cfg_file = tmp_path / "cmp.yaml"
    cfg_file.write_text(yaml.safe_dump({"optimizers": ["mezo", "zo-adam:lr=1e-4"], "seeds": [0, 1, 2], "steps": 9,
                                        "sweep": {"lr": ["1e-5", "1e-4"]}, "opt_config": {"mezo": {"lr": "1e-3"}}}))  # fmt: skip
    cfg = build_config(CompareConfig, cfg_file, {"steps": 4})
    assert cfg.steps == 4 and parse_seeds(cfg.seeds) == [0, 1, 2]
    assert [(s.label, s.hparams) for s in parse_optimizers(cfg.optimizers, KNOWN, {})] == [
        ("mezo", {}), ("zo-adam", {"lr": 1e-4})]  # fmt: skip
    assert parse_sweep(cfg.sweep) == [{"lr": 1e-5}, {"lr": 1e-4}]
    assert load_opt_config(cfg.opt_config) == {"mezo": {"lr": 1e-3}}
