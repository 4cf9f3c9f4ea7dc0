"""The retrieval task: next-item prediction with a sampled softmax over the item catalogue, full-ranking
evaluation (HR@K / NDCG@K / MRR, trainer/evaluate.py), a most-popular baseline (docs/model.md).

Split (leave-one-out with validation): each user's last item is the test target, the second-to-last the
validation target, training sequences end before it (trainer/data). Sharded path (``sharding.enabled``): the item
table is a TorchRec EmbeddingCollection (trainer/parallel/item_embeddings.py). :func:`prepare_retrieval_batch`
draws the negatives up front on both paths (one place, one random stream); on the sharded path it also picks the
ids of the ONE table lookup per step that serves the sequence and the negatives.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

from hstu.modules.losses import lookup_all_items, next_item_labels, sample_negatives, sampled_softmax_loss
from hstu.trainer.config import ConfigError, RunConfig
from hstu.trainer.evaluate import evaluate, evaluate_popularity, item_groups, popularity_counts
from hstu.trainer.pipeline import PreparedBatch
from hstu.trainer.tasks.spec import TaskData

log = logging.getLogger("hstu")


def metric_names(eval_cfg) -> list:
    return [f"hr@{k}" for k in eval_cfg.ks] + [f"ndcg@{k}" for k in eval_cfg.ndcg_ks] + ["mrr"]


def build_data(cfg: RunConfig, rank: int = 0, world_size: int = 1, with_validation: bool = False):
    """(seqs, train_loader, test_loader) — or (seqs, train_loader, valid_loader, test_loader) with
    ``with_validation`` — from the data package (progress bars follow train.progress); the train sequences end
    before each user's validation item either way; the loaders read this rank's slice of every global batch."""
    from hstu.trainer.data import build_loaders, load_sequences

    seqs = load_sequences(cfg.data, progress=cfg.train.progress and rank == 0)
    train_loader, valid_loader, test_loader = build_loaders(cfg.data, seqs, rank, world_size)
    if with_validation:
        return seqs, train_loader, valid_loader, test_loader
    return seqs, train_loader, test_loader


def build_model_for(cfg: RunConfig, num_items: int, device: torch.device, item_features: Any = None,
                    train_counts: Any = None) -> torch.nn.Module:
    """The RetrievalModel on ``device`` (tables built on the meta device stay there: per-shard init); with item
    features, items with <= model.item_features.content_only_max_events training events (``train_counts``
    [N+1]) get their id embedding dropped (content part only)."""
    from hstu.modules.embeddings import to_device_keeping_meta
    from hstu.modules.model import build_model

    model = build_model(cfg, num_items, item_features)
    threshold = cfg.model.item_features.content_only_max_events
    if model.item_tower is not None and threshold >= 0 and train_counts is not None:
        model.item_tower.drop_ids(torch.as_tensor(train_counts) <= threshold)
    return to_device_keeping_meta(model, device)


def compute_loss(model: torch.nn.Module, batch: Any, ctx: Any) -> torch.Tensor:
    """Sampled-softmax next-item loss of one batch on the device: a PreparedBatch from :func:`prepare_retrieval_batch`
    (a bare JaggedBatch is prepared here). ONE loss call for both paths; the route is the batch's: plain
    (``lookup_ids`` None) encodes with the model's own item table, sharded makes ONE call of the (DMP) model do both
    item lookups (``lookup_ids``)."""
    lc = ctx.cfg.loss
    p = batch if isinstance(batch, PreparedBatch) else PreparedBatch(batch, int(batch.item_ids.numel()))
    if p.negatives is None:
        p = prepare_retrieval_batch(p, ctx)
    item_vectors, table, table_ids = None, None, None
    if p.lookup_ids is None:  # plain: the model looks up positives and negatives itself
        seq_emb, item_vectors = model.encode(p.batch), model.item_vectors  # [T, D]
    else:  # sharded: ids 0..N (row = id) or the sorted unique ids prepare_retrieval_batch chose to look up
        seq_emb, table = model(p.batch, p.lookup_ids, p.input_index)  # [T, D], [U, D]
        table_ids = None if _lookup_all(ctx.cfg, ctx.num_items) else p.lookup_ids
    return sampled_softmax_loss(seq_emb, p.labels, p.valid, item_vectors, ctx.num_items, lc.num_negatives,
                                lc.temperature, negatives=p.negatives, route=lc.route, item_lookup=lc.item_lookup,
                                table=table, table_ids=table_ids, compile=lc.compile, backend=ctx.cfg.ops.backend)


def _lookup_all(cfg: RunConfig, num_items: int) -> bool:
    """The one rule (``loss.route`` / ``loss.item_lookup``): does the step look up the whole table (ids 0..N)?"""
    lc = cfg.loss
    return lookup_all_items(lc.route, lc.item_lookup, num_items, lc.num_negatives, cfg.model.embedding_dim)


def prepare_retrieval_batch(out: PreparedBatch, ctx: Any) -> PreparedBatch:
    """Both paths: next-item labels [T], valid [T] and the negatives [V, R] of the V valid positions, drawn from
    ``ctx.neg_generator`` here and nowhere else (uniform over 1..N; with ``data.holdout_items_frac`` uniform over
    the items not held out, ``task.negative_pool``). Sharded path (``ctx.env.sharded``) also: the ids of the ONE table
    lookup of the step: ``lookup_ids`` = all ids 0..N when the loss uses the whole table (``_lookup_all``), else
    the unique ids of the batch and its negatives; ``input_index`` [T] maps each batch item into lookup_ids."""
    cfg, batch = ctx.cfg, out.batch
    labels, valid = next_item_labels(batch.item_ids, batch.offsets)
    lc, n = cfg.loss, ctx.num_items
    pool = getattr(getattr(ctx, "task", None), "negative_pool", None)
    if pool is None:
        negatives = sample_negatives(int(valid.sum()), lc.num_negatives, n, ctx.neg_generator, ctx.device,
                                     reserve_positive_column=True)  # the loss writes the positives into column 0
    else:  # data.holdout_items_frac: held-out items do not exist at training time, never a negative either
        draw = sample_negatives(int(valid.sum()), lc.num_negatives, int(pool.numel()), ctx.neg_generator, ctx.device)
        negatives = pool.to(draw.device)[draw - 1]
    out.labels, out.valid, out.negatives = labels, valid, negatives
    env = getattr(ctx, "env", None)
    if env is None or not env.sharded:
        return out
    if _lookup_all(cfg, n):
        out.lookup_ids, out.input_index = torch.arange(n + 1, device=ctx.device), batch.item_ids
    else:
        out.lookup_ids, inverse = torch.unique(torch.cat([batch.item_ids, negatives.flatten()]), return_inverse=True)
        out.input_index = inverse[: batch.item_ids.numel()]
    return out


def popularity_baseline(cfg: RunConfig, seqs, eval_loader, env: Any = None,
                        groups: Optional[Dict[str, torch.Tensor]] = None,
                        pool: Optional[torch.Tensor] = None,
                        train_counts: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Most-popular baseline on ``eval_loader``: items ranked by their count in the training sequences
    (``train_counts`` [N+1], the events the model trains on — validation and test targets excluded; without it,
    every event but each user's last); collective with ``env`` of world size > 1. ``pool``: the items that exist
    at training time (holdout: the held-out items count 0, as for the model)."""
    counts_of = getattr(seqs, "popularity_counts", None)  # streamed own logs: per-rank counts summed over ranks
    if train_counts is not None:
        counts = torch.as_tensor(train_counts)  # read only: the pool mask below makes a new tensor
    elif counts_of is not None:
        counts = counts_of(env)
    else:
        counts = popularity_counts(torch.as_tensor(seqs.item_ids), torch.as_tensor(seqs.offsets), seqs.num_items)
    if pool is not None:
        keep = torch.zeros_like(counts, dtype=torch.bool)
        keep[pool] = True
        counts = counts.masked_fill(~keep, 0)
    return evaluate_popularity(counts, eval_loader, cfg.eval, reduce=env.all_reduce_sum
                               if env is not None and env.world_size > 1 else None, groups=groups)


class RetrievalTask:
    """Next-item retrieval: sampled softmax, full-ranking evaluation (see the module docstring)."""

    name = "retrieval"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.data = cfg, None
        self.item_features = None  # ItemFeatureTable when model.item_features.enabled
        self.train_counts: Optional[torch.Tensor] = None  # [N+1] training events per item
        self.negative_pool: Optional[torch.Tensor] = None  # with data.holdout_items_frac: the items not held out
        self.held_out: Optional[int] = None  # how many items data.holdout_items_frac held out

    # -- config
    def check_config(self) -> None:
        if self.cfg.model.arch == "dlrm":
            raise ConfigError("key 'model.arch' = 'dlrm' needs task=ranking")

    def metric_names(self) -> List[str]:
        return metric_names(self.cfg.eval)

    def selection_value(self, metrics: Dict[str, float]) -> float:
        return metrics[self.cfg.eval.selection_metric]

    # -- data
    def prepare(self, progress: bool = False) -> Dict[str, Any]:
        from hstu.trainer.data import prepare

        return prepare(self.cfg.data, progress=progress)

    def build_data(self, env=None) -> TaskData:
        rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
        seqs, train_loader, valid_loader, test_loader = build_data(self.cfg, rank, world, with_validation=True)
        self.data = TaskData(train_loader, test_loader, seqs.num_items, seqs.num_users, seqs, valid_loader)
        from hstu.trainer.data.holdout import train_item_counts

        train_seqs = getattr(train_loader, "seqs", None)  # the streamed own-logs loader holds no sequences
        self.train_counts = None if train_seqs is None else torch.as_tensor(train_item_counts(train_seqs))
        if self.cfg.data.holdout_items_frac > 0:
            from hstu.trainer.data.holdout import holdout_items

            held = torch.as_tensor(holdout_items(seqs, self.cfg.data.holdout_items_frac, self.cfg.data.seed))
            keep = torch.ones(seqs.num_items + 1, dtype=torch.bool)
            keep[0], keep[held] = False, False
            self.negative_pool = keep.nonzero().flatten()
            self.held_out = int(held.numel())
        if self.cfg.model.item_features.enabled:
            from hstu.trainer.data import load_item_features

            events = getattr(seqs, "events", None)  # own logs: the prepared dataset holds the side-feature table
            self.item_features = load_item_features(self.cfg.data, self.cfg.model.item_features, seqs.num_items,
                                                    dataset_dir=getattr(events, "folder", None))
        return self.data

    def data_description(self) -> Dict[str, Any]:
        from hstu.trainer.data import tie_options

        split = "leave-one-out (validation: second-to-last item, test: last item)"
        events = self.cfg.data.events
        if self.cfg.data.name == "events" and events.split == "time":  # own logs (docs/data.md "Split options")
            split = (f"time cutoff {events.time_cutoff} (test: first item at/after it, validation: last item before "
                     "it)")
        out = {"split": split, **tie_options(self.cfg.data)}
        prepared = getattr(getattr(self.data, "source", None), "events", None)
        if prepared is not None:  # own logs: where the vocabularies are (hstu export copies them)
            out["dataset_dir"] = str(prepared.folder)
        if self.cfg.data.holdout_items_frac > 0:
            out["holdout_items_frac"] = self.cfg.data.holdout_items_frac
            out["held_out_items"] = int(self.held_out) if self.held_out is not None else None
            if self.train_counts is not None and self.data is not None:  # items of the data with no training event
                present = torch.as_tensor(self.data.source.item_ids).unique()
                out["never_seen_items"] = int((self.train_counts[present] == 0).sum())
        return out

    # -- model, sharding, batch, loss
    def build_model(self, device: torch.device) -> torch.nn.Module:
        return build_model_for(self.cfg, self.data.num_items, device, self.item_features, self.train_counts)

    def build_model_for_items(self, num_items: int, device: torch.device) -> torch.nn.Module:
        """The model for ``num_items`` items without loading data (``hstu plan --num-items``)."""
        return build_model_for(self.cfg, num_items, device)

    def wrap_sharded_tables(self, model: torch.nn.Module, weight_dtype: str, init_seed: Optional[int] = None) -> None:
        """The item table becomes a CollectionItemEmbeddings (a TorchRec EmbeddingCollection that DMP shards; a
        table on the meta device stays there and is initialised per shard from ``init_seed``), the item tower's
        feature tables (model.item_features) a CollectionFeatureTables."""
        from hstu.trainer.parallel.item_embeddings import CollectionItemEmbeddings

        model.item_embeddings = CollectionItemEmbeddings(model.item_embeddings, weight_dtype, init_seed)
        if getattr(model, "item_tower", None) is not None:  # the feature tables too, one more collection
            from hstu.trainer.parallel.item_features import CollectionFeatureTables

            model.item_tower.tables = CollectionFeatureTables(model.item_tower.tables, weight_dtype, init_seed)

    def prefetcher(self, model: torch.nn.Module) -> Any:
        """The sharded model's CollectionItemEmbeddings: ``prefetch(lookup_ids)`` starts the input all-to-all of
        the next batch (``sharding.pipeline=prefetch``, trainer/pipeline.py)."""
        from hstu.trainer.parallel.item_embeddings import find_item_embeddings

        return find_item_embeddings(model)

    def prepare_batch(self, prepared: PreparedBatch, ctx: Any) -> PreparedBatch:
        """Labels and negatives (both paths), lookup ids (sharded): :func:`prepare_retrieval_batch`."""
        return prepare_retrieval_batch(prepared, ctx)

    def compute_loss(self, model, batch, ctx) -> torch.Tensor:
        return compute_loss(model, batch, ctx)

    # -- evaluation
    def eval_splits(self) -> tuple:
        """Leave-one-out with validation: second-to-last item (validation), last item (test)."""
        return ("validation", "test")

    def evaluate(self, model, ctx, split: str = "test") -> Dict[str, float]:
        """Full-ranking metrics of ``split`` (validation | test; ``ctx``: the TrainContext, or a device);
        collective with N ranks."""
        env = getattr(ctx, "env", None)
        loader = {"test": self.data.eval_loader, "validation": self.data.valid_loader}[split]
        if loader is None:
            raise ValueError(f"no {split} loader in this context")
        if env is not None and env.sharded:
            from hstu.trainer import distributed as hd

            model = hd.unwrap(model)  # its sharded table stays sharded (collective lookups)
        return evaluate(model, loader, self.data.num_items, self.cfg.eval, getattr(ctx, "device", ctx),
                        reduce=env.all_reduce_sum if env is not None and env.world_size > 1 else None,
                        groups=self.groups())

    def groups(self) -> Optional[Dict[str, torch.Tensor]]:
        """eval.item_groups: the cold / never-seen target groups from the training counts (else None)."""
        if not self.cfg.eval.item_groups or self.train_counts is None:
            return None
        return item_groups(self.train_counts, self.cfg.eval.cold_max_events)

    def baseline_metrics(self, env=None) -> Dict[str, float]:
        return popularity_baseline(self.cfg, self.data.source, self.data.eval_loader, env, self.groups(),
                                   self.negative_pool, self.train_counts)

    def baseline(self, metrics, env=None) -> Dict[str, float]:
        """The most-popular baseline on the test split, logged once (eval.popularity_baseline; else {})."""
        if not self.cfg.eval.popularity_baseline:
            return {}
        base = self.baseline_metrics(env)
        metrics.log("baseline", 0, epoch=0, name="most_popular", **base)
        log.info("most-popular baseline: %s", ", ".join(f"{k} {base[k]:.4f}" for k in self.metric_names()))
        return base

    # -- weights and export
    def plain_state_dict(self, model) -> Dict[str, torch.Tensor]:
        """A sharded (DMP) RetrievalModel as the plain model's state_dict; collective."""
        from hstu.trainer.parallel.item_embeddings import plain_state_dict

        return plain_state_dict(model)

    streamed_export_keys = ("item_embeddings.table.weight",)  # = plain_weights.ITEM_KEY: never read whole

    def export(self, state: Dict[str, torch.Tensor], ckpt: str, out: str, *, embedding_dtype: str = "fp32",
               overwrite: bool = False, source: Optional[Dict[str, str]] = None,
               chunk_rows: Optional[int] = None) -> Dict[str, Any]:
        """``hstu export`` of the plain weights ``state`` (read from ``ckpt``; without the item table, which is
        streamed from ``ckpt`` ``chunk_rows`` rows at a time): serving/export.py."""
        from hstu.serving.export import export_retrieval_state

        return export_retrieval_state(self.cfg, state, ckpt, out, embedding_dtype=embedding_dtype,
                                      overwrite=overwrite, source=source, chunk_rows=chunk_rows)
