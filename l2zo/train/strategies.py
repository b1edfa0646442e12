"""Lightning strategies for ZO runs on many processes: the one place that turns ``DistributedArgs`` into one.

``--strategy ddp`` is data-parallel ZO (:class:`ZODDPStrategy`). Every process holds the whole model, perturbs it
with the same seed, evaluates its slice of the batch, and the optimizer sums (loss * count, count) over the
processes (``ZOOptimizer.reduce_fn``), so that every process applies the identical update: nothing but a few
scalars crosses the processes per step. ``--strategy fsdp`` (sharded ZO) comes from ``l2zo.train.sharded``.

Every process runs the same command (Lightning's launcher starts processes 1..N-1 by re-running it, as
``torchrun`` or SLURM would); the run folder, TensorBoard, checkpoints and artifacts are rank 0's alone
(:func:`replica_paths`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import nn

from l2zo.config import DistributedArgs
from l2zo.errors import L2ZOError

C = TypeVar("C")

# Lightning's launcher polls its child processes every 5 s and SIGKILLs rank 0 once one has exited non-zero: a
# failure every process meets at the same step (parted replicas, a non-finite loss: both are collective) must
# leave rank 0 the time to record it in summary.json, so the other processes wait this long before exiting.
_RECORD_GRACE_S = 12.0
_nested = False  # inside replica_paths already (a compare's runs): only the outermost waits


def make_strategy(args: DistributedArgs) -> Strategy | str:
    """What ``L.Trainer(strategy=...)`` takes for ``args.strategy``: "auto" (one process), a
    :class:`ZODDPStrategy`, or the sharded strategy of ``l2zo.train.sharded``."""
    if args.strategy == "ddp":
        return ZODDPStrategy()
    if args.strategy == "fsdp":
        try:
            from l2zo.train.sharded import make_fsdp_strategy
        except ModuleNotFoundError as exc:
            if exc.name != "l2zo.train.sharded":
                raise
            raise L2ZOError("fsdp is not available in this build; use --strategy ddp") from None
        return make_fsdp_strategy(args)
    return "auto"


def refuse_closureless_precision(plugin: Precision) -> None:
    """ZO optimizers evaluate the loss closure themselves, several times a step. Precision plugins that run the
    closure once and then call ``optimizer.step()`` without it (fp16 with a GradScaler, DeepSpeed) cannot drive
    them: refused with one line."""
    scaler = getattr(plugin, "scaler", None)
    if scaler is not None or isinstance(plugin, DeepSpeedPrecision):
        what = "DeepSpeed" if isinstance(plugin, DeepSpeedPrecision) else f"precision {plugin.precision!r} (GradScaler)"
        raise L2ZOError(f"{what} calls optimizer.step() without the loss closure, which ZO optimizers evaluate "
                        "themselves; use --precision 32 or bf16-mixed")  # fmt: skip


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set in place to rank ``src``'s: the replicas start identical."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        torch.distributed.broadcast(t.data, src)


class ZODDPStrategy(DDPStrategy):
    """Lightning's DDP without ``DistributedDataParallel``: the same launcher, process group, ``reduce`` and
    ``all_gather``, but the module stays unwrapped. ZO computes no gradients, so DDP's gradient buckets (a
    parameter-sized buffer) would be pure cost, and DDP refuses a module without trainable gradients. Rank 0's
    weights are broadcast at the start of every ``fit`` (``validate``/``test`` already sync module states).
    Meta-training all-reduces its small net's gradients itself (``MetaTrainModule``).
    """

    strategy_name = "zo_ddp"

    def setup(self, trainer: L.Trainer) -> None:
        refuse_closureless_precision(self.precision_plugin)
        super().setup(trainer)

    def configure_ddp(self) -> None:
        assert self.model is not None
        broadcast_module_(self.model)


def process_rank(args: DistributedArgs) -> int:
    """This process's global rank, known before any Trainer exists: ``RANK`` (torchrun), else
    ``NODE_RANK * devices + LOCAL_RANK`` (Lightning's launcher sets both for the processes it starts)."""
    if args.world_size == 1:
        return 0
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * args.devices + int(os.environ.get("LOCAL_RANK", 0))


def is_primary(args: DistributedArgs) -> bool:
    """Whether this process is rank 0: the one that writes the run folder and prints."""
    return process_rank(args) == 0


@contextlib.contextmanager
def replica_paths(cfg: C, *fields: str) -> Iterator[C]:
    """``cfg`` itself on rank 0; on every other rank a copy whose ``fields`` (the run folder, the artifact folder)
    point into a private temporary folder, removed on exit. Every process runs the same code (and the same
    collectives), while the files the user sees are written once, by rank 0, and its log alone is shown."""
    if is_primary(cfg.dist):  # type: ignore[attr-defined]
        yield cfg
        return
    global _nested
    logging.getLogger("l2zo").setLevel(logging.WARNING)  # rank 0 narrates the run
    outermost, _nested = not _nested, True
    with tempfile.TemporaryDirectory(prefix=f"l2zo-rank{process_rank(cfg.dist)}-") as tmp:  # type: ignore[attr-defined]
        try:
            yield dataclasses.replace(cfg, **{f: os.path.join(tmp, f) for f in fields})  # type: ignore[type-var]
        except Exception:
            if outermost:  # the process is about to exit: see _RECORD_GRACE_S
                time.sleep(_RECORD_GRACE_S)
            raise
        finally:
            _nested = not outermost


def sum_over_processes(trainer: L.Trainer) -> Any:
    """``reduce_fn`` for ``ZOOptimizer``: a tensor summed over the processes (None on one process)."""
    if trainer.world_size == 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")
