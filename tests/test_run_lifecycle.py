"""Runs that never lie, and run folders that stay consistent (issue 12, items 4, 5 and 8).

Every way a run ends (done, user error, NaN, SIGTERM, SIGINT, an exception) leaves a summary.json whose
``status`` says which, in strict JSON, with one line on stderr and a non-zero exit for anything but done;
for ``l2zo finetune``, each run of ``l2zo compare`` and ``l2zo meta-train``. The signal tests start the
real CLI in a subprocess, wait until it is training, and signal it, as a user or a scheduler would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from l2zo.cli.main import main
from l2zo.utils.io import atomic_dir, dumps_strict, write_json_atomic, write_text_atomic
from l2zo.utils.rundir import LOCK_FILE, locked_run_folder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--task", "synth-color", "--num-train", "32", "--num-dev", "16", "--num-test", "16",
         "--batch-size", "8", "--max-length", "64", "--no-progress"]  # fmt: skip
META = ["--model", "tiny", "--tasks", "synth-sentiment,synth-parity", "--num-train", "24", "--num-dev", "8",
        "--batch-size", "4", "--max-length", "40", "--reset-every", "4", "--p-teacher", "0.5", "--no-progress"]  # fmt: skip
LONG = "100000"  # steps: a run that is surely still going when the signal comes


def strict_load(path: Path) -> dict:
    """Parse JSON the way strict readers do: NaN and Infinity are errors."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


# ------------------------------------------------------------------------------------ the CLI in a subprocess


def _default_signals() -> None:
    # A shell starts background jobs with SIGINT ignored, and a run keeps an ignored signal ignored (as it
    # should): give the child the dispositions a user's terminal gives it, whatever ran this test suite.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "l2zo", *argv], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_signals)  # fmt: skip


def training(logdir: Path) -> Callable[[], bool]:
    """True once the run folder holds a TensorBoard events file (the first logged evaluation or step)."""
    return lambda: any(logdir.glob("events.out.tfevents.*")) and (logdir / "summary.json").is_file()


def stop(proc: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("l2zo:")]
    return lines[-1] if lines else ""


# ------------------------------------------------------------- real commands, signalled once they train


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """finetune (SIGTERM and SIGINT), compare and meta-train (SIGTERM), started together as subprocesses and
    each signalled once it trains: name -> (exit status, stderr, run folder). While the SIGTERM finetune runs,
    a second run into its folder is tried here: its (status, stderr) under "second"."""
    root = tmp_path_factory.mktemp("signals")
    steps = ["--steps", LONG, "--eval-every", "5"]
    cases = {
        "finetune-term": (signal.SIGTERM, ["finetune", *SMALL, *steps, "--logdir", str(root / "ft-term")], "ft-term"),
        "finetune-int": (signal.SIGINT, ["finetune", *SMALL, *steps, "--logdir", str(root / "ft-int")], "ft-int"),
        "compare-term": (signal.SIGTERM, ["compare", *SMALL, "--optimizers", "mezo,zo-sgd-sign", *steps,
                                          "--logdir", str(root / "cmp")], "cmp/mezo/seed0"),
        "meta-term": (signal.SIGTERM, ["meta-train", *META, "--steps", LONG, "--checkpoint-every", "1000",
                                       "--logdir", str(root / "meta"), "--output", str(root / "meta-art")], "meta"),
    }  # fmt: skip
    procs = {name: start(*argv) for name, (_, argv, _) in cases.items()}
    results: dict[str, tuple[int, str, Path]] = {}
    try:
        pending = dict(cases)
        t0 = time.monotonic()
        while pending:  # signal each as soon as it trains, so that none trains on while the others start
            assert time.monotonic() - t0 < 900, f"{sorted(pending)} did not start training"
            for name, (signum, _, ready) in list(pending.items()):
                if procs[name].poll() is not None:
                    out, err_text = procs[name].communicate()
                    pytest.fail(f"{name} ended (exit {procs[name].returncode}) before it trained:\n{out}\n{err_text}")
                if not training(root / ready)():
                    continue
                if name == "finetune-term":
                    err = io.StringIO()
                    with contextlib.redirect_stderr(err):
                        rc = main(["finetune", *SMALL, "--steps", "1", "--logdir", str(root / ready), "--overwrite"])
                    results["second"] = (rc, err.getvalue(), root / ready)
                rc, err_text = stop(procs[name], signum)
                results[name] = (rc, err_text, root / ready.split("/")[0])
                del pending[name]
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_sigterm_stops_finetune_as_interrupted(signalled):
    rc, err, logdir = signalled["finetune-term"]
    assert rc == 128 + signal.SIGTERM  # 143, not Lightning's silent 0
    assert last_line(err).startswith("l2zo: interrupted by SIGTERM; stopped at step ") and "Traceback" not in err
    summary = strict_load(logdir / "summary.json")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["exit_code"] == 143
    assert 0 <= summary["steps_done"] < int(LONG)


def test_sigint_stops_finetune_as_interrupted(signalled):
    rc, err, logdir = signalled["finetune-int"]
    assert rc == 128 + signal.SIGINT  # 130, not Lightning's wordless 1
    assert last_line(err).startswith("l2zo: interrupted by SIGINT") and "Traceback" not in err
    assert strict_load(logdir / "summary.json")["status"] == "interrupted"


def test_a_second_run_into_a_running_folder_is_refused(signalled):
    rc, err, _ = signalled["second"]
    assert rc == 2 and err.count("\n") == 1
    assert re.match(r"l2zo: error: .*ft-term is in use by another l2zo run \(pid \d+\); wait for it", err)


def test_sigterm_stops_the_whole_compare(signalled):
    rc, err, root = signalled["compare-term"]
    assert rc == 143 and "run mezo seed 0 recorded as interrupted, 0 of 2 runs done" in last_line(err)
    state = strict_load(root / "compare.json")
    assert state["status"] == "interrupted" and [(r["label"], r["status"]) for r in state["runs"]] == [
        ("mezo", "interrupted")]  # fmt: skip
    assert strict_load(root / "mezo" / "seed0" / "summary.json")["status"] == "interrupted"
    assert not (root / "zo-sgd-sign").exists()  # the compare stopped; it did not go on to the next run


def test_sigterm_in_meta_train_saves_a_checkpoint_and_says_how_to_resume(signalled, tmp_path):
    rc, err, logdir = signalled["meta-term"]
    assert rc == 143
    line = last_line(err)
    assert line.startswith("l2zo: interrupted by SIGTERM; meta-train stopped without an artifact; checkpoint ")
    summary = strict_load(logdir / "summary.json")
    art = Path(summary["output"])
    assert summary["status"] == "interrupted" and summary["artifact"] is None and not art.exists()
    k = summary["steps_done"]
    ckpt = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == k >= 1  # the signal waited for the meta-step to end, then saved it
    command = summary["resume_command"]
    assert command in line and command.startswith("l2zo meta-train --config ") and "--resume" in command
    # The printed command works (here with the step budget cut to where it stopped: it writes the artifact).
    assert main([*command.split()[1:], "--steps", str(k)]) == 0
    assert strict_load(logdir / "summary.json")["status"] == "ok" and art.is_dir()


# -------------------------------------------------------------------------------------------- finetune


def test_diverging_first_order_run_is_failed_with_strict_json(tmp_path, capsys):
    """fo-sgd at lr 1e30: the weights overflow; the run must not say ok, and NaN becomes null plus where."""
    logdir = tmp_path / "fo"
    rc = main(["finetune", *SMALL, "--optimizer", "fo-sgd", "--lr", "1e30", "--steps", "1", "--logdir", str(logdir)])
    err = capsys.readouterr().err
    assert rc == 2 and last_line(err) == "l2zo: error: the run diverged: dev loss nan at step 1; lower --lr (or --eps)"
    summary = strict_load(logdir / "summary.json")
    assert summary["status"] == "failed" and summary["dev_loss_final"] is None
    assert summary["non_finite"]["dev_loss_final"] == "nan" and summary["non_finite"]["dev_history[1].loss"] == "nan"

    logdir = tmp_path / "fo-nan-step"  # a NaN training loss stops the run at that step
    rc = main(["finetune", *SMALL, "--optimizer", "fo-sgd", "--lr", "1e30", "--steps", "5", "--eval-every", "5",
               "--logdir", str(logdir)])  # fmt: skip
    assert rc == 2 and "non-finite loss nan at step 1: the run diverged" in capsys.readouterr().err
    summary = strict_load(logdir / "summary.json")
    assert summary["status"] == "failed" and summary["steps_done"] == 2


def test_an_unexpected_exception_is_status_error_and_one_line(tmp_path, capsys, monkeypatch):
    from l2zo.train.module import FinetuneModule

    def broken(self, batch, batch_idx):  # a bug in a training step
        raise ZeroDivisionError("division by zero in a step")

    monkeypatch.setattr(FinetuneModule, "training_step", broken)
    logdir = tmp_path / "bug"
    rc = main(["finetune", *SMALL, "--steps", "2", "--logdir", str(logdir)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert last_line(err).startswith("l2zo: internal error: ZeroDivisionError: division by zero in a step")
    summary = strict_load(logdir / "summary.json")
    assert summary["status"] == "error" and summary["exit_code"] == 1 and "ZeroDivisionError" in summary["error"]


def test_overwrite_removes_everything_a_stale_lock_does_not_block_and_eval_is_announced(tmp_path, capsys, caplog):
    logdir = tmp_path / "run"
    assert main(["finetune", *SMALL, "--steps", "1", "--save-model", "--logdir", str(logdir)]) == 0
    assert (logdir / "model" / "config.json").is_file()
    (logdir / ".summary.json.killed.tmp").write_text("{")  # what a killed atomic write leaves
    # A process that held the lock was SIGKILLed: the OS dropped its lock, the file with its pid stays.
    code = (
        f"import time\nfrom l2zo.utils.rundir import locked_run_folder\nwith locked_run_folder({str(logdir)!r}):\n"
        "    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert (logdir / LOCK_FILE).read_text().strip() == str(holder.pid)

    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="l2zo"):
        assert main(["finetune", *SMALL, "--steps", "1", "--logdir", str(logdir)]) == 2  # a run is there
        assert "already holds a run" in capsys.readouterr().err
        assert main(["finetune", *SMALL, "--steps", "1", "--eval-batch-size", "4", "--logdir", str(logdir),
                     "--overwrite"]) == 0  # fmt: skip
    assert not (logdir / "model").exists()  # the old run's weights went with it
    assert not (logdir / ".summary.json.killed.tmp").exists()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 3  # this run's: validate, fit, test
    assert strict_load(logdir / "summary.json")["status"] == "ok"
    text = caplog.text
    announced = (
        "evaluation: dev 16 examples x 4 candidates (64 sequences) x 2 evaluations, test 16 examples x 4 "
        "candidates (64 sequences) once; up to 64 tokens per sequence, 4 examples per batch"
    )
    assert announced in text
    assert "dev evaluation at step 0: 16 examples in" in text and "test evaluation at step 1: 16 examples in" in text
    assert text.index("evaluation: dev 16") < text.index("dev evaluation at step 0")  # announced before it starts
    assert "examples/s)" in text


def test_a_locked_folder_refuses_a_second_run(tmp_path, capsys):
    logdir = tmp_path / "run"
    with locked_run_folder(logdir):
        assert main(["finetune", *SMALL, "--steps", "1", "--logdir", str(logdir)]) == 2
        assert f"is in use by another l2zo run (pid {os.getpid()})" in capsys.readouterr().err
        assert main(["meta-train", *META, "--steps", "1", "--logdir", str(logdir),
                     "--output", str(tmp_path / "art")]) == 2  # fmt: skip
        assert "is in use by another l2zo run" in capsys.readouterr().err
    assert [p.name for p in logdir.iterdir()] == [LOCK_FILE]


# ---------------------------------------------------------------------------------------------- compare


def _signal_during(monkeypatch: pytest.MonkeyPatch, label: str, signum: int = signal.SIGTERM) -> list[str]:
    """Send ``signum`` to this process (once) during the first training step of the run whose folder names
    ``label``; returns the run folders that trained, in order."""
    from l2zo.train.module import FinetuneModule

    trained: list[str] = []
    sent: list[int] = []
    original = FinetuneModule.training_step

    def step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        folder = Path(self.logger.log_dir)
        if not trained or trained[-1] != str(folder):
            trained.append(str(folder))
        if label in folder.parts and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)  # a real signal, handled while the step runs
        return original(self, batch, batch_idx)

    monkeypatch.setattr(FinetuneModule, "training_step", step)
    return trained


def test_compare_records_an_interrupted_run_refuses_other_experiments_and_resumes(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cmp"
    argv = ["compare", *SMALL, "--optimizers", "mezo:lr=1e-3,zo-sgd-sign:lr=1e-4", "--steps", "2", "--eval-every",
            "2", "--seeds", "0", "--logdir", str(root)]  # fmt: skip
    trained = _signal_during(monkeypatch, "zo-sgd-sign")
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert last_line(err).startswith("l2zo: interrupted by SIGTERM; run zo-sgd-sign seed 0 recorded as interrupted")
    state = strict_load(root / "compare.json")
    assert state["status"] == "interrupted" and state["experiment"]["task"] == "synth-color"
    assert [(r["label"], r["status"]) for r in state["runs"]] == [("mezo", "ok"), ("zo-sgd-sign", "interrupted")]
    assert strict_load(root / "zo-sgd-sign" / "seed0" / "summary.json")["status"] == "interrupted"
    from l2zo.compare.events import read_run

    assert read_run(root / "zo-sgd-sign" / "seed0", root).status == "interrupted"  # `l2zo report` sees it
    assert main(["report", str(root)]) == 0
    assert "| interrupted (1/1 seeds): seed0: interrupted by SIGTERM |" in capsys.readouterr().out

    # Another experiment (another task) in the same folder: refused, naming what differs.
    other = [a if a != "synth-color" else "synth-sentiment" for a in argv]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds another experiment (task: 'synth-color' there, 'synth-sentiment' now)" in err
    # The same experiment again: refused without --resume.
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err
    # --resume keeps the finished run and redoes the interrupted one.
    mezo_events = sorted(p.name for p in (root / "mezo" / "seed0").iterdir())
    trained.clear()
    assert main([*argv, "--resume"]) == 0
    assert [Path(t).parts[-2] for t in trained] == ["zo-sgd-sign"]
    assert sorted(p.name for p in (root / "mezo" / "seed0").iterdir()) == mezo_events
    state = strict_load(root / "compare.json")
    assert state["status"] == "ok" and [r["status"] for r in state["runs"]] == ["ok", "ok"]
    assert "| zo-sgd-sign |" in (root / "summary.md").read_text()

    # --overwrite replaces the whole experiment, even another one.
    assert main([*other[: other.index("--optimizers") + 1], "mezo:lr=1e-3", *argv[argv.index("--steps") :],
                 "--overwrite"]) == 0  # fmt: skip
    assert not (root / "zo-sgd-sign").exists()
    assert strict_load(root / "compare.json")["experiment"]["task"] == "synth-sentiment"


# ------------------------------------------------------------------------------------------- meta-train


def _net(art: Path) -> dict[str, torch.Tensor]:
    from l2zo.learned.artifact import read_artifact

    return read_artifact(art)[0].state_dict()


META_STEPS = 3


@pytest.fixture(scope="module")
def meta_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact of a meta-train run of META_STEPS steps that nothing stopped."""
    root = tmp_path_factory.mktemp("meta-full")
    assert main(["meta-train", *META, "--steps", str(META_STEPS), "--logdir", str(root / "run"),
                 "--output", str(root / "art")]) == 0  # fmt: skip
    return root / "art"


@pytest.mark.parametrize("signal_step", [1, META_STEPS - 1], ids=["mid-run", "last-step"])
def test_meta_train_signal_then_resume_equals_an_unstopped_run(tmp_path, capsys, monkeypatch, meta_full, signal_step):
    """A SIGTERM during meta-step j: the step ends, a checkpoint at j + 1, status interrupted, no artifact
    claimed; the printed resume command then gives the artifact of a run that was never stopped, bit for bit.
    In the last step too: the checkpoint is the final state and the resume only writes the artifact."""
    from l2zo.train.meta_module import MetaTrainModule

    original = MetaTrainModule.training_step
    sent: list[int] = []

    def signalled_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step == signal_step and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled while the step runs
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MetaTrainModule, "training_step", signalled_step)
    logdir, art = tmp_path / "run", tmp_path / "art"
    assert main(["meta-train", *META, "--steps", str(META_STEPS), "--logdir", str(logdir), "--output", str(art)]) == 143
    assert "resume with: " in last_line(capsys.readouterr().err)
    summary = strict_load(logdir / "summary.json")
    assert summary["status"] == "interrupted" and summary["steps_done"] == signal_step + 1 and not art.exists()
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == signal_step + 1
    assert main(summary["resume_command"].split()[1:]) == 0
    assert strict_load(logdir / "summary.json")["status"] == "ok"
    na, nb = _net(art), _net(meta_full)
    assert list(na) == list(nb)
    for k in na:
        assert torch.equal(na[k], nb[k]), k  # bit for bit: every random choice is a function of (seed, step)


# ------------------------------------------------------------------------------------------- atomic writes


def test_strict_json_writes_null_and_says_where():
    text = dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "ok": 0.5})
    obj = json.loads(text, parse_constant=lambda t: pytest.fail(f"{t} in strict JSON"))
    assert obj["a"] is None and obj["b"] == [1.0, None] and obj["c"] == {"d": None} and obj["ok"] == 0.5
    assert obj["non_finite"] == {"a": "nan", "b[1]": "inf", "c.d": "-inf"}


def test_leftovers_of_killed_atomic_writes_are_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "artifact"
    stale = [tmp_path / ".artifact.k1ll.tmp", tmp_path / ".artifact.old"]  # a killed atomic_dir, a killed overwrite
    for d in stale:
        d.mkdir()
        (d / "half.bin").write_bytes(b"\0")
    other = tmp_path / ".other.x.tmp"  # another target's: kept
    other.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    assert (target / "w").read_text() == "1" and not any(d.exists() for d in stale) and other.exists()
    (tmp_path / ".summary.json.dead.tmp").write_text("{")
    write_json_atomic(tmp_path / "summary.json", {"x": 1})
    write_text_atomic(tmp_path / "notes.txt", "n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x.tmp", "artifact", "notes.txt", "summary.json"]
