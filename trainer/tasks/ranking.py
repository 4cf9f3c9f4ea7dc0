"""The ranking task: generative ranking (docs/ranking.md) — multi-task BCE at item positions (+ an optional
regression head), NE / AUC / GAUC evaluation over all candidates, an item-rate baseline.

Split (chronological): the last ``ranking.num_eval_targets`` events of each user are the test candidates, the K
before them the validation candidates, training windows end before them (trainer/data/ranking.py). In N processes
(``sharding.enabled``) each rank trains and evaluates its slice of every global batch, all its tables are sharded
(trainer/parallel/ranking_embeddings.py) and evaluation gathers all predictions on rank 0 (exact NE/AUC/GAUC).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hstu.trainer.config import RunConfig
from hstu.trainer.config_checks import check_ranking_training, ranking_dataset
from hstu.trainer.tasks.spec import TaskData

log = logging.getLogger("hstu")


class RankingTask:
    """Generative ranking (docs/ranking.md): multi-task BCE at item positions, NE / AUC / GAUC evaluation."""

    name = "ranking"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.data, self.split, self.spec, self.eval_loader = cfg, None, None, None, None
        self.valid_loader = None  # validation candidates (None: no user has any)
        self.item_features = None  # ItemFeatureTable when model.item_features.enabled (the item tower's features)
        self.train_counts: Optional[np.ndarray] = None  # [num_items + 1] training-window events per item

    # -- config
    def task_names(self) -> List[str]:
        rc = self.cfg.ranking
        return list(rc.tasks) if rc.tasks else list(ranking_dataset(self.cfg)[0])

    def regression_name(self) -> str:
        if self.cfg.ranking.regression_weight <= 0:
            return ""
        return ranking_dataset(self.cfg)[1]

    def check_config(self) -> None:
        # the one validation pass's ranking part (trainer/config_checks.py), again: a config mutated after
        # load_config (tests/test_ranking_stream.py)
        check_ranking_training(self.cfg)

    def metric_names(self) -> List[str]:
        from hstu.trainer.ranking_metrics import metric_names

        return metric_names(self.task_names(), self.regression_name())

    def selection_value(self, metrics: Dict[str, float]) -> float:
        from hstu.trainer.ranking_metrics import higher_is_better

        name = self.cfg.eval.selection_metric
        v = float(metrics[name])
        if math.isnan(v):
            return -math.inf
        return v if higher_is_better(name) else -v

    def eval_splits(self) -> tuple:
        """Chronological split: the last K events are the test candidates, the K before them the validation
        candidates (trainer/data/ranking.py); ("test",) only when no user has validation candidates."""
        return ("validation", "test") if self.valid_loader is not None or self.data is None else ("test",)

    def data_description(self) -> Dict[str, Any]:
        K = self.cfg.ranking.num_eval_targets
        out: Dict[str, Any] = {"split": f"chronological: test = last {K} events per user, validation = the {K} "
                                        "before them, training windows end before the validation events"}
        if self.cfg.data.name in ("ml-1m", "events"):
            from hstu.trainer.data import tie_options

            out.update(tie_options(self.cfg.data))
        if self.cfg.data.name == "events":  # own logs (trainer/data/events_ranking.py)
            from hstu.trainer.data.events_ranking import describe_events_split

            out.update(describe_events_split(self.cfg, self.data))
        return out

    # -- data / model
    def prepare(self, progress: bool = False) -> Dict[str, Any]:
        """The ranking cache entry + every other file it reads (users.dat), validated: `hstu prepare`."""
        from hstu.trainer.data.ranking import prepare_ranking

        return prepare_ranking(self.cfg, progress=progress)

    def streaming(self) -> bool:
        """``ranking.synthetic.stream=true`` (synthetic data): train batches are generated per batch."""
        return self.cfg.data.name == "synthetic" and bool(getattr(self.cfg.ranking.synthetic, "stream", False))

    def build_data(self, env=None) -> TaskData:
        """Data of this rank: every rank holds the whole dataset; its loaders read its slice of every global
        batch (``data.batch_size`` / ``data.eval_batch_size`` users, split over ``env.world_size`` ranks).
        Streaming (``ranking.synthetic.stream``): the train loader generates its users per batch
        (trainer/data/ranking_stream.py) and only the first ``ranking.synthetic.eval_users`` users are held —
        the eval set, and ``self.data`` / ``self.split`` (what the item-rate baseline is fitted on)."""
        from hstu.trainer.data.ranking import (build_ranking_loaders, chronological_split, load_ranking_data,
                                               validation_loader)

        cfg, rc = self.cfg, self.cfg.ranking
        rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
        if self.streaming():
            from hstu.trainer.data.ranking_stream import build_streaming_ranking_data

            train, evaluation, data, self.split = build_streaming_ranking_data(cfg, rank, world)
            self.data = data
        else:
            self.data = data = load_ranking_data(cfg, progress=cfg.train.progress and rank == 0)
            self.split = chronological_split(data, cfg.data.max_seq_len, rc.num_eval_targets)
            train, evaluation = build_ranking_loaders(data, self.split, cfg.data.batch_size,
                                                      cfg.data.eval_batch_size, cfg.data.seed, rc.max_side_tokens,
                                                      rank, world)
        from hstu.modules.ranking import RankingSpec

        C = len(data.context_names)
        max_side = rc.max_side_tokens if data.side is not None else 0
        self.spec = RankingSpec(
            num_items=data.num_items, num_actions=data.num_actions, contextual_vocab=tuple(data.context_vocab),
            side_vocab=tuple(data.side_vocab), task_names=tuple(data.task_names),
            regression=rc.regression_weight > 0, max_tokens=C + 2 * cfg.data.max_seq_len + max_side + 1,
            action_with_item=rc.action_with_item, head_hidden_dim=rc.head_hidden_dim)
        held = (f" (streaming, {train.num_sequences} train users generated per batch), held eval set:"
                if self.streaming() else ":")
        log.info("ranking data %s%s %d users, %d events, tasks %s, contextual %s, side series %s", cfg.data.name,
                 held, data.num_users, data.num_events, list(data.task_names), list(data.context_names),
                 list(data.side.names) if data.side is not None else [])
        if cfg.model.item_features.enabled:
            self._load_item_features(data)
        self.eval_loader = evaluation
        self.valid_loader = validation_loader(data, self.split, cfg.data.eval_batch_size, rc.max_side_tokens, rank,
                                              world)
        return TaskData(train, evaluation, data.num_items, int(train.num_sequences), data, self.valid_loader)

    def _load_item_features(self, data: Any) -> None:
        """The item tower's feature table (trainer/data/item_features.py) and, outside streaming, each item's
        number of training-window events (items with <= model.item_features.content_only_max_events of them use
        their content part only)."""
        from hstu.trainer.data.item_features import load_ranking_item_features

        self.item_features = load_ranking_item_features(self.cfg, data.num_items)
        if self.streaming():  # only the eval users are held: their counts would understate every item's
            log.info("ranking item features %s (streaming: no item's id embedding is dropped)",
                     list(self.item_features.names))
            return
        from hstu.trainer.data.sequences import gather_ranges

        base = data.offsets[self.split.rows]
        tr, _ = gather_ranges(base + self.split.train_start, base + self.split.train_end)
        self.train_counts = np.bincount(data.item_ids[tr], minlength=data.num_items + 1)
        log.info("ranking item features %s; %d of %d items have no training event", list(self.item_features.names),
                 int((self.train_counts[1:] == 0).sum()), data.num_items)

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """HSTURankingModel | DLRMRanking (model.arch), with the item tower when model.item_features.enabled."""
        cfg = self.cfg
        if cfg.model.item_features.enabled and self.item_features is None:
            raise ValueError("model.item_features.enabled=true: build_data loads the item features first")
        if cfg.model.arch == "dlrm":
            from hstu.modules.dlrm import DLRMRanking
            from hstu.modules.item_tower import build_item_tower

            model = DLRMRanking(cfg.model.embedding_dim, self.spec, cfg.ranking.dlrm_mlp, cfg.model.dropout,
                                build_item_tower(cfg.model, self.item_features, self.spec.num_items))
        else:
            from hstu.modules.ranking import HSTURankingModel

            model = HSTURankingModel(cfg.model, self.spec, cfg.ops.backend, self.item_features)
        threshold = cfg.model.item_features.content_only_max_events
        if model.item_tower is not None and threshold >= 0 and self.train_counts is not None:
            model.item_tower.drop_ids(torch.as_tensor(self.train_counts) <= threshold)
        from hstu.modules.embeddings import to_device_keeping_meta

        return to_device_keeping_meta(model, device)

    def wrap_sharded_tables(self, model: torch.nn.Module, weight_dtype: str, init_seed: Optional[int] = None) -> None:
        """All of ``model.tables`` (item, action, contextual, side) become ONE CollectionRankingTables (tables on
        the meta device stay there and are initialised per shard from ``init_seed``); the item tower's feature
        tables (model.item_features) a CollectionFeatureTables."""
        from hstu.trainer.parallel.ranking_embeddings import CollectionRankingTables

        model.tables = CollectionRankingTables(model.tables, weight_dtype, init_seed)
        if getattr(model, "item_tower", None) is not None:  # the item tower's feature tables: one more collection
            from hstu.trainer.parallel.item_features import CollectionFeatureTables

            model.item_tower.tables = CollectionFeatureTables(model.item_tower.tables, weight_dtype, init_seed)

    def prefetcher(self, model: torch.nn.Module) -> Any:
        """None: no input-dist prefetch for the ranking tables (``sharding.pipeline=prefetch`` is rejected)."""
        return None

    def prepare_batch(self, prepared: Any, ctx: Any) -> Any:
        """Nothing to add: the model does its one table lookup itself (sharded or not)."""
        return prepared

    def _weights(self, device) -> torch.Tensor:
        w = self.cfg.ranking.task_weights or [1.0] * len(self.spec.task_names)
        return torch.tensor(w, dtype=torch.float32, device=device)

    def compute_loss(self, model, batch, ctx=None) -> torch.Tensor:
        """Σ_k w_k · mean BCE_k over the batch's item positions (+ regression_weight · MSE). ``batch``: a
        RankingBatch on the device, or the loop's PreparedBatch wrapping one."""
        batch = getattr(batch, "batch", batch)
        logits, reg = model(batch)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch.labels, reduction="none").mean(0)  # [K]
        loss = (bce * self._weights(bce.device)).sum()
        if reg is not None and batch.regression is not None:
            loss = loss + self.cfg.ranking.regression_weight * F.mse_loss(reg.float(), batch.regression)
        return loss

    @torch.no_grad()
    def predict_batches(self, model, device, loader=None) -> List[Dict[str, np.ndarray]]:
        """This rank's eval batches of ``loader`` (default: the test split), in order: per batch logits [N, K],
        labels [N, K], users [N] (+ reg, reg_t [N] with a regression head). On the sharded path every rank runs
        the same number of batches (one collective table lookup each)."""
        was = model.training
        model.eval()
        out: List[Dict[str, np.ndarray]] = []
        try:
            for batch in (self.eval_loader if loader is None else loader):
                batch = batch.to(device)
                logits, reg = model(batch)
                part = {"logits": logits.float().cpu().numpy(), "labels": batch.labels.cpu().numpy(),
                        "users": batch.user_ids[batch.pred_seq].cpu().numpy()}
                if reg is not None and batch.regression is not None:
                    part["reg"], part["reg_t"] = reg.float().cpu().numpy(), batch.regression.cpu().numpy()
                out.append(part)
        finally:
            model.train(was)
        return out

    def predict(self, model, device, env=None, loader=None) -> Optional[Dict[str, np.ndarray]]:
        """Eval-set predictions of all ranks in the 1-process order (global batch by global batch, rank slices
        in rank order): logits [N, K], labels [N, K], users [N] (+ reg, reg_t). Collective with ``env`` of
        world size > 1: the result is on rank 0, None on the other ranks."""
        if env is not None and env.sharded:
            from hstu.trainer import distributed as hd

            model = hd.unwrap(model)  # its sharded tables stay sharded (collective lookups)
        mine = self.predict_batches(model, device, loader)
        gathered = env.gather_object(mine) if env is not None and env.world_size > 1 else [mine]
        if gathered is None:
            return None
        if len({len(g) for g in gathered}) != 1:
            raise RuntimeError(f"ranks evaluated different numbers of batches: {[len(g) for g in gathered]}")
        ordered = [part for batch_parts in zip(*gathered) for part in batch_parts]
        keys = ordered[0].keys() if ordered else ()
        return {k: np.concatenate([p[k] for p in ordered]) for k in keys}

    def evaluate(self, model, ctx, split: str = "test") -> Dict[str, float]:
        """NE / AUC / GAUC per task over ALL candidates of ``split`` (test | validation; ``ctx``: the
        TrainContext, or a device). With N ranks the predictions are gathered on rank 0, which computes the
        metrics and broadcasts them."""
        from hstu.trainer.ranking_metrics import ranking_metrics

        loader = {"test": self.eval_loader, "validation": self.valid_loader}[split]
        if loader is None:
            raise ValueError(f"task=ranking: no {split} candidates in this dataset")
        env = getattr(ctx, "env", None)
        p = self.predict(model, getattr(ctx, "device", ctx), env, loader)
        metrics = None
        if p is not None:
            metrics = ranking_metrics(p["logits"], p["labels"], p["users"], self.spec.task_names, p.get("reg"),
                                      p.get("reg_t"), self.regression_name())
        if env is not None and env.world_size > 1:
            metrics = env.broadcast_object(metrics)
        return metrics

    def plain_state_dict(self, model) -> Dict[str, torch.Tensor]:
        """A sharded (DMP) ranking model as the plain model's state_dict (best.pt); collective."""
        from hstu.trainer.parallel.ranking_embeddings import plain_state_dict

        return plain_state_dict(model)

    def baseline(self, metrics, env=None) -> Dict[str, float]:
        """Item-rate baseline (eval.popularity_baseline): each item's smoothed positive rate per task in the
        training windows, as the prediction for every eval impression of that item. Computed on rank 0 from the
        whole dataset and broadcast (collective with N ranks). Streaming synthetic data: from the training
        windows of the eval users only (``ranking.synthetic.eval_users``; the rest is never held)."""
        if not self.cfg.eval.popularity_baseline:
            return {}
        out = self.baseline_metrics(env)
        metrics.log("baseline", 0, epoch=0, name="item_rate", **out)
        log.info("item-rate baseline: %s", ", ".join(f"{k} {out[k]:.4f}" for k in out if k.startswith(("ne_",
                                                                                                         "auc_"))))
        return out

    def baseline_metrics(self, env=None) -> Dict[str, float]:
        """The item-rate baseline's test metrics (unlogged); collective with N ranks."""
        if env is not None and env.world_size > 1:
            return env.broadcast_object(self._item_rate() if env.is_main else None)
        return self._item_rate()

    def export(self, state: Dict[str, torch.Tensor], ckpt: str, out: str, *, embedding_dtype: str = "fp32",
               overwrite: bool = False, source: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """``hstu export`` of the plain weights ``state`` (read from ``ckpt``): serving/export_ranking.py."""
        from hstu.serving.export_ranking import export_ranking_state

        return export_ranking_state(self.cfg, state, out, embedding_dtype=embedding_dtype, overwrite=overwrite,
                                    source=source)

    def _item_rate(self) -> Dict[str, float]:
        from hstu.trainer.data.sequences import gather_ranges
        from hstu.trainer.ranking_metrics import ranking_metrics

        d, s = self.data, self.split
        base = d.offsets[s.rows]
        tr, _ = gather_ranges(base + s.train_start, base + s.train_end)  # the training windows
        ev, _ = gather_ranges(base + s.hist_end, base + s.hist_end + s.num_candidates)
        prior = d.labels[tr].mean(0)  # [K]
        alpha = 10.0
        pos = np.zeros((d.num_items + 1, prior.size))
        np.add.at(pos, d.item_ids[tr], d.labels[tr])
        cnt = np.bincount(d.item_ids[tr], minlength=d.num_items + 1)[:, None]
        rate = np.clip((pos + alpha * prior) / (cnt + alpha), 1e-6, 1 - 1e-6)[d.item_ids[ev]]
        users = np.repeat(d.user_ids[s.rows], s.num_candidates)
        return ranking_metrics(np.log(rate / (1 - rate)), d.labels[ev], users, d.task_names)
