"""Standalone loader of a serving artifact written by ``hstu export`` (docs/serving.md).

    import hstu.serving
    model = hstu.serving.load("artifacts/ml-1m-hstu")
    top = model.retrieve(history_ids, history_timestamps, k=10)          # TopK(ids [k], scores [k])
    scores = model.rank(history_ids, history_timestamps, candidates)      # [m], M-FALCON
    ranker = hstu.serving.load("artifacts/ranking", task="ranking")      # a ranking artifact:
    out = ranker.rank(history, candidates)                                # RankScores(probabilities [m, K], ...)

Needs torch (+ the standard library) only: it never imports hstu.trainer, hstu.modules, hstu.ops, triton or
torchrec (tests/test_serving_artifact.py checks this in a subprocess that blocks those imports). Every problem
with the artifact is an :class:`ArtifactError` naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from hstu.serving.mfalcon import DEFAULT_MICRO_BATCH, MFalcon, Tensorish, UserState, per_user_query_times
from hstu.serving.retrieval import ItemTable, TopK, topk_inner_product
from hstu.serving.vocab import RawIdServing, VocabError, load_vocabularies

FORMAT, FORMAT_VERSION = "hstu-serving", 3  # = serving/export.py (not imported: it needs the trainer)
READABLE_VERSIONS = (1, 2, 3)  # 1: before manifest.task; 1-2: item table in embeddings.pt (read into memory)
MANIFEST, CONFIG_JSON = "manifest.json", "config.json"
MODEL_FIELDS = ("arch", "variant", "embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim",
                "l2_norm_output", "num_items", "max_seq_len")
L2_EPS = 1e-6  # = hstu.modules.model.L2_EPS
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


class ArtifactError(ValueError):
    """The artifact is missing a file, has another format version, or its files disagree (names file/field)."""


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: missing file (not an hstu serving artifact, or an incomplete copy)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def _field(d: Dict[str, Any], dotted: str, where: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ArtifactError(f"{where}: missing field {dotted!r}")
        cur = cur[part]
    return cur


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ServingModel(RawIdServing):
    """A loaded retrieval artifact: M-FALCON ranking, catalog retrieval, incremental user state; raw-id requests
    (``retrieve_raw`` / ``rank_raw``, serving/vocab.py) when it carries the vocabularies of an own-logs run."""

    task = "retrieval"

    def __init__(self, path: str, manifest: Dict[str, Any], config: Dict[str, Any], engine: MFalcon,
                 table: ItemTable, records: List[Dict[str, torch.Tensor]],
                 item_tower: Optional[ItemTowerProgram] = None) -> None:
        self.path, self.manifest, self.config = path, manifest, config
        self.engine, self.table, self.records = engine, table, records
        self.item_tower = item_tower  # None unless the model was trained with item features
        m = manifest["model"]
        self.num_items, self.max_seq_len, self.variant = int(m["num_items"]), int(m["max_seq_len"]), m["variant"]
        self.embedding_dtype = manifest["embedding"]["dtype"]
        self.vocab: Dict[str, Any] = {}  # name -> RawIdVocab (items, users) of an own-logs run, else {}

    # -------------------------------------------------------------------------------------- user state
    def encode(self, history_ids: Tensorish, history_timestamps: Tensorish,
               query_time: Optional[int] = None) -> UserState:
        """Encode a history once (last max_seq_len events) -> UserState (KV cache + user vector)."""
        return self.engine.encode(history_ids, history_timestamps, query_time)

    def append(self, state: UserState, item_ids: Tensorish, timestamps: Tensorish,
               query_time: Optional[int] = None) -> UserState:
        """New events / query time -> updated UserState without re-encoding the cache (see MFalcon.append)."""
        return self.engine.append(state, item_ids, timestamps, query_time)

    # -------------------------------------------------------------------------------------- requests
    def user_vector(self, history_ids: Tensorish, history_timestamps: Tensorish,
                    query_time: Optional[int] = None) -> torch.Tensor:
        return self.engine.user_vector(self.encode(history_ids, history_timestamps, query_time))

    def rank_state(self, state: UserState, candidates: Tensorish, micro_batch: Optional[int] = None) -> torch.Tensor:
        return self.engine.rank(state, candidates, micro_batch)

    def rank(self, history_ids: Tensorish, history_timestamps: Tensorish, candidates: Tensorish, *,
             query_time: Optional[int] = None, micro_batch: Optional[int] = None) -> torch.Tensor:
        """[m] scores: each candidate encoded after the history (position n, time = query time), seeing the
        history and itself only; score = <its encoding, its item vector>. Equal to scoring each alone."""
        return self.rank_state(self.encode(history_ids, history_timestamps, query_time), candidates, micro_batch)

    def rank_batch(self, histories: Sequence[Sequence[Tensorish]], candidates: Sequence[Tensorish], *,
                   query_times: Optional[Sequence[Optional[int]]] = None,
                   micro_batch: Optional[int] = None) -> List[torch.Tensor]:
        """Several users in one call: histories[b] = (history_ids, history_timestamps) with candidates[b]
        (jagged: any m_b) -> [scores [m_b]]; equal to per-user ``rank`` calls."""
        qts = per_user_query_times(histories, candidates, query_times)
        return [self.rank(h[0], h[1], c, query_time=qt, micro_batch=micro_batch)
                for h, c, qt in zip(histories, candidates, qts)]

    @torch.inference_mode()
    def retrieve_state(self, state: UserState, k: int, *, exclude_history: bool = False,
                       chunk_size: Optional[int] = None) -> TopK:
        exclude = [state.item_ids] if exclude_history else None
        return topk_inner_product(self.engine.user_vector(state), self.table, k, chunk_size=chunk_size,
                                  exclude=exclude)

    def retrieve(self, history_ids: Tensorish, history_timestamps: Tensorish, k: int, *,
                 query_time: Optional[int] = None, exclude_history: bool = False,
                 chunk_size: Optional[int] = None) -> TopK:
        """Exact top-k of items 1..num_items by <user vector, item vector> (chunked; ties -> smaller id)."""
        state = self.encode(history_ids, history_timestamps, query_time)
        return self.retrieve_state(state, k, exclude_history=exclude_history, chunk_size=chunk_size)

    # -------------------------------------------------------------------------------------- new items
    @torch.inference_mode()
    def add_items(self, features: Sequence[Dict[str, Sequence[int]]]) -> torch.Tensor:
        """New items from their content features alone, no retraining: features[i] = {feature name: indices}
        (encoded as manifest.json ``item_tower.features[].encoding`` says; a feature left out = missing). Their
        vectors come from the exported item tower with no id part; returns the new ids [M] (num_items + 1, ...),
        usable at once in retrieve / rank / histories. Needs an artifact of a model with item features."""
        if self.item_tower is None:
            raise ValueError(f"{self.path}: this model has no item tower (trained without model.item_features)")
        packed = self.item_tower.pack(features)
        rows = self.item_tower.program(torch.zeros(packed.shape[0], self.table.dim), packed)
        ids = self.table.append(rows)
        self.item_tower.values = torch.cat([self.item_tower.values, packed])
        self.num_items = self.engine.num_items = self.table.num_rows - 1
        return ids

    # -------------------------------------------------------------------------------------- self-check
    def verify(self, atol: float = TOLERANCE["atol"], rtol: float = TOLERANCE["rtol"]) -> Dict[str, float]:
        """Replay the recorded requests; raises ArtifactError on a mismatch, returns the max abs errors."""
        worst = {"rank_scores": 0.0, "user_vector": 0.0, "topk_scores": 0.0}
        where = os.path.join(self.path, self.manifest["records"]["file"])
        for i, r in enumerate(self.records):
            state = self.encode(r["history_ids"], r["history_timestamps"], int(r["query_time"]))
            got = {"rank_scores": self.rank_state(state, r["candidates"]), "user_vector": state.last,
                   "topk_scores": self.retrieve_state(state, len(r["topk_ids"])).scores}
            for name, value in got.items():
                check_record_field(where, i, name, value, r[name], atol, rtol, worst)
        tower = self.item_tower
        if tower is not None and "check_packed" in tower.check:
            where = os.path.join(self.path, self.manifest["item_tower"]["values_file"])
            worst["item_tower"] = 0.0
            with torch.inference_mode():
                got = tower.program(torch.zeros(tower.check["check_packed"].shape[0], self.table.dim),
                                    tower.check["check_packed"])
            check_record_field(where, 0, "item_tower", got, tower.check["check_vectors"], atol, rtol, worst)
        return worst


class ItemTowerProgram:
    """The exported content tower (manifest ``item_tower``): program (id part [M, D], packed [M, W]) -> [M, D],
    the feature layout and the packed features of the catalog's items (values [rows, W] int64)."""

    def __init__(self, program: Any, features: List[Dict[str, Any]], values: torch.Tensor,
                 check: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.program, self.features, self.values = program, features, values
        self.width = sum(int(f["width"]) for f in features)
        self.check = check or {}  # {"check_packed" [K, W], "check_vectors" [K, D]} recorded at export

    def pack(self, items: Sequence[Dict[str, Sequence[int]]]) -> torch.Tensor:
        """[{name: indices}] -> [M, W] int64; ValueError naming the item, feature and value when out of range."""
        if len(items) == 0:
            raise ValueError("add_items: no items given")
        known = {f["name"]: f for f in self.features}
        out = torch.zeros(len(items), self.width, dtype=torch.int64)
        for i, item in enumerate(items):
            for name, vals in item.items():
                if name not in known:
                    raise ValueError(f"add_items: item {i}: unknown feature {name!r} (known: {list(known)})")
                f, lo = known[name], sum(int(g["width"]) for g in self.features[:self.features.index(known[name])])
                vals = [int(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals])]
                if len(vals) > int(f["width"]) or any(not 1 <= v < int(f["cardinality"]) for v in vals):
                    raise ValueError(f"add_items: item {i}: feature {name!r} = {vals} must be at most {f['width']} "
                                     f"values in 1..{int(f['cardinality']) - 1}")
                out[i, lo:lo + len(vals)] = torch.tensor(vals, dtype=torch.int64)
        return out


def _load_item_tower(path: str, manifest: Dict[str, Any], rows: int) -> Optional[ItemTowerProgram]:
    meta = manifest.get("item_tower")
    if meta is None:
        return None
    mpath = os.path.join(path, MANIFEST)
    program = torch.export.load(os.path.join(path, _field(manifest, "item_tower.program", mpath))).module()
    vfile = os.path.join(path, _field(manifest, "item_tower.values_file", mpath))
    state = torch.load(vfile, map_location="cpu", weights_only=True)
    values = state.get("values") if isinstance(state, dict) else None
    features = _field(manifest, "item_tower.features", mpath)
    width = sum(int(f["width"]) for f in features)
    if values is None or tuple(values.shape) != (rows, width):
        raise ArtifactError(f"{vfile}: field values must be [{rows}, {width}] (rows, sum of item_tower.features "
                            f"widths in {mpath})")
    return ItemTowerProgram(program, features, values,
                            {k: state[k] for k in ("check_packed", "check_vectors") if k in state})


def check_record_field(where: str, i: int, name: str, value: torch.Tensor, ref: torch.Tensor, atol: float,
                       rtol: float, worst: Dict[str, float]) -> None:
    """Recorded output ``ref`` of record ``i`` vs the loaded model's ``value``: same shape and allclose, else an
    ArtifactError naming the file, record and field; ``worst[name]`` keeps the largest abs error seen."""
    if value.shape != ref.shape:
        raise ArtifactError(f"{where}: record {i} field {name!r} has shape {tuple(ref.shape)}, the loaded model "
                            f"gives {tuple(value.shape)}")
    err = float((value - ref).abs().max()) if ref.numel() else 0.0
    worst[name] = max(worst[name], err)
    if not torch.allclose(value, ref, atol=atol, rtol=rtol):
        raise ArtifactError(f"{where}: record {i} field {name!r} differs from the loaded model by {err:.3g} "
                            f"(atol {atol}, rtol {rtol})")


def _check_config(manifest: Dict[str, Any], config: Dict[str, Any], path: str,
                  fields: Sequence[str] = MODEL_FIELDS) -> None:
    """manifest.json model.* present and equal to config.json model.* / data.max_seq_len."""
    mpath, cpath = os.path.join(path, MANIFEST), os.path.join(path, CONFIG_JSON)
    model = _field(manifest, "model", mpath)
    for name in fields:
        _field(manifest, f"model.{name}", mpath)
    for name in fields:
        if name in ("num_items", "max_seq_len", "max_tokens", "max_side_tokens"):
            continue
        cv = _field(config, f"model.{name}", cpath)
        if cv != model[name]:
            raise ArtifactError(f"{cpath}: field model.{name} = {cv!r} does not match {mpath} model.{name} = "
                                f"{model[name]!r}")
    cv = _field(config, "data.max_seq_len", cpath)
    if cv != model["max_seq_len"]:
        raise ArtifactError(f"{cpath}: field data.max_seq_len = {cv!r} does not match {mpath} model.max_seq_len = "
                            f"{model['max_seq_len']!r}")
    if model["arch"] != "hstu" or model["variant"] not in ("research", "production"):
        raise ArtifactError(f"{mpath}: field model.arch/variant = {model['arch']}/{model['variant']} not servable")


def _load_table(path: str, manifest: Dict[str, Any]) -> ItemTable:
    """The item table: memory-mapped raw files (format 3: loading touches no row) or embeddings.pt (1-2)."""
    mpath = os.path.join(path, MANIFEST)
    emb = _field(manifest, "embedding", mpath)
    if "layout" in emb:  # format 3 (format 1-2 loaders refuse it by format_version)
        return _map_table(path, manifest, emb, mpath)
    file = os.path.join(path, _field(manifest, "embedding.file", mpath))
    state = torch.load(file, map_location="cpu", weights_only=True)
    w = state.get("weight") if isinstance(state, dict) else None
    if w is None:
        raise ArtifactError(f"{file}: missing field 'weight'")
    expected = (manifest["model"]["num_items"] + 1, manifest["model"]["embedding_dim"])
    if tuple(w.shape) != expected or tuple(w.shape) != (emb.get("rows"), emb.get("dim")):
        raise ArtifactError(f"{file}: field weight has shape {tuple(w.shape)}, {mpath} says {expected} "
                            "(model.num_items + 1, model.embedding_dim)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}.get(emb.get("dtype"))
    if dtype is None or w.dtype != dtype:
        raise ArtifactError(f"{file}: field weight is {w.dtype}, {mpath} field embedding.dtype = {emb.get('dtype')!r}")
    scale = state.get("scale")
    if (scale is None) != (dtype != torch.int8) or (scale is not None and tuple(scale.shape) != (expected[0],)):
        raise ArtifactError(f"{file}: field 'scale' must be [{expected[0]}] fp32 exactly for int8 tables")
    return ItemTable(w, scale, l2_norm=bool(manifest["model"]["l2_norm_output"]), eps=L2_EPS)


def _map_table(path: str, manifest: Dict[str, Any], emb: Dict[str, Any], mpath: str) -> ItemTable:
    rows, dim = manifest["model"]["num_items"] + 1, manifest["model"]["embedding_dim"]
    if (emb.get("rows"), emb.get("dim")) != (rows, dim):
        raise ArtifactError(f"{mpath}: field embedding.rows/dim = {emb.get('rows')}/{emb.get('dim')}, expected "
                            f"{rows}/{dim} (model.num_items + 1, model.embedding_dim)")
    dtype = emb.get("dtype")
    if dtype not in ("fp32", "bf16", "int8"):
        raise ArtifactError(f"{mpath}: field embedding.dtype = {dtype!r}, expected fp32 | bf16 | int8")
    l2 = bool(manifest["model"]["l2_norm_output"])
    for name, needed in (("scale_file", dtype == "int8"), ("factor_file", l2)):
        if (name in emb) != needed:
            raise ArtifactError(f"{mpath}: field embedding.{name} must be {'present' if needed else 'absent'} "
                                f"(embedding.dtype {dtype}, model.l2_norm_output {l2})")
    files = {k: os.path.join(path, emb[k]) for k in ("file", "scale_file", "factor_file") if k in emb}
    try:
        return ItemTable.open_raw(files["file"], dtype, rows, dim, scale_file=files.get("scale_file"),
                                  factor_file=files.get("factor_file"), l2_norm=l2, eps=L2_EPS)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def load_programs(path: str, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """{"extend", "score"}: the artifact's torch.export programs as callables."""
    mpath, programs = os.path.join(path, MANIFEST), {}
    for name in ("extend", "score"):
        file = os.path.join(path, _field(manifest, f"programs.{name}.file", mpath))
        if not os.path.isfile(file):
            raise ArtifactError(f"{file}: missing file (programs.{name} in {mpath})")
        programs[name] = torch.export.load(file).module()
    return programs


def load_records(path: str, manifest: Dict[str, Any]) -> List[Dict[str, torch.Tensor]]:
    return torch.load(os.path.join(path, _field(manifest, "records.file", os.path.join(path, MANIFEST))),
                      map_location="cpu", weights_only=True)


def load(path: str, *, task: Optional[str] = None, verify: bool = True, verify_checksums: bool = True,
         micro_batch: int = DEFAULT_MICRO_BATCH):
    """Load an artifact directory -> ServingModel (retrieval) | RankingServingModel (ranking). task: the kind
    expected (None = either); verify: replay the recorded requests (a few ms); verify_checksums: check every
    file's size and sha256 against manifest.json."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: no such artifact directory")
    mpath = os.path.join(path, MANIFEST)
    manifest = _read_json(mpath)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: field format = {manifest.get('format')!r}, expected {FORMAT!r}")
    version = _field(manifest, "format_version", mpath)
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{mpath}: field format_version = {version!r}, this loader reads versions "
                            f"{list(READABLE_VERSIONS)} (re-export with this version of `hstu export`)")
    kind = manifest.get("task", "retrieval") if version == 1 else _field(manifest, "task", mpath)
    if kind not in ("retrieval", "ranking"):
        raise ArtifactError(f"{mpath}: field task = {kind!r}, expected retrieval | ranking")
    if task is not None and kind != task:
        raise ArtifactError(f"{mpath}: field task = {kind!r}, but a {task!r} artifact was asked for")
    for name, info in _field(manifest, "files", mpath).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ArtifactError(f"{file}: missing file (listed in {mpath} field files)")
        if os.path.getsize(file) != info.get("bytes") or (verify_checksums and _sha256(file) != info.get("sha256")):
            raise ArtifactError(f"{file}: size or sha256 differs from {mpath} field files.{name} (corrupt copy?)")
    config = _read_json(os.path.join(path, CONFIG_JSON))
    if kind == "ranking":
        from hstu.serving.ranking_artifact import load_ranking  # lazy: it imports this module

        return load_ranking(path, manifest, config, verify=verify, micro_batch=micro_batch)
    _check_config(manifest, config, path)
    table = _load_table(path, manifest)
    programs = load_programs(path, manifest)
    records = load_records(path, manifest)
    m = manifest["model"]
    engine = MFalcon(programs["extend"], programs["score"], table.lookup, table.vectors, variant=m["variant"],
                     max_seq_len=m["max_seq_len"], num_items=m["num_items"], num_layers=m["num_layers"],
                     num_heads=m["num_heads"], attention_dim=m["attention_dim"], linear_dim=m["linear_dim"],
                     embedding_dim=m["embedding_dim"], micro_batch=micro_batch)
    model = ServingModel(path, manifest, config, engine, table, records,
                         _load_item_tower(path, manifest, table.num_rows))
    try:
        model.vocab = load_vocabularies(path, manifest)
    except (VocabError, KeyError) as e:
        raise ArtifactError(f"{e}" if isinstance(e, VocabError) else f"{mpath}: missing field vocabularies.*.{e}")
    if verify:
        model.verify()
    return model


__all__ = ["ArtifactError", "ServingModel", "TopK", "UserState", "load"]
