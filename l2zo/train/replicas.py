"""Data-parallel replicas: each process's slice of the data, and the check that the replicas stay identical.

Data-parallel ZO keeps every process's weights bit-identical without ever sending them: the same z (a function
of the run seed and the step), the same summed losses, the same update. :class:`ReplicaChecksum` verifies it
every N steps with an all-gathered checksum of the raw parameter bits, and fails the run loudly if they part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor, nn

from l2zo.errors import L2ZOError

T = TypeVar("T")

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements widened to int64 at a time: no parameter-sized copy


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Process ``rank``'s contiguous slice of ``items``; the slices of ranks 0..world-1 partition ``items`` in
    order and differ in length by at most one."""
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


@torch.no_grad()
def param_checksum(module: nn.Module) -> Tensor:
    """An int64 scalar (on the parameters' device) that changes with any bit of any parameter or buffer of
    ``module``: the raw bits of each tensor summed as integers (wrapping), weighted by the tensor's position."""
    total: Tensor | None = None
    tensors = [*module.parameters(), *module.buffers()]
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.is_floating_point() else flat
        s = torch.zeros((), dtype=torch.int64, device=t.device)
        for k in range(0, bits.numel(), _CHUNK):
            s += bits[k : k + _CHUNK].to(torch.int64).sum()
        total = s * (i + 1) if total is None else total + s.to(total.device) * (i + 1)
    return total if total is not None else torch.zeros((), dtype=torch.int64)


class ReplicaChecksum(L.Callback):
    """Every ``every`` optimizer steps (and when training ends), all-gather :func:`param_checksum` of the module
    and raise ``L2ZOError`` if the processes differ. On one process it does nothing."""

    def __init__(self, every: int) -> None:
        self.every = every

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        local = param_checksum(pl_module).to(trainer.strategy.root_device)
        sums = trainer.strategy.all_gather(local).reshape(-1).tolist()
        if len(set(sums)) > 1:
            raise L2ZOError(f"the {len(sums)} processes' parameters differ at step {trainer.global_step} (checksum per "
                            f"rank: {sums}); data-parallel ZO needs identical replicas: a non-deterministic kernel "
                            "or a hardware fault made them part. The run is stopped")  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)
