"""User-facing errors.

An ``L2ZOError`` is a mistake in what the user asked for (unknown task, bad flag, missing file ...).
The CLI prints its message, without a traceback, and exits non-zero. Messages name the problem and
the fix or the valid choices.
"""

from __future__ import annotations

from collections.abc import Iterable


class L2ZOError(Exception):
    """A user error with a message that says what is wrong and how to fix it."""


def unknown_choice(kind: str, value: str, choices: Iterable[str], hint: str = "") -> L2ZOError:
    """Build the error for a name that is not among the valid ``choices``.

    Example: ``unknown_choice("task", "sst3", ["sst2", "rte"])`` ->
    "unknown task 'sst3'; valid choices: rte, sst2".
    """
    listed = ", ".join(sorted(choices))
    msg = f"unknown {kind} {value!r}; valid choices: {listed}"
    if hint:
        msg += f". {hint}"
    return L2ZOError(msg)


def not_utf8(path: object, exc: UnicodeDecodeError, what: str = "file") -> L2ZOError:
    """Build the error for a text file that is not UTF-8, naming the first bad byte's position."""
    return L2ZOError(f"{what} {path} is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                     "save it as UTF-8")  # fmt: skip
