"""The one validation pass over a :class:`~hstu.trainer.config.RunConfig` (docs/reliability.md).

:func:`check_values` range-checks every value of every section — float fields must be finite, counts and sizes
positive, probabilities in their interval, names one of the allowed choices below — plus the cross-field rules
that need no data (arch vs task, ranking tasks vs dataset, streaming synthetic data). It runs inside
``load_config``, i.e. before any data is read or a run directory is touched; a failure is a one-line
:class:`ConfigError` naming the key, the value and the allowed range or choices. The lists of allowed values are
defined here once (``trainer/data``, ``trainer/tasks/`` import them).

Checks that need the machine (:func:`check_resources`: CUDA present, the sampled-softmax logits fit in memory)
run when training starts (``train.check_train_config``), not when a saved config is read back for eval/export.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, value and source."""


# ---------------------------------------------------------------------------------------------- allowed values
DATASETS = ("ml-1m", "ml-20m", "ml-100k", "amzn-books", "synthetic", "events")  # events: data.events (own logs)
TASKS = ("retrieval", "ranking")
ARCHS = ("hstu", "sasrec", "dlrm")  # dlrm: task=ranking only
RANKING_ARCHS = ("hstu", "dlrm")
VARIANTS = ("research", "production")
TIME_BUCKET_FNS = ("sqrt", "log")
LOSSES = ("sampled_softmax",)
LOSS_ROUTES = ("sampled", "all_items", "gather")  # loss.route (modules/losses.py)
ITEM_LOOKUPS = ("auto", "all", "unique")  # loss.item_lookup
OPS_BACKENDS = ("pytorch", "triton", "cpu")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")
TIE_ORDERS = ("random", "file", "item_id")  # data.tie_order (trainer/data/sequences.py)
SELECT_ON = ("validation", "test")  # eval.select_on
BEST_FORMATS = ("plain", "dcp")  # checkpoint.best_format
ITEM_FEATURE_COMBINES = ("sum", "mlp")  # model.item_features.combine
ITEM_FEATURE_POOLINGS = ("mean", "sum")  # model.item_features.pooling
# item features each dataset has (trainer/data/item_features.py)
ITEM_FEATURES_BY_DATASET = {"ml-1m": ("genre", "year", "title"), "ml-100k": ("genre", "year", "title"),
                            "synthetic": ("cluster",)}
# ranking datasets: (binary tasks, regression target or "")
RANKING_DATASETS = {"ml-1m": (("like", "love"), "rating"), "synthetic": (("click", "like", "share", "complete"), "")}


def ranking_dataset(cfg: Any) -> Tuple[Tuple[str, ...], str]:
    """(binary tasks, regression target or "") of ``cfg``'s dataset: RANKING_DATASETS, or for data.name=events the
    tasks of ``data.events.labels`` and the rating (when a rating_column is declared)."""
    if cfg.data.name == "events":
        from hstu.trainer.events_config import ranking_labels

        try:
            labels = ranking_labels(cfg.data.events)
        except ValueError:
            return (), ""
        return tuple(name for name, *_ in labels), "rating" if cfg.data.events.rating_column else ""
    return RANKING_DATASETS.get(cfg.data.name, ((), ""))

# the sampled-softmax batch may use at most this fraction of the machine's memory (check_resources)
LOGITS_MEMORY_FRACTION = 0.9
# bytes per (position, negative) that every route of modules/losses.py allocates at least: the int64 negative
# id, its float32 logit and the logit's gradient
BYTES_PER_NEGATIVE = 8 + 4 + 4


def _fail(key: str, value: Any, rule: str) -> "ConfigError":
    return ConfigError(f"key '{key}' = {value!r} must be {rule}")


def _leaves(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every field of a dataclass tree; list/tuple items as ``key[i]``."""
    for f in dataclasses.fields(obj):
        val, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(val):
            yield from _leaves(val, key + ".")
        elif isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                yield f"{key}[{i}]", v
        else:
            yield key, val


class _Checks:
    """Small rule helpers reading dotted keys of one config."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def get(self, key: str) -> Any:
        obj = self.cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def choice(self, key: str, allowed: Sequence[str], value: Any = None) -> None:
        val = self.get(key) if value is None else value
        if val not in allowed:
            raise ConfigError(f"key '{key}' = {val!r} is not one of {list(allowed)}")

    def at_least(self, low: float, *keys: str) -> None:
        for key in keys:
            val = self.get(key)
            if not val >= low:
                raise _fail(key, val, f">= {low}")

    def positive(self, *keys: str) -> None:
        for key in keys:
            val = self.get(key)
            if not val > 0:
                raise _fail(key, val, "> 0")

    def interval(self, key: str, low: float, high: float, closed_high: bool = False, value: Any = None) -> None:
        val = self.get(key) if value is None else value
        ok = low <= val <= high if closed_high else low <= val < high
        if not ok:
            raise _fail(key, val, f"in [{low}, {high}{']' if closed_high else ')'}")


def check_values(cfg: Any) -> None:
    """Range-check every value of ``cfg`` (a RunConfig); raise ConfigError on the first bad one."""
    for key, val in _leaves(cfg):  # NaN/inf anywhere: no float field of the config means anything non-finite
        if isinstance(val, float) and not math.isfinite(val):
            raise _fail(key, val, "a finite number")
    c = _Checks(cfg)
    c.choice("task", TASKS)
    c.choice("data.name", DATASETS)
    c.choice("model.arch", ARCHS)
    c.choice("model.variant", VARIANTS)
    c.choice("model.input_time_bucket_fn", TIME_BUCKET_FNS)
    c.choice("loss.name", LOSSES)
    c.choice("loss.route", LOSS_ROUTES)
    c.choice("loss.item_lookup", ITEM_LOOKUPS)
    c.choice("ops.backend", OPS_BACKENDS)
    c.choice("train.device", DEVICES, cfg.train.device.split(":")[0])
    c.choice("train.dtype", DTYPES)
    c.choice("data.tie_order", TIE_ORDERS)
    c.choice("eval.select_on", SELECT_ON)
    _check_data(c)
    _check_model(c)
    _check_item_features(c)
    _check_optim_loss(c)
    _check_train_eval(c)
    _check_sharding(cfg)
    check_ranking_values(cfg)


def _check_data(c: _Checks) -> None:
    cfg = c.cfg
    c.positive("data.batch_size", "data.eval_batch_size")
    c.at_least(0, "data.num_workers")
    # retrieval trains on next-item targets inside the max_seq_len history: 2 events give one target; a ranking
    # history event is itself a target
    low = 2 if cfg.task == "retrieval" else 1
    if not cfg.data.max_seq_len >= low:
        raise _fail("data.max_seq_len", cfg.data.max_seq_len,
                    f">= {low} (task={cfg.task}: a shorter history gives no training target)")
    # retrieval: one train target + the validation and test targets; ranking: a history event + an eval event
    low = 4 if cfg.task == "retrieval" else 2
    if not cfg.data.min_seq_len >= low:
        raise _fail("data.min_seq_len", cfg.data.min_seq_len,
                    f">= {low} (task={cfg.task}: one train target + the held-out validation and test targets)"
                    if low == 4 else f">= {low} (task={cfg.task}: a history event + the held-out eval event)")
    c.positive("data.synthetic.num_users", "data.synthetic.num_items", "data.synthetic.num_interests")
    c.at_least(1, "data.synthetic.min_seq_len")
    c.at_least(cfg.data.synthetic.min_seq_len, "data.synthetic.max_seq_len")
    c.at_least(0, "data.synthetic.zipf_exponent", "data.synthetic.num_action_types")
    for key in ("drift", "interest_focus", "sequential_strength"):
        c.interval("data.synthetic." + key, 0.0, 1.0, closed_high=True)
    from hstu.trainer.events_config import check_events_values  # stdlib-only, beside the ranking sections

    check_events_values(cfg)


def _check_model(c: _Checks) -> None:
    m = c.cfg.model
    c.positive(*(f"model.{k}" for k in ("embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim",
                                        "ffn_dim", "num_time_buckets", "time_bucket_base", "input_time_buckets")))
    c.interval("model.dropout", 0.0, 1.0)
    c.interval("model.attn_dropout", 0.0, 1.0)
    if m.arch == "hstu" and m.attn_dropout > 0:
        raise _fail("model.attn_dropout", m.attn_dropout, "0 with model.arch=hstu (the jagged attention op has "
                    "no dropout)")
    if m.arch == "sasrec" and m.embedding_dim % m.num_heads:
        raise ConfigError(f"key 'model.num_heads' = {m.num_heads} must divide model.embedding_dim = "
                          f"{m.embedding_dim} (model.arch=sasrec)")
    if m.arch == "dlrm" and c.cfg.task != "ranking":
        raise ConfigError("key 'model.arch' = 'dlrm' needs task=ranking")


def _check_item_features(c: _Checks) -> None:
    """model.item_features.* and data.holdout_items_frac (the item tower: task=retrieval and task=ranking)."""
    cfg, f = c.cfg, c.cfg.model.item_features
    c.interval("data.holdout_items_frac", 0.0, 1.0)
    c.at_least(0, "eval.cold_max_events")
    c.choice("model.item_features.combine", ITEM_FEATURE_COMBINES)
    c.choice("model.item_features.pooling", ITEM_FEATURE_POOLINGS)
    c.positive("model.item_features.title_buckets", "model.item_features.year_bucket_years")
    c.at_least(-1, "model.item_features.content_only_max_events")
    if len(set(f.features)) != len(f.features):
        raise _fail("model.item_features.features", f.features, "a list without repeats")
    if cfg.data.holdout_items_frac > 0 and cfg.task != "retrieval":
        raise ConfigError(f"key 'data.holdout_items_frac' = {cfg.data.holdout_items_frac}: needs task=retrieval")
    if cfg.eval.item_groups and cfg.task != "retrieval":
        raise ConfigError("key 'eval.item_groups' = True: needs task=retrieval (the ranking metrics have no cold / "
                          "never-seen groups)")
    if cfg.eval.item_groups and cfg.data.name == "events" and cfg.data.events.stream:
        raise ConfigError("key 'eval.item_groups' = True: not supported with data.events.stream=true yet (the "
                          "streamed loader keeps no training counts)")
    if cfg.data.holdout_items_frac > 0 and cfg.data.name == "events":
        raise ConfigError(f"key 'data.holdout_items_frac' = {cfg.data.holdout_items_frac}: not supported with "
                          "data.name=events yet (the own-logs split builds its own loaders)")
    if not f.enabled:
        if not f.use_ids:
            raise ConfigError("key 'model.item_features.use_ids' = False needs model.item_features.enabled=true "
                              "(an item needs ids or features)")
        return
    known = ITEM_FEATURES_BY_DATASET.get(cfg.data.name)
    if cfg.data.name == "events":  # own logs: the columns of the side-feature table (trainer/data/item_features.py)
        ev = cfg.data.events.item_features
        known = tuple(ev.columns) + tuple(ev.multi_columns) if ev.paths else ()
        if not known:
            raise ConfigError("key 'model.item_features.enabled' = True: data.name=events needs an item side-feature "
                              "table (data.events.item_features.paths and .columns / .multi_columns)")
    if known is None:
        raise ConfigError(f"key 'model.item_features.enabled' = True: data.name = {cfg.data.name!r} has no item "
                          f"features ({' | '.join(ITEM_FEATURES_BY_DATASET)})")
    for i, name in enumerate(f.features):
        c.choice(f"model.item_features.features[{i}]", known, name)


def _check_optim_loss(c: _Checks) -> None:
    c.at_least(0, "optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip_norm")
    c.positive("optim.eps")
    for i, beta in enumerate(c.cfg.optim.betas):
        c.interval(f"optim.betas[{i}]", 0.0, 1.0, value=beta)
    c.positive("loss.num_negatives", "loss.temperature")


def _check_train_eval(c: _Checks) -> None:
    cfg = c.cfg
    c.positive("train.epochs", "train.eval_every_epochs", "train.log_every_steps")
    c.at_least(0, "train.max_steps", "train.max_train_minutes", "train.num_threads")
    c.interval("train.stochastic_length.alpha", 0.0, 2.0, closed_high=True)
    if not cfg.train.stochastic_length.alpha > 0:
        raise _fail("train.stochastic_length.alpha", cfg.train.stochastic_length.alpha, "in (0, 2]")
    for key in ("ks", "ndcg_ks"):
        ks = getattr(cfg.eval, key)
        if key == "ks" and not ks:
            raise _fail("eval.ks", ks, "a non-empty list of cut-offs >= 1")
        for i, k in enumerate(ks):
            if not k >= 1:
                raise _fail(f"eval.{key}[{i}]", k, "a cut-off >= 1")
    c.positive("eval.item_chunk_size")
    c.at_least(0, "checkpoint.every_steps")
    c.at_least(1, "checkpoint.keep_last")
    if cfg.checkpoint.best_format not in BEST_FORMATS:
        raise _fail("checkpoint.best_format", cfg.checkpoint.best_format, "one of " + ", ".join(BEST_FORMATS))


def _check_sharding(cfg: Any) -> None:
    from hstu.trainer.parallel import config as pc  # the sharding lists live beside ShardingConfig

    c = _Checks(cfg)
    for key, allowed in (("sharding_type", pc.SHARDING_TYPES), ("optimizer", pc.OPTIMIZERS),
                         ("state_placement", pc.STATE_PLACEMENTS), ("weight_dtype", pc.WEIGHT_DTYPES),
                         ("pipeline", pc.PIPELINES), ("table_init", pc.TABLE_INITS)):
        c.choice("sharding." + key, allowed)
    c.at_least(0, "sharding.hbm_cap_bytes", "sharding.ddr_cap_bytes")
    c.positive("sharding.batch_size")
    sh = cfg.sharding
    for key, low in (("lr", None), ("weight_decay", None), ("eps", 0)):
        val = getattr(sh, key)
        if val is not None and not (val > 0 if low == 0 else val >= 0):
            raise _fail("sharding." + key, val, "> 0" if low == 0 else ">= 0")
    for i, beta in enumerate(sh.betas or ()):
        c.interval(f"sharding.betas[{i}]", 0.0, 1.0, value=beta)
    if sh.table_init == "per_shard" and not sh.enabled:
        raise ConfigError("key 'sharding.table_init' = 'per_shard' needs sharding.enabled=true (the plain path "
                          "builds whole tables)")
    if sh.table_init == "per_shard" and cfg.train.init_from:
        raise ConfigError("key 'sharding.table_init' = 'per_shard' cannot start from train.init_from (that copies "
                          "plain tables into every rank): use sharding.table_init=copy")
    try:
        sh.validate()  # the standalone check (ShardingConfig users outside a RunConfig)
    except ValueError as e:
        raise ConfigError(f"key {e}") from None


def check_ranking_values(cfg: Any) -> None:
    """The ``ranking.*`` section and the task=ranking rules that need no data."""
    c, rc = _Checks(cfg), cfg.ranking
    c.positive("ranking.num_eval_targets", "ranking.head_hidden_dim")
    c.at_least(0, "ranking.regression_weight", "ranking.zip_prefix_len", "ranking.max_side_tokens")
    for i, w in enumerate(rc.task_weights):
        if not w >= 0:
            raise _fail(f"ranking.task_weights[{i}]", w, ">= 0")
    for i, width in enumerate(rc.dlrm_mlp):
        if not width > 0:
            raise _fail(f"ranking.dlrm_mlp[{i}]", width, "> 0")
    s = "ranking.synthetic."
    c.positive(*(s + k for k in ("num_users", "num_items", "num_clusters", "creators_per_cluster", "num_countries")))
    c.at_least(rc.synthetic.min_seq_len, s + "max_seq_len")
    c.at_least(0, s + "zipf_exponent")
    for key in ("follow_prob", "interest_switch", "move_prob"):
        c.interval(s + key, 0.0, 1.0, closed_high=True)
    validate_ranking_stream(cfg)
    if cfg.task != "ranking":
        return
    if cfg.data.name not in RANKING_DATASETS and cfg.data.name != "events":
        raise ConfigError(f"key 'data.name' = {cfg.data.name!r}: task=ranking supports "
                          f"{list(RANKING_DATASETS) + ['events']}")
    if cfg.data.name == "events":  # own logs (docs/data.md "Ranking on your own logs")
        ev = cfg.data.events
        if ev.stream:
            raise ConfigError("key 'data.events.stream' = True: not supported with task=ranking yet (the ranking "
                              "path reads the prepared shards into memory; set data.events.stream=false)")
        if not ev.rating_column and not ev.action_column:
            raise ConfigError("key 'data.events.rating_column' = '': task=ranking on own logs needs a rating_column "
                              "or an action_column (the action tokens and the labels come from it)")
        if not ranking_dataset(cfg)[0]:
            raise ConfigError(f"key 'data.events.labels' = {list(ev.labels)}: task=ranking needs at least one label "
                              "(e.g. 'click=action==1'; the default like=rating>=4 needs a rating_column)")
    if cfg.model.arch not in RANKING_ARCHS:
        raise ConfigError(f"key 'model.arch' = {cfg.model.arch!r}: task=ranking supports {' | '.join(RANKING_ARCHS)}")
    if cfg.train.stochastic_length.enabled:
        raise ConfigError("key 'train.stochastic_length.enabled' = True: not supported with task=ranking")
    known = ranking_dataset(cfg)[0]
    bad = [t for t in rc.tasks if t not in known]
    if bad:
        raise ConfigError(f"key 'ranking.tasks' = {bad}: not defined for {cfg.data.name} (known: {list(known)})")
    num_tasks = len(rc.tasks or known)
    if rc.task_weights and len(rc.task_weights) != num_tasks:
        raise ConfigError(f"key 'ranking.task_weights' has {len(rc.task_weights)} values for {num_tasks} tasks "
                          f"{list(rc.tasks or known)}")
    if cfg.sharding.enabled and cfg.sharding.pipeline != "none":
        raise ConfigError(f"key 'sharding.pipeline' = {cfg.sharding.pipeline!r}: task=ranking supports 'none' (the "
                          "prefetch pipeline overlaps the retrieval item lookup only)")


def check_ranking_training(cfg: Any) -> None:
    """Rules for *training* a ranking model (checked when training starts: a saved config of a model built
    without them can still be exported/evaluated)."""
    check_ranking_values(cfg)
    rc = cfg.ranking
    if rc.regression_weight > 0 and not ranking_dataset(cfg)[1]:
        raise ConfigError(f"key 'ranking.regression_weight' = {rc.regression_weight} must be 0: {cfg.data.name} "
                          "has no regression target")


def validate_ranking_stream(cfg: Any) -> None:
    """``ranking.synthetic.stream`` / ``eval_users`` / ``prefetch_batches`` (docs/ranking.md, streaming synthetic
    data): stream=true needs task=ranking, data.name=synthetic and 1 <= eval_users <= num_users; eval_users > 0
    and prefetch_batches > 0 need stream=true (the materialised path evaluates every user)."""
    s = cfg.ranking.synthetic
    for key in ("eval_users", "prefetch_batches"):
        if getattr(s, key) < 0:
            raise _fail(f"ranking.synthetic.{key}", getattr(s, key), ">= 0")
    if not s.stream:
        for key in ("eval_users", "prefetch_batches"):
            if getattr(s, key) > 0:
                raise ConfigError(f"key 'ranking.synthetic.{key}' = {getattr(s, key)} needs "
                                  "ranking.synthetic.stream=true (the materialised path evaluates every user)")
        return
    if cfg.task != "ranking" or cfg.data.name != "synthetic":
        raise ConfigError(f"key 'ranking.synthetic.stream' = True needs task=ranking and data.name=synthetic, got "
                          f"task={cfg.task!r}, data.name={cfg.data.name!r}")
    if not 1 <= s.eval_users <= s.num_users:
        raise ConfigError(f"key 'ranking.synthetic.eval_users' = {s.eval_users} must be in 1..{s.num_users} "
                          "(ranking.synthetic.num_users) with ranking.synthetic.stream=true")
    if s.min_seq_len < 2:
        raise ConfigError(f"key 'ranking.synthetic.min_seq_len' = {s.min_seq_len} must be >= 2 (every user needs "
                          "a history event and an eval event)")


# ------------------------------------------------------------------------------------------ machine resources


def machine_memory_bytes(device: str) -> Optional[int]:
    """Memory the training batch can use: the GPU's for cuda[:N], physical RAM for cpu; None if unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def logits_bytes(cfg: Any) -> int:
    """Lower bound of the sampled-softmax memory of one batch: data.batch_size x data.max_seq_len positions x
    loss.num_negatives x BYTES_PER_NEGATIVE (the negative ids, logits and logit gradients every route holds)."""
    return int(cfg.data.batch_size) * int(cfg.data.max_seq_len) * int(cfg.loss.num_negatives) * BYTES_PER_NEGATIVE


def check_resources(cfg: Any, memory_bytes: Optional[int] = None) -> None:
    """Refuse a retrieval config whose sampled-softmax batch cannot fit this machine's memory (the size in GB)."""
    if cfg.task != "retrieval":
        return
    memory = machine_memory_bytes(cfg.train.device) if memory_bytes is None else memory_bytes
    need = logits_bytes(cfg)
    if memory and need > LOGITS_MEMORY_FRACTION * memory:
        raise ConfigError(
            f"key 'loss.num_negatives' = {cfg.loss.num_negatives} needs >= {need / 1e9:.1f} GB for one batch's "
            f"sampled-softmax logits (data.batch_size {cfg.data.batch_size} x data.max_seq_len "
            f"{cfg.data.max_seq_len} positions x {cfg.loss.num_negatives} negatives x {BYTES_PER_NEGATIVE} bytes); "
            f"this machine's {cfg.train.device} has {memory / 1e9:.1f} GB")
