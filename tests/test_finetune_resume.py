"""``l2zo finetune --resume`` (issue 12, item 6): a stopped fine-tune continues from its last checkpoint and ends
exactly where a run that was never stopped ends, bit for bit in fp32 on CPU: the weights, the dev history, the test
metrics, the batch digest and the TensorBoard curves.

Stopped by a real SIGTERM to the CLI in a subprocess; by signals at each kind of step boundary (a step with a dev
evaluation, during that evaluation, during the final test); by a crash after a periodic checkpoint. Then the
refusals, and the data order: the step-addressable batch sampler gives exactly the batches of the DataLoader
(``RandomSampler`` re-iterated per epoch) that it replaced, so earlier digests and results stay valid.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, RandomSampler

from l2zo.cli.main import main
from l2zo.train.data import SeededBatches
from l2zo.train.module import RUN_STATE_KEY, FinetuneModule
from l2zo.utils.rundir import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 7, 3  # dev evaluations at 0, 3, 6 inside fit and 7 after it
# 24 examples in batches of 8: an epoch is 3 steps, so the 7 steps cross two epoch boundaries.
ARGS = ["--model", "tiny-derived", "--task", "synth-color", "--num-train", "24", "--num-dev", "8", "--num-test", "8",
        "--batch-size", "8", "--max-length", "48", "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY),
        "--save-model", "--no-progress"]  # fmt: skip
CASES = {"mezo": ["--optimizer", "mezo"], "zo-adam-linear": ["--optimizer", "zo-adam", "--lr-schedule", "linear"]}
# Tags whose values are a function of the run (the step time and memory are not).
CURVES = ("val/loss", "val/acc", "test/loss", "test/acc", "train/loss", "train/lr", "train/projected_grad",
          "train/forward_passes")  # fmt: skip


def finetune(logdir: Path, *extra: str, case: str = "mezo") -> int:
    return main(["finetune", *ARGS, *CASES[case], "--logdir", str(logdir), *extra])


def summary(logdir: Path) -> dict:
    return json.loads((logdir / "summary.json").read_text(encoding="utf-8"))


def checkpoint(logdir: Path) -> dict:
    return torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def dev_steps(ckpt: dict) -> list[int]:
    return [s for s, _ in ckpt[RUN_STATE_KEY]["history"]["val/loss"]]


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("l2zo:")]
    return lines[-1] if lines else ""


def assert_same_run(run: Path, ref: Path) -> None:
    """The resumed ``run`` ended where ``ref`` (never stopped) ended: weights, dev history, test, batches, curves."""
    from l2zo.compare.events import read_folder

    a, b = summary(run), summary(ref)
    assert a["status"] == b["status"] == "ok"
    for key in ("steps_done", "dev_history", "dev_loss_best_step", "test_loss", "test_acc", "batch_digest",
                "batch_digests_head"):  # fmt: skip
        assert a[key] == b[key], key
    wa, wb = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert list(wa) == list(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit for bit
    ca, cb = read_folder(run)[0], read_folder(ref)[0]  # the events of every process that wrote the folder
    for tag in CURVES:
        if tag in cb:
            assert ca[tag] == cb[tag], tag
    assert not (run / "checkpoints").exists()  # a finished run keeps no checkpoint


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".l2zo.lock"))
    return dst


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """One torch thread in this process too, as in the subprocesses (OMP_NUM_THREADS=1): every run compared uses
    the same kernels, and the tiny runs do not contend for a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``reference(case, steps)``: the folder of a run that nothing stopped (run once per module)."""
    root = tmp_path_factory.mktemp("reference")
    done: dict[tuple[str, int], Path] = {}

    def get(case: str = "mezo", steps: int = STEPS) -> Path:
        if (case, steps) not in done:
            logdir = root / f"{case}-{steps}"
            assert finetune(logdir, "--steps", str(steps), case=case) == 0
            done[case, steps] = logdir
        return done[case, steps]

    return get


# ------------------------------------------------------------------ a real SIGTERM to the CLI in a subprocess

# The CLI, paused inside training step ``k`` until the test has sent its signal: the signal lands mid-step
# at a known step, however slow the machine.
_PAUSED_CLI = """
import sys, time
from pathlib import Path
from l2zo.cli.main import main
from l2zo.train.module import FinetuneModule
k, ready, sent = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
original = FinetuneModule.training_step
def paused(self, batch, batch_idx):
    if self.global_step == k and not ready.exists():
        ready.touch()
        t0 = time.monotonic()
        while not sent.exists() and time.monotonic() - t0 < 600:
            time.sleep(0.01)
    return original(self, batch, batch_idx)
FinetuneModule.training_step = paused
sys.exit(main(sys.argv[4:]))
"""
SIGNAL_IN_STEP = {"mezo": 4, "zo-adam-linear": 1}  # the step index running when SIGTERM comes (not an eval step)


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Each case started as a subprocess and sent SIGTERM inside step SIGNAL_IN_STEP[case]: (exit, stderr, folder)."""
    root = tmp_path_factory.mktemp("sigterm")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = {}
    for case, k in SIGNAL_IN_STEP.items():
        argv = [str(k), str(root / f"{case}.ready"), str(root / f"{case}.sent"), "finetune", *ARGS, *CASES[case],
                "--logdir", str(root / case)]  # fmt: skip
        procs[case] = subprocess.Popen([sys.executable, "-c", _PAUSED_CLI, *argv], env=env, cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    results = {}
    try:
        for case, proc in procs.items():
            t0 = time.monotonic()
            while not (root / f"{case}.ready").exists():
                if proc.poll() is not None:
                    pytest.fail(f"{case} ended (exit {proc.returncode}) before step {SIGNAL_IN_STEP[case]}:\n"
                                f"{proc.communicate()[1]}")  # fmt: skip
                assert time.monotonic() - t0 < 600, f"{case} did not reach step {SIGNAL_IN_STEP[case]}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            (root / f"{case}.sent").touch()
            _, err = proc.communicate(timeout=600)
            results[case] = (proc.returncode, err, root / case)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_resume_equals_an_unstopped_run(case, sigtermed, reference, capsys):
    """SIGTERM inside step k: the step ends, checkpoint at k + 1, exit 143 with the resume command; the
    command gives the run that was never stopped, bit for bit (mezo; zo-adam's moments and the linear lr)."""
    rc, err, logdir = sigtermed[case]
    k = SIGNAL_IN_STEP[case] + 1
    line = last_line(err)
    assert rc == 143 and "Traceback" not in err
    assert line.startswith(f"l2zo: interrupted by SIGTERM; stopped at step {k} of {STEPS}; checkpoint ")
    s = summary(logdir)
    assert s["status"] == "interrupted" and s["steps_done"] == s["checkpoint_step"] == k
    assert s["resume_command"] in line and s["resume_command"].endswith(" --resume")
    ckpt = checkpoint(logdir)
    assert ckpt["global_step"] == k and dev_steps(ckpt) == [0] + [3] * (k >= 3)
    opt = ckpt["optimizer_states"][0]
    assert opt["zo"] == {"step_count": k, "seed": 0}
    if case == "zo-adam-linear":  # the method's state and the schedule travel too
        assert opt["state"] and ckpt["lr_schedulers"][0]["last_epoch"] == k
    assert list((logdir / "checkpoints").iterdir()) == [logdir / "checkpoints" / "last.ckpt"]

    assert main(s["resume_command"].split()[1:]) == 0
    assert summary(logdir)["resumed_from_step"] == k
    assert "resumed from step" in capsys.readouterr().out
    assert_same_run(logdir, reference(case))


# ------------------------------------------------------------- signals at every kind of step boundary, in-process


def _signal_when(monkeypatch: pytest.MonkeyPatch, hook: str, when: Callable[[FinetuneModule], bool]) -> None:
    """SIGTERM to this process from inside ``FinetuneModule.<hook>`` the first time ``when(module)`` holds."""
    original = getattr(FinetuneModule, hook)
    sent: list[int] = []

    def signalled(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not sent and when(self):
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled while the hook runs
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FinetuneModule, hook, signalled)


def test_signals_at_evaluation_steps_then_resumes_equal_an_unstopped_run(tmp_path, monkeypatch, reference, capsys):
    """A checkpoint is the state after a step *and* its dev evaluation (Lightning's restart counts the evaluation
    at the restored step as done). One run, stopped three times and resumed each time: during step 3's update (an
    evaluation step: the evaluation runs, then the checkpoint); during the evaluation at step 6 inside fit (it
    finishes, then the checkpoint); during the final test (the checkpoint taken after fit; the resume redoes the
    final evaluation and the test). It ends as the run that was never stopped."""
    logdir = tmp_path / "run"
    stops = [
        ("training_step", lambda m: m.global_step == 2, 3, [0, 3]),
        ("validation_step", lambda m: m.trainer.state.fn == "fit" and m.global_step == 6, 6, [0, 3, 6]),
        ("test_step", lambda m: True, STEPS, [0, 3, 6]),
    ]
    for i, (hook, when, step, evaluated) in enumerate(stops):
        with monkeypatch.context() as patch:
            _signal_when(patch, hook, when)
            assert finetune(logdir, *(["--resume"] if i else [])) == 143
        assert f"stopped at step {step} of {STEPS}; checkpoint " in last_line(capsys.readouterr().err)
        ckpt = checkpoint(logdir)
        assert ckpt["global_step"] == step and dev_steps(ckpt) == evaluated
        assert summary(logdir)["status"] == "interrupted"
    assert finetune(logdir, "--resume") == 0
    assert_same_run(logdir, reference("mezo"))


# ------------------------------------------------------------------- a crash after a periodic checkpoint


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with --checkpoint-every 2 that crashed in step 5 (as a SIGKILL would end it, but in-process)."""
    logdir = tmp_path_factory.mktemp("crashed") / "run"
    original = FinetuneModule.training_step

    def crashing(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step == 5:
            raise RuntimeError("the machine went away")
        return original(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FinetuneModule, "training_step", crashing)
        assert finetune(logdir, "--checkpoint-every", "2") == 1
    return logdir


def test_crash_after_a_periodic_checkpoint_then_resume_equals_an_unstopped_run(tmp_path, crashed, reference):
    logdir = copy_run(crashed, tmp_path / "run")
    s = summary(logdir)
    assert s["status"] == "error" and s["steps_done"] == 5 and s["checkpoint_step"] == 4
    # Only the last checkpoint is kept, and no temp file of its writes.
    assert [p.name for p in (logdir / "checkpoints").iterdir()] == ["last.ckpt"]
    ckpt = checkpoint(logdir)
    assert ckpt["global_step"] == 4 and dev_steps(ckpt) == [0, 3] and ckpt["l2zo_finetune_run"]["wall_time_s"] > 0
    assert ckpt[RUN_STATE_KEY]["step_digests"].shape == (4, 32)
    # --checkpoint-every may change on resume (and does not change the result).
    assert finetune(logdir, "--resume", "--checkpoint-every", "3") == 0
    assert_same_run(logdir, reference("mezo"))


def test_a_resumed_run_may_extend_steps(tmp_path, crashed, reference):
    logdir = copy_run(crashed, tmp_path / "run")
    assert finetune(logdir, "--resume", "--steps", "9") == 0
    s = summary(logdir)
    assert s["steps"] == 9 and s["resumed_from_step"] == 4
    assert "steps: 9" in (logdir / "config.yaml").read_text()  # the config that ran to the end
    assert_same_run(logdir, reference("mezo", steps=9))  # constant lr: as a 9-step run from the start


# ---------------------------------------------------------------------------------------------- refusals


def files(folder: Path) -> dict[Path, bytes] | None:
    """Every file under ``folder`` and its bytes (the lock file aside: a refusal may take the lock)."""
    if not folder.exists():
        return None
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def refused(capsys: pytest.CaptureFixture[str], logdir: Path, *extra: str) -> str:
    """Run ``--resume`` (plus ``extra``) into ``logdir``: it must be refused with one line, exit 2, and leave
    the folder exactly as it was. Returns the line."""
    before = files(logdir)
    capsys.readouterr()
    assert finetune(logdir, "--resume", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("l2zo: error: ")
    assert files(logdir) == before
    return err.strip()


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, crashed, capsys):
    logdir = copy_run(crashed, tmp_path / "run")
    line = refused(capsys, logdir, "--lr", "0.5")
    assert "the config differs from the run's (--lr None in the run, 0.5 now)" in line
    line = refused(capsys, logdir, "--batch-size", "4", "--seed", "1")
    assert "--batch-size 8 in the run, 4 now; --seed 0 in the run, 1 now" in line
    assert line.endswith(f"l2zo finetune --config {logdir / 'config.yaml'} --resume")
    assert "beyond --steps 3" in refused(capsys, logdir, "--steps", "3")  # the checkpoint is at step 4
    assert "pass one of them" in refused(capsys, logdir, "--overwrite")


def test_resume_refuses_a_truncated_or_missing_checkpoint(tmp_path, crashed, capsys):
    logdir = copy_run(crashed, tmp_path / "run")
    last = logdir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert "cannot read the checkpoint" in refused(capsys, logdir)
    last.write_bytes(b"not a checkpoint")
    assert "it is truncated or not a checkpoint" in refused(capsys, logdir)
    shutil.rmtree(logdir / "checkpoints")
    assert "no checkpoint" in refused(capsys, logdir)
    assert "there is no run" in refused(capsys, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_resume_refuses_a_finished_run(reference, capsys):
    line = refused(capsys, reference("mezo"))
    assert "has finished (summary.json: status ok); there is nothing to resume" in line


def test_a_stopped_run_says_resume_and_overwrite_removes_its_checkpoint(tmp_path, crashed, capsys, monkeypatch):
    logdir = copy_run(crashed, tmp_path / "run")
    capsys.readouterr()
    assert finetune(logdir) == 2  # neither --resume nor --overwrite
    assert "already holds a run; resume it with --resume, pick another --logdir" in capsys.readouterr().err

    def crashing(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        raise RuntimeError("stop before any checkpoint")

    monkeypatch.setattr(FinetuneModule, "training_step", crashing)
    assert finetune(logdir, "--overwrite") == 1
    assert not (logdir / "checkpoints").exists()  # the old run's checkpoint went with it
    assert "no checkpoint" in refused(capsys, logdir)


# ------------------------------------------------------------------------------------------- data order


def old_batches(n: int, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """The training batches before SeededBatches: a RandomSampler DataLoader, re-iterated each epoch by Lightning."""
    data = list(range(n))
    loader = DataLoader(data, batch_size=batch_size, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(seed)),
                        collate_fn=list, drop_last=n >= batch_size)  # type: ignore[arg-type]  # fmt: skip
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize(("n", "batch_size", "seed"), [(24, 8, 0), (10, 3, 1), (12, 4, 7), (5, 8, 2), (7, 7, 3)])
def test_seeded_batches_are_the_random_sampler_batches_and_start_anywhere(n, batch_size, seed):
    old = old_batches(n, batch_size, seed, epochs=4)
    assert list(itertools.islice(SeededBatches(n, batch_size, seed), len(old))) == old
    for t in range(len(old)):  # a pure function of (seed, step): starting at t gives the same tail
        assert list(itertools.islice(SeededBatches(n, batch_size, seed, start=t), len(old) - t)) == old[t:]


def test_finetune_trains_on_the_batches_of_the_old_dataloader(reference):
    """End to end: the digest of the batches a run trained on is the digest of the old DataLoader's batches, so
    digests and results recorded before the sampler changed stay comparable."""
    from l2zo.config import FinetuneConfig
    from l2zo.config.parser import build_config
    from l2zo.models import load_model
    from l2zo.tasks.loading import load_task_data
    from l2zo.tasks.scoring import CandidateScorer

    cfg = build_config(FinetuneConfig, overrides={"model": "tiny-derived", "task": "synth-color", "num_train": 24,
                                                  "num_dev": 8, "num_test": 8, "max_length": 48})  # fmt: skip
    _, data = load_task_data(cfg.data)
    scorer = CandidateScorer(load_model("tiny-derived").tokenizer, max_length=48)
    chain = hashlib.sha256()
    for batch in old_batches(len(data.train), 8, seed=0, epochs=3)[:STEPS]:
        b = scorer.collate([data.train[i] for i in batch])
        step = hashlib.sha256()
        for t in (b.input_ids, b.labels):
            step.update(t.to(torch.int64).contiguous().numpy().tobytes())
        chain.update(step.digest())
    assert summary(reference("mezo"))["batch_digest"] == chain.hexdigest()


# ------------------------------------------------------------------------------ every optimizer (slow)


# forward-grad is left out: its JVP needs eager attention, which `l2zo finetune` does not select.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fo-adam", "fo-sgd", "fzoo", "hizoo", "learned", "learned-random", "lozo", "lozo-m",
                                  "mezo-svrg", "per-block-const", "sparse-mezo", "zo-sgd-cons", "zo-sgd-mmt",
                                  "zo-sgd-sign"])  # fmt: skip
def test_every_optimizer_resumes_bit_for_bit(name, tmp_path, monkeypatch):
    """Each method's state (momentum, Hessian, low-rank factors, SVRG anchor and full-batch estimate, Adam moments,
    the learned net) is checkpointed: crashed after the checkpoint at step 4, resumed, the run equals one that was
    never stopped (mezo and zo-adam are in the default suite above)."""
    opt = ["--optimizer", name, *(["--artifact", str(ROOT / "checkpoints/tiny/zo-finetuner")] * (name == "learned"))]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["finetune", *ARGS, *opt, "--logdir", str(full)]) == 0
    original = FinetuneModule.training_step

    def crashing(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.global_step == 5:
            raise RuntimeError("crash")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(FinetuneModule, "training_step", crashing)
        assert main(["finetune", *ARGS, *opt, "--checkpoint-every", "2", "--logdir", str(cut)]) == 1
    assert main(["finetune", *ARGS, *opt, "--logdir", str(cut), "--resume"]) == 0
    assert_same_run(cut, full)
