"""``DistributedArgs``: how many processes a run spans, one nested config shared by finetune, compare and meta-train.

The strategy itself is built in ``l2zo.train.strategies.make_strategy`` (Lightning lives under ``l2zo/train/``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from l2zo.config.checks import check_fields
from l2zo.errors import L2ZOError

Strategy = Literal["auto", "ddp", "fsdp"]


@dataclasses.dataclass
class DistributedArgs:
    """Devices and nodes (flags --devices ... or --dist.devices ...; YAML keys at the top or under dist:)"""

    devices: int = 1
    """processes (one device each) per node; --batch-size stays the batch of one step over all of them"""
    num_nodes: int = 1
    """nodes (start the same command on each, with MASTER_ADDR, MASTER_PORT and NODE_RANK set)"""
    strategy: Strategy = "auto"
    """auto (one process), ddp (data-parallel ZO: every process holds the model and a slice of each batch) or
    fsdp (sharded ZO: each process holds a slice of the model)"""
    checksum_every: int = 100
    """compare a checksum of the parameters across processes every N steps and fail if they differ; 0: never"""

    def __post_init__(self) -> None:
        check_fields(self, positive=("devices", "num_nodes"))
        if self.checksum_every < 0:
            raise L2ZOError(f"--checksum-every must be 0 (never) or positive, got {self.checksum_every}")
        if self.world_size > 1 and self.strategy == "auto":
            raise L2ZOError(f"--devices {self.devices} --num-nodes {self.num_nodes} runs {self.world_size} processes: "
                            "choose how with --strategy ddp (data-parallel) or --strategy fsdp (sharded)")  # fmt: skip

    @property
    def world_size(self) -> int:
        """Processes in all."""
        return self.devices * self.num_nodes
