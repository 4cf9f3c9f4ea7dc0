"""Data pipeline entry points: raw files -> cached UserSequences -> leave-one-out -> JaggedBatch loaders.

    seqs = load_sequences(cfg.data)                       # parse/download/generate, cached as .npz
    train_loader, valid_loader, test_loader = build_loaders(cfg.data, seqs)
    summary = prepare(cfg.data)                           # for `hstu prepare`
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from hstu.trainer.config import DataConfig
from hstu.trainer.config_checks import DATASETS
from hstu.trainer.data.batch import JaggedBatch
from hstu.trainer.data.cache import cache_key, load_or_build
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.loader import SequenceLoader
from hstu.trainer.data.sequences import (KEPT_BEYOND_MAX_LEN, EvalSequences, UserSequences, build_user_sequences,
                                        leave_one_out, leave_one_out_split, truncate)

AMAZON_CORE = 5

__all__ = [
    "DATASETS", "DataError", "EvalSequences", "JaggedBatch", "SequenceLoader", "UserSequences",
    "build_loaders", "build_user_sequences", "leave_one_out", "leave_one_out_split", "load_sequences",
    "prepare",
]


def _raw_dir(data_cfg: DataConfig, progress: bool) -> Path:
    if data_cfg.data_dir:
        path = Path(data_cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data_dir for {data_cfg.name} is not a directory", path=str(path))
        return path
    from hstu.trainer.data.download import download_dataset

    return download_dataset(data_cfg.name, data_cfg.cache_dir, progress=progress)


def _build_synthetic(data_cfg: DataConfig, progress: bool, meta: Dict[str, Any]) -> UserSequences:
    from hstu.trainer.data.synthetic import generate

    full = generate(data_cfg.synthetic, progress)
    meta.update(raw_events=full.num_events, raw_users=full.num_users, raw_items=int(np.unique(full.item_ids).size))
    return truncate(full, data_cfg.max_seq_len + KEPT_BEYOND_MAX_LEN, data_cfg.min_seq_len)


def tie_options(data_cfg: DataConfig) -> Dict[str, Any]:
    """How same-second events were ordered: {"tie_order": ..., "tie_seed": data.seed (random only)} — part of
    the cache key and of every results JSON that describes the data."""
    out: Dict[str, Any] = {"tie_order": data_cfg.tie_order}
    if data_cfg.tie_order == "random":
        out["tie_seed"] = int(data_cfg.seed)
    return out


def _load(data_cfg: DataConfig, progress: bool = True) -> Tuple[UserSequences, Path, bool, str, Dict[str, Any]]:
    """-> (sequences, cache file, cache hit, source description, meta with raw counts)."""
    name = data_cfg.name
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    options: Dict[str, Any] = {
        "dataset": name, "max_seq_len": data_cfg.max_seq_len, "min_seq_len": data_cfg.min_seq_len,
    }
    if name != "synthetic":  # the generator's timestamps strictly increase: no ties, the order cannot matter
        options.update(tie_options(data_cfg))
    ties = {"tie_order": data_cfg.tie_order, "tie_seed": data_cfg.seed}
    sources: List[Path] = []
    if name == "synthetic":
        from hstu.trainer.data.synthetic import GENERATOR_VERSION

        options.update(synthetic=dataclasses.asdict(data_cfg.synthetic), generator_version=GENERATOR_VERSION)
        build = lambda meta: _build_synthetic(data_cfg, progress, meta)  # noqa: E731
        source = "generated"
    elif name == "amzn-books":
        from hstu.trainer.data.amazon import amazon_file, load_amazon_books

        raw = _raw_dir(data_cfg, progress)
        sources.append(amazon_file(raw))
        options["core"] = AMAZON_CORE
        build = lambda meta: load_amazon_books(  # noqa: E731
            raw, data_cfg.max_seq_len, data_cfg.min_seq_len, AMAZON_CORE, progress, stats=meta, **ties
        )
        source = str(sources[0])
    else:  # MovieLens
        from hstu.trainer.data.movielens import load_movielens, ratings_file

        raw = _raw_dir(data_cfg, progress)
        sources.append(ratings_file(name, raw))
        build = lambda meta: load_movielens(  # noqa: E731
            name, raw, data_cfg.max_seq_len, data_cfg.min_seq_len, progress, stats=meta, **ties
        )
        source = str(sources[0])
    seqs, path, hit, meta = load_or_build(data_cfg.cache_dir, name, cache_key(sources, options), build)
    if seqs.num_users == 0:
        raise DataError(f"{name}: no user has >= {data_cfg.min_seq_len} events", path=source)
    return seqs, path, hit, source, meta


def load_sequences(data_cfg: DataConfig, progress: bool = True) -> UserSequences:
    """DataConfig -> UserSequences (read data_dir, else download; synthetic: generate), through the cache.
    data.name=events: the prepared dataset of data.events (trainer/data/events_loader.py; with
    data.events.stream a StreamedEvents handle that build_loaders turns into per-rank streaming loaders)."""
    if data_cfg.name == "events":
        from hstu.trainer.data.events_loader import load_events

        return load_events(data_cfg, progress)
    return _load(data_cfg, progress)[0]


def build_loaders(data_cfg: DataConfig, seqs: UserSequences, rank: int = 0,
                  world_size: int = 1) -> Tuple[SequenceLoader, SequenceLoader, SequenceLoader]:
    """Leave-one-out split with validation (sequences.leave_one_out_split) -> (train loader: shuffled per (seed,
    epoch), resumable, sequences end before the validation item; validation loader; test loader: in user order,
    batches carry target_ids / target_timestamps). rank/world_size: this process's slice of every global batch.
    ``data.holdout_items_frac`` > 0: those items are removed from the train sequences only (trainer/data/holdout.py).
    data.name=events: the split of data.events.split (trainer/data/events_split.py)."""
    if data_cfg.name == "events":
        from hstu.trainer.data.events_loader import build_events_loaders

        return build_events_loaders(data_cfg, seqs, rank, world_size)
    split = leave_one_out_split(seqs, data_cfg.max_seq_len)
    train_seqs = split.train
    if data_cfg.holdout_items_frac > 0:
        from hstu.trainer.data.holdout import holdout_items, remove_items

        train_seqs = remove_items(split.train, holdout_items(seqs, data_cfg.holdout_items_frac, data_cfg.seed))
    train = SequenceLoader(train_seqs, data_cfg.batch_size, shuffle=True, seed=data_cfg.seed,
                           num_workers=data_cfg.num_workers, min_len=2, rank=rank, world_size=world_size)
    validation, test = (SequenceLoader.for_eval(view, data_cfg.eval_batch_size, num_workers=data_cfg.num_workers,
                                                rank=rank, world_size=world_size)
                        for view in (split.validation, split.test))
    return train, validation, test


def load_item_features(data_cfg: DataConfig, feat_cfg: Any, num_items: int, progress: bool = False,
                       dataset_dir: Any = None) -> Any:
    """The item feature table of the dataset (trainer/data/item_features.py): movies.dat / u.item from the raw
    folder (downloaded when data.data_dir is unset), the clusters of the synthetic world, the side-feature table
    of a prepared own-logs dataset (``dataset_dir``; default: found from ``data_cfg``)."""
    from hstu.trainer.data import item_features as itf

    raw = None if data_cfg.name in ("synthetic", "events") else _raw_dir(data_cfg, progress)
    return itf.load_item_features(data_cfg, feat_cfg, num_items, raw, dataset_dir)


def prepare(data_cfg: DataConfig, progress: bool = True) -> Dict[str, Any]:
    """Load (and cache) the dataset; return a summary for the ``hstu prepare`` CLI: counts of the kept
    sequences (users, items, events), raw counts of the source (raw_events, ...), cache path and hit.
    data.name=events: prepares the dataset folder (trainer/data/events_prepare.py) and summarises its manifest."""
    if data_cfg.name == "events":
        from hstu.trainer.data.events_loader import events_summary, load_events

        return events_summary(data_cfg, load_events(dataclasses.replace(
            data_cfg, events=dataclasses.replace(data_cfg.events, stream=True)), progress))
    seqs, path, hit, source, meta = _load(data_cfg, progress)
    lengths = seqs.lengths()
    summary: Dict[str, Any] = {
        "dataset": data_cfg.name,
        "users": seqs.num_users,
        "items": int(np.unique(seqs.item_ids).size),  # distinct items in the kept events
        "num_items": seqs.num_items,  # max item id (embedding table has num_items + 1 rows)
        "events": seqs.num_events,  # kept events (each user's last max_seq_len + 2)
        "mean_seq_len": float(lengths.mean()) if lengths.size else 0.0,
        "max_seq_len": data_cfg.max_seq_len,
        **tie_options(data_cfg),
        **meta,  # raw_events / raw_users / raw_items (+ core_* for Amazon): counts before truncation
        "source": source,
        "cache_path": str(path),
        "cache_hit": hit,
    }
    return summary


def summary_lines(summary: Dict[str, Any]) -> List[str]:
    """Human-readable lines of a :func:`prepare` summary."""
    return [f"{k}: {v}" for k, v in summary.items()]
