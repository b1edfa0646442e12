"""Run folders: checked before anything is created, locked while a run writes them, cleared for --overwrite.

The lock is an ``fcntl.flock`` on ``<folder>/.l2zo.lock``: a second run into the same folder is refused at
once, naming the process that holds it. The operating system drops the lock when its process ends, however
it ends (a SIGKILL included), so a stale lock never blocks; the empty lock file stays (removing it would
let two processes lock two different files of the same name).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from l2zo.errors import L2ZOError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): run folders are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".l2zo.lock"
# Subfolders a run writes (fine-tuned weights, Lightning checkpoints); --overwrite removes them with the files.
RUN_SUBDIRS = ("model", "checkpoints")


def _missing_top(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir -p`` would create first)."""
    top = None
    p = path
    while not p.exists():
        top = p
        if p.parent == p:
            break
        p = p.parent
    return top


def check_writable_dir(path: str | Path, flag: str = "--logdir") -> None:
    """Raise ``L2ZOError`` unless ``path`` is a folder this process can write, or one it can create.

    Creates nothing that outlives the call (writability is probed with a temp folder in the nearest
    existing ancestor, removed at once).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise L2ZOError(f"{flag} {path} is a file, not a folder; pick another {flag}")
    anc = path
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise L2ZOError(f"{flag} {path} cannot be created: {anc} is a file; pick another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".l2zo-write-test-"))
    except OSError as exc:
        raise L2ZOError(
            f"{flag} {path} is not writable ({exc.strerror or exc} in {anc}); pick a folder you can write to"
        ) from None


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds (part of) a run: TensorBoard events, a config.yaml or a summary.json."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (
        any(path.glob("events.out.tfevents.*")) or (path / "summary.json").exists() or (path / "config.yaml").exists()
    )


def clear_run(path: str | Path) -> None:
    """Remove everything a run wrote into ``path``: its files, ``model/``, ``checkpoints/`` and temp leftovers.

    Other subfolders (another tool's, or runs nested below) are kept; the lock file stays.
    """
    for entry in Path(path).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if entry.name in RUN_SUBDIRS or (entry.name.startswith(".") and entry.name.endswith((".tmp", ".old"))):
                shutil.rmtree(entry)
        else:
            entry.unlink()


@dataclass
class RunFolder:
    """A locked run folder. ``started``: the run has written into it (a refusal before that removes what was created)."""

    path: Path
    created: Path | None  # the outermost folder this run created, if any
    started: bool = False


def _take_lock(path: Path, flag: str) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise L2ZOError(
                f"{path} is in use by another l2zo run (pid {holder}); wait for it to end or pick another {flag}"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def locked_run_folder(path: str | Path, flag: str = "--logdir") -> Iterator[RunFolder]:
    """Create ``path`` if needed and hold its lock until the block ends.

    If the block raises before setting ``folder.started``, the folders created here are removed again,
    so a refused run leaves nothing behind.
    """
    path = Path(path)
    check_writable_dir(path, flag)
    created = _missing_top(path)
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path, created)
    try:
        fd = _take_lock(path, flag)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    try:
        yield folder
    except BaseException:
        if not folder.started and created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
