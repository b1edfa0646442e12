"""The Lightning side of honest run endings (the rest is ``l2zo.utils.runstatus``).

Lightning installs its own SIGTERM handler for each ``fit``/``validate``/``test`` (``_SignalConnector``): it
sets ``trainer.received_sigterm``, and the loops then raise ``SIGTERMException``, a ``SystemExit`` without a
code, so the process exits 0 as if it had finished. SIGINT becomes ``KeyboardInterrupt``, which Lightning
turns into ``sys.exit(1)`` without a word. :class:`StopOnSignal` takes both signals back from Lightning as
soon as its loops start and ends the run at the next batch boundary with ``RunInterrupted``;
:func:`trainer_call` wraps each trainer call.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from l2zo.errors import L2ZOError
from l2zo.utils.runstatus import RunInterrupted, SignalGuard


class StopOnSignal(L.Callback):
    """Stop at the first batch boundary after SIGTERM/SIGINT; ``on_interrupt(trainer)`` runs first (a checkpoint).

    Lightning registers its SIGTERM handler after ``on_fit_start`` and restores the one it found (the guard's)
    at teardown; the ``on_*_start`` hooks below run after that registration, so the guard handles every signal.
    """

    def __init__(self, guard: SignalGuard, on_interrupt: Callable[[L.Trainer], None] | None = None) -> None:
        self.guard = guard
        self.on_interrupt = on_interrupt

    def _take_signals(self, *_: Any) -> None:
        self.guard.install()

    on_train_start = on_validation_start = on_test_start = _take_signals

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if self.guard.pending is None:
            return
        if self.on_interrupt is not None and trainer.training:
            self.on_interrupt(trainer)
        self.guard.check()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._stop_if_signalled(trainer)


class FailOnNonFiniteLoss(L.Callback):
    """End the run as failed at the first non-finite training loss (logged under ``tag``).

    The ZO optimizers stop there themselves (restoring theta); a first-order optimizer would step on into NaN
    weights and finish with ``status: ok``.
    """

    def __init__(self, tag: str = "train/loss") -> None:
        self.tag = tag

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        loss = trainer.callback_metrics.get(self.tag)  # this step's value: read live from the logged results
        if loss is not None and not bool(torch.isfinite(loss)):
            raise L2ZOError(f"non-finite loss {float(loss)} at step {trainer.global_step - 1}: the run diverged; "
                            "lower --lr")  # fmt: skip


@contextlib.contextmanager
def trainer_call(guard: SignalGuard) -> Iterator[None]:
    """Around ``trainer.fit/validate/test``: a signal waits for the next batch boundary (``StopOnSignal``), or
    the call's end; a ``SIGTERMException`` (a SIGTERM that reached Lightning first) becomes ``RunInterrupted``."""
    try:
        with guard.deferred():
            yield
    except SIGTERMException as exc:
        raise RunInterrupted(signal.SIGTERM) from exc
