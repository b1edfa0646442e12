"""A fine-tune's resumable checkpoint: one file, ``LOGDIR/checkpoints/last.ckpt``, written when and how it is safe.

*When.* A checkpoint is the state at the end of a step n: after its update and after the dev evaluation that
Lightning runs inside ``fit`` at n (every ``eval_every`` steps). Taken between the two, a resume would skip that
evaluation: Lightning's restart counts the evaluation at the restored step as done. So :class:`StepCheckpoints`
saves at the end of every ``every``-th step and, on SIGTERM/SIGINT, at the end of the current step, then stops;
at a step with an evaluation both wait for it to end (a second signal stops at once, keeping the previous
checkpoint). Lightning logs a step's training metrics after the hook that saves; the stop waits for that too,
so the TensorBoard curves of a stopped and resumed run have every step. The standalone evaluations (step 0, the
final one, test) stop at once, as ``StopOnSignal`` does; the state after ``fit`` is saved first (``after_fit``).
These are the two restart points of Lightning 2.6's loops (``_TrainingEpochLoop.update_restart_stage``):
"on train batch end" and "on last" (after the evaluation); tests/test_finetune_resume.py stops at each.

*How.* Only the last checkpoint is kept (a full model's is as large as the model, plus the optimizer state).
:class:`AtomicCheckpointIO` streams it to a temp file beside the target and renames it over the target, so a
kill during the write leaves the previous checkpoint whole, and the model is never held twice in memory.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from l2zo.errors import L2ZOError
from l2zo.train.lifecycle import StopOnSignal
from l2zo.utils.io import atomic_file
from l2zo.utils.runstatus import SignalGuard, one_line

CHECKPOINT_DIR = "checkpoints"  # inside the run folder
LAST_CHECKPOINT = "last.ckpt"
# What torch.load raises for a truncated, foreign or unsafe file.
UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)


def last_checkpoint(logdir: str | Path) -> Path:
    return Path(logdir) / CHECKPOINT_DIR / LAST_CHECKPOINT


class AtomicCheckpointIO(TorchCheckpointIO):
    """``trainer.save_checkpoint`` streamed to a temp file and renamed over its target (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (only the small records are read) and without executing anything
    in it (``weights_only``); ``L2ZOError`` if it is truncated or not a checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UNREADABLE as exc:  # a truncated zip, a foreign pickle, not a torch file at all
        why = one_line(exc).split(". ")[0]  # torch appends a paragraph of advice
        raise L2ZOError(f"cannot read the checkpoint {path} ({why}): it is truncated or not a checkpoint; "
                        "start the run again with --overwrite") from None  # fmt: skip
    if not isinstance(ckpt, dict):
        raise L2ZOError(f"{path} is not a Lightning checkpoint; start the run again with --overwrite")
    return ckpt


class StepCheckpoints(StopOnSignal):
    """Save ``path`` at the end of every ``every``-th step (0: never) and, on a signal, at the end of the current
    step, then stop (see the module doc). ``record()`` is stored in each checkpoint under ``key``.

    ``eval_every`` must be the trainer's ``val_check_interval`` (evaluations at the multiples of it).
    ``saved_step``: the step of the checkpoint on disk (the restored one, for a resumed run).
    """

    def __init__(self, guard: SignalGuard, path: Path, *, every: int, eval_every: int, key: str,
                 record: Callable[[], dict[str, Any]], saved_step: int | None = None) -> None:  # fmt: skip
        super().__init__(guard)
        self.path = path
        self.every = every
        self.eval_every = eval_every
        self.key = key
        self.record = record
        self.saved_step = saved_step

    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint now (unless the one on disk is already at this step)."""
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self.saved_step = int(trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.record()

    def _end_of_step(self, trainer: L.Trainer, stop: bool) -> None:
        signalled = self.guard.pending is not None
        if signalled or (self.every and trainer.global_step % self.every == 0):
            self.save(trainer)
        if signalled and stop:
            self.guard.check()  # raises RunInterrupted

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        # Saved here, between the update and the logging of the step's metrics; the stop waits for the logging
        # (on_train_batch_start of the next step, or ``after_fit``). A step with an evaluation ends with it.
        if trainer.global_step % self.eval_every != 0:
            self._end_of_step(trainer, stop=False)

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        # Stop before the next step if the checkpoint holds the last one; a signal that came after it was saved
        # lets this step run and stops at its end.
        if self.saved_step == trainer.global_step:
            self.guard.check()

    def on_validation_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # a standalone evaluation stops at once
            super().on_validation_batch_end(trainer)

    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._end_of_step(trainer, stop=True)

    def after_fit(self, trainer: L.Trainer) -> None:
        """Once ``fit`` has returned: save the trained state if checkpoints are on (a signal during the final
        evaluation or the test then loses no step), and stop if a signal came during the last step."""
        if self.every or self.guard.pending is not None:
            self.save(trainer)
        self.guard.check()
