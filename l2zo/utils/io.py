"""Atomic writes: a reader (or a crash) never sees a half-written report or artifact.

Every write goes to a temp file or folder beside its target (``.NAME.XXXX.tmp``) and is renamed over it
when complete. A killed write leaves its temp behind; the next successful write of the same target
removes such leftovers. JSON is strict (no NaN or Infinity): see :func:`strict_json`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

NON_FINITE_KEY = "non_finite"


def _remove_leftovers(path: Path) -> None:
    """Delete the temp files/folders that killed writes of ``path`` left beside it (``.NAME.*.tmp``, ``.NAME.old``)."""
    for p in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), path.with_name(f".{path.name}.old")]:
        if not p.exists():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary temp file beside ``path``; on success fsync it and rename it over ``path``, on error delete it.

    Streamed to disk (a large checkpoint is never held twice in memory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _remove_leftovers(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def strict_json(obj: Any) -> tuple[Any, dict[str, str]]:
    """``obj`` with every non-finite number replaced by None, and where each was: ``{"a.b[2]": "nan"}``.

    Python's json writes NaN and Infinity, which are not JSON; strict readers (jq, browsers) reject them.
    Tuples become lists; anything else that is not JSON is left for ``default=str``.
    """
    found: dict[str, str] = {}

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral)):
            x = float(x)
            if not math.isfinite(x):
                found[where] = str(x)
                return None
        return x

    return walk(obj, ""), found


def dumps_strict(obj: Any, **kw: Any) -> str:
    """JSON text of ``obj`` without NaN/Infinity. A dict gets a ``non_finite`` key saying which values were
    not finite (they are written as null), so a reader can tell a missing number from a diverged one."""
    clean, found = strict_json(obj)
    if found and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = {**clean.get(NON_FINITE_KEY, {}), **found}
    return json.dumps(clean, allow_nan=False, default=str, **kw)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (see :func:`dumps_strict`), sorted keys, written atomically."""
    write_text_atomic(path, dumps_strict(obj, indent=2, sort_keys=True) + "\n")


def write_yaml_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success rename it to ``path``, on error delete it.

    With ``overwrite`` an existing ``path`` is replaced only after the new folder is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(path)
