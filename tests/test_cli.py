"""End-to-end: `l2zo finetune` and the listing commands, on the shipped tiny model, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from l2zo.cli.main import main

SMALL = ["--num-train", "64", "--num-dev", "32", "--num-test", "32", "--batch-size", "8", "--no-progress"]


def _events(folder: Path) -> list[Path]:
    return list(folder.glob("events.out.tfevents.*"))


def test_finetune_writes_events_and_summary(tmp_path, capsys):
    logdir = tmp_path / "x"
    rc = main(
        [
            "finetune",
            "--model",
            "tiny",
            "--task",
            "synth-sentiment",
            "--optimizer",
            "mezo",
            "--lr",
            "1e-3",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--logdir",
            str(logdir),
            *SMALL,
        ]
    )
    assert rc == 0
    assert _events(logdir)
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps_done"] == 6
    assert [h["step"] for h in summary["dev_history"]] == [0, 3, 6]
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["time_per_step_s"] > 0 and summary["peak_mem_mb"] > 0
    assert yaml.safe_load((logdir / "config.yaml").read_text())["lr"] == 1e-3
    out = capsys.readouterr().out
    assert "test acc" in out
    # TensorBoard received the promised tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/projected_grad",
        "train/step_time_s",
        "train/peak_mem_mb",
        "val/loss",
        "val/acc",
        "test/acc",
    ):
        assert tag in tags, tag
    # A second run into the same folder must be asked for.
    rc = main(
        ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--steps", "1", "--logdir", str(logdir), *SMALL]
    )
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "task": "synth-sentiment",
                "steps": 100,
                "lr": 1e-4,
                "num-train": 32,
                "num_dev": 16,
                "num_test": 16,
                "batch_size": 8,
                "progress": False,
            }
        )
    )
    logdir = tmp_path / "run"
    assert main(["finetune", "--config", str(cfg), "--steps", "2", "--eval-every", "2", "--logdir", str(logdir)]) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["steps_done"] == 2  # the flag won over the file
    assert summary["hparams"]["lr"] == 1e-4  # the file won over the default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "sst3"], "unknown task 'sst3'; valid choices:"),
        (["--optimizer", "adamw"], "unknown optimizer 'adamw'; valid choices:.*mezo"),
        (["--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
        (["--precision", "fp8"], "bad --precision 'fp8'; valid choices: 32, bf16-mixed"),
        (["--steps", "ten"], "bad value for --steps: 'ten' is not a valid int"),
        (["--opt-args", "momentum=0.9"], "no hyperparameter 'momentum'"),
        (["--task", "sst2", "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
        (["--task", "missing.yaml"], "missing.yaml"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    rc = main(["finetune", "--steps", "1", "--logdir", str(tmp_path / "e"), *SMALL, *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("l2zo: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny\nlearning_rate: 0.1\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and "valid keys:" in err


def test_user_yaml_task_with_three_classes_trains_and_evaluates(tmp_path):
    """A 3-class task from files made here: it loads, trains and evaluates end to end."""
    words = {
        "low": ["cold", "ice", "snow", "frost"],
        "mid": ["mild", "calm", "fair", "soft"],
        "high": ["hot", "fire", "sun", "heat"],
    }
    rows = [{"text": f"the day felt {w} and {w2}", "temp": lab} for lab, ws in words.items() for w in ws for w2 in ws]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 2))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::2]))
    task = {
        "name": "weather3",
        "template": "{text}. The weather was",
        "verbalizer": {"low": " cold", "mid": " mild", "high": " hot"},
        "label_field": "temp",
        "data": {"train": "train.jsonl", "test": "test.jsonl"},
    }
    task_file = tmp_path / "weather3.yaml"
    task_file.write_text(yaml.safe_dump(task))
    logdir = tmp_path / "w"
    rc = main(
        [
            "finetune",
            "--model",
            "tiny",
            "--task",
            str(task_file),
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--lr",
            "1e-3",
            "--logdir",
            str(logdir),
            "--num-train",
            "60",
            "--num-dev",
            "20",
            "--num-test",
            "24",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["task"] == "weather3"
    assert summary["split_sizes"] == {"train": 60, "dev": 20, "test": 24}
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] > 0


def test_listing_commands(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "synth-"):
        assert name in out
    assert main(["optimizers"]) == 0
    assert "mezo" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "smollm2-135m" in out


def test_demo_compares_learned_mezo_and_the_random_ablation(tmp_path, capsys):
    """The quick start's main job, with a 3-step budget: the shipped artifact, three optimizers on three paired
    seeds, the table and the paired 95% CIs against mezo."""
    assert main(["demo", "--steps", "3", "--logdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "reusing the learned optimizer" in out
    for run in ("mezo", "learned", "learned-random"):
        for seed in (0, 1, 2):
            assert (tmp_path / "demo" / run / f"seed{seed}").is_dir(), (run, seed)
        assert f"| {run} |" in out
    assert "## Paired against `mezo`" in out
    assert "learned - learned-random (the same net untrained), final dev loss over 3 paired seeds: " in out
    assert (tmp_path / "demo" / "summary.md").is_file()
    for run in ("learned", "learned-random"):  # the ablation is the shipped net's own spec (role embedding), untrained
        hp = json.loads((tmp_path / "demo" / run / "seed0" / "summary.json").read_text())["hparams"]
        assert Path(hp["artifact"]).resolve() == (Path(__file__).resolve().parents[1] / "checkpoints/tiny/zo-finetuner")
    # TensorBoard shows what each net does to every kind of block, step by step; MeZO has no allocation to show.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def sigma_tags(run: str) -> dict[str, list[float]]:
        acc = EventAccumulator(str(tmp_path / "demo" / run / "seed0"))
        acc.Reload()
        return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("sigma/")}

    learned = sigma_tags("learned")
    assert {"sigma/embed_tokens", "sigma/q_proj", "sigma/down_proj"} <= set(learned)
    assert all(len(v) == 1 and v[0] > 0 for v in learned.values()), learned  # the first step's (then every 10th)
    assert learned != sigma_tags("learned-random") and sigma_tags("mezo") == {}


def test_nan_loss_is_one_clear_error_and_a_failed_summary(tmp_path, capsys):
    """An eps so large that the perturbed weights overflow: the loss is NaN, the run stops cleanly."""
    logdir = tmp_path / "nan"
    rc = main(
        [
            "finetune",
            "--model",
            "tiny",
            "--task",
            "synth-color",
            "--eps",
            "1e38",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--logdir",
            str(logdir),
            *SMALL,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss at step 0" in err and "Traceback" not in err
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]


def test_cache_z_changes_nothing_but_speed(tmp_path):
    """--cache-z replays the same z from one copy: the run's dev losses and test accuracy are identical."""
    summaries = []
    for flag in ("--no-cache-z", "--cache-z"):
        logdir = tmp_path / flag
        argv = ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--lr", "1e-3", "--steps", "4",
                "--eval-every", "2", "--logdir", str(logdir), flag, *SMALL]  # fmt: skip
        assert main(argv) == 0
        summaries.append(json.loads((logdir / "summary.json").read_text()))
    a, b = summaries
    assert a["dev_loss_final"] == b["dev_loss_final"] and a["test_acc"] == b["test_acc"]
