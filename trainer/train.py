"""The one train loop: ``train(cfg) -> TrainResult`` (retrieval, sampled softmax, full-ranking eval).

Per run: seed → data (load_sequences / build_loaders) → model (build_model) → AdamW (+ linear warmup) →
epochs of ``train_one_epoch`` (optional Stochastic Length) with ``run_evaluation`` every
``train.eval_every_epochs`` epochs and after the last one. The best epoch (by ``eval.selection_metric``) is
saved to run_dir/best.pt; everything is logged to metrics.jsonl / TensorBoard / train.log and summarised in
results.json. Epochs are 1-based. A NaN/inf loss raises :class:`NonFiniteLossError` before any parameter
update (best.pt stays untouched).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np
import torch
from tqdm import tqdm

from hstu.modules.losses import next_item_labels, sampled_softmax_loss
from hstu.trainer import run_dir as rd
from hstu.trainer.config import ConfigError, RunConfig, save_config, to_dict
from hstu.trainer.evaluate import evaluate, evaluate_popularity, popularity_counts
from hstu.trainer.metrics_log import MetricsLogger, setup_logging
from hstu.trainer.stochastic_length import apply_stochastic_length

log = logging.getLogger("hstu")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and epoch."""


@dataclass
class TrainResult:
    """Summary of a run (also written to run_dir/results.json)."""

    run_dir: str
    selection_metric: str
    best_epoch: int  # 1-based epoch whose evaluation scored best
    best_metrics: Dict[str, float]
    final_metrics: Dict[str, float]
    baseline_metrics: Dict[str, float]  # most-popular baseline ({} when eval.popularity_baseline is false)
    epochs_run: int
    steps: int
    train_tokens: int  # training tokens processed (after Stochastic Length)
    train_seconds: float  # time inside train_one_epoch (evaluation excluded)
    tokens_per_second: float  # training tokens (after Stochastic Length) / train_seconds

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainContext:
    """What stays fixed during a run."""

    cfg: RunConfig
    device: torch.device
    num_items: int
    train_loader: Any
    eval_loader: Any
    metrics: MetricsLogger
    neg_generator: torch.Generator  # negatives for the sampled softmax
    sl_generator: torch.Generator  # Stochastic Length


@dataclass
class TrainState:
    """What changes during a run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    tokens: int = 0
    train_seconds: float = 0.0
    best_value: float = -math.inf
    best_epoch: int = 0
    best_metrics: Dict[str, float] = field(default_factory=dict)
    final_metrics: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ setup helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def metric_names(eval_cfg) -> list:
    return [f"hr@{k}" for k in eval_cfg.ks] + [f"ndcg@{k}" for k in eval_cfg.ndcg_ks] + ["mrr"]


def check_train_config(cfg: RunConfig) -> None:
    """Checks that need more than config.validate: the selection metric must be one evaluation produces."""
    names = metric_names(cfg.eval)
    if cfg.eval.selection_metric not in names:
        raise ConfigError(f"key 'eval.selection_metric' = {cfg.eval.selection_metric!r} is not one of {names}")
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"key 'train.device' = {cfg.train.device!r} but CUDA is not available")


def build_optimizer(model: torch.nn.Module, optim_cfg) -> tuple:
    """AdamW over all trainable parameters + LambdaLR linear warmup over ``warmup_steps`` (then constant)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                            weight_decay=optim_cfg.weight_decay)
    warm = max(0, int(optim_cfg.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell an epoch-aware loader/sampler which epoch starts (shuffling seed = data.seed + epoch)."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def _autocast(cfg: RunConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")


# ---------------------------------------------------------------------------------------------------- training


def compute_loss(model: torch.nn.Module, batch: Any, ctx: TrainContext) -> torch.Tensor:
    """Sampled-softmax next-item loss of one jagged batch (already on the device)."""
    seq_emb = model.encode(batch)  # [T, D]
    labels, valid = next_item_labels(batch.item_ids, batch.offsets)
    lc = ctx.cfg.loss
    return sampled_softmax_loss(seq_emb, labels, valid, model.item_vectors, ctx.num_items, lc.num_negatives,
                                lc.temperature, ctx.neg_generator)


def _non_finite(state: TrainState, ctx: TrainContext, loss: float) -> NonFiniteLossError:
    best = os.path.join(ctx.cfg.run_dir, rd.CHECKPOINT_FILE)
    kept = f"last good checkpoint kept at {best}" if os.path.exists(best) else "no checkpoint was saved yet"
    msg = (f"training stopped: non-finite loss ({loss}) at step {state.step + 1}, epoch {state.epoch + 1}; "
           f"no update was applied, {kept}. Try a lower optim.lr, optim.grad_clip_norm > 0 or train.dtype=float32.")
    ctx.metrics.log("error", state.step + 1, epoch=state.epoch + 1, loss=loss, message=msg)
    log.error(msg)
    return NonFiniteLossError(msg)


def train_step(state: TrainState, ctx: TrainContext, batch: Any) -> float:
    """One optimizer step on a CPU batch; returns the loss. Raises NonFiniteLossError before updating."""
    cfg = ctx.cfg
    if cfg.train.stochastic_length.enabled:
        batch = apply_stochastic_length(batch, cfg.data.max_seq_len, cfg.train.stochastic_length.alpha,
                                        ctx.sl_generator)
    batch = batch.to(ctx.device)
    with _autocast(cfg, ctx.device):
        loss = compute_loss(state.model, batch, ctx)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _non_finite(state, ctx, value)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    state.tokens += int(batch.item_ids.numel())
    return value


def _steps_left(state: TrainState, cfg: RunConfig) -> bool:
    return cfg.train.max_steps <= 0 or state.step < cfg.train.max_steps


def train_one_epoch(state: TrainState, ctx: TrainContext) -> Dict[str, float]:
    """One pass over the train loader (stops early at train.max_steps); logs every train.log_every_steps."""
    cfg = ctx.cfg
    state.model.train()
    _set_epoch(ctx.train_loader, state.epoch)
    bar = tqdm(ctx.train_loader, desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not cfg.train.progress, dynamic_ncols=True)
    t0, tokens0, win_t, win_tok = time.perf_counter(), state.tokens, time.perf_counter(), state.tokens
    losses, window = [], []
    try:
        for batch in bar:
            value = train_step(state, ctx, batch)
            losses.append(value)
            window.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            if cfg.train.log_every_steps > 0 and state.step % cfg.train.log_every_steps == 0:
                now = time.perf_counter()
                tps = (state.tokens - win_tok) / max(now - win_t, 1e-9)
                ctx.metrics.log_train(state.step, state.epoch + 1, sum(window) / len(window),
                                      lr=state.scheduler.get_last_lr()[0], tokens_per_second=tps)
                win_t, win_tok, window = now, state.tokens, []
            if not _steps_left(state, cfg):
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    state.train_seconds += seconds
    state.epoch += 1
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    tps = (state.tokens - tokens0) / max(seconds, 1e-9)
    ctx.metrics.log("epoch", state.step, epoch=state.epoch, loss=mean_loss, seconds=seconds, tokens_per_second=tps)
    log.info("epoch %d: loss %.4f, %d steps, %.1f s, %.0f tokens/s", state.epoch, mean_loss, len(losses), seconds, tps)
    return {"loss": mean_loss, "seconds": seconds, "tokens_per_second": tps}


def run_evaluation(state: TrainState, ctx: TrainContext) -> Dict[str, float]:
    """Full-ranking eval; records it in metrics.jsonl and saves best.pt when the selection metric improves."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    with _autocast(cfg, ctx.device):
        metrics = evaluate(state.model, ctx.eval_loader, ctx.num_items, cfg.eval, ctx.device)
    value = metrics[cfg.eval.selection_metric]
    is_best = value > state.best_value
    if is_best:
        state.best_value, state.best_epoch, state.best_metrics = value, state.epoch, dict(metrics)
        rd.save_state_dict(state.model, os.path.join(cfg.run_dir, rd.CHECKPOINT_FILE))
    state.final_metrics = dict(metrics)
    ctx.metrics.log_eval(state.step, state.epoch, metrics, is_best=is_best, seconds=time.perf_counter() - t0)
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in metric_names(cfg.eval))
    log.info("eval epoch %d: %s%s", state.epoch, shown, " (best)" if is_best else "")
    return metrics


# ---------------------------------------------------------------------------------------------------- assembly


def resolve_run_dir(cfg: RunConfig) -> RunConfig:
    """Copy of cfg whose run_dir is set (default runs/<data.name>-<arch>-<timestamp>)."""
    if cfg.run_dir:
        return cfg
    return dataclasses.replace(cfg, run_dir=rd.default_run_dir(f"{cfg.data.name}-{cfg.model.arch}"))


def build_data(cfg: RunConfig):
    """(seqs, train_loader, eval_loader) from the data package (progress bars follow train.progress)."""
    from hstu.trainer.data import build_loaders, load_sequences

    seqs = load_sequences(cfg.data, progress=cfg.train.progress)
    train_loader, eval_loader = build_loaders(cfg.data, seqs)
    return seqs, train_loader, eval_loader


def build_model_for(cfg: RunConfig, num_items: int, device: torch.device) -> torch.nn.Module:
    from hstu.modules.model import build_model

    return build_model(cfg, num_items).to(device)


def _popularity_baseline(cfg: RunConfig, seqs, eval_loader, metrics: MetricsLogger) -> Dict[str, float]:
    if not cfg.eval.popularity_baseline:
        return {}
    counts = popularity_counts(torch.as_tensor(seqs.item_ids), torch.as_tensor(seqs.offsets), seqs.num_items)
    base = evaluate_popularity(counts, eval_loader, cfg.eval)
    metrics.log("baseline", 0, epoch=0, name="most_popular", **base)
    log.info("most-popular baseline: %s", ", ".join(f"{k} {base[k]:.4f}" for k in metric_names(cfg.eval)))
    return base


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def train(cfg: RunConfig) -> TrainResult:
    """Train and evaluate one model as configured; see the module docstring. Returns the run summary."""
    check_train_config(cfg)
    cfg = resolve_run_dir(cfg)
    removed = rd.prepare_run_dir(cfg.run_dir)
    save_config(cfg, os.path.join(cfg.run_dir, rd.CONFIG_FILE))
    setup_logging(cfg.run_dir)
    if removed:
        log.warning("run_dir %s held a previous run; replaced its %s", cfg.run_dir, ", ".join(removed))
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    device = torch.device(cfg.train.device)
    seqs, train_loader, eval_loader = build_data(cfg)
    model = build_model_for(cfg, seqs.num_items, device)
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    log.info("run_dir %s: %d users, %d items, %d parameters", cfg.run_dir, seqs.num_users, seqs.num_items,
             sum(p.numel() for p in model.parameters()))
    with MetricsLogger(cfg.run_dir, tensorboard=cfg.train.tensorboard) as metrics:
        ctx = TrainContext(cfg, device, seqs.num_items, train_loader, eval_loader, metrics,
                           _generator(device, cfg.train.seed + 1), torch.Generator().manual_seed(cfg.train.seed + 2))
        state = TrainState(model, optimizer, scheduler)
        baseline = _popularity_baseline(cfg, seqs, eval_loader, metrics)
        budget_s = cfg.train.max_train_minutes * 60.0
        for _ in range(cfg.train.epochs):
            train_one_epoch(state, ctx)
            over_budget = budget_s > 0 and state.train_seconds >= budget_s
            if over_budget:
                log.warning("train.max_train_minutes=%g reached after epoch %d of %d: stopping early",
                            cfg.train.max_train_minutes, state.epoch, cfg.train.epochs)
            last = state.epoch == cfg.train.epochs or not _steps_left(state, cfg) or over_budget
            if last or state.epoch % cfg.train.eval_every_epochs == 0:
                run_evaluation(state, ctx)
            if last:
                break
        result = TrainResult(
            run_dir=cfg.run_dir, selection_metric=cfg.eval.selection_metric, best_epoch=state.best_epoch,
            best_metrics=state.best_metrics, final_metrics=state.final_metrics, baseline_metrics=baseline,
            epochs_run=state.epoch, steps=state.step, train_tokens=state.tokens, train_seconds=state.train_seconds,
            tokens_per_second=state.tokens / max(state.train_seconds, 1e-9))
        metrics.log("best", state.step, epoch=state.best_epoch, **state.best_metrics)
    rd.write_json({**result.to_dict(), "config": to_dict(cfg)}, os.path.join(cfg.run_dir, rd.RESULTS_FILE))
    log.info("done: best %s %.4f at epoch %d; results in %s", cfg.eval.selection_metric,
             state.best_value, state.best_epoch, cfg.run_dir)
    return result
