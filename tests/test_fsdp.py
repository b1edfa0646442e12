"""Sharded ZO: z for row shards (pure), FSDP2 on 2 CPU processes with gloo against one unsharded process.

The 2-process test runs this file as a script, once per rank (``python tests/test_fsdp.py RANK ...``), with the
environment a launcher sets (MASTER_ADDR/PORT on a free port, WORLD_SIZE, RANK, LOCAL_RANK): Lightning then
takes the processes as given and runs ``ShardedZOStrategy`` in them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from l2zo.engine import Z_CHUNK, Block, ZSource, axpby_z_
from l2zo.engine.seeding import shard_chunks

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


# ---------------------------------------------------------------------------- z for row shards (no processes)


@dataclass(frozen=True, eq=False)
class RowShard(Block):
    """A block of which this 'process' holds rows [r0, r1): what ``Block`` reports for an FSDP2 DTensor."""

    rows: torch.Tensor | None = None
    offset: int = 0
    total: int = 0

    @property
    def local(self) -> torch.Tensor:
        return self.rows

    @property
    def span(self) -> tuple[int, int]:
        return self.offset, self.total


def row_shards(full: torch.Tensor, world: int, index: int) -> list[RowShard]:
    """The FSDP2 shards of ``full`` over ``world`` ranks (torch.chunk on dim 0: uneven, the last may be empty)."""
    rows, row = full.shape[0], full[0].numel()
    size = -(-rows // world)
    out = []
    for r in range(world):
        r0, r1 = min(r * size, rows), min((r + 1) * size, rows)
        out.append(RowShard(index, f"w{index}", full, full[r0:r1].clone(), r0 * row, full.numel()))
    return out


# 5 rows of 700_001 entries: 3.5M entries, 4 chunks; row cuts at 1.4M, 2.1M and 2.8M fall inside chunks.
SHAPE = (5, 700_001)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_z_is_the_unsharded_z_bit_for_bit(world):
    """The concatenated shards' z equals the whole block's z, for uneven shards (5 rows on 2, 3, 4 ranks: an
    empty one on 4) whose boundaries cut chunks; each shard draws at most two chunks it uses in part."""
    full = torch.empty(SHAPE)
    z = ZSource(workers=1).full(full, seed=123, block_index=4)
    parts = []
    for shard in row_shards(full, world, 4):
        n = shard.local.numel()
        plan = shard_chunks(n, *shard.span)
        assert sum(end - start for _, _, _, start, end in plan) == n
        assert sum(1 for _, size, _, start, end in plan if end - start < size) <= 2
        parts.append(ZSource(workers=1).full(shard.local, 123, 4, shard.span).view(-1))
    assert torch.equal(torch.cat(parts), z.view(-1))


@pytest.mark.parametrize("workers, cache", [(1, False), (2, False), (2, True)])
def test_shard_updates_are_the_unsharded_updates_bit_for_bit(workers, cache):
    """theta <- d*theta + c*z(seed) on the shards (the engine's pass: threads, cached z) leaves exactly the rows
    of the same pass on the whole tensor, over two steps; a small second block stays in one chunk."""
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(SHAPE, generator=g), torch.randn(7, 3, generator=g)]
    whole = [Block(i, f"w{i}", t.clone()) for i, t in enumerate(fulls)]
    ranks = list(zip(*(row_shards(t, 3, i) for i, t in enumerate(fulls))))  # per rank: its shard of each block
    for seed in (11, 12):
        axpby_z_(whole, seed, ZSource(workers=1), coef=[0.5, -0.25], decay=[0.9, 1.0])
        for shards in ranks:
            axpby_z_(shards, seed, ZSource(workers=workers, cache=cache), coef=[0.5, -0.25], decay=[0.9, 1.0])
    for i, b in enumerate(whole):
        assert torch.equal(torch.cat([shards[i].local for shards in ranks]), b.param)


def test_shard_chunks_unsharded_is_every_whole_chunk():
    """Without a shard the plan is the chunks of the unsharded definition of z, every one whole."""
    n = 2 * Z_CHUNK + 5
    assert shard_chunks(n) == [(0, Z_CHUNK, 0, 0, Z_CHUNK), (1, Z_CHUNK, 0, Z_CHUNK, 2 * Z_CHUNK),
                               (2, 5, 0, 2 * Z_CHUNK, n)]  # fmt: skip
    assert shard_chunks(0, 0, 10) == []
    with pytest.raises(ValueError):
        shard_chunks(5, 8, 10)


# ------------------------------------------------------------------- FSDP2 on 2 processes vs one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gather(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights (sharded ones gathered: a collective), as copies."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def _train(world: int, rank: int, strategy: Any, steps: int, *, split: bool = False, resume: Path | None = None,
           save: Path | None = None, snapshot_at: int | None = None) -> dict[str, Any]:  # fmt: skip
    """MeZO on tiny/synth-color up to step ``steps``; returns each step's (L+, L-) and the full weights after.

    ``split``: rank r trains on examples r, r + world, ... of each batch of 8 (its data shard); else every rank sees
    the whole batch (8 examples: a power of two, so that the reduced mean, sum(loss * 8) / 16, is the loss
    exactly, whatever the float width of the reduction). ``resume``: continue from this checkpoint; ``save``:
    write one at the end; ``snapshot_at``: also return the weights after that step.
    """
    import lightning as L

    from l2zo.config import FinetuneConfig
    from l2zo.config.parser import build_config
    from l2zo.models import load_model
    from l2zo.optim.registry import build_optimizer
    from l2zo.tasks.loading import load_task_data
    from l2zo.tasks.scoring import CandidateScorer
    from l2zo.train.data import SeededBatches, TaskDataModule
    from l2zo.train.module import FinetuneModule

    cfg = build_config(FinetuneConfig, overrides={"model": "tiny", "task": "synth-color", "num_train": 44,
                                                  "num_dev": 4, "num_test": 4, "max_length": 48})  # fmt: skip
    _, data = load_task_data(cfg.data)
    loaded = load_model("tiny")
    scorer = CandidateScorer(loaded.tokenizer, max_length=48)

    class ShardBatches(SeededBatches):
        def __iter__(self):
            for batch in super().__iter__():
                yield batch[rank::world] if split else batch

    class Data(TaskDataModule):
        def train_dataloader(self):
            batches = ShardBatches(len(self.data.train), 8, seed=0, start=int(self.trainer.global_step))
            return torch.utils.data.DataLoader(self.data.train, batch_sampler=batches, collate_fn=self.scorer.collate)

    out: dict[str, Any] = {"probes": [], "initial": _gather(loaded.model)}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            p = trainer.optimizers[0].last_probe
            out["probes"].append((float(p.loss_plus), float(p.loss_minus)))
            if trainer.global_step == snapshot_at:
                out["snapshot"] = _gather(module.model)

    module = FinetuneModule(loaded.model, scorer, "classification",
                            lambda m: build_optimizer("mezo", m, lr=1e-3, eps=1e-3, seed=7),
                            zeroth_order=True, forwards_per_step=2, total_steps=steps)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, max_epochs=-1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Record()])  # fmt: skip
    trainer.fit(module, datamodule=Data(data, scorer, 8, 4, 0), ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    out["weights"] = _gather(module.model)
    out["param_types"] = sorted({type(p).__name__ for p in module.model.parameters()})
    return out


def _worker(rank: int, world: int, out: str) -> None:
    """One rank of the FSDP2 runs (started by the test below as a script)."""
    from l2zo.train.sharded import make_fsdp_strategy

    torch.set_num_threads(1)
    ckpt = Path(out) / "fsdp.ckpt"
    results = {
        "same": _train(world, rank, make_fsdp_strategy(), STEPS, save=ckpt),
        "resumed": _train(world, rank, make_fsdp_strategy(), STEPS + 1, resume=ckpt),
        "split": _train(world, rank, make_fsdp_strategy(), STEPS, split=True),
    }
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_fsdp_two_ranks_match_one_unsharded_process(tmp_path):
    """FSDP2 over 2 gloo processes (uneven row shards: 875 embedding rows) gives one unsharded process's L+, L-
    and weights after a few MeZO steps: bit for bit when every rank sees the whole batch, also after saving a
    checkpoint and resuming from it for one more step; to fp32 reduction tolerance when each rank has its own half
    of the batch (losses reduced as (sum of loss * count, count)). The two ranks always see the same L+ and L-."""
    port, world = _free_port(), 2
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "NODE_RANK": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(world), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: CPU kernels may round differently with other thread counts
    try:
        ref = _train(1, 0, "auto", STEPS + 1, snapshot_at=STEPS)
    finally:
        torch.set_num_threads(threads)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    assert ranks[0]["same"]["param_types"] == ["DTensor"]  # really sharded
    assert ref["param_types"] == ["Parameter"]
    assert all(not torch.equal(w, ref["initial"][n]) for n, w in ref["weights"].items())  # every weight trained
    for run in ("same", "resumed", "split"):
        assert ranks[0][run]["probes"] == ranks[1][run]["probes"]
    same, resumed, split = ranks[0]["same"], ranks[0]["resumed"], ranks[0]["split"]
    assert same["probes"] == ref["probes"][:STEPS]
    assert all(torch.equal(same["weights"][n], w) for n, w in ref["snapshot"].items())
    assert resumed["probes"] == ref["probes"][STEPS:]  # the resumed run's one step
    assert all(torch.equal(resumed["weights"][n], w) for n, w in ref["weights"].items())
    flat = [loss for probe in split["probes"] for loss in probe]
    assert flat == pytest.approx([loss for probe in ref["probes"][:STEPS] for loss in probe], rel=1e-5)
    for n, w in ref["snapshot"].items():
        torch.testing.assert_close(split["weights"][n], w, rtol=1e-5, atol=1e-6)


def test_only_mezo_like_optimizers_run_sharded():
    """A row shard can run a step that is MeZO's with a sigma per block; per-entry state (zo-adam), its own
    directions (lozo) or a sigma from weight statistics (learned-random) are refused with the fix."""
    from l2zo.errors import L2ZOError
    from l2zo.optim.registry import build_optimizer
    from l2zo.train.sharded import check_shardable
    from tests.helpers import tiny_llama

    model = tiny_llama()
    check_shardable(build_optimizer("mezo", model))
    check_shardable(torch.optim.SGD(model.parameters(), lr=0.1))  # first order: FSDP2 reduces the gradients
    for name in ("zo-adam", "lozo", "learned-random"):
        with pytest.raises(L2ZOError, match="--strategy ddp"):
            check_shardable(build_optimizer(name, model))


def test_fsdp_refuses_an_unshardable_optimizer_before_the_run_folder_exists(tmp_path, capsys):
    from l2zo.cli.main import main

    logdir = tmp_path / "run"
    rc = main(["finetune", "--model", "tiny", "--task", "synth-color", "--num-train", "16", "--num-dev", "8",
               "--num-test", "8", "--batch-size", "4", "--steps", "1", "--strategy", "fsdp", "--optimizer", "zo-adam",
               "--logdir", str(logdir)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "ZOAdam has its own" in err and "use --strategy ddp" in err, err
    assert not logdir.exists()


# ----------------------------------------------------------------------------------- --device-map auto


def test_device_map_spreads_layers_over_gpus_and_refuses_offload():
    """The planned map (computed on an empty model, no GPU needed) keeps decoder layers whole on GPUs; a map that
    would put any module on the host is refused with one line, before any weight is loaded."""
    from l2zo.errors import L2ZOError
    from l2zo.models import load_model
    from l2zo.models.loading import plan_device_map
    from l2zo.models.tiny import tiny_dir

    where = str(tiny_dir("tiny"))  # ~3.4 MB of fp32 weights
    plan = plan_device_map(where, {0: "3MB", 1: "3MB"}, local_files_only=True)
    assert set(plan.values()) == {0, 1}
    assert "model.layers.0" in plan  # a layer is placed whole, not split across devices
    for max_memory in ({0: "1MB", "cpu": "1GB"}, {0: "1MB", 1: "1MB", "cpu": "1GB", "disk": "1GB"}, None):
        # None: what this machine's GPUs have free; on a machine without GPUs, everything would stay on the host.
        if max_memory is None and torch.cuda.is_available():
            continue
        with pytest.raises(L2ZOError, match=r"--device-map auto would offload .* to the host") as err:
            load_model("tiny", device_map="auto", max_memory=max_memory)
        assert "\n" not in str(err.value)
    with pytest.raises(L2ZOError, match="not a choice"):
        load_model("tiny", device_map="balanced")


@pytest.mark.gpu
def test_device_map_auto_finetunes_on_the_gpus(tmp_path):
    """On a GPU machine: `--device-map auto` places every weight on a GPU, and `l2zo finetune` with it runs its MeZO
    steps there (Lightning leaves the placed model where it is; z is drawn on each weight's device)."""
    from l2zo.config import FinetuneConfig
    from l2zo.config.parser import build_config
    from l2zo.models import load_model
    from l2zo.train.finetune import run_finetune

    assert {p.device.type for p in load_model("tiny", device_map="auto").model.parameters()} == {"cuda"}

    cfg = build_config(FinetuneConfig, overrides={"model": "tiny", "task": "synth-color", "num_train": 16,
                                                  "num_dev": 4, "num_test": 4, "max_length": 48, "batch_size": 4,
                                                  "steps": 2, "eval_every": 2, "device_map": "auto",
                                                  "logdir": str(tmp_path / "run")})  # fmt: skip
    summary = run_finetune(cfg)
    assert summary["status"] == "ok" and summary["steps_done"] == 2
    assert all(h["loss"] == h["loss"] for h in summary["dev_history"])  # finite dev losses


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
