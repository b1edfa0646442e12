"""``ZArgs``: how a ZO run draws z and how many passes over the weights its step makes, one nested config shared
by finetune and compare (flags --z-source, --z-table-size, --cache-z, --two-pass; YAML keys at the top or under zo:).

What a seed means depends on ``z_source`` (and, for the table, ``z_table_size``): a run records both, and a
resume with other values is refused (``l2zo.train.finetune``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from l2zo.engine.noise_table import DEFAULT_SIZE, WINDOW, NoiseTable
from l2zo.engine.seeding import ZSource
from l2zo.errors import L2ZOError

ZSourceKind = Literal["randn", "table"]


@dataclasses.dataclass
class ZArgs:
    """How z is drawn and applied (see BENCHMARKS.md for what each costs)"""

    z_source: ZSourceKind = "randn"
    """randn: z from seeded Mersenne-twister chunks (exact N(0,1), ~10-20 ns a number on CPU); table: windows of
    one seeded table of N(0,1) noise (memory speed; another definition of z: see l2zo/engine/noise_table.py)"""
    z_table_size: int = DEFAULT_SIZE
    """entries of the noise table (--z-source table): its memory, and how close E[z z^T] is to the identity
    (eigenvalues within about 1 +/- 3*sqrt(512/size))"""
    cache_z: bool = False
    """ZO optimizers draw z once per step and keep it (one parameter-sized copy): same parameters, fewer
    regenerations (--z-source randn only; see BENCHMARKS.md)"""
    two_pass: bool = False
    """two passes over the weights per step instead of three: the restore and update of step t and the
    perturbation of step t+1 are one pass (MeZO-like methods; the same parameters to rounding, restored before
    every evaluation and checkpoint)"""

    def __post_init__(self) -> None:
        if self.z_source == "table" and self.z_table_size < 2 * WINDOW:
            raise L2ZOError(f"--z-table-size must be at least {2 * WINDOW}, got {self.z_table_size}")
        if self.z_source == "table" and self.cache_z:
            raise L2ZOError("--cache-z keeps a copy of z drawn by randn; a noise table's z is stored already: "
                            "drop --cache-z or use --z-source randn")  # fmt: skip

    def make_source(self, workers: int | None = None) -> ZSource:
        """The ZSource these options describe."""
        table = NoiseTable(self.z_table_size) if self.z_source == "table" else None
        return ZSource(workers=workers, cache=self.cache_z, table=table)

    def describe(self) -> dict[str, Any]:
        """What a seed means under these options (recorded with the run)."""
        return self.make_source(workers=1).describe()
