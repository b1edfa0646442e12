"""Tasks: the Task interface and registry, the MeZO GLUE/SuperGLUE tasks, user YAML tasks, candidate scoring."""

from l2zo.tasks.base import Example, SplitSizes, Task, TaskData, get_task, register_task, task_names
from l2zo.tasks.scoring import CandidateScorer, ScoringBatch

__all__ = [
    "CandidateScorer",
    "Example",
    "ScoringBatch",
    "SplitSizes",
    "Task",
    "TaskData",
    "get_task",
    "register_task",
    "task_names",
]
