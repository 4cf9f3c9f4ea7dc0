"""Standalone loader of a RANKING artifact (``hstu export`` of a task=ranking run; docs/serving.md).

    ranker = hstu.serving.load("artifacts/ranking", task="ranking")
    out = ranker.rank(history, candidates)       # RankScores(probabilities [m, K], logits [m, K], regression)
    state = ranker.append(ranker.encode(history), new_events)   # incremental: == encode(history + new_events)
    outs = ranker.rank_batch([h1, h2], [c1, c2])  # several users, jagged candidates
    ids = ranker.add_items([{"genre": [3, 8]}])    # model.item_features: new items from their features alone

``history``: a :class:`hstu.serving.ranking.RankingHistory` (or a dict of its fields: item_ids, actions,
timestamps, context, side). Torch only, like serving/artifact.py (which dispatches here on manifest.task).

Raw ids (an own-logs run, data.name=events: the artifact carries the dataset's vocabularies, serving/vocab.py)::

    out = ranker.rank_raw({"item_ids": ["sku-1", "sku-9"], "actions": [1, 2], "timestamps": [t0, t1],
                           "context": {"device": "ios"}}, ["sku-3", "sku-4"])
    out.by_candidate()   # {"sku-3": {"like": 0.71, ...}, "sku-4": {...}}

Unknown raw item ids -> the OOV id (with item_ids=raw: left out of the history / refused as candidates), unknown
or missing context values -> 0 (the null id); counted (``vocab[name].unknown_seen``) and logged as warnings.
"""

from __future__ import annotations

import os
import logging
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from hstu.serving.artifact import MANIFEST, TOLERANCE, ArtifactError, ItemTowerProgram, _check_config, _field, \
    _load_item_tower, check_record_field, load_programs, load_records
from hstu.serving.mfalcon import Tensorish
from hstu.serving.ranking import RankingHistory, RankingMFalcon, RankingState, RankScores, TokenTables, \
    as_history, history_from_record
from hstu.serving.retrieval import ItemTable
from hstu.serving.vocab import RawIdVocab, VocabError, candidate_item_ids, history_item_ids, load_vocabularies

RANKING_FIELDS = ("arch", "variant", "embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim",
                  "num_items", "max_seq_len", "max_tokens", "max_side_tokens")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
log = logging.getLogger("hstu.serving")


class RawRankScores(NamedTuple):
    """:meth:`RankingServingModel.rank_raw` output: the raw candidate ids as given [m] + their scores."""

    candidates: List[Any]
    probabilities: torch.Tensor  # [m, K] sigmoid of the task logits
    logits: torch.Tensor  # [m, K]
    regression: Optional[torch.Tensor]  # [m] or None
    task_names: Tuple[str, ...]

    def by_candidate(self) -> Dict[Any, Dict[str, float]]:
        """{raw candidate id: {task name: probability, ("regression": value)}} (a repeated id: its last row)."""
        out = {}
        for j, raw in enumerate(self.candidates):
            row = {t: float(self.probabilities[j, k]) for k, t in enumerate(self.task_names)}
            if self.regression is not None:
                row["regression"] = float(self.regression[j])
            out[raw] = row
        return out


class RankingServingModel:
    """A loaded ranking artifact: M-FALCON multi-task scoring of candidates for one or several users."""

    task = "ranking"

    def __init__(self, path: str, manifest: Dict[str, Any], config: Dict[str, Any], engine: RankingMFalcon,
                 records: List[Dict[str, torch.Tensor]], item_tower: Optional[ItemTowerProgram] = None) -> None:
        self.path, self.manifest, self.config, self.engine, self.records = path, manifest, config, engine, records
        self.item_tower = item_tower  # None unless the model was trained with item features
        m, r = manifest["model"], manifest["ranking"]
        self.num_items, self.max_seq_len, self.variant = int(m["num_items"]), int(m["max_seq_len"]), m["variant"]
        self.task_names = tuple(r["task_names"])
        self.context_names = tuple(c["name"] for c in r["contextual"])
        self.side_names = tuple(c["name"] for c in r["side"])
        self.embedding_dtype = manifest["embedding"]["dtype"]
        self.vocab: Dict[str, RawIdVocab] = {}  # name -> RawIdVocab (items, users, context<i>) of own logs, else {}

    def encode(self, history: Any, query_time: Optional[int] = None) -> RankingState:
        """Encode a history layout once (KV cache); qt defaults to the last event's timestamp."""
        return self.engine.encode(history, query_time)

    def append(self, state: RankingState, events: Any, query_time: Optional[int] = None) -> RankingState:
        """New events (item_ids, actions, timestamps; optional side snapshots) after the cached history -> the
        state ``encode`` of the whole history gives, recomputing only the rows from the first changed one
        (``RankingMFalcon.append``; ``state.recomputed`` counts them)."""
        return self.engine.append(state, events, query_time)

    def rank_state(self, state: RankingState, candidates: Tensorish, *,
                   candidate_timestamps: Optional[Tensorish] = None, micro_batch: Optional[int] = None) -> RankScores:
        return self.engine.rank(state, candidates, candidate_timestamps, micro_batch)

    def rank(self, history: Any, candidates: Tensorish, *, query_time: Optional[int] = None,
             candidate_timestamps: Optional[Tensorish] = None, micro_batch: Optional[int] = None) -> RankScores:
        """Per-task probabilities [m, K] (+ logits, regression) of the candidates, each scored after the history
        as if it were the only target (M-FALCON). Equal to the training model (tests/test_serving_ranking*.py)."""
        return self.rank_state(self.encode(history, query_time), candidates,
                               candidate_timestamps=candidate_timestamps, micro_batch=micro_batch)

    def rank_batch(self, histories: Sequence[Any], candidates: Sequence[Tensorish], *,
                   query_times: Optional[Sequence[Optional[int]]] = None,
                   micro_batch: Optional[int] = None) -> List[RankScores]:
        """Several users in one call (jagged candidates) -> [RankScores]; equal to per-user ``rank`` calls."""
        return self.engine.rank_batch(histories, candidates, query_times=query_times, micro_batch=micro_batch)

    @torch.inference_mode()
    def add_items(self, features: Sequence[Dict[str, Sequence[int]]]) -> torch.Tensor:
        """New items from their content features alone, no retraining (as the retrieval artifact's
        ``add_items``): features[i] = {feature name: indices} (manifest ``item_tower.features[].encoding``); their
        item rows come from the exported item tower with no id part and are appended to the items table. Returns
        the new ids [M] (num_items + 1, ...), usable at once as candidates and in histories."""
        if self.item_tower is None:
            raise ValueError(f"{self.path}: this model has no item tower (trained without model.item_features)")
        items = self.engine.tables.items
        packed = self.item_tower.pack(features)
        ids = items.append(self.item_tower.program(torch.zeros(packed.shape[0], items.dim), packed))
        self.item_tower.values = torch.cat([self.item_tower.values, packed])
        self.num_items = items.num_rows - 1
        return ids

    # -- raw ids (own logs)
    def _vocab(self, name: str) -> RawIdVocab:
        v = self.vocab.get(name)
        if v is None:
            raise ValueError(f"{self.path}: this artifact carries no {name} vocabulary (exported from a run not "
                             "trained on data.name=events; use ids)")
        return v

    def _context_ids(self, context: Any) -> torch.Tensor:
        """Raw context values (a {column: value} mapping, missing = null, or a sequence in ``context_names``
        order) -> contextual ids [C]; unknown values -> 0 (the null id), counted and warned."""
        entries = self.manifest["ranking"]["contextual"]
        if isinstance(context, Mapping):
            unknown = [k for k in context if k not in self.context_names]
            if unknown:
                raise ValueError(f"context: unknown column(s) {unknown} (this model has {list(self.context_names)})")
            values = [context.get(n) for n in self.context_names]
        else:
            values = list(context)
            if not values:  # none given: encode asks for it, append keeps the state's
                return torch.zeros(0, dtype=torch.int64)
            if len(values) != len(entries):
                raise ValueError(f"context: this model has {len(entries)} contextual features "
                                 f"{list(self.context_names)}, got {len(values)} values")
        out = torch.zeros(len(entries), dtype=torch.int64)
        for i, (entry, raw) in enumerate(zip(entries, values)):
            if raw is None:
                continue
            if "vocabulary" not in entry:
                raise ValueError(f"{self.path}: context {entry['name']!r} has no vocabulary in this artifact "
                                 "(exported from a run not trained on data.name=events; use ids)")
            vocab = self._vocab(entry["vocabulary"])
            out[i] = int(vocab.to_ids([raw])[0])
            if out[i] == 0:
                log.warning("context %s = %r is not in the vocabulary: mapped to 0 (the null id)", entry["name"], raw)
        return out

    def raw_history(self, history: Any) -> RankingHistory:
        """A history with raw item ids (and raw context values, see :meth:`_context_ids`) -> the id history
        ``encode`` takes: unknown items -> the OOV id (item_ids=raw: the event is left out), counted + warned."""
        h = as_history(history)
        raw = h.item_ids.tolist() if isinstance(h.item_ids, (torch.Tensor, np.ndarray)) else list(h.item_ids)
        acts = torch.as_tensor(h.actions, dtype=torch.int64).reshape(-1)
        ts = torch.as_tensor(h.timestamps, dtype=torch.int64).reshape(-1)
        if not len(raw) == acts.numel() == ts.numel():
            raise ValueError(f"item_ids, actions and timestamps differ in length: {len(raw)}, {acts.numel()}, "
                             f"{ts.numel()}")
        ids, keep = history_item_ids(self._vocab("items"), raw)
        keep_t = torch.as_tensor(keep)
        return RankingHistory(torch.as_tensor(ids)[keep_t], acts[keep_t], ts[keep_t], self._context_ids(h.context),
                              h.side)

    def encode_raw(self, history: Any, query_time: Optional[int] = None) -> RankingState:
        return self.encode(self.raw_history(history), query_time)

    def rank_raw(self, history: Any, candidates: Sequence[Any], *, query_time: Optional[int] = None,
                 candidate_timestamps: Optional[Tensorish] = None, micro_batch: Optional[int] = None
                 ) -> RawRankScores:
        """:meth:`rank` with raw item ids (str or int, as the dataset declared them) in the history and the
        candidates -> RawRankScores keyed by the raw candidate ids (``by_candidate()``); unknown candidates score
        as the OOV id (with item_ids=raw they are refused)."""
        raw = candidates.tolist() if isinstance(candidates, (torch.Tensor, np.ndarray)) else list(candidates)
        cand = torch.as_tensor(candidate_item_ids(self._vocab("items"), raw))
        out = self.rank_state(self.encode_raw(history, query_time), cand,
                              candidate_timestamps=candidate_timestamps, micro_batch=micro_batch)
        return RawRankScores(raw, out.probabilities, out.logits, out.regression, self.task_names)

    def retrieve(self, *args, **kwargs):
        raise ArtifactError(f"{os.path.join(self.path, MANIFEST)}: field task = 'ranking': a ranking artifact has no "
                            "catalog retrieval (export a retrieval run for retrieve)")

    def verify(self, atol: float = TOLERANCE["atol"], rtol: float = TOLERANCE["rtol"]) -> Dict[str, float]:
        """Replay the recorded requests; raises ArtifactError on a mismatch, returns the max abs errors."""
        worst = {"logits": 0.0, "regression": 0.0}
        where = os.path.join(self.path, self.manifest["records"]["file"])
        for i, r in enumerate(self.records):
            out = self.rank(history_from_record(r), r["candidates"], query_time=int(r["query_time"]))
            got = {"logits": out.logits, "regression": out.regression if out.regression is not None else
                   torch.zeros(0)}
            for name, value in got.items():
                check_record_field(where, i, name, value, r[name], atol, rtol, worst)
        tower = self.item_tower
        if tower is not None and "check_packed" in tower.check:  # the content program on recorded items
            where = os.path.join(self.path, self.manifest["item_tower"]["values_file"])
            worst["item_tower"] = 0.0
            with torch.inference_mode():
                got = tower.program(torch.zeros(tower.check["check_packed"].shape[0], self.engine.tables.dim),
                                    tower.check["check_packed"])
            check_record_field(where, 0, "item_tower", got, tower.check["check_vectors"], atol, rtol, worst)
        return worst


def _load_tables(path: str, manifest: Dict[str, Any]) -> TokenTables:
    mpath = os.path.join(path, MANIFEST)
    file = os.path.join(path, _field(manifest, "embedding.file", mpath))
    dtype_name = _field(manifest, "embedding.dtype", mpath)
    shapes = _field(manifest, "embedding.tables", mpath)
    state = torch.load(file, map_location="cpu", weights_only=True)
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise ArtifactError(f"{mpath}: field embedding.dtype = {dtype_name!r}, expected one of {list(DTYPES)}")
    tables = {}
    for name, shape in shapes.items():
        t = state.get(name) if isinstance(state, dict) else None
        w = t.get("weight") if isinstance(t, dict) else None
        if w is None:
            raise ArtifactError(f"{file}: missing field '{name}.weight'")
        if list(w.shape) != list(shape) or w.dtype != dtype:
            raise ArtifactError(f"{file}: field {name}.weight is {w.dtype} {tuple(w.shape)}, {mpath} says "
                                f"{dtype_name} {tuple(shape)}")
        scale = t.get("scale")
        if (scale is None) != (dtype != torch.int8) or (scale is not None and tuple(scale.shape) != (shape[0],)):
            raise ArtifactError(f"{file}: field '{name}.scale' must be [{shape[0]}] fp32 exactly for int8 tables")
        tables[name] = ItemTable(w, scale, l2_norm=False)
    m, r = manifest["model"], _field(manifest, "ranking", mpath)
    if tables["items"].num_rows != m["num_items"] + 1 or tables["items"].dim != m["embedding_dim"]:
        raise ArtifactError(f"{file}: field items.weight has shape {tuple(tables['items'].weight.shape)}, {mpath} "
                            f"says ({m['num_items'] + 1}, {m['embedding_dim']}) (model.num_items + 1, embedding_dim)")
    n_ctx, n_side = len(_field(manifest, "ranking.contextual", mpath)), len(_field(manifest, "ranking.side", mpath))
    try:
        return TokenTables(tables["items"], tables["actions"], [tables[f"contextual.{i}"] for i in range(n_ctx)],
                           [tables[f"side.{i}"] for i in range(n_side)], bool(r["action_with_item"]))
    except KeyError as e:
        raise ArtifactError(f"{mpath}: field embedding.tables has no {e} (ranking.contextual / side list it)") from None


def _load_vocabularies(path: str, manifest: Dict[str, Any]) -> Dict[str, RawIdVocab]:
    """The artifact's raw-id vocabularies (serving/vocab.py), each checked against its table."""
    mpath = os.path.join(path, MANIFEST)
    meta = manifest.get("vocabularies") or {}
    for i, entry in enumerate(manifest["ranking"]["contextual"]):  # the manifest first: then the files
        key = entry.get("vocabulary")
        if key is None:
            continue
        if key not in meta:
            raise ArtifactError(f"{mpath}: field ranking.contextual[{i}].vocabulary = {key!r} is not in vocabularies")
        num_ids = meta[key].get("num_ids")
        if int(num_ids) + 1 != int(entry["vocab"]):
            raise ArtifactError(f"{mpath}: vocabularies.{key}.num_ids = {num_ids} does not match the contextual "
                                f"table {i} ({entry['name']!r}: ranking.contextual[{i}].vocab = {entry['vocab']} "
                                "rows = values + the null id 0)")
    try:
        return load_vocabularies(path, manifest)
    except (VocabError, KeyError) as e:
        raise ArtifactError(f"{e}" if isinstance(e, VocabError) else f"{mpath}: missing field vocabularies.*.{e}")


def load_ranking(path: str, manifest: Dict[str, Any], config: Dict[str, Any], *, verify: bool,
                 micro_batch: int) -> RankingServingModel:
    """The ranking half of :func:`hstu.serving.load` (format, version and checksums already checked)."""
    mpath = os.path.join(path, MANIFEST)
    _check_config(manifest, config, path, RANKING_FIELDS)
    r = _field(manifest, "ranking", mpath)
    for name in ("task_names", "regression", "action_with_item", "contextual", "side", "actions"):
        _field(manifest, f"ranking.{name}", mpath)
    tables = _load_tables(path, manifest)
    programs = load_programs(path, manifest)
    m = manifest["model"]
    engine = RankingMFalcon(programs["extend"], programs["score"], tables, variant=m["variant"],
                            max_seq_len=m["max_seq_len"], max_side_tokens=m["max_side_tokens"],
                            num_layers=m["num_layers"], num_heads=m["num_heads"], attention_dim=m["attention_dim"],
                            linear_dim=m["linear_dim"], task_names=r["task_names"], regression=r["regression"],
                            side_names=[s["name"] for s in r["side"]], micro_batch=micro_batch)
    model = RankingServingModel(path, manifest, config, engine, load_records(path, manifest),
                                _load_item_tower(path, manifest, tables.items.num_rows))
    model.vocab = _load_vocabularies(path, manifest)
    if verify:
        model.verify()
    return model


__all__ = ["RankingServingModel", "load_ranking"]
