"""The one train loop: ``train(cfg) -> TrainResult``; what it trains is the run's task (``cfg.task``): a task spec
from trainer/tasks/ (retrieval: sampled softmax, full-ranking eval; ranking: docs/ranking.md) supplies the data,
model, batch preparation, loss, evaluation, baseline and the sharded tables — nothing here depends on the task.

Per run: seed → data (``task.build_data``) → model (``task.build_model``) → AdamW (+ linear warmup) →
epochs of ``train_one_epoch`` (optional Stochastic Length) with ``run_evaluation`` every
``train.eval_every_epochs`` epochs and after the last one. Each evaluation scores every split the task has
(retrieval: validation = second-to-last item, test = last item; ranking: test only); the best epoch is the one
whose ``eval.select_on`` split (default validation) scores best on ``eval.selection_metric``, its weights are
run_dir/best.pt (``checkpoint.best_format=dcp``: the DCP checkpoint run_dir/best/step_N, nothing gathered), and
the test metrics are reported at that selected epoch and at the final one (results.json
``selected`` / ``final``). Everything is logged to metrics.jsonl / TensorBoard / train.log. Epochs are 1-based.
A NaN/inf loss raises :class:`NonFiniteLossError` before any parameter update (best.pt stays untouched).

The same loop runs in 1 or N processes (docs/distributed.md): with ``sharding.enabled`` the item table (ranking:
all its tables) is a TorchRec EmbeddingCollection sharded by DMP (fused rowwise AdamW) and the dense tower is
DDP; each rank trains on its slice of every global batch, the loss is the global batch's
(``distributed.reduce_step``), evaluation is split over ranks. ``checkpoint.every_steps`` writes resumable DCP
checkpoints (the state objects ``checkpoint_manager`` registers, trainer/checkpoint_manager.py) and
``train.resume`` continues from the latest one;
``sharding.pipeline=prefetch`` overlaps the next batch's input all-to-all with the current step
(trainer/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
from tqdm import tqdm

from hstu.trainer import checkpoint as ckpt
from hstu.trainer import distributed as hd
from hstu.trainer import run_dir as rd
from hstu.trainer.config import ConfigError, RunConfig, to_dict
from hstu.trainer.config_checks import check_resources
from hstu.trainer.metrics_log import MetricsLogger
from hstu.trainer.checkpoint_manager import (DCP, META, RANK, AttributeState, CheckpointManager,
                                             DenseOptimizerState, GlobalRNGState, SchedulerState)
from hstu.trainer.pipeline import BatchStream, DataPosition, PreparedBatch, prepare_batch
from hstu.trainer.run_lifecycle import EarlyLog, commit, resume_point, start
from hstu.trainer.tasks import get_task

log = logging.getLogger("hstu")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and epoch."""


@dataclass
class TrainResult:
    """Summary of a run (also written to run_dir/results.json)."""

    run_dir: str
    selection_metric: str
    best_epoch: int  # 1-based epoch selected (best eval.selection_metric on the select_on split)
    best_metrics: Dict[str, float]  # TEST metrics at the selected epoch
    final_metrics: Dict[str, float]  # TEST metrics at the final epoch
    baseline_metrics: Dict[str, float]  # most-popular baseline ({} when eval.popularity_baseline is false)
    epochs_run: int
    steps: int
    train_tokens: int  # training tokens processed (after Stochastic Length)
    train_seconds: float  # time inside train_one_epoch (evaluation excluded)
    tokens_per_second: float  # training tokens (after Stochastic Length) / train_seconds
    select_on: str = "test"  # split the epoch was selected on (validation | test; ranking has test only)
    selected: Dict[str, Any] = field(default_factory=dict)  # {"epoch", "validation": {...}, "test": {...}}
    final: Dict[str, Any] = field(default_factory=dict)  # same at the final epoch
    data: Dict[str, Any] = field(default_factory=dict)  # how the data was cut: tie_order (+ tie_seed), ...

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainContext:
    """What stays fixed during a run."""

    cfg: RunConfig
    device: torch.device
    num_items: int
    train_loader: Any
    eval_loader: Any  # the test split
    metrics: MetricsLogger
    neg_generator: torch.Generator  # negatives for the sampled softmax
    sl_generator: torch.Generator  # Stochastic Length
    env: hd.DistEnv = field(default_factory=hd.DistEnv)  # rank / world / device / sharded
    item_embeddings: Any = None  # sharded path: the task's table prefetcher (task.prefetcher), else None
    task: Any = None  # the run's TaskSpec (trainer/tasks/): batch preparation, loss, evaluation, metric names
    valid_loader: Any = None  # the validation split (retrieval), None when the task has none
    checkpoints: Any = None  # the CheckpointManager of the run's state objects (checkpoint_manager)
    best_checkpoints: Any = None  # checkpoint.best_format=dcp: the best model's manager (best_checkpoint_manager)
    data_position: Any = None  # pipeline.DataPosition: the loader / generator state a checkpoint records


@dataclass
class TrainState:
    """What changes during a run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sparse_optimizer: Any = None  # sharded path: dmp.fused_optimizer (rowwise AdamW, updates inside backward)
    sparse_scheduler: Any = None  # its LambdaLR (same warmup); must step before the backward it affects
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    tokens: int = 0
    train_seconds: float = 0.0
    best_value: float = -math.inf
    best_epoch: int = 0
    best_metrics: Dict[str, float] = field(default_factory=dict)  # test metrics at the selected epoch
    final_metrics: Dict[str, float] = field(default_factory=dict)  # test metrics at the latest evaluation
    best_validation: Dict[str, float] = field(default_factory=dict)  # validation metrics at the selected epoch
    final_validation: Dict[str, float] = field(default_factory=dict)  # validation metrics at the latest eval
    final_epoch: int = 0  # epoch of the latest evaluation
    baseline_metrics: Dict[str, float] = field(default_factory=dict)
    epoch_loss_sum: float = 0.0  # over the steps of the current epoch (kept across a resume)
    epoch_steps: int = 0
    save_pending: bool = False  # a checkpoint fell on an epoch's last step: written after its evaluation
    position: Any = None  # data position after the last trained batch (pipeline.BatchStream.position)


# ------------------------------------------------------------------------------------------------ setup helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_train_config(cfg: RunConfig) -> None:
    """Checks that need more than config.validate: the selection metric must be one evaluation produces."""
    task = get_task(cfg)
    task.check_config()
    names = task.metric_names()
    if cfg.eval.selection_metric not in names:
        raise ConfigError(f"key 'eval.selection_metric' = {cfg.eval.selection_metric!r} is not one of {names}")
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"key 'train.device' = {cfg.train.device!r} but CUDA is not available")
    check_resources(cfg)  # the sampled-softmax batch fits this machine's memory


def warmup_schedule(optimizer: Any, optim_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR linear warmup over ``optim_cfg.warmup_steps`` (then constant)."""
    warm = max(0, int(optim_cfg.warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)


def build_optimizer(model: torch.nn.Module, optim_cfg) -> tuple:
    """AdamW over all trainable parameters + LambdaLR linear warmup over ``warmup_steps`` (then constant).
    (A sharded table's parameters do not require grad: its fused optimizer is separate.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                            weight_decay=optim_cfg.weight_decay)
    return opt, warmup_schedule(opt, optim_cfg)


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell an epoch-aware loader/sampler which epoch starts (shuffling seed = data.seed + epoch)."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def _autocast(cfg: RunConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")


# ---------------------------------------------------------------------------------------------------- training


def _non_finite(state: TrainState, ctx: TrainContext, loss: float) -> NonFiniteLossError:
    best = best_path(ctx.cfg)
    kept = f"last good checkpoint kept at {best}" if os.path.exists(best) else "no checkpoint was saved yet"
    msg = (f"training stopped: non-finite loss ({loss}) at step {state.step + 1}, epoch {state.epoch + 1}; "
           f"no update was applied, {kept}. Try a lower optim.lr, optim.grad_clip_norm > 0 or train.dtype=float32.")
    ctx.metrics.log("error", state.step + 1, epoch=state.epoch + 1, loss=loss, message=msg)
    log.error(msg)
    return NonFiniteLossError(msg)


def train_step(state: TrainState, ctx: TrainContext, batch: Any) -> float:
    """One optimizer step on a CPU loader batch or a PreparedBatch; returns the (global) loss.
    Raises NonFiniteLossError before updating (the loss is all-reduced first, so every rank raises)."""
    cfg = ctx.cfg
    prepared = batch if isinstance(batch, PreparedBatch) else prepare_batch(batch, ctx)
    with _autocast(cfg, ctx.device):
        loss = ctx.task.compute_loss(state.model, prepared, ctx)
    value, scale, tokens = hd.reduce_step(ctx.env, loss, prepared.num_valid, prepared.tokens)
    if not math.isfinite(value):
        raise _non_finite(state, ctx, value)
    state.optimizer.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()  # sharded table: its rowwise AdamW update runs here
    if cfg.optim.grad_clip_norm > 0:  # dense parameters only (the table's gradients never materialise)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip_norm)
    state.optimizer.step()
    state.scheduler.step()
    if state.sparse_scheduler is not None:
        state.sparse_optimizer.step()  # a no-op (the update ran in backward); keeps LambdaLR's call order
        state.sparse_scheduler.step()  # the LR of the next backward
    state.step += 1
    state.tokens += tokens
    return value


def _steps_left(state: TrainState, cfg: RunConfig) -> bool:
    return cfg.train.max_steps <= 0 or state.step < cfg.train.max_steps


# TrainState fields a checkpoint records (the top level of its meta: the layout older checkpoints have too)
PROGRESS_KEYS = ("step", "epoch", "tokens", "train_seconds", "best_value", "best_epoch", "best_metrics",
                 "final_metrics", "best_validation", "final_validation", "final_epoch", "baseline_metrics",
                 "epoch_loss_sum", "epoch_steps")


def checkpoint_manager(state: TrainState, env: Any, ctx: Optional[TrainContext] = None) -> CheckpointManager:
    """The run's checkpointed state objects, registered once (trainer/checkpoint_manager.py): model, dense and
    sparse optimizer, LR schedulers, progress, RNG streams and, with ``ctx``, the data position (loader +
    SL/negative generators, ``ctx.data_position``). Without ``ctx`` (loading a checkpoint outside a run) the data
    position is left out and there is no checkpoint directory to save to."""
    cfg = ctx.cfg if ctx is not None else None
    manager = CheckpointManager(env, ckpt.checkpoint_dir(cfg) if cfg else "", cfg.checkpoint.keep_last if cfg else 0)
    manager.register("model", state.model, DCP).register(
        "dense_optim", DenseOptimizerState(state.model, state.optimizer), DCP)
    if state.sparse_optimizer is not None:
        manager.register("sparse_optim", state.sparse_optimizer, DCP)
    manager.register("progress", AttributeState(state, PROGRESS_KEYS), META, flat=True)
    manager.register("scheduler", SchedulerState(state.scheduler), META)
    if state.sparse_scheduler is not None:
        manager.register("sparse_scheduler", SchedulerState(state.sparse_scheduler), META)
    manager.register("rng", GlobalRNGState(), RANK, flat=True)
    if ctx is not None:
        manager.register("loader", ctx.data_position.loader, META)
        manager.register("generators", ctx.data_position.generators, RANK, flat=True)
    return manager


def save_checkpoint(state: TrainState, ctx: TrainContext, position: Any) -> None:
    """Collective: write checkpoint step_<state.step> (position: data position after the last trained batch)."""
    t0 = time.perf_counter()
    ctx.data_position.saved = position
    try:
        path = ctx.checkpoints.save(state.step)
    finally:
        ctx.data_position.saved = None
    commit(ctx.cfg, ctx.env)
    state.save_pending = False
    ctx.metrics.log("checkpoint", state.step, epoch=state.epoch, path=path, seconds=time.perf_counter() - t0)


def resume(state: TrainState, ctx: TrainContext, path: str) -> None:
    """Load checkpoint ``path`` into every registered state object (model, optimizers, schedulers, progress,
    loader, generators, RNGs; see trainer/checkpoint_manager.py)."""
    ctx.checkpoints.load(path)
    log.info("resumed from %s: step %d, epoch %d", path, state.step, state.epoch)


def train_one_epoch(state: TrainState, ctx: TrainContext) -> Dict[str, float]:
    """One pass over the train loader (stops early at train.max_steps); logs every train.log_every_steps and
    checkpoints every checkpoint.every_steps (a checkpoint due on the epoch's last step is left pending)."""
    cfg = ctx.cfg
    state.model.train()
    _set_epoch(ctx.train_loader, state.epoch)
    stream = BatchStream(ctx, prefetch=ctx.env.sharded and cfg.sharding.pipeline == "prefetch")
    bar = tqdm(stream, desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not cfg.train.progress or not ctx.env.is_main, dynamic_ncols=True)
    t0, tokens0, win_t, win_tok = time.perf_counter(), state.tokens, time.perf_counter(), state.tokens
    window, every = [], cfg.checkpoint.every_steps
    try:
        for batch in bar:
            value = train_step(state, ctx, batch)
            state.epoch_loss_sum += value
            state.epoch_steps += 1
            window.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            if cfg.train.log_every_steps > 0 and state.step % cfg.train.log_every_steps == 0:
                now = time.perf_counter()
                tps = (state.tokens - win_tok) / max(now - win_t, 1e-9)
                ctx.metrics.log_train(state.step, state.epoch + 1, sum(window) / len(window),
                                      lr=state.scheduler.get_last_lr()[0], tokens_per_second=tps,
                                      process_cpu_seconds=time.process_time())  # rank 0's, all threads
                win_t, win_tok, window = now, state.tokens, []
            if every > 0 and state.step % every == 0:
                if batch.last or not _steps_left(state, cfg):
                    state.save_pending = True
                else:
                    save_checkpoint(state, ctx, stream.position())
            if not _steps_left(state, cfg):
                break
        state.position = stream.position()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    state.train_seconds += seconds
    state.epoch += 1
    mean_loss = state.epoch_loss_sum / state.epoch_steps if state.epoch_steps else float("nan")
    state.epoch_loss_sum, state.epoch_steps = 0.0, 0
    tps = (state.tokens - tokens0) / max(seconds, 1e-9)
    ctx.metrics.log("epoch", state.step, epoch=state.epoch, loss=mean_loss, seconds=seconds, tokens_per_second=tps)
    log.info("epoch %d: loss %.4f, %.1f s, %.0f tokens/s", state.epoch, mean_loss, seconds, tps)
    return {"loss": mean_loss, "seconds": seconds, "tokens_per_second": tps}


def selection_split(cfg: RunConfig, splits) -> str:
    """The split the best epoch is selected on: ``eval.select_on`` when the task evaluates it, else "test"
    (ranking has no validation split yet)."""
    return cfg.eval.select_on if cfg.eval.select_on in splits else "test"


def is_improvement(value: float, best_value: float) -> bool:
    """Selection rule: strictly better than every earlier evaluation (ties keep the earlier epoch)."""
    return value > best_value


# metrics.jsonl kind / TensorBoard prefix per split: the test split keeps the historical "eval" name
SPLIT_LOG_KIND = {"test": "eval", "validation": "valid"}


def best_checkpoint_manager(state: TrainState, env: Any, cfg: RunConfig) -> CheckpointManager:
    """checkpoint.best_format=dcp: the best epoch's model (+ progress) as RUN_DIR/best/step_N, keep-last 1."""
    manager = CheckpointManager(env, os.path.join(cfg.run_dir, rd.BEST_DIR), keep_last=1)
    return manager.register("model", state.model, DCP).register(
        "progress", AttributeState(state, PROGRESS_KEYS), META, flat=True)


def best_path(cfg: RunConfig) -> str:
    """Where the best epoch's weights are: RUN_DIR/best.pt, or RUN_DIR/best (a DCP checkpoint directory)."""
    name = rd.BEST_DIR if cfg.checkpoint.best_format == "dcp" else rd.CHECKPOINT_FILE
    return os.path.join(cfg.run_dir, name)


def save_best(state: TrainState, ctx: TrainContext) -> None:
    """Collective: save the current model as the best one (checkpoint.best_format): best.pt (a sharded model's
    tables gathered into the plain state_dict on every rank) or a per-rank DCP checkpoint (nothing gathered)."""
    cfg, env = ctx.cfg, ctx.env
    if cfg.checkpoint.best_format == "dcp":
        if ctx.best_checkpoints is None:
            ctx.best_checkpoints = best_checkpoint_manager(state, env, cfg)
        ctx.best_checkpoints.save(state.step)
    elif env.sharded:  # best.pt holds the plain model's state_dict (gathered tables): `hstu eval`
        tensors = ctx.task.plain_state_dict(state.model)  # collective
        if env.is_main:
            rd.save_tensors(tensors, best_path(cfg))
    else:
        rd.save_state_dict(state.model, best_path(cfg))


def run_evaluation(state: TrainState, ctx: TrainContext) -> Dict[str, float]:
    """Full-ranking eval of every split of the task (validation and test for retrieval); logs each split to
    metrics.jsonl (kinds "valid" / "eval") and saves the best model (save_best) when the selection split's metric
    improves. The test metrics never influence the selection unless ``eval.select_on=test``. Returns the test
    metrics."""
    cfg, env = ctx.cfg, ctx.env
    splits = ctx.task.eval_splits()
    t0 = time.perf_counter()
    with _autocast(cfg, ctx.device):
        by_split = {split: ctx.task.evaluate(state.model, ctx, split=split) for split in splits}
    seconds = time.perf_counter() - t0
    metrics = by_split["test"]
    validation = by_split.get("validation", {})
    value = ctx.task.selection_value(by_split[selection_split(cfg, splits)])
    is_best = is_improvement(value, state.best_value)
    if is_best:
        state.best_value, state.best_epoch, state.best_metrics = value, state.epoch, dict(metrics)
        state.best_validation = dict(validation)
        save_best(state, ctx)
        commit(cfg, env)
    state.final_metrics, state.final_validation, state.final_epoch = dict(metrics), dict(validation), state.epoch
    for split, m in by_split.items():
        ctx.metrics.log(SPLIT_LOG_KIND[split], state.step, epoch=state.epoch, **m, split=split, is_best=is_best,
                        seconds=seconds)
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in ctx.task.metric_names() if k in m)
        log.info("eval epoch %d %s: %s%s", state.epoch, split, shown, " (selected so far)" if is_best else "")
    return metrics


# ---------------------------------------------------------------------------------------------------- assembly


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def train(cfg: RunConfig) -> TrainResult:
    """Train and evaluate one model as configured; see the module docstring. Returns the run summary."""
    check_train_config(cfg)
    env = hd.setup(cfg)
    try:
        return _train(cfg, env)
    finally:
        hd.teardown(env)


def _train(cfg: RunConfig, env: hd.DistEnv) -> TrainResult:
    # data, model and init weights first: bad input fails here, before the run directory is created or a
    # previous run's files in it are replaced; what they log is kept and written to train.log once it exists
    early = EarlyLog(env)
    cfg, resume_from, found = resume_point(cfg, env)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    device = env.device
    task = get_task(cfg)
    data = task.build_data(env)
    if cfg.eval.select_on not in task.eval_splits():
        log.warning("eval.select_on=%s: task=%s has no %s split here; the best epoch is selected on the test split",
                    cfg.eval.select_on, task.name, cfg.eval.select_on)
    from hstu.modules.embeddings import tables_on

    per_shard = cfg.sharding.enabled and cfg.sharding.table_init == "per_shard"
    with tables_on("meta" if per_shard else None):  # per_shard: no rank ever holds a whole table
        model = task.build_model(device)
    if cfg.train.init_from and not resume_from:  # before sharding: the sharded tables copy the plain ones
        from hstu.trainer.plain_weights import load_plain_weights

        loaded = load_plain_weights(model, cfg.train.init_from)  # verified; a checkpoint dir: newest good one
        log.info("initialised %d tensors (%d elements) from %s", loaded["tensors"], loaded["elements"],
                 loaded["source"])
    elif cfg.train.init_from:
        log.info("train.init_from ignored: resuming from %s", resume_from)
    try:
        start(cfg, env, resume_from, found)
        early.replay()
        return _run(cfg, env, data, model, task, device, resume_from)
    except BaseException:
        if env.is_main and rd.restore_previous(cfg.run_dir, ckpt.checkpoint_dir(cfg)):
            log.error("run failed before it had a checkpoint or result: the previous run in %s was put back",
                      cfg.run_dir)
        raise


def _run(cfg: RunConfig, env: hd.DistEnv, data: Any, model: torch.nn.Module, task: Any, device: torch.device,
         resume_from: Optional[str]) -> TrainResult:
    """The run after its directory is prepared: sharding, optimizers, resume, the epoch loop, results.json."""
    sparse_optimizer = sparse_scheduler = None
    if env.sharded:
        model, sparse_optimizer = hd.shard_model(model, cfg, env, task)
        sparse_scheduler = warmup_schedule(sparse_optimizer, cfg.optim)
        if env.world_size > 1:
            torch.manual_seed(hd.rank_seed(cfg.train.seed, env))  # rank-local dropout masks
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    log.info("run_dir %s: %d users, %d items, %d parameters (this process), world size %d%s", cfg.run_dir,
             data.num_users, data.num_items, sum(p.numel() for p in model.parameters()), env.world_size,
             f", tables {cfg.sharding.sharding_type}" if env.sharded else "")
    ctx = TrainContext(cfg, device, data.num_items, data.train_loader, data.eval_loader, None,
                       _generator(device, hd.rank_seed(cfg.train.seed + 1, env)),
                       torch.Generator().manual_seed(hd.rank_seed(cfg.train.seed + 2, env)), env, task=task,
                       valid_loader=getattr(data, "valid_loader", None))
    if env.sharded:
        ctx.item_embeddings = task.prefetcher(model)
    state = TrainState(model, optimizer, scheduler, sparse_optimizer, sparse_scheduler)
    ctx.data_position = DataPosition(ctx.train_loader, ctx)
    ctx.checkpoints = checkpoint_manager(state, env, ctx)
    if resume_from:
        resume(state, ctx, resume_from)
    with MetricsLogger(cfg.run_dir, tensorboard=cfg.train.tensorboard and env.is_main, enabled=env.is_main,
                       purge_step=state.step + 1 if resume_from else None) as metrics:
        ctx.metrics = metrics
        if not resume_from:
            state.baseline_metrics = task.baseline(metrics, env)
        budget_s = cfg.train.max_train_minutes * 60.0
        while state.epoch < cfg.train.epochs and _steps_left(state, cfg):
            train_one_epoch(state, ctx)
            over_budget = budget_s > 0 and state.train_seconds >= budget_s
            if over_budget:
                log.warning("train.max_train_minutes=%g reached after epoch %d of %d: stopping early",
                            cfg.train.max_train_minutes, state.epoch, cfg.train.epochs)
            last = state.epoch == cfg.train.epochs or not _steps_left(state, cfg) or over_budget
            if last or state.epoch % cfg.train.eval_every_epochs == 0:
                run_evaluation(state, ctx)
            if state.save_pending or (last and cfg.checkpoint.every_steps > 0):
                save_checkpoint(state, ctx, state.position)
            if last:
                break
        result = make_result(cfg, state, selection_split(cfg, task.eval_splits()), task.data_description())
        metrics.log("best", state.step, epoch=state.best_epoch, select_on=result.select_on, **state.best_metrics)
    if env.is_main:
        best = best_path(cfg) if state.best_epoch else None
        rd.write_json({**result.to_dict(), "best_checkpoint": best, "config": to_dict(cfg)},
                      os.path.join(cfg.run_dir, rd.RESULTS_FILE))
        commit(cfg, env)
    log.info("done: epoch %d selected on %s %s; test %s %.4f there, %.4f at the final epoch %d; results in %s",
             state.best_epoch, result.select_on, cfg.eval.selection_metric, cfg.eval.selection_metric,
             state.best_metrics.get(cfg.eval.selection_metric, float("nan")),
             state.final_metrics.get(cfg.eval.selection_metric, float("nan")), state.final_epoch, cfg.run_dir)
    return result


def make_result(cfg: RunConfig, state: TrainState, select_on: str, data: Dict[str, Any]) -> TrainResult:
    """The run summary: test metrics at the selected and at the final epoch (+ the validation metrics there)."""
    def point(epoch: int, validation: Dict[str, float], test: Dict[str, float]) -> Dict[str, Any]:
        return {"epoch": epoch, "validation": dict(validation), "test": dict(test)}

    return TrainResult(
        run_dir=cfg.run_dir, selection_metric=cfg.eval.selection_metric, best_epoch=state.best_epoch,
        best_metrics=state.best_metrics, final_metrics=state.final_metrics,
        baseline_metrics=state.baseline_metrics, epochs_run=state.epoch, steps=state.step,
        train_tokens=state.tokens, train_seconds=state.train_seconds,
        tokens_per_second=state.tokens / max(state.train_seconds, 1e-9), select_on=select_on,
        selected=point(state.best_epoch, state.best_validation, state.best_metrics),
        final=point(state.final_epoch, state.final_validation, state.final_metrics), data=dict(data))
