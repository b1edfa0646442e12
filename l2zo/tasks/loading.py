"""``load_task_data``: a run's task and its train/dev/test splits, as ``DataArgs`` asks."""

from __future__ import annotations

from pathlib import Path

from l2zo.config import DataArgs
from l2zo.errors import L2ZOError
from l2zo.tasks.base import SplitSizes, Task, TaskData, get_task


def load_task_data(data: DataArgs) -> tuple[Task, TaskData]:
    task = get_task(data.task)
    # Task defaults (MeZO's 1000/500/1000, or a YAML task's own sizes), overridden by the flags.
    default = task.default_sizes
    sizes = SplitSizes(
        train=data.num_train or default.train, dev=data.num_dev or default.dev, test=data.num_test or default.test
    )
    loaded = task.load(Path(data.data_dir) if data.data_dir else None, sizes, data.data_seed)
    for split in ("train", "dev", "test"):
        if not getattr(loaded, split):
            raise L2ZOError(f"task {task.name!r} has an empty {split} split; check the data files or the split sizes")
    return task, loaded
