"""The Lightning data module: one task's sampled splits, batched by the shared candidate scorer.

Training batches come from :class:`SeededBatches`, a function of the run seed and the step only, so every
optimizer run with the same seed sees the same batches in the same order (``l2zo compare`` relies on it), and
a resumed run (``l2zo finetune --resume``) picks the stream up at the step it stopped at.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from l2zo.tasks.base import Example, TaskData
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.replicas import shard


class SeededBatches(Sampler[list[int]]):
    """Endless training batches (lists of example indices), step ``start`` onwards; batch t depends on (seed, t) only.

    Epoch e is ``randperm(n)`` number 2e drawn from ``torch.Generator().manual_seed(seed)``, cut into
    ``n // batch_size`` batches (the remainder dropped; one batch of all n when n < batch_size). These are
    exactly the batches of the DataLoader this replaces (``RandomSampler(generator=...)`` re-iterated each
    epoch, ``drop_last`` when n >= batch_size): RandomSampler draws a second, unused randperm as each epoch
    runs out, and the odd draws are made here too so that the orders stay equal. Starting at step t redraws
    the permutations of the epochs before it (cheap next to a step). It has no length: the trainer stops at
    ``max_steps``. With ``world`` > 1 processes, process ``rank`` gets its contiguous slice of each batch
    (``l2zo.train.replicas.shard``): the slices of one step make up the one-process batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1) -> None:  # fmt: skip
        if num_examples < 1 or batch_size < 1 or start < 0:
            raise ValueError(
                f"SeededBatches({num_examples}, {batch_size}, start={start}): need n, size >= 1, start >= 0"
            )
        self.n = num_examples
        self.size = min(batch_size, num_examples)
        self.seed = seed
        self.start = start
        self.rank, self.world = rank, world

    @property
    def per_epoch(self) -> int:
        return self.n // self.size

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        epoch, first = divmod(self.start, self.per_epoch)
        for _ in range(2 * epoch):  # the epochs before ``start``: only their generator draws matter
            torch.randperm(self.n, generator=gen)
        while True:
            order = torch.randperm(self.n, generator=gen).tolist()
            torch.randperm(self.n, generator=gen)  # RandomSampler's draw as the epoch runs out (see above)
            for k in range(first, self.per_epoch):
                yield shard(order[k * self.size : (k + 1) * self.size], self.rank, self.world)
            first = 0


class TaskDataModule(L.LightningDataModule):
    """Dataloaders over ``TaskData``; ``collate`` tokenizes with the ``CandidateScorer``."""

    def __init__(self, data: TaskData, scorer: CandidateScorer, batch_size: int, eval_batch_size: int, seed: int):
        super().__init__()
        self.data = data
        self.scorer = scorer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        # Lightning asks for it after restoring a checkpoint (``Trainer._run``: restore, then the fit loop's
        # ``setup_data``), so a resumed fit starts the stream at the restored step.
        start = int(self.trainer.global_step) if self.trainer is not None else 0
        rank, world = self._rank_world()
        return DataLoader(
            self.data.train,  # type: ignore[arg-type]
            batch_sampler=SeededBatches(len(self.data.train), self.batch_size, self.seed, start, rank, world),
            collate_fn=self.scorer.collate,
        )

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _eval(self, examples: list[Example]) -> DataLoader:
        # Each process scores its own slice, without the padding repeats of a DistributedSampler; the module sums.
        examples = shard(examples, *self._rank_world())
        return DataLoader(examples, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.scorer.collate)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return self._eval(self.data.dev)

    def test_dataloader(self) -> DataLoader:
        return self._eval(self.data.test)
