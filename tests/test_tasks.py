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


def test_retrieval_negatives_are_drawn_once_in_prepare_batch(tmp_path):
    """Plain path: prepare_batch draws the negatives (the only draw of ctx.neg_generator), compute_loss draws
    nothing, and the loss equals the pre-refactor plain path (negatives drawn inside the loss from the same seed)."""
    import torch

    from hstu.modules.losses import next_item_labels, sampled_softmax_loss
    from hstu.trainer.pipeline import PreparedBatch
    from hstu.trainer.tasks.retrieval import build_data, build_model_for

    cfg = load_config(None, [
        "data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=300",
        "data.synthetic.max_seq_len=12", "data.max_seq_len=12", "data.batch_size=8", "model.embedding_dim=8",
        "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2", "loss.num_negatives=5",
        "train.progress=false", f"data.cache_dir={tmp_path}"])
    seqs, loader, _ = build_data(cfg)
    batch = next(iter(loader))
    model = build_model_for(cfg, seqs.num_items, torch.device("cpu")).eval()
    task = tasks.get_task(cfg)
    ctx = SimpleNamespace(cfg=cfg, num_items=seqs.num_items, device=torch.device("cpu"),
                          neg_generator=torch.Generator().manual_seed(5), env=SimpleNamespace(sharded=False))
    prepared = task.prepare_batch(PreparedBatch(batch, batch.num_events), ctx)
    labels, valid = next_item_labels(batch.item_ids, batch.offsets)
    assert prepared.negatives.shape == (int(valid.sum()), 5) and prepared.lookup_ids is None
    after_prepare = ctx.neg_generator.get_state()
    loss = task.compute_loss(model, prepared, ctx)
    assert torch.equal(ctx.neg_generator.get_state(), after_prepare)
    lc = cfg.loss
    reference = sampled_softmax_loss(model.encode(batch), labels, valid, model.item_vectors, seqs.num_items,
                                     lc.num_negatives, lc.temperature, torch.Generator().manual_seed(5),
                                     route=lc.route, item_lookup=lc.item_lookup)
    assert torch.equal(loss, reference)
