"""Data-parallel ZO (``--strategy ddp``) on CPU with gloo and 2 processes, started by Lightning's own launcher.

- 2 ranks x batch 8 give the parameters of 1 process x batch 16 (to fp32 reduction tolerance), and the two
  ranks are bit-identical;
- the replica checksum stops a run whose replicas part (one ulp on rank 1), recorded as failed;
- meta-training on 2 ranks gives the same net on both, and the one-process net to fp32 tolerance;
- bad combinations are one-line errors (exit 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from l2zo.cli.main import main
from l2zo.errors import L2ZOError
from l2zo.train.replicas import param_checksum, shard
from l2zo.train.strategies import refuse_closureless_precision
from tests.ddp_worker import SaveWeights, install

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
DDP = ["--devices", "2", "--strategy", "ddp", "--device", "cpu"]
FINETUNE = ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--num-train", "32", "--num-dev", "9",
            "--num-test", "7", "--batch-size", "16", "--steps", "3", "--eval-every", "3", "--lr", "1e-3",
            "--checkpoint-every", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
META = ["meta-train", "--model", "tiny", "--tasks", "synth-sentiment,synth-size", "--num-train", "16", "--num-dev",
        "8", "--batch-size", "6", "--max-length", "48", "--steps", "3", "--p-teacher", "0.5", "--checkpoint-every",
        "10", "--no-progress", "--device", "cpu"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, argv: list[str], *diverge: int) -> subprocess.CompletedProcess:
    """``l2zo argv`` on 2 ranks: this starts rank 0, whose Lightning launcher starts rank 1."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    cmd = [sys.executable, str(WORKER), str(out), *map(str, diverge), "--", *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=600)


def _in_process(out: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``l2zo argv`` on one process, here, with the same weight-saving callback."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    import l2zo.train.finetune as finetune
    import l2zo.train.meta_train as meta_train

    monkeypatch.setattr(finetune, "make_trainer", finetune.make_trainer)  # undone after the test
    monkeypatch.setattr(meta_train, "make_meta_trainer", meta_train.make_meta_trainer)
    install([SaveWeights(out)])
    assert main(argv) == 0


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def test_two_ranks_of_8_give_one_process_of_16_and_identical_replicas(tmp_path, monkeypatch):
    run = _launch(tmp_path / "ddp", [*FINETUNE, *DDP, "--checksum-every", "1", "--logdir", str(tmp_path / "r2")])
    assert run.returncode == 0, run.stderr[-3000:]
    _in_process(tmp_path / "one", [*FINETUNE, "--logdir", str(tmp_path / "r1")], monkeypatch)
    r0, r1, one = _weights(tmp_path / "ddp", 0), _weights(tmp_path / "ddp", 1), _weights(tmp_path / "one", 0)
    from l2zo.models import load_model

    init = dict(load_model("tiny").model.state_dict())
    moved = max(float((one[k] - init[k.removeprefix("model.")]).abs().max()) for k in one)
    assert moved > 1e-4  # the runs trained
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"rank 0 and rank 1 differ in {k}"
        torch.testing.assert_close(r0[k], one[k], rtol=0, atol=1e-6, msg=f"2 x 8 and 1 x 16 differ in {k}")
    s2, s1 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("r2", "r1"))
    assert s2["status"] == "ok" and s2["processes"] == 2 and s1["processes"] == 1
    # Dev and test metrics are sums over both ranks' slices (9 = 5 + 4 and 7 = 4 + 3 examples): the whole splits.
    assert s2["dev_history"][0]["loss"] == pytest.approx(s1["dev_history"][0]["loss"], rel=1e-6)
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)
    assert "mezo on synth-sentiment" in run.stdout and run.stdout.count("run folder:") == 1  # rank 0 reports


def test_replica_checksum_stops_a_run_whose_replicas_part(tmp_path):
    run = _launch(tmp_path / "ddp", [*FINETUNE, *DDP, "--checksum-every", "1", "--logdir", str(tmp_path / "r")], 2)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "parameters differ at step 2" in run.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "parameters differ at step 2" in summary["error"]


def test_meta_train_on_two_ranks_keeps_one_net(tmp_path, monkeypatch):
    argv = [*META, *DDP, "--checksum-every", "1", "--logdir", str(tmp_path / "r2"), "--output", str(tmp_path / "a2")]
    run = _launch(tmp_path / "ddp", argv)
    assert run.returncode == 0, run.stderr[-3000:]
    _in_process(tmp_path / "one", [*META, "--logdir", str(tmp_path / "r1"), "--output", str(tmp_path / "a1")],
                monkeypatch)  # fmt: skip
    r0, r1, one = _weights(tmp_path / "ddp", 0), _weights(tmp_path / "ddp", 1), _weights(tmp_path / "one", 0)
    net = [k for k in r0 if k.startswith("net.")]
    assert net and all(torch.equal(r0[k], r1[k]) for k in r0)  # net and trajectory identical on both ranks
    for k in net:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-6, msg=f"meta-gradient differs in {k}")
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["artifact"] == str(tmp_path / "a2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--devices", "2"], "choose how with --strategy ddp"),
        (["finetune", "--devices", "0"], "--devices must be positive"),
        ([*FINETUNE, *DDP, "--batch-size", "1"], "--batch-size (1) must be at least the number of processes (2"),
        ([*FINETUNE, *DDP, "--optimizer", "fo-sgd"], "fo-sgd needs gradients of the loss: run it with --devices 1"),
        ([*FINETUNE, *DDP, "--optimizer", "forward-grad"], "forward-grad needs gradients"),
        ([*META, *DDP, "--objective", "unrolled", "--differentiable-g"], "--differentiable-g differentiates"),
        ([*META, *DDP, "--batch-size", "1"], "--batch-size (1) must be at least the number of processes (2)"),
        (["compare", "--model", "tiny", *DDP, "--lr-grid", "1e-3,1e-4"], "--lr-grid runs on one process for now"),
    ],
)
def test_bad_combinations_are_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_closureless_precision_is_refused():
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(L2ZOError, match="without the loss closure"):
        refuse_closureless_precision(scaled)
    refuse_closureless_precision(MixedPrecision("bf16-mixed", "cpu"))  # no scaler: the closure is ZO's


def test_slices_partition_a_batch_and_the_checksum_sees_one_bit():
    items = list(range(15))
    slices = [shard(items, r, 2) for r in range(2)]
    assert slices == [items[:7], items[7:]] and shard(items, 0, 1) == items
    module = torch.nn.Linear(3, 2)
    before = param_checksum(module)
    with torch.no_grad():
        module.bias[1] = torch.nextafter(module.bias[1], torch.tensor(1e9))
    assert param_checksum(module) != before
