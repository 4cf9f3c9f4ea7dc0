"""Typed run configuration: dataclasses loaded from ``configs/**/*.yaml`` plus dotted ``key=value`` overrides.

A :class:`RunConfig` records everything needed to reproduce a run; the resolved config is written to every run
directory (``config.yaml``). Unknown keys and values of the wrong type are rejected with a :class:`ConfigError`
naming the key (and the file, when the value came from one).

Example::

    cfg = load_config("configs/ml-1m/hstu.yaml", ["train.epochs=3", "model.num_layers=4"])
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from hstu.trainer.config_checks import TIE_ORDERS, ConfigError, check_values, validate_ranking_stream  # noqa: F401 (re-export)
from hstu.trainer.events_config import EventsConfig
from hstu.trainer.parallel.config import ShardingConfig
from hstu.trainer.ranking_config import RankingConfig



@dataclass
class SyntheticConfig:
    """Synthetic interaction generator (the embedded default dataset; see ``trainer/data/synthetic.py``)."""

    num_users: int = 2000
    num_items: int = 1000
    num_interests: int = 20  # latent interest clusters
    zipf_exponent: float = 1.05  # item popularity ~ rank^-s
    min_seq_len: int = 10
    max_seq_len: int = 80  # length of generated histories (before data.max_seq_len truncation)
    drift: float = 0.05  # per-event probability that a user's current interest moves
    interest_focus: float = 0.8  # probability an event is drawn from the current interest (else popularity)
    sequential_strength: float = 0.7  # in-interest event: probability it follows the previous item's successor
    num_action_types: int = 0  # 0: no action types generated
    seed: int = 1234


@dataclass
class DataConfig:
    """Which dataset, where it lives and how sequences are cut and batched."""

    name: str = "synthetic"  # ml-1m | ml-20m | ml-100k | amzn-books | synthetic | events (own logs: data.events)
    data_dir: Optional[str] = None  # directory with the raw files; None -> download (or generate for synthetic)
    cache_dir: str = "~/.cache/hstu"  # preprocessed-sequence cache, keyed by source checksum + options
    max_seq_len: int = 200  # keep the last N items of each user (history length cap)
    min_seq_len: int = 4  # users with fewer events are dropped (retrieval needs >= 4: 1 train target + validation
    # target + test target; ranking >= 2)
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader worker processes (persistent); 0 = in-process
    seed: int = 42  # shuffling seed (epoch e uses seed + e); also seeds tie_order=random
    # order of a user's events with equal timestamps: random (seeded shuffle, data.seed) | file | item_id
    tie_order: str = "random"
    # share of the items (seeded by data.seed) removed from every TRAINING sequence; they stay in the catalog and
    # are validation / test targets ("never-seen" items, docs/model.md "Item tower")
    holdout_items_frac: float = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    events: EventsConfig = field(default_factory=EventsConfig)  # data.name=events (trainer/events_config.py)


@dataclass
class ItemFeaturesConfig:
    """Item tower (modules/item_tower.py, docs/model.md): id embedding + pooled content-feature embeddings."""

    enabled: bool = False
    combine: str = "sum"  # sum | mlp (a small MLP over the concatenated parts)
    pooling: str = "mean"  # multi-valued features (genre, title words): mean | sum over the item's values
    features: List[str] = field(default_factory=list)  # [] = all the dataset has (trainer/data/item_features.py)
    use_ids: bool = True  # false: content features only (the id table is kept but unused)
    # an item with <= this many training events uses its content part only (its id embedding is dropped);
    # 0 = items never seen in training; -1 = never drop
    content_only_max_events: int = 0
    title_buckets: int = 2048  # hashed title-word vocabulary
    year_bucket_years: int = 5  # release-year bucket width


@dataclass
class ModelConfig:
    """Sequence encoder. ``arch``: hstu | sasrec. ``variant`` (HSTU only): research | production (see docs/model.md)."""

    arch: str = "hstu"
    variant: str = "research"
    embedding_dim: int = 50  # item embedding width D (= model width)
    num_layers: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # d_qk per head
    linear_dim: int = 50  # d_v per head (HSTU) ; SASRec uses embedding_dim
    ffn_dim: int = 50  # SASRec feed-forward width
    dropout: float = 0.2  # input / output dropout
    attn_dropout: float = 0.0
    num_time_buckets: int = 128  # log-bucketed |dt| -> [0, num_time_buckets]
    time_bucket_base: float = 0.301  # bucket = floor(ln(max(|dt|,1)) / base)
    use_rab_position: bool = True  # research variant: relative position bias
    use_rab_time: bool = True  # research variant: relative time bias
    l2_norm_output: bool = True  # L2-normalise sequence and item embeddings
    # production variant only: time goes in as an INPUT embedding of bucket(query_time - t_j)
    input_time_buckets: int = 2048  # table has input_time_buckets + 1 rows
    input_time_bucket_fn: str = "sqrt"  # sqrt: floor(sqrt(dt/60)) | log: floor(ln(dt/60)), clamped
    item_features: ItemFeaturesConfig = field(default_factory=ItemFeaturesConfig)


@dataclass
class LossConfig:
    """Sampled softmax over uniform negatives (per position)."""

    name: str = "sampled_softmax"
    num_negatives: int = 128
    temperature: float = 0.05
    # how the R + 1 logits per position are computed (same value and gradients, modules/losses.py):
    # sampled = R + 1 dot products per position (fast default); all_items = score every item, gather;
    # gather = materialise [V, R, D] (reference)
    route: str = "sampled"
    # which item vectors the loss looks up: all = ids 0..N, unique = ids it needs, auto = all when
    # num_items + 1 <= num_negatives * embedding_dim (route all_items always looks up all)
    item_lookup: str = "auto"
    # route sampled: the item-table gradient through torch.compile (inductor, C++; ~4x faster than the eager
    # blocked index_add_ on CPU, one ~10 s compile per process); false = eager, identical sums
    compile: bool = False


@dataclass
class OptimConfig:
    """Dense AdamW (embedding tables use the same settings unless sharded with rowwise AdamW later)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip_norm: float = 0.0  # 0 = off


@dataclass
class StochasticLengthConfig:
    """Stochastic Length (hstu-spec.md): long sequences are subsampled so expected attention cost is O(N^alpha)."""

    enabled: bool = False
    alpha: float = 1.6
    # threshold = floor(max_seq_len ** (alpha / 2)); a sequence of length L > threshold is cut to threshold
    # items with probability 1 - max_seq_len**alpha / L**2


@dataclass
class TrainConfig:
    """Train loop: epochs, step cap, eval cadence, seed, device/dtype, Stochastic Length, progress/TensorBoard."""

    epochs: int = 101
    max_steps: int = 0  # 0 = no step cap (useful for smoke runs)
    max_train_minutes: float = 0.0  # 0 = no cap; else stop (and evaluate) after the epoch that crosses it
    eval_every_epochs: int = 5
    log_every_steps: int = 50
    seed: int = 42
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast on GPU)
    num_threads: int = 0  # torch intra-op threads, 0 = torch default
    stochastic_length: StochasticLengthConfig = field(default_factory=StochasticLengthConfig)
    progress: bool = True  # tqdm bars
    tensorboard: bool = True  # TensorBoard event files in run_dir/tensorboard
    resume: bool = True  # continue from the latest checkpoint in checkpoint.dir when there is one
    # weights to start from (best.pt / state_dict file or DCP checkpoint dir of any run, plain or sharded, any
    # world size); optimizers and step start fresh; ignored when this run resumes from its own checkpoint
    init_from: str = ""


@dataclass
class EvalConfig:
    """Full-ranking evaluation over all items."""

    ks: List[int] = field(default_factory=lambda: [1, 10, 50, 200])
    ndcg_ks: List[int] = field(default_factory=lambda: [10, 50, 200])
    remove_history: bool = True  # GR's code removes history items from the ranking
    item_chunk_size: int = 65536  # items scored per chunk (memory bound for large catalogs)
    selection_metric: str = "ndcg@10"  # best-epoch selection
    select_on: str = "validation"  # split the best epoch is selected on: validation | test (docs/model.md)
    popularity_baseline: bool = True  # also evaluate the most-popular baseline once per run (logged, results.json)
    # also report the metrics on cold targets (<= cold_max_events training events: "cold/hr@10", ...) and on
    # targets never seen in training ("unseen/hr@10", ...)
    item_groups: bool = False
    cold_max_events: int = 5


@dataclass
class OpsConfig:
    """Kernel backend for every op in ``ops/``: pytorch (default reference) | triton (GPU or TRITON_INTERPRET=1) |
    cpu (C++ CPU kernels where an op has one, JIT-built on first use; the PyTorch reference elsewhere)."""

    backend: str = "pytorch"


@dataclass
class CheckpointConfig:
    """Resumable training checkpoints (torch.distributed.checkpoint; layout in docs/distributed.md)."""

    dir: Optional[str] = None  # None -> <run_dir>/checkpoints (any iopath path)
    every_steps: int = 0  # 0 = no step checkpoints
    keep_last: int = 2  # keep the newest N complete checkpoints
    # the best epoch's weights: plain = RUN_DIR/best.pt, one plain state_dict (a sharded run gathers every table
    # into every rank to write it); dcp = RUN_DIR/best/step_N, a per-rank DCP checkpoint of the model (keep-last
    # 1, nothing gathered: for tables larger than one process). `hstu eval` / `hstu export` / train.init_from
    # read either.
    best_format: str = "plain"


@dataclass
class RunConfig:
    """Everything a run needs. ``run_dir`` holds config.yaml, metrics.jsonl, TensorBoard events and logs."""

    run_dir: Optional[str] = None
    task: str = "retrieval"  # retrieval | ranking (trainer/tasks/; ranking: docs/ranking.md)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)  # used by task=ranking


# --------------------------------------------------------------------------------------------------------------
# loading, overriding, validating
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``key`` and ``source``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> "typing.NoReturn":
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _build(tp, value, key + ".", source)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            fail()
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail()
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. run_dir=2024 on the CLI
            return str(value)
        if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads 2003-01-01 as a date
            return value.isoformat()
        fail()
    return value


def _build(cls: Any, data: Dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{k}' (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: str, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML config; a top-level ``defaults: [other.yaml, ...]`` list is merged first (relative paths)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory (expected a YAML file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    merged: Dict[str, Any] = {}
    for inc in data.pop("defaults", []) or []:
        merged = _merge(merged, _read_yaml(os.path.join(os.path.dirname(path), inc), seen + (path,)))
    return _merge(merged, data)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    cls: Any = RunConfig
    node = tree
    for i, p in enumerate(parts):
        fields_ = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields_:
            raise ConfigError(f"{source}: unknown key '{dotted}' ('{p}' is not one of {', '.join(sorted(fields_))})")
        tp = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            node[p] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: key '{dotted}': '{p}' is a value, not a section")
        node = node.setdefault(p, {})
        cls = tp


def parse_override(text: str) -> Tuple[str, Any]:
    """``'model.num_layers=4'`` -> ``('model.num_layers', 4)``; the value is parsed as YAML (``null`` -> None)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Build a :class:`RunConfig` from an optional YAML file plus dotted ``key=value`` overrides."""
    tree = _read_yaml(path) if path else {}
    source = path or "<defaults>"
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(tree, key, value, f"override '{ov}'")
    try:
        cfg = _build(RunConfig, tree, "", source)
    except ConfigError as e:
        if overrides and "override" not in str(e):
            raise ConfigError(f"{e} (file {source} with overrides {list(overrides)})") from None
        raise
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """The one validation pass (trainer/config_checks.py): every value range-checked, ConfigError naming the key,
    the value and the allowed range or choices."""
    check_values(cfg)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain-dict view (tuples become lists) suitable for YAML/JSON."""

    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config atomically (tmp + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
