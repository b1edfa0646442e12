"""Say how big the evaluation is before it starts, and how fast it went.

Evaluation scores every candidate of every example: on a 135M model, MeZO's 500 dev + 1000 test examples
at 256 tokens take many minutes on a CPU, several times per run. The user should know before waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning as L

from l2zo.tasks.base import Example

log = logging.getLogger("l2zo")


def evaluations_planned(steps: int, eval_every: int) -> int:
    """Dev evaluations in a run: at step 0, every ``eval_every`` steps, and at the end if not on the grid."""
    return 1 + steps // eval_every + (1 if steps % eval_every else 0)


def _candidates(examples: Sequence[Example]) -> str:
    counts = sorted({len(e.candidates) for e in examples}) or [0]
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def describe(dev: Sequence[Example], test: Sequence[Example], *, dev_evals: int, max_length: int,
             batch_size: int) -> str:  # fmt: skip
    """One line: examples, candidates, sequences and the token cap of the dev and test evaluations."""

    def split(name: str, ex: Sequence[Example], times: str) -> str:
        seqs = sum(len(e.candidates) for e in ex)
        return f"{name} {len(ex)} examples x {_candidates(ex)} candidates ({seqs} sequences) {times}"

    return (f"evaluation: {split('dev', dev, f'x {dev_evals} evaluations')}, {split('test', test, 'once')}; "
            f"up to {max_length} tokens per sequence, {batch_size} examples per batch "
            "(smaller: --num-dev, --num-test, --max-length)")  # fmt: skip


class EvalReport(L.Callback):
    """Logs :func:`describe` before the first evaluation, then each evaluation's examples per second
    (the first dev one and the test at INFO, the rest at DEBUG)."""

    def __init__(self, dev: Sequence[Example], test: Sequence[Example], *, dev_evals: int, max_length: int,
                 batch_size: int) -> None:  # fmt: skip
        self.dev, self.test = dev, test
        self.text = describe(dev, test, dev_evals=dev_evals, max_length=max_length, batch_size=batch_size)
        self.announced = False
        self.dev_done = 0
        self._t0 = 0.0

    def _start(self, *_: Any) -> None:
        if not self.announced:
            log.info("%s", self.text)
            self.announced = True
        self._t0 = time.perf_counter()

    on_validation_start = on_test_start = _start

    def _rate(self, name: str, n: int, step: int, level: int) -> None:
        dt = time.perf_counter() - self._t0
        log.log(level, "%s evaluation at step %d: %d examples in %.1f s (%.1f examples/s)", name, step, n, dt,
                n / dt if dt > 0 else float("inf"))  # fmt: skip

    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._rate("dev", len(self.dev), trainer.global_step, logging.INFO if self.dev_done == 0 else logging.DEBUG)
        self.dev_done += 1

    def on_test_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._rate("test", len(self.test), trainer.global_step, logging.INFO)
