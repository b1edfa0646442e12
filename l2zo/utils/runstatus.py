"""How a run ended, told honestly: the status words, the exit codes, and signals turned into exceptions.

Shared by ``l2zo finetune``, every run of ``l2zo compare`` and ``l2zo meta-train`` (the Lightning side is
``l2zo.train.lifecycle``). A run's ``summary.json`` carries one of:

- ``running``: written when the run starts; found later only after a SIGKILL or a crash of the machine;
- ``ok``: it finished (exit 0);
- ``failed``: it could not finish (a non-finite or diverged loss, a user error found mid-run; exit 2);
- ``interrupted``: SIGTERM or SIGINT (exit 128 + the signal: 143 or 130);
- ``error``: an unexpected exception, i.e. a bug (exit 1).

Signals: Lightning turns SIGTERM into a ``SystemExit`` without a code (exit 0, as if done) and SIGINT into
``sys.exit(1)`` without a word. Inside :func:`signal_guard` both become :class:`RunInterrupted` instead:
at once, or inside ``guard.deferred()`` at the next safe point (``guard.check()``, e.g. a batch boundary),
so that a checkpoint is never taken halfway through a step. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from l2zo.errors import L2ZOError

log = logging.getLogger("l2zo")

RUNNING, OK, FAILED, INTERRUPTED, ERROR = "running", "ok", "failed", "interrupted", "error"
EXIT_CODES = {OK: 0, ERROR: 1, FAILED: 2}  # interrupted: 128 + the signal number

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(BaseException):
    """A run stopped by SIGTERM or SIGINT.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that code catching ``Exception`` to isolate one
    failing run (``l2zo compare``) lets it through and the whole command stops.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.detail = detail

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.signame}" + (f"; {self.detail}" if self.detail else "")


def one_line(exc: BaseException) -> str:
    """The exception as one line: its message, prefixed by its type unless it is a user error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (L2ZOError, RunInterrupted)) else f"{type(exc).__name__}: {text}"


def outcome(exc: BaseException | None) -> tuple[str, int]:
    """(status, exit code) of a run that ended with ``exc`` (None: it finished)."""
    if exc is None:
        return OK, EXIT_CODES[OK]
    if isinstance(exc, RunInterrupted):
        return INTERRUPTED, exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, 128 + signal.SIGINT
    if isinstance(exc, L2ZOError):
        return FAILED, EXIT_CODES[FAILED]
    return ERROR, EXIT_CODES[ERROR]


def record_end(summary: dict[str, Any], exc: BaseException | None) -> dict[str, Any]:
    """Set ``status`` and ``exit_code`` in ``summary`` for a run that ended with ``exc`` (None: it finished), and
    why: ``error`` (failed, error) or ``reason`` and ``signal`` (interrupted)."""
    status, code = outcome(exc)
    summary.update(status=status, exit_code=code)
    if isinstance(exc, RunInterrupted):
        summary.update(reason=f"interrupted by {exc.signame}", signal=exc.signame)
    elif exc is not None:
        summary["error"] = one_line(exc)
    return summary


class SignalGuard:
    """SIGTERM and SIGINT as :class:`RunInterrupted`; see the module docstring."""

    def __init__(self) -> None:
        self.pending: int | None = None  # the first signal received
        self._deferred = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        first = self.pending is None
        if first:
            self.pending = signum
        if self._deferred and first:
            name = signal.Signals(signum).name
            log.warning("l2zo: %s received; stopping after the current step (send it again to stop at once)", name)
            return
        raise RunInterrupted(signum)

    def install(self) -> None:
        """(Re)take SIGTERM and SIGINT, e.g. after Lightning put its own SIGTERM handler in place.

        Only from the main thread (Python delivers signals there); a signal ignored when the guard started
        (``nohup``, a background job's SIGINT) stays ignored.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            if self._previous.get(signum, signal.getsignal(signum)) is signal.SIG_IGN:
                continue
            signal.signal(signum, self._handler)

    def _start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
        self.install()

    def _stop(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @contextlib.contextmanager
    def deferred(self) -> Iterator[SignalGuard]:
        """Inside, a first signal is only recorded; ``check()`` (called at safe points, and on leaving) raises."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1
        self.check()

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived."""
        if self.pending is not None:
            raise RunInterrupted(self.pending)


_active: SignalGuard | None = None


@contextlib.contextmanager
def signal_guard() -> Iterator[SignalGuard]:
    """The process's guard: created and installed by the outermost call, shared by nested ones (a compare's runs)."""
    global _active
    if _active is not None:
        yield _active
        return
    guard = _active = SignalGuard()
    guard._start()
    try:
        yield guard
    finally:
        guard._stop()
        _active = None
