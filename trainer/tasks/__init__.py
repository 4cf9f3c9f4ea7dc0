"""Task specs: what the ONE train loop (trainer/train.py) trains, selected by ``RunConfig.task``.

A task is a :class:`TaskSpec` — an object built per run from the RunConfig (:func:`get_task`) that supplies every
task-specific stage; the loop and the tools around it (epochs, optimizer, eval cadence, best epoch, logging,
checkpoints, ``hstu prepare`` / ``hstu eval`` / ``hstu export``, the sharded path) only call these hooks and never
branch on the task name. Tasks live in their own modules and are registered in :data:`TASK_REGISTRY`:

- ``retrieval`` (trainer/tasks/retrieval.py): next-item retrieval, sampled softmax, full-ranking evaluation;
- ``ranking`` (trainer/tasks/ranking.py): generative ranking, multi-task BCE, NE / AUC / GAUC (docs/ranking.md).

The value lists and per-task config rules stay in the one validation pass (trainer/config_checks.py); its
``TASKS`` are exactly the registry's keys (tests/test_tasks.py).
"""

from __future__ import annotations

from typing import Dict

from hstu.trainer.config import ConfigError, RunConfig
from hstu.trainer.config_checks import RANKING_DATASETS, TASKS  # noqa: F401  (re-exported)
from hstu.trainer.tasks.spec import TaskData, TaskSpec
from hstu.trainer.tasks.ranking import RankingTask
from hstu.trainer.tasks.retrieval import RetrievalTask

TASK_REGISTRY: Dict[str, type] = {"retrieval": RetrievalTask, "ranking": RankingTask}


def get_task(cfg: RunConfig) -> TaskSpec:
    """cfg.task -> a fresh task object for this run (raises ConfigError for a task name not registered)."""
    cls = TASK_REGISTRY.get(cfg.task)
    if cls is None:
        raise ConfigError(f"key 'task' = {cfg.task!r} is not one of {list(TASK_REGISTRY)}")
    return cls(cfg)


make_task = get_task  # the name callers used before the task package

__all__ = ["TASK_REGISTRY", "TaskData", "TaskSpec", "RankingTask", "RetrievalTask", "get_task", "make_task"]
