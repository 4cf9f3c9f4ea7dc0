"""The task specs (trainer/tasks/): the registry matches the validation pass's task list, every registered task
provides every hook of TaskSpec, and nothing outside trainer/tasks/ (and the validation pass) branches on the
task name."""

import os
import re
from types import SimpleNamespace

import pytest

from hstu.trainer import tasks
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.config_checks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_is_the_validated_task_list():
    assert tuple(tasks.TASK_REGISTRY) == TASKS


@pytest.mark.parametrize("name", TASKS)
def test_each_task_implements_the_spec(name):
    task = tasks.get_task(load_config(None, [f"task={name}"]))
    assert isinstance(task, tasks.TaskSpec) and task.name == name
    hooks = [n for n in dir(tasks.TaskSpec) if not n.startswith("_")]
    assert {"build_data", "build_model", "compute_loss", "prepare_batch", "wrap_sharded_tables", "evaluate",
            "baseline", "export"} <= set(hooks)
    missing = [n for n in hooks if not hasattr(task, n)]
    assert not missing


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="key 'task' = 'nope' is not one of"):
        tasks.get_task(SimpleNamespace(task="nope"))


def test_no_task_name_branch_outside_the_task_package():
    pattern = re.compile(r"""task\s*[!=]=|getattr\(cfg,\s*["']task["']""")
    hits = []
    for folder in ("trainer", "serving", "modules", "launch"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, ROOT)
            if rel.startswith(os.path.join("trainer", "tasks")):
                continue
            for f in files:
                path = os.path.join(rel, f)
                if f.endswith(".py") and path != os.path.join("trainer", "config_checks.py"):
                    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
                    hits += [f"{path}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits
