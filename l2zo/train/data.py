"""The Lightning data module: one task's sampled splits, batched by the shared candidate scorer.

Training batches come from a ``RandomSampler`` seeded only by the run seed, so every optimizer run
with the same seed sees the same batches in the same order (``l2zo compare`` relies on it).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from l2zo.tasks.base import Example, TaskData
from l2zo.tasks.scoring import CandidateScorer


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
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.data.train,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=RandomSampler(self.data.train, generator=gen),  # type: ignore[arg-type]
            collate_fn=self.scorer.collate,
            drop_last=len(self.data.train) >= self.batch_size,
        )

    def _eval(self, examples: list[Example]) -> DataLoader:
        return DataLoader(examples, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.scorer.collate)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        return self._eval(self.data.dev)

    def test_dataloader(self) -> DataLoader:
        return self._eval(self.data.test)
