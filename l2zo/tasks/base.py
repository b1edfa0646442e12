"""The one task interface every dataset implements, and the task registry.

A task turns raw data into :class:`Example` objects: a prompt and a list of candidate continuations
(the verbalized labels, or COPA's two choices) with the index of the correct one. Everything that
depends on a tokenizer or a model (candidate scoring, the loss, accuracy) lives in
``l2zo.tasks.scoring`` and is shared by all tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from l2zo.errors import L2ZOError, unknown_choice


@dataclass(frozen=True)
class Example:
    """One classification example.

    Attributes:
        prompt: the text before the candidate, e.g. "a gripping film . It was".
        candidates: continuations scored after the prompt, e.g. (" terrible", " great").
        label: index into ``candidates`` of the correct continuation.
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class SplitSizes:
    """How many examples to sample per split (MeZO: 1000 / 500 / up to 1000)."""

    train: int = 1000
    dev: int = 500
    test: int = 1000


@dataclass
class TaskData:
    """The three sampled splits of a task, plus where they came from (for reports)."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: str = ""
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Task(Protocol):
    """A classification task scored by candidate log-likelihood.

    Attributes:
        name: registry name, e.g. "sst2" or "synth-parity".
        description: one line for ``l2zo tasks``.
        loss_kind: "classification" (cross-entropy over the length-normalised candidate
            log-likelihoods, MeZO's ``train_as_classification``) or "lm" (teacher-forced LM loss on
            the correct candidate's tokens, MeZO's choice for COPA). Accuracy is always the argmax
            over candidates.
        default_dev: the default dev size (MeZO uses 100 for CB and COPA).
        default_sizes: the split sizes used when the user gives none (MeZO's 1000 / default_dev / 1000,
            or a YAML task's own ``sizes``).
    """

    name: str
    description: str
    loss_kind: str
    default_dev: int

    @property
    def default_sizes(self) -> SplitSizes: ...

    def load(self, data_dir: Path | None, sizes: SplitSizes, seed: int) -> TaskData:
        """Sample train/dev/test with a fixed data seed.

        ``data_dir`` is the root of a local copy laid out like ../shared/data (one folder per task);
        ``None`` loads from the Hugging Face hub. Raises :class:`L2ZOError` for a missing file, an
        empty split, or a template field missing from the data.
        """
        ...


# name -> (factory, one-line description). Factories are cheap: they build no data.
_REGISTRY: dict[str, tuple[Callable[[], Task], str]] = {}


def register_task(name: str, description: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator registering a zero-argument task factory under ``name``."""

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} registered twice")
        _REGISTRY[name] = (factory, description)
        return factory

    return deco


def _ensure_builtin_tasks_loaded() -> None:
    # Importing the modules runs their @register_task decorators.
    from l2zo.tasks import glue, synthetic  # noqa: F401


def task_names() -> dict[str, str]:
    """All registered task names with their one-line descriptions."""
    _ensure_builtin_tasks_loaded()
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def get_task(name: str) -> Task:
    """Return the task called ``name``, or a user task from a YAML file path.

    A name ending in .yaml/.yml is read as a user-defined task (``l2zo.tasks.custom``).
    """
    if name.endswith((".yaml", ".yml")):
        from l2zo.tasks.custom import load_yaml_task

        return load_yaml_task(Path(name))
    _ensure_builtin_tasks_loaded()
    if name not in _REGISTRY:
        raise unknown_choice("task", name, _REGISTRY, "A user-defined task is given as a path to its YAML file.")
    return _REGISTRY[name][0]()


__all__ = [
    "Example",
    "L2ZOError",
    "SplitSizes",
    "Task",
    "TaskData",
    "get_task",
    "register_task",
    "task_names",
]
