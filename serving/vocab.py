"""Raw-id vocabularies of an own-logs run (data.name=events) inside a serving artifact (docs/serving.md "Raw ids").

``hstu export`` copies the prepared dataset's ``vocab/items.parquet`` (and ``vocab/users.parquet``) into the
artifact as flat numpy files, written in chunks through DuckDB (bounded memory whatever the vocabulary size) and
memory-mapped by the loader (only the pages a lookup touches are read)::

    vocab_<name>.keys.npy      [K] sorted lookup keys: int64 raw ids, or for string ids the first 8 bytes of
                               md5(utf-8 raw id) as uint64 (collisions resolved by comparing the bytes below)
    vocab_<name>.ids.npy       [K] int64 id of each key
    vocab_<name>.offsets.npy   [num_ids + 2] int64 (string ids) -- raw id of id i = bytes[offsets[i]:offsets[i+1]]
    vocab_<name>.bytes.npy     [B] uint8 utf-8 raw ids, by id (id 0 and the OOV id: empty)
    vocab_<name>.raw.npy       [num_ids + 1] int64 raw id of each id (integer ids; 0 at id 0 / the OOV id)

Lookups are binary searches (np.searchsorted) over the memory-mapped arrays, never a dict of the vocabulary.
Unknown raw item ids map to the OOV id (``item_ids=vocab``: num_items, the id rare items trained as); with
``item_ids=raw`` the vocabulary is the identity (no files) and unknown ids (outside 1..num_items) have no id: their
events are left out of the history. Both are counted (``RawIdVocab.unknown_seen``) and logged as a warning.

The serving side (RawIdVocab, load_vocabularies, RawIdServing) needs numpy + the standard library; the export
side (export_vocabularies) needs DuckDB and the trainer's config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("hstu.serving")
NAMES = ("items", "users")
CHUNK_ROWS = 1 << 20  # vocabulary rows per DuckDB fetch at export


def _md5_key(raw: str) -> int:
    return int(hashlib.md5(raw.encode("utf-8")).hexdigest()[:16], 16)


class VocabError(ValueError):
    """A vocabulary that does not fit the artifact / checkpoint (names the file)."""


# ---------------------------------------------------------------------------------------------- serving side
class RawIdVocab:
    """raw id <-> id of one vocabulary (items | users). ``num_ids``: the largest id (items: num_items, the OOV id
    included); ``unknown``: the id of raw ids it does not hold (items: the OOV id; users / identity: 0 = none)."""

    def __init__(self, name: str, raw_type: str, num_ids: int, unknown: int, keys: Optional[np.ndarray] = None,
                 ids: Optional[np.ndarray] = None, by_id: Optional[Tuple[np.ndarray, ...]] = None) -> None:
        self.name, self.raw_type, self.num_ids, self.unknown = name, raw_type, int(num_ids), int(unknown)
        self.keys, self.ids, self.by_id = keys, ids, by_id
        self.identity = keys is None  # item_ids=raw: id = raw id
        self.unknown_seen = 0  # raw ids looked up and not found, since load

    def __len__(self) -> int:
        return self.num_ids if self.identity else int(self.keys.shape[0])

    def _known(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= 1) & (ids <= self.num_ids) & (ids != self.unknown if self.unknown else True)

    def to_ids(self, raw_ids: Any) -> np.ndarray:
        """Raw ids (a sequence of str / int, as the dataset declared them) -> ids [N] int64; unknown -> ``unknown``
        (counted in ``unknown_seen``)."""
        values = list(raw_ids.tolist() if isinstance(raw_ids, np.ndarray) else raw_ids)
        if self.raw_type == "int":
            try:
                q = np.asarray([int(v) for v in values], dtype=np.int64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.name} raw ids must be integers for this model ({e})") from None
            if self.identity:
                out = np.where((q >= 1) & (q <= self.num_ids), q, self.unknown)
            else:
                pos = np.clip(np.searchsorted(self.keys, q), 0, max(len(self) - 1, 0))
                hit = (self.keys[pos] == q) if len(self) else np.zeros(q.shape, dtype=bool)
                out = np.where(hit, self.ids[pos], self.unknown).astype(np.int64)
        else:
            if any(not isinstance(v, str) for v in values):
                bad = next(v for v in values if not isinstance(v, str))
                raise ValueError(f"{self.name} raw ids must be strings for this model, got {bad!r}")
            h = np.asarray([_md5_key(v) for v in values], dtype=np.uint64)
            pos = np.searchsorted(self.keys, h)
            out = np.full(len(values), self.unknown, dtype=np.int64)
            for j, (p, v) in enumerate(zip(pos.tolist(), values)):
                want = v.encode("utf-8")
                while p < len(self) and int(self.keys[p]) == int(h[j]):  # equal md5 prefixes: compare the bytes
                    cand = int(self.ids[p])
                    if self._raw_bytes(cand) == want:
                        out[j] = cand
                        break
                    p += 1
        self.unknown_seen += int((out == self.unknown).sum())
        return out.astype(np.int64)

    def _raw_bytes(self, i: int) -> bytes:
        offsets, data = self.by_id
        return data[int(offsets[i]):int(offsets[i + 1])].tobytes()

    def to_raw(self, ids: Any) -> List[Any]:
        """Ids -> raw ids (str or int); None for padding (0), the OOV id, or an id outside 1..num_ids."""
        arr = np.asarray(ids, dtype=np.int64).ravel()
        out: List[Any] = []
        for i in arr.tolist():
            if not self._known(np.int64(i)):
                out.append(None)
            elif self.identity:
                out.append(int(i))
            elif self.raw_type == "int":
                out.append(int(self.by_id[0][i]))
            else:
                out.append(self._raw_bytes(i).decode("utf-8"))
        return out


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise VocabError(f"{path}: missing vocabulary file ({what})")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_vocabularies(path: str, manifest: Dict[str, Any]) -> Dict[str, RawIdVocab]:
    """The vocabularies of an artifact (manifest ``vocabularies``; {} when it has none), memory-mapped and
    checked against the item table size (model.num_items) -> {name: RawIdVocab}; VocabError names the file."""
    meta = manifest.get("vocabularies") or {}
    out: Dict[str, RawIdVocab] = {}
    mpath = os.path.join(path, "manifest.json")
    for name, info in meta.items():
        num_ids = int(info["num_ids"])
        if name == "items" and num_ids != int(manifest["model"]["num_items"]):
            raise VocabError(f"{mpath}: vocabularies.items.num_ids = {num_ids} does not match the item table "
                             f"(model.num_items = {manifest['model']['num_items']})")
        if info.get("identity"):
            out[name] = RawIdVocab(name, "int", num_ids, 0)
            continue
        files = {k: os.path.join(path, f) for k, f in info["files"].items()}
        keys, ids = _load_npy(files["keys"], "lookup keys"), _load_npy(files["ids"], "ids")
        if keys.shape != ids.shape or keys.ndim != 1:
            raise VocabError(f"{files['ids']}: shape {ids.shape} differs from {files['keys']} {keys.shape}")
        if keys.shape[0] and (int(ids.min()) < 1 or int(ids.max()) > num_ids):
            raise VocabError(f"{files['ids']}: ids must lie in 1..{num_ids} (the table's rows), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        if info["raw_type"] == "int":
            by_id = (_load_npy(files["raw"], "raw ids by id"),)
            want = num_ids + 1
        else:
            by_id = (_load_npy(files["offsets"], "offsets by id"), _load_npy(files["bytes"], "utf-8 raw ids"))
            want = num_ids + 2
        if by_id[0].shape != (want,):
            raise VocabError(f"{files['raw' if info['raw_type'] == 'int' else 'offsets']}: {by_id[0].shape[0]} rows, "
                             f"the table of {num_ids} ids needs {want}")
        out[name] = RawIdVocab(name, info["raw_type"], num_ids, int(info.get("unknown_id") or 0), keys, ids, by_id)
    return out


def history_item_ids(items: RawIdVocab, raw: List[Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Raw history item ids [n] -> (ids [n] int64, keep [n] bool): unknown raw ids -> the OOV id, or, when the
    vocabulary has none (item_ids=raw), keep = False (the event is left out); counted and logged as a warning."""
    ids = items.to_ids(raw)
    unknown = ids == items.unknown
    if unknown.any():
        first = raw[int(np.flatnonzero(unknown)[0])]
        what = f"the OOV id {items.unknown}" if items.unknown else "nothing (left out of the history)"
        log.warning("%d of %d history item ids are not in the vocabulary (first: %r): mapped to %s",
                    int(unknown.sum()), len(raw), first, what)
    keep = ~unknown if not items.unknown else np.ones(len(raw), dtype=bool)
    return ids, keep


def candidate_item_ids(items: RawIdVocab, raw: List[Any]) -> np.ndarray:
    """Raw candidate item ids [m] -> ids [m] int64: unknown ones score as the OOV id (counted, logged as a
    warning); with no OOV id (item_ids=raw) they are refused (ValueError)."""
    ids = items.to_ids(raw)
    unknown = ids == items.unknown
    if unknown.any():
        first = raw[int(np.flatnonzero(unknown)[0])]
        if not items.unknown:
            raise ValueError(f"candidate {first!r} is not an item of this model (1..{items.num_ids})")
        log.warning("%d of %d candidate item ids are not in the vocabulary (first: %r): scored as the OOV id %d",
                    int(unknown.sum()), len(raw), first, items.unknown)
    return ids


class RawIdServing:
    """Raw-id requests of a retrieval ServingModel (mixed into serving/artifact.py ServingModel; ``self.vocab``
    = load_vocabularies(...)). Histories of raw item ids in, raw item ids out."""

    vocab: Dict[str, RawIdVocab]

    def _items(self) -> RawIdVocab:
        items = getattr(self, "vocab", {}).get("items")
        if items is None:
            raise ValueError(f"{self.path}: this artifact carries no item vocabulary (exported from a run not "
                             "trained on data.name=events; use item ids)")
        return items

    def history_ids(self, raw_ids: Sequence[Any], timestamps: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Raw item ids [n] + timestamps [n] -> (item ids, timestamps): unknown raw ids -> the OOV id (or left
        out when the vocabulary has none), counted and logged."""
        ts = np.asarray(timestamps, dtype=np.int64).reshape(-1)
        raw = list(raw_ids)
        if len(raw) != ts.shape[0]:
            raise ValueError(f"history: {len(raw)} raw item ids but {ts.shape[0]} timestamps")
        ids, keep = history_item_ids(self._items(), raw)
        return ids[keep], ts[keep]

    def encode_raw(self, raw_ids: Sequence[Any], timestamps: Any, query_time: Optional[int] = None):
        ids, ts = self.history_ids(raw_ids, timestamps)
        return self.encode(ids, ts, query_time)

    def retrieve_raw(self, raw_ids: Sequence[Any], timestamps: Any, k: int, *, query_time: Optional[int] = None,
                     exclude_history: bool = False, chunk_size: Optional[int] = None) -> Tuple[List[Any], Any]:
        """Top-k as (raw item ids [k], scores [k]): :meth:`retrieve` over the known items (the OOV id is never
        returned: it stands for no item in particular)."""
        from hstu.serving.retrieval import topk_inner_product

        items = self._items()
        state = self.encode_raw(raw_ids, timestamps, query_time)
        exclude = [int(i) for i in state.item_ids.tolist()] if exclude_history else []
        if items.unknown:
            exclude.append(items.unknown)
        top = topk_inner_product(self.engine.user_vector(state), self.table, k, chunk_size=chunk_size,
                                 exclude=[exclude] if exclude else None)
        return items.to_raw(top.ids), top.scores

    def rank_raw(self, raw_ids: Sequence[Any], timestamps: Any, candidates: Sequence[Any], *,
                 query_time: Optional[int] = None, micro_batch: Optional[int] = None):
        """M-FALCON scores [m] of raw candidate ids after a raw-id history (unknown candidates score as the OOV
        id; with no OOV id they are refused)."""
        import torch

        cand = candidate_item_ids(self._items(), list(candidates))
        return self.rank_state(self.encode_raw(raw_ids, timestamps, query_time), torch.as_tensor(cand), micro_batch)


# ---------------------------------------------------------------------------------------------- export side
def find_dataset_dir(cfg: Any, source: Optional[Dict[str, str]]) -> str:
    """The prepared dataset of an events run: ``source["dataset_dir"]`` (hstu export --dataset-dir), else the
    ``data.dataset_dir`` its results.json recorded, else the cache folder its config hashes to (the sources must
    be unchanged). Raises VocabError saying how to point at it."""
    source = source or {}
    if source.get("dataset_dir"):
        return source["dataset_dir"]
    results = os.path.join(source.get("run_dir", ""), "results.json")
    if os.path.isfile(results):
        with open(results, encoding="utf-8") as f:
            found = (json.load(f).get("data") or {}).get("dataset_dir")
        if found and os.path.isfile(os.path.join(found, "manifest.json")):
            return found
    from hstu.trainer.data.events_prepare import dataset_dir, dataset_key
    from hstu.trainer.data.events_schema import resolve_paths

    try:
        ev = cfg.data.events
        files = resolve_paths(ev) + (resolve_paths(ev.item_features, "data.events.item_features.paths")
                                     if ev.item_features.paths else [])
        folder = dataset_dir(cfg.data, dataset_key(cfg.data, files)[0])
    except Exception as e:  # sources moved / changed: say how to point at the folder
        raise VocabError(f"cannot locate the prepared dataset of this run ({e}); pass --dataset-dir") from None
    if not (folder / "manifest.json").is_file():
        raise VocabError(f"{folder}: the prepared dataset of this run is not there (sources changed or the cache "
                         "was cleared); pass --dataset-dir or run `hstu prepare` with the run's config")
    return str(folder)


def _sql_path(path: str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _raw_type(con: Any, vocab_file: str) -> str:
    kind = con.execute(f"SELECT typeof(raw) FROM read_parquet({_sql_path(vocab_file)}) LIMIT 1").fetchone()
    return "string" if kind is not None and kind[0] == "VARCHAR" else "int"


def _vocab_files(name: str, raw_type: str) -> Dict[str, str]:
    roles = ("keys", "ids") + (("offsets", "bytes") if raw_type == "string" else ("raw",))
    return {role: f"vocab_{name}.{role}.npy" for role in roles}


def _write_vocab_files(vocab_file: str, outdir: str, files: Dict[str, str], num_ids: int, con: Any) -> None:
    """``vocab_file`` (raw, id[, count] Parquet) -> the numpy files ``files`` in ``outdir``, in chunks of
    CHUNK_ROWS rows (memory: DuckDB's limit + one chunk, whatever the vocabulary size)."""
    from numpy.lib.format import open_memmap

    src = f"read_parquet({_sql_path(vocab_file)})"
    is_str = "bytes" in files
    path = {role: os.path.join(outdir, f) for role, f in files.items()}
    key = "('0x' || md5(raw)[1:16])::UBIGINT" if is_str else "raw::BIGINT"
    con.execute(f"CREATE OR REPLACE TEMP TABLE kv AS SELECT row_number() OVER (ORDER BY k, id) - 1 AS rn, k, id "
                f"FROM (SELECT {key} AS k, id::BIGINT AS id FROM {src} WHERE id BETWEEN 1 AND {num_ids})")
    n = int(con.execute("SELECT count(*) FROM kv").fetchone()[0])
    keys = open_memmap(path["keys"], "w+", np.uint64 if is_str else np.int64, (n,))
    ids = open_memmap(path["ids"], "w+", np.int64, (n,))
    for a in range(0, n, CHUNK_ROWS):
        got = con.execute(f"SELECT k, id FROM kv WHERE rn >= {a} AND rn < {a + CHUNK_ROWS} ORDER BY rn").fetchnumpy()
        keys[a:a + got["k"].shape[0]], ids[a:a + got["id"].shape[0]] = got["k"], got["id"]
    keys.flush(), ids.flush()
    del keys, ids
    con.execute("DROP TABLE kv")
    chunks = range(1, num_ids + 1, CHUNK_ROWS)
    if not is_str:
        raw = open_memmap(path["raw"], "w+", np.int64, (num_ids + 1,))
        raw[:] = 0
        for a in chunks:
            got = con.execute(f"SELECT id, raw::BIGINT AS raw FROM {src} WHERE id >= {a} AND id < {a + CHUNK_ROWS}"
                              ).fetchnumpy()
            raw[np.asarray(got["id"], dtype=np.int64)] = got["raw"]
        raw.flush()
        del raw
        return
    total = int(con.execute(f"SELECT coalesce(sum(strlen(raw)), 0) FROM {src} WHERE id BETWEEN 1 AND {num_ids}"
                            ).fetchone()[0])
    offsets = open_memmap(path["offsets"], "w+", np.int64, (num_ids + 2,))
    data = open_memmap(path["bytes"], "w+", np.uint8, (total,))
    offsets[:] = 0
    for a in chunks:  # offsets[i + 1] = bytes of id i, then the running sum
        got = con.execute(f"SELECT id, strlen(raw) AS n FROM {src} WHERE id >= {a} AND id < {a + CHUNK_ROWS}"
                          ).fetchnumpy()
        offsets[np.asarray(got["id"], dtype=np.int64) + 1] = got["n"]
    np.cumsum(offsets, out=offsets)
    for a in chunks:  # the raw ids of ids a.. in id order: one string per chunk
        text = con.execute(f"SELECT string_agg(raw, '' ORDER BY id) FROM {src} WHERE id >= {a} AND "
                           f"id < {a + CHUNK_ROWS}").fetchone()[0]
        if text:
            b = text.encode("utf-8")
            start = int(offsets[a])
            data[start:start + len(b)] = np.frombuffer(b, dtype=np.uint8)
    offsets.flush(), data.flush()
    del offsets, data


def export_vocabularies(cfg: Any, source: Optional[Dict[str, str]], num_items: int, contexts: bool = False):
    """(manifest["vocabularies"], {file name: writer(path)}) of an events run whose item table has ``num_items``
    ids; ({}, {}) for other datasets. VocabError when the dataset's vocabulary does not fit the table.
    ``contexts``: also the per-column contextual vocabularies (``context<i>``: ``column``, ids 1..vocab_size,
    unknown 0 = the null id; the ranking export)."""
    if cfg.data.name != "events":
        return {}, {}
    import duckdb

    from hstu.trainer.data.download import sha256_file

    folder = find_dataset_dir(cfg, source)
    mpath = os.path.join(folder, "manifest.json")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    counts = manifest["counts"]
    items_file = os.path.join(folder, "vocab", "items.parquet")
    if int(manifest["num_items"]) != int(num_items):
        raise VocabError(f"{items_file}: the prepared dataset has {manifest['num_items']} item ids ({mpath}), the "
                         f"checkpoint's item table {num_items}: not the dataset this run trained on (pass "
                         "--dataset-dir)")
    meta: Dict[str, Any] = {}
    plan: List[Tuple[str, str, int]] = []
    con = duckdb.connect()
    try:
        for name, num_ids in (("items", int(num_items)), ("users", int(counts["raw_users"]))):
            path = os.path.join(folder, "vocab", f"{name}.parquet")
            if not os.path.isfile(path):
                raise VocabError(f"{path}: missing vocabulary of the prepared dataset")
            entry: Dict[str, Any] = {"num_ids": num_ids, "source": path, "source_sha256": sha256_file(path)}
            if name == "items" and manifest["options"]["item_ids"] == "raw":
                entry.update(identity=True, raw_type="int", unknown_id=0)
            else:
                raw_type = _raw_type(con, path)
                entry.update(raw_type=raw_type, files=_vocab_files(name, raw_type),
                             unknown_id=int(counts["oov_id"]) if name == "items" else 0)
                plan.append((name, path, num_ids))
            meta[name] = entry
        for i, ctx in enumerate(manifest.get("contexts") or [] if contexts else []):
            path = os.path.join(folder, ctx["vocab_file"])
            if not os.path.isfile(path):
                raise VocabError(f"{path}: missing vocabulary of the prepared dataset")
            raw_type, num_ids = _raw_type(con, path), int(ctx["vocab_size"])
            meta[f"context{i}"] = {"num_ids": num_ids, "column": ctx["column"], "source": path,
                                    "source_sha256": sha256_file(path), "raw_type": raw_type, "unknown_id": 0,
                                    "files": _vocab_files(f"context{i}", raw_type)}
            plan.append((f"context{i}", path, num_ids))
    finally:
        con.close()
    if not plan:
        return meta, {}
    budget_mb = max(64, int(cfg.data.events.prepare_memory_mb) // 2)  # as hstu prepare: DuckDB's half
    threads = int(getattr(cfg.data.events, "prepare_threads", 0) or 0)

    def write_all(first_path: str) -> None:
        import tempfile

        outdir = os.path.dirname(first_path)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(outdir) or ".") as spill:
            options = {"memory_limit": f"{budget_mb}MB", "temp_directory": spill}
            con = duckdb.connect(config={**options, **({"threads": threads} if threads else {})})
            try:
                for name, path, num_ids in plan:
                    _write_vocab_files(path, outdir, meta[name]["files"], num_ids, con)
            finally:
                con.close()

    return meta, {meta[plan[0][0]]["files"]["keys"]: write_all}  # one writer writes every vocab_* file
