"""``hstu export`` of a generative RANKING run (HSTURankingModel, docs/serving.md "Ranking artifact").

Artifact (same atomic writer, manifest and checks as serving/export.py; ``manifest.task = "ranking"``)::

    dense_extend.pt2  torch.export program: history tokens (causal continuation of a KV cache, prefix visible)
    dense_score.pt2   torch.export program: M-FALCON candidates -> head outputs [M, K (+1 regression)]
    tables.pt         every token table unsharded ({name: {"weight", "scale"?}}: items, actions, contextual.i,
                      side.i), fp32 | bf16 | int8 rowwise; with item features (model.item_features) ``items``
                      holds the item tower's vector of every item (HSTURankingModel.item_rows)
    records.pt        recorded requests and the training model's outputs on them (each candidate alone)
    item_tower.pt2, item_features.pt   with item features: the content program and the catalog's packed features
                      (as the retrieval artifact, serving/export.py export_item_tower), for ``add_items``

Step inputs (serving/ranking.py STEP_INPUTS): e [M, D] raw token rows, kinds, pos, gaps, ts, t_next [M] (score:
[1] except gaps [M]), contextual_len [1], past_k [L, H, N, dqk], past_v [L, H, N, dv], past_pos, past_ts [N].
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch

from hstu.serving.export import EXAMPLE_PAST, EXAMPLE_ROWS, EXTEND_FILE, RECORDS_FILE, SCORE_FILE, check_out, \
    export_example_cache, manifest_head, write_artifact
from hstu.serving.ranking import KIND_ITEM, STEP_INPUTS, Layout, RankingHistory, RankingMFalcon, RankingStep, \
    TokenTables, history_from_record, side_columns
from hstu.serving.retrieval import EMBEDDING_DTYPES, ItemTable

TABLES_FILE = "tables.pt"
MODEL_FIELDS = ("arch", "variant", "embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim")
# feature names each dataset's loader declares (trainer/data/ranking.py, synthetic_ranking.py), in table order
DATASET_FEATURES = {"ml-1m": (("gender", "age", "occupation", "zip"), ()),
                    "synthetic": (("country", "age_group"), ("creator", "region"))}
ACTION_MEANING = {"ml-1m": "the rating 1..5", "synthetic": "1 + bitmask of (click, like, share, complete)"}


# ---------------------------------------------------------------------------------------------- model
def _selected(names, wanted) -> Tuple[str, ...]:
    """The features a ranking.contextual / side_series selection keeps, in its order (None = all; as
    trainer/data/ranking.py select_features orders the tables)."""
    return tuple(names) if wanted is None else tuple(w for w in wanted if w in names)


def ranking_spec_from_state(cfg, state: Dict[str, torch.Tensor]):
    """(RankingSpec, contextual names, side names) of a ranking checkpoint: table sizes from the tensors'
    shapes, task names and options from the config (no data loading)."""
    from hstu.modules.ranking import RankingSpec
    from hstu.trainer.config import ConfigError
    from hstu.trainer.config_checks import ranking_dataset

    def rows(key: str) -> int:
        if key not in state:
            raise ConfigError(f"checkpoint has no {key} (not an HSTURankingModel checkpoint?)")
        return int(state[key].shape[0])

    count = lambda prefix: sum(1 for k in state if k.startswith(prefix) and k.endswith(".weight"))  # noqa: E731
    ctx = tuple(rows(f"tables.contextual.{i}.weight") for i in range(count("tables.contextual.")))
    side = tuple(rows(f"tables.side.{i}.weight") for i in range(count("tables.side.")))
    rc = cfg.ranking
    tasks = tuple(rc.tasks) or tuple(ranking_dataset(cfg)[0])
    regression = rc.regression_weight > 0
    if rows("head.out.weight") != len(tasks) + int(regression):
        raise ConfigError(f"checkpoint head has {rows('head.out.weight')} outputs, the config says tasks {tasks} "
                          f"+ regression {regression}")
    spec = RankingSpec(num_items=rows("tables.items.table.weight") - 1, num_actions=rows("tables.actions.weight") - 1,
                       contextual_vocab=ctx, side_vocab=side, task_names=tasks, regression=regression,
                       max_tokens=rows("position_embeddings.weight"), action_with_item=rc.action_with_item,
                       head_hidden_dim=int(state["head.hidden.weight"].shape[0]))
    c_names, s_names = DATASET_FEATURES.get(cfg.data.name, ((), ()))
    if cfg.data.name == "events":  # own logs: the declared context columns (trainer/data/events_ranking.py)
        c_names = tuple(cfg.data.events.context_columns)
    c_names, s_names = _selected(c_names, rc.contextual), _selected(s_names, rc.side_series)
    if len(c_names) != len(ctx):
        c_names = tuple(f"context{i}" for i in range(len(ctx)))
    if len(s_names) != len(side):
        s_names = tuple(f"side{i}" for i in range(len(side)))
    return spec, c_names, s_names


def token_tables(model, dtype: str) -> TokenTables:
    """The model's tables as serving tables in ``dtype`` (fp32 | bf16 | int8 rowwise). The items table holds
    ``model.item_rows()``: with item features the item tower's vector of every item (the tower is baked in)."""
    q = lambda emb: ItemTable.quantize(emb.weight, dtype, l2_norm=False)  # noqa: E731
    t = model.tables
    items = ItemTable.quantize(model.item_rows(), dtype, l2_norm=False)
    return TokenTables(items, q(t.actions), [q(x) for x in t.contextual], [q(x) for x in t.side],
                       model.spec.action_with_item)


def _dequantized_copy(model, tables: TokenTables):
    """A copy of the model whose tables hold exactly the artifact's (dequantised) rows (its item table: the baked
    item-tower rows, so the copy has no tower)."""
    ref = copy.deepcopy(model)
    ref.item_tower = None
    t = ref.tables
    mods = {"items": t.items.table, "actions": t.actions}
    mods.update({f"contextual.{i}": x for i, x in enumerate(t.contextual)})
    mods.update({f"side.{i}": x for i, x in enumerate(t.side)})
    with torch.no_grad():
        for name, table in tables.named().items():
            mods[name].weight.copy_(table.lookup(torch.arange(table.num_rows)))
    return ref


# ---------------------------------------------------------------------------------------------- reference
def alone_batch(layout: Layout, candidates: torch.Tensor, query_time: int,
                candidate_timestamps: Optional[torch.Tensor] = None) -> Any:
    """Training-format batch (duck-typed RankingBatch) of ONE user's layout with each candidate alone as the
    target: one sequence per candidate, history tokens + [candidate], num_targets = 1."""
    m, T = int(candidates.numel()), int(layout.ids.numel())
    cts = torch.full((m,), int(query_time)) if candidate_timestamps is None else candidate_timestamps.long()
    rep = lambda col, cand_col: torch.cat([torch.cat([col, c.view(1)]) for c in cand_col]) if m else col[:0]  # noqa
    full = lambda v: torch.full((m,), int(v), dtype=torch.int64)  # noqa: E731
    offsets = torch.arange(m + 1, dtype=torch.int64) * (T + 1)
    return SimpleNamespace(
        token_ids=rep(layout.ids, candidates.long()), token_kinds=rep(layout.kinds, full(KIND_ITEM)),
        token_features=rep(layout.features, full(0)), paired_items=rep(layout.paired, full(0)),
        timestamps=rep(layout.timestamps, cts), positions=rep(layout.positions, full(T)),
        time_gaps=rep(layout.gaps, (cts - layout.last_event_time).clamp(min=0)), offsets=offsets,
        max_len=T + 1, num_targets=torch.ones(m, dtype=torch.int64), contextual_len=layout.contextual_len,
        pred_rows=offsets[1:] - 1)


@torch.inference_mode()
def reference_rank_outputs(model, engine: RankingMFalcon, history: Any, candidates, query_time: Optional[int] = None
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ground truth of ranking M-FALCON: the training model's forward with each candidate alone as the target ->
    (logits [m, K], regression [m] | None). ``engine`` only builds the layout (and its query-time default)."""
    layout = engine.layout(history)
    qt = int(query_time) if query_time is not None else layout.last_event_time
    return model(alone_batch(layout, torch.as_tensor(candidates, dtype=torch.int64), qt))


def _random_request(spec, n: int, g: torch.Generator, num_side: int) -> RankingHistory:
    ids = torch.randint(1, spec.num_items + 1, (n,), generator=g)
    ts = 1_600_000_000 + torch.randint(0, 86_400, (n,), generator=g).cumsum(0)
    side = {}
    for f in range(num_side):
        s = 3 + f
        side[f] = (torch.randint(1, spec.side_vocab[f], (s,), generator=g),
                   1_600_000_000 + torch.randint(-86_400, 86_400 * max(n, 1), (s,), generator=g).sort().values)
    return RankingHistory(ids, torch.randint(1, spec.num_actions + 1, (n,), generator=g), ts,
                          torch.tensor([int(torch.randint(0, v, (1,), generator=g)) for v in spec.contextual_vocab],
                                       dtype=torch.int64), side)


def _records(ref, engine: RankingMFalcon, spec, seed: int = 0) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sorted({1, min(7, engine.max_seq_len), engine.max_seq_len + 3})):
        h = _random_request(spec, n, g, len(spec.side_vocab))
        qt = int(h.timestamps[-1]) + (3_600 if i % 2 else 0)
        cand = torch.randint(1, spec.num_items + 1, (8,), generator=g)
        logits, reg = reference_rank_outputs(ref, engine, h, cand, qt)
        out.append({"item_ids": h.item_ids, "actions": h.actions, "timestamps": h.timestamps, "context": h.context,
                    **side_columns(h),
                    "query_time": torch.tensor(qt), "candidates": cand, "logits": logits,
                    "regression": reg if reg is not None else torch.zeros(0)})
    return out


# ---------------------------------------------------------------------------------------------- export
def _without_tables(model):
    """A shallow copy of the model sharing every module except ``tables`` (the programs take raw token rows, so
    the tables, stored once in tables.pt, stay out of the exported state; so does the item tower)."""
    dense = copy.copy(model)
    dense._modules = dict(model._modules)
    dense._modules["tables"] = torch.nn.Module()
    dense._modules["item_tower"] = None  # baked into the items table (token_tables)
    return dense


def export_ranking_programs(model):
    """(extend, score) ExportedPrograms of the ranking serving step, dynamic in rows M and cached rows N."""
    model = _without_tables(model)
    M, ts, past, past_shapes = export_example_cache(model.layers)
    m, n = EXAMPLE_ROWS, EXAMPLE_PAST
    rows = (torch.randn(m, model.dim), torch.tensor([0, 1, 2, 1, 3]), torch.arange(n, n + m), torch.arange(m) * 30,
            ts[n:], ts[n:] + 50)
    ctx = torch.tensor([2])
    one = (torch.tensor([KIND_ITEM]), torch.tensor([n]), torch.arange(m) * 30, ts[n:n + 1], ts[n:n + 1])
    with torch.no_grad():
        extend = torch.export.export(RankingStep(model, False).eval(), rows + (ctx,) + past,
                                     dynamic_shapes=({0: M},) * 6 + (None,) + past_shapes)
        score = torch.export.export(RankingStep(model, True).eval(), (rows[0],) + one + (ctx,) + past,
                                    dynamic_shapes=({0: M}, None, None, {0: M}, None, None, None) + past_shapes)
    return extend, score


def export_ranking_model(model, config: Dict[str, Any], out: str, *, context_names=(), side_names=(),
                         embedding_dtype: str = "fp32", source: Optional[Dict[str, str]] = None,
                         overwrite: bool = False, vocabularies: Optional[tuple] = None) -> Dict[str, Any]:
    """Write the artifact of an HSTURankingModel to ``out`` atomically; returns the manifest.
    ``vocabularies``: (manifest entry, files) of an own-logs run (serving/vocab.py export_vocabularies)."""
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"--embedding-dtype must be one of {EMBEDDING_DTYPES}, got {embedding_dtype!r}")
    if not hasattr(model, "forward_cached"):
        raise ValueError(f"ranking export supports the HSTU ranker only, got {type(model).__name__}")
    out = check_out(out, overwrite)
    model = model.eval()
    spec, rc, mc = model.spec, config.get("ranking", {}), config["model"]
    max_seq_len = int(config["data"]["max_seq_len"])
    max_side = int(rc.get("max_side_tokens", 32)) if spec.side_vocab else 0
    tables = token_tables(model, embedding_dtype)
    ref = _dequantized_copy(model, tables)  # reference outputs use exactly the rows the artifact stores
    engine = RankingMFalcon.from_model(ref, max_seq_len=max_seq_len, max_side_tokens=max_side,
                                       side_names=side_names)
    records = _records(ref, engine, spec)
    extend, score = export_ranking_programs(model)
    meta = {k: mc[k] for k in MODEL_FIELDS}
    meta.update(num_items=spec.num_items, max_seq_len=max_seq_len, max_tokens=spec.max_tokens,
                max_side_tokens=max_side)
    manifest = manifest_head("ranking", meta, source)
    dataset = config.get("data", {}).get("name", "")
    manifest.update({
        "ranking": {"task_names": list(spec.task_names), "regression": bool(spec.regression),
                    "regression_name": "rating" if spec.regression and dataset == "ml-1m" else "",
                    "action_with_item": bool(spec.action_with_item),
                    # item content features: the item tower's vectors are the items table (no tower at serving)
                    "item_features": list(model.item_tower.names) if model.item_tower is not None else [],
                    "actions": {"vocab": spec.num_actions + 1, "meaning": ACTION_MEANING.get(dataset, "")},
                    "contextual": [{"name": nm, "vocab": v} for nm, v in zip(context_names, spec.contextual_vocab)],
                    "side": [{"name": nm, "vocab": v} for nm, v in zip(side_names, spec.side_vocab)]},
        "embedding": {"file": TABLES_FILE, "dtype": embedding_dtype,
                      "tables": {nm: [t.num_rows, t.dim] for nm, t in tables.named().items()},
                      "quantization": "int8 symmetric rowwise, row = weight * scale" if embedding_dtype == "int8"
                      else "none"},
        "programs": {"extend": {"file": EXTEND_FILE, "inputs": STEP_INPUTS, "outputs": ["enc", "k", "v"]},
                     "score": {"file": SCORE_FILE, "inputs": STEP_INPUTS, "outputs": ["head"]}},
        "records": {"file": RECORDS_FILE, "count": len(records)},
    })
    if embedding_dtype != "fp32":  # what quantisation costs on the recorded requests, vs the fp32 model
        fp32 = RankingMFalcon.from_model(model, max_seq_len=max_seq_len, max_side_tokens=max_side,
                                         side_names=side_names)
        manifest["quantization_max_abs_logit_error"] = max(float((fp32.rank(fp32.encode(history_from_record(r), int(
            r["query_time"])), r["candidates"]).logits - r["logits"]).abs().max()) for r in records)
    state = {nm: t.state() for nm, t in tables.named().items()}
    files = {EXTEND_FILE: lambda p: torch.export.save(extend, p), SCORE_FILE: lambda p: torch.export.save(score, p),
             TABLES_FILE: lambda p: torch.save(state, p), RECORDS_FILE: lambda p: torch.save(records, p)}
    if model.item_tower is not None:  # the content program + catalog features: new items at serving (add_items)
        from hstu.serving.export import export_item_tower

        manifest["item_tower"], tower_files = export_item_tower(model.item_tower, config)
        files.update(tower_files)
    if vocabularies and vocabularies[0]:  # raw ids of an own-logs run (serving/vocab.py)
        manifest["vocabularies"] = vocabularies[0]
        files.update(vocabularies[1])
        columns = {e.get("column"): k for k, e in vocabularies[0].items() if k.startswith("context")}
        for entry in manifest["ranking"]["contextual"]:  # contextual table i <- vocabularies[key]
            if entry["name"] in columns:
                entry["vocabulary"] = columns[entry["name"]]
    write_artifact(out, manifest, config, files)
    return manifest


def export_ranking_state(cfg, state: Dict[str, torch.Tensor], out: str, *, embedding_dtype: str = "fp32",
                         overwrite: bool = False, source: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Full (unsharded) state dict of an HSTURankingModel + its run config -> artifact (``hstu export``)."""
    from hstu.modules.item_tower import features_from_state
    from hstu.modules.ranking import HSTURankingModel
    from hstu.trainer.config import to_dict

    spec, c_names, s_names = ranking_spec_from_state(cfg, state)
    model = HSTURankingModel(cfg.model, spec, "pytorch", features_from_state(state))
    model.load_state_dict(state)
    vocabularies = ranking_vocabularies(cfg, source, spec, c_names)  # before the programs: a misfit fails fast
    return export_ranking_model(model, to_dict(cfg), out, context_names=c_names, side_names=s_names,
                                embedding_dtype=embedding_dtype, source=source, overwrite=overwrite,
                                vocabularies=vocabularies)


def ranking_vocabularies(cfg, source: Optional[Dict[str, str]], spec, context_names=()):
    """(manifest["vocabularies"], files) of an own-logs ranking run: items, users and the context columns of the
    dataset the ranking task prepared (ranking_data_config: its own cache entry); ({}, {}) for other data.
    ConfigError naming the file when a vocabulary does not fit its table (contextual table i of column
    ``context_names[i]``: the column's values + the null id 0)."""
    if cfg.data.name != "events":
        return {}, {}
    import dataclasses

    from hstu.serving.vocab import VocabError, export_vocabularies
    from hstu.trainer.config import ConfigError
    from hstu.trainer.data.ranking import ranking_data_config

    try:
        meta, files = export_vocabularies(dataclasses.replace(cfg, data=ranking_data_config(cfg)), source,
                                          spec.num_items, contexts=True)
    except VocabError as e:
        raise ConfigError(str(e)) from None
    by_column = {e["column"]: e for k, e in meta.items() if k.startswith("context")}
    for i, (name, rows) in enumerate(zip(context_names, spec.contextual_vocab)):
        entry = by_column.get(name)
        if entry is None:
            raise ConfigError(f"{meta['items']['source']}: the prepared dataset has no context column {name!r} "
                              f"(it has {sorted(by_column)}); pass --dataset-dir")
        if entry["num_ids"] + 1 != rows:
            raise ConfigError(f"{entry['source']}: {entry['num_ids']} values of context column {name!r}, the "
                              f"checkpoint's contextual table {i} has {rows} rows (values + the null id 0): not the "
                              "dataset this run trained on (pass --dataset-dir)")
    return meta, files
