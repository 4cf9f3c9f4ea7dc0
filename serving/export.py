"""``hstu export``: a trained retrieval run -> a self-contained serving artifact (docs/serving.md); ranking runs:
serving/export_ranking.py.

Artifact directory (written into a hidden temp dir next to OUT, then renamed; format version FORMAT_VERSION)::

    manifest.json     format, format_version, model metadata, embedding dtype, programs, files (bytes + sha256)
    config.yaml       the run's resolved config, verbatim;  config.json: the same, for the torch-only loader
    dense_extend.pt2  torch.export program: history rows (causal continuation of a KV cache)  -> enc, K, V
    dense_score.pt2   torch.export program: M-FALCON candidates (history + self only)         -> enc
    item_table.bin    item table rows 0..num_items, raw little-endian [rows, D]: fp32 | bf16 | int8, written in
                      bounded chunks straight from the checkpoint's shards (serving/table_stream.py); int8:
                      item_scale.bin [rows] fp32 (row = weight * scale); l2_norm_output: item_factor.bin [rows]
                      fp32 (scale / ||row||), so the loader memory-maps all three and touches no row at load
    records.pt        recorded input -> output pairs (rank scores, user vector, top-10) of the reference model

The dense programs are exported for ONE user with dynamic sizes (new rows M >= 1, cached rows N >= 0) from plain
torch ops (``HSTUEncoder.forward_cached``: dense single-sequence attention, no jagged op, no custom op), so they
load and run with torch alone. Checkpoints are read through trainer/plain_weights.py (``read_plain_state``): full
unsharded tensors of best.pt or a DCP checkpoint, whatever world size and sharding wrote them — except the item
table, which is never held whole: it is read ``--chunk-rows`` rows at a time (serving/table_stream.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from hstu.serving.mfalcon import DenseStep
from hstu.serving.retrieval import EMBEDDING_DTYPES, ItemTable, topk_inner_product
from hstu.serving.table_stream import DEFAULT_EXPORT_CHUNK_ROWS, TABLE_FILE, TensorRows, write_raw_item_table
from hstu.trainer.integrity import sha256_file
from hstu.trainer.plain_weights import ITEM_KEY

FORMAT, FORMAT_VERSION = "hstu-serving", 3  # 3: raw memory-mapped item table; 2: manifest.task; 1 = retrieval
MANIFEST, CONFIG_YAML, CONFIG_JSON = "manifest.json", "config.yaml", "config.json"
EXTEND_FILE, SCORE_FILE = "dense_extend.pt2", "dense_score.pt2"
RECORDS_FILE = "records.pt"
ITEM_TOWER_FILE, ITEM_FEATURES_FILE = "item_tower.pt2", "item_features.pt"
STEP_INPUTS = ["x", "pos", "ts", "t_next", "q_time", "past_k", "past_v", "past_pos", "past_ts"]
MODEL_FIELDS = ("arch", "variant", "embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim",
                "l2_norm_output")
RECORD_TOPK = 10


# ---------------------------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(run_dir: str, checkpoint: Optional[str] = None, ckpt_dir: Optional[str] = None) -> str:
    """checkpoint: None (best, else the latest DCP checkpoint), "best" (RUN_DIR/best.pt, else the DCP best
    checkpoint RUN_DIR/best/step_N of checkpoint.best_format=dcp), "latest"
    (the newest checkpoint in ``ckpt_dir`` — the run's checkpoint.dir, default RUN_DIR/checkpoints — that
    verifies: a DCP directory, sharded by any number of processes) or a path (state_dict file or DCP
    directory). Verified (trainer/integrity.py); raises CheckpointError with a one-line reason."""
    from hstu.trainer.integrity import resolve_run_checkpoint

    return resolve_run_checkpoint(run_dir, checkpoint, ckpt_dir)


# ---------------------------------------------------------------------------------------------- reference
def _batch(seqs, qts) -> Any:
    ids = torch.cat([torch.as_tensor(s[0], dtype=torch.int64) for s in seqs])
    ts = torch.cat([torch.as_tensor(s[1], dtype=torch.int64) for s in seqs])
    lengths = torch.tensor([len(s[0]) for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return SimpleNamespace(item_ids=ids, timestamps=ts, offsets=offsets, max_len=int(lengths.max()),
                           target_timestamps=torch.as_tensor(qts, dtype=torch.int64))


@torch.inference_mode()
def reference_rank_scores(model, ids, ts, qt: int, candidates) -> torch.Tensor:
    """Ground truth for M-FALCON: every candidate scored ALONE by the full model: sequence history + [c] with
    timestamps history + [qt], query time qt; score = <encoding of the candidate row, item_vector(c)>."""
    cand = torch.as_tensor(candidates, dtype=torch.int64)
    ids, ts = torch.as_tensor(ids, dtype=torch.int64), torch.as_tensor(ts, dtype=torch.int64)
    seqs = [(torch.cat([ids, c.view(1)]), torch.cat([ts, torch.tensor([qt])])) for c in cand]
    batch = _batch(seqs, [qt] * len(seqs))
    enc = model.encode(batch)[batch.offsets[1:] - 1]
    return (enc * model.item_vectors(cand)).sum(-1)


@torch.inference_mode()
def reference_user_vector(model, ids, ts, qt: int) -> torch.Tensor:
    """The full model's user vector (last row, query time qt) of one history."""
    return model.user_vectors(_batch([(ids, ts)], [qt]))[0]


# ---------------------------------------------------------------------------------------------- export
EXAMPLE_ROWS, EXAMPLE_PAST = 5, 7  # m new rows after n cached ones: the example inputs of torch.export


def export_example_cache(layers):
    """What both serving steps' torch.export needs about the KV cache: (M, ts, past, past_shapes) — the dynamic
    row dim M, timestamps ts [n + m], an example cache past = (k [L, H, n, dqk], v [L, H, n, dv], past_pos [n],
    past_ts [n]) and its dynamic shapes (cached rows N >= 0)."""
    from torch.export import Dim

    layer, n, m = layers[0], EXAMPLE_PAST, EXAMPLE_ROWS
    L, H, dqk, dv = len(layers), layer.num_heads, layer.attention_dim, layer.linear_dim
    M, N = Dim("rows", min=1, max=1 << 24), Dim("past", min=0, max=1 << 24)
    ts = torch.arange(1_000_000, 1_000_000 + 100 * (n + m), 100)
    past = (torch.randn(L, H, n, dqk), torch.randn(L, H, n, dv), torch.arange(n), ts[:n])
    return M, ts, past, ({2: N}, {2: N}, {0: N}, {0: N})


def export_dense_programs(encoder, l2_norm: bool, eps: float):
    """(extend, score) ExportedPrograms of the encoder's serving step, dynamic in rows M and cached rows N."""
    M, ts, past, past_shapes = export_example_cache(encoder.layers)
    m, n = EXAMPLE_ROWS, EXAMPLE_PAST
    rows = (torch.randn(m, encoder.embedding_dim), torch.arange(n, n + m), ts[n:], ts[n:] + 50, ts[n:] + 99)
    one = (torch.tensor([n]), ts[n:n + 1], ts[n:n + 1], ts[n:n + 1])
    with torch.no_grad():
        extend = torch.export.export(DenseStep(encoder, l2_norm, False, eps).eval(), rows + past,
                                     dynamic_shapes=({0: M},) * 5 + past_shapes)
        score = torch.export.export(DenseStep(encoder, l2_norm, True, eps).eval(), (rows[0],) + one + past,
                                    dynamic_shapes=({0: M}, None, None, None, None) + past_shapes)
    return extend, score


def check_out(out: str, overwrite: bool) -> str:
    """Absolute --out; refuses an existing one unless overwrite (--force)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --force to replace it)")
    return out


def manifest_head(task: str, model: Dict[str, Any], source: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """The fields every artifact's manifest starts with."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "source": source or {}, "model": model}


def write_artifact(out: str, manifest: Dict[str, Any], config: Dict[str, Any],
                   files: Dict[str, Callable[[str], None]]) -> None:
    """Write files (name -> writer(path)), config.json/yaml and manifest.json (files: bytes + sha256) into a
    hidden temp dir next to ``out``, then rename it to ``out`` (an existing ``out`` is renamed away first and
    deleted after): a reader never sees a partial artifact."""
    import yaml

    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, write in files.items():
            write(os.path.join(tmp, name))
        with open(os.path.join(tmp, CONFIG_JSON), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, CONFIG_YAML), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        manifest["files"] = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                                    "sha256": sha256_file(os.path.join(tmp, name))} for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _records(model, table: ItemTable, n_max: int, seed: int = 0):
    """A few deterministic synthetic requests and the reference outputs (of ``model``, whose item table must
    already hold the artifact's dequantised rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sorted({1, min(7, n_max), n_max})):
        ids = torch.randint(1, model.num_items + 1, (n,), generator=g)
        ts = 1_600_000_000 + torch.randint(0, 86_400, (n,), generator=g).cumsum(0)
        qt = int(ts[-1]) + (3_600 if i % 2 else 0)
        cand = torch.randint(1, model.num_items + 1, (8,), generator=g)
        uv = reference_user_vector(model, ids, ts, qt)
        top = topk_inner_product(uv, table, RECORD_TOPK)
        out.append({"history_ids": ids, "history_timestamps": ts, "query_time": torch.tensor(qt),
                    "candidates": cand, "rank_scores": reference_rank_scores(model, ids, ts, qt, cand),
                    "user_vector": uv, "topk_ids": top.ids, "topk_scores": top.scores})
    return out


class _RowLookup(torch.nn.Module):
    """Stands in for ItemEmbeddings: ids [...] -> fp32 rows [..., D] from ``fn`` (a table on disk)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fn(ids).float()


@contextlib.contextmanager
def _item_rows_from(model, lookup: Callable[[torch.Tensor], torch.Tensor], tower):
    """``model`` with its id table replaced by ``lookup`` and its item tower by ``tower``, restored after."""
    saved = model.item_embeddings, model.item_tower
    model.item_embeddings, model.item_tower = _RowLookup(lookup), tower
    try:
        yield model
    finally:
        model.item_embeddings, model.item_tower = saved


def export_model(model, config: Dict[str, Any], out: str, *, embedding_dtype: str = "fp32",
                 source: Optional[Dict[str, str]] = None, overwrite: bool = False, item_rows: Any = None,
                 chunk_rows: int = DEFAULT_EXPORT_CHUNK_ROWS, timings: Optional[Dict[str, float]] = None,
                 vocabularies: Optional[tuple] = None) -> Dict[str, Any]:
    """Write the artifact of a RetrievalModel (HSTU) to ``out`` atomically; returns the manifest. ``item_rows``:
    a row reader of its id table [num_items + 1, D] (serving/table_stream.py; the model's table may then be on
    the meta device), default the model's own table. The item vectors are streamed ``chunk_rows`` at a time.
    ``timings``: filled with the seconds of the table files ("table_s") and of the records ("records_s").
    ``vocabularies``: (manifest entry, files) of an own-logs run (serving/vocab.py export_vocabularies)."""
    import time


    from hstu.modules.model import L2_EPS

    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"--embedding-dtype must be one of {EMBEDDING_DTYPES}, got {embedding_dtype!r}")
    if int(chunk_rows) < 1:
        raise ValueError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    mc = config["model"]
    if mc.get("arch") != "hstu" or not hasattr(model.encoder, "forward_cached"):
        raise ValueError(f"serving export supports model.arch hstu only, got {mc.get('arch')!r}")
    out = check_out(out, overwrite)
    model = model.eval()
    rows_reader = item_rows if item_rows is not None else TensorRows(model.item_embeddings.table.weight)
    num_rows, dim = int(model.num_items) + 1, int(mc["embedding_dim"])
    if tuple(rows_reader.shape) != (num_rows, dim):
        raise ValueError(f"item table rows have shape {tuple(rows_reader.shape)}, the model needs {(num_rows, dim)}")

    @torch.no_grad()
    def item_vectors(start: int, end: int) -> torch.Tensor:  # before normalisation: id rows, or the item tower's
        raw = rows_reader.read(start, end).float()
        return raw if model.item_tower is None else model.item_tower(torch.arange(start, end), raw)

    enc = model.encoder
    extend, score = export_dense_programs(enc, model.l2_norm_output, L2_EPS)
    meta_model = {k: mc[k] for k in MODEL_FIELDS}
    meta_model.update(num_items=int(model.num_items), max_seq_len=int(enc.max_seq_len))
    manifest = manifest_head("retrieval", meta_model, source)
    manifest.update({
        "programs": {"extend": {"file": EXTEND_FILE, "inputs": STEP_INPUTS, "outputs": ["enc", "k", "v"]},
                     "score": {"file": SCORE_FILE, "inputs": STEP_INPUTS, "outputs": ["enc"]}},
    })

    timings = {} if timings is None else timings

    def write_table(path: str) -> None:  # item_table.bin (+ item_scale.bin, item_factor.bin) in bounded chunks
        t0 = time.perf_counter()
        emb = write_raw_item_table(os.path.dirname(path), num_rows, dim, item_vectors, embedding_dtype,
                                   l2_norm=model.l2_norm_output, eps=L2_EPS, chunk_rows=int(chunk_rows))
        emb["quantization"] = "int8 symmetric rowwise, row = weight * scale" if embedding_dtype == "int8" else "none"
        manifest["embedding"] = emb
        timings["table_s"] = time.perf_counter() - t0

    def write_records(path: str) -> None:  # reference outputs of the model with exactly the stored rows
        t0 = time.perf_counter()
        d, emb = os.path.dirname(path), manifest["embedding"]
        table = ItemTable.open_raw(os.path.join(d, emb["file"]), embedding_dtype, num_rows, dim,
                                   scale_file=emb.get("scale_file") and os.path.join(d, emb["scale_file"]),
                                   factor_file=emb.get("factor_file") and os.path.join(d, emb["factor_file"]),
                                   l2_norm=model.l2_norm_output, eps=L2_EPS)
        with _item_rows_from(model, table.lookup, None):
            records = _records(model, table, enc.max_seq_len)
        if embedding_dtype != "fp32":  # what quantisation costs on the recorded requests, vs the fp32 model
            with _item_rows_from(model, rows_reader.take, model.item_tower):
                manifest["quantization_max_abs_rank_error"] = max(
                    float((reference_rank_scores(model, r["history_ids"], r["history_timestamps"],
                                                 int(r["query_time"]), r["candidates"]) - r["rank_scores"]).abs().max())
                    for r in records)
        torch.save(records, path)
        manifest["records"] = {"file": RECORDS_FILE, "count": len(records)}
        timings["records_s"] = time.perf_counter() - t0

    files = {EXTEND_FILE: lambda p: torch.export.save(extend, p), SCORE_FILE: lambda p: torch.export.save(score, p),
             TABLE_FILE: write_table, RECORDS_FILE: write_records}
    if model.item_tower is not None:
        manifest["item_tower"], tower_files = export_item_tower(model.item_tower, config)
        files.update(tower_files)
    if vocabularies and vocabularies[0]:  # raw ids of an own-logs run (serving/vocab.py)
        manifest["vocabularies"] = vocabularies[0]
        files.update(vocabularies[1])
    write_artifact(out, manifest, config, files)
    return manifest


def export_item_tower(tower, config: Dict[str, Any]):
    """(manifest["item_tower"], files) of a model with item features: the content program ``item_tower.pt2``
    ((id part [M, D], packed features [M, W]) -> item vectors [M, D], feature tables inside, dynamic M) and
    ``item_features.pt`` ({"values": [num_items + 1, W] int64}, the trained items' packed features, plus
    "check_packed" [K, W] / "check_vectors" [K, D]: the training tower's content-only vectors of K items)."""
    from torch.export import Dim

    from hstu.modules.item_tower import ContentStep
    from hstu.trainer.data.item_features import feature_encodings

    M = Dim("items", min=1, max=1 << 24)
    example = (torch.zeros(3, tower.dim), tower.feature_values[:3].clone())
    with torch.no_grad():
        program = torch.export.export(ContentStep(tower).eval(), example, dynamic_shapes=({0: M}, {0: M}))
    values = tower.feature_values.detach().cpu().clone()
    check = values[values.ne(0).any(1)][:8]  # a few items with features: the program must reproduce their
    with torch.no_grad():  # content-only vectors (checked by the loader's verify)
        check_vectors = tower.combine(torch.zeros(check.shape[0], tower.dim), check)
    encodings = feature_encodings(config["data"]["name"], config["model"]["item_features"],
                                  config["data"].get("events", {}).get("item_features"))
    meta = {"program": ITEM_TOWER_FILE, "values_file": ITEM_FEATURES_FILE, "combine": tower.combine_mode,
            "pooling": tower.pooling, "dim": tower.dim,
            "features": [{"name": n, "width": w, "cardinality": int(tower.tables[n].num_embeddings),
                          "encoding": encodings.get(n, "")} for n, w in zip(tower.names, tower.widths)]}
    files = {ITEM_TOWER_FILE: lambda p: torch.export.save(program, p),
             ITEM_FEATURES_FILE: lambda p: torch.save({"values": values, "check_packed": check,
                                                       "check_vectors": check_vectors}, p)}
    return meta, files


def export_run(run_dir: str, out: str, *, embedding_dtype: str = "fp32", checkpoint: Optional[str] = None,
               overwrite: bool = False, overrides: Sequence[str] = (), dataset_dir: Optional[str] = None,
               chunk_rows: int = DEFAULT_EXPORT_CHUNK_ROWS) -> Dict[str, Any]:
    """RUN_DIR (config.yaml + best.pt or a DCP checkpoint) -> artifact at ``out``; returns the manifest. The
    run's task spec (trainer/tasks/) writes it: :func:`export_retrieval_state` | export_ranking.py. A retrieval
    run's item table is never read whole: it is streamed ``chunk_rows`` rows at a time from the checkpoint.
    ``dataset_dir``: the prepared own-logs dataset whose vocabularies to copy (default: found from the run)."""

    from hstu.trainer.config import ConfigError, load_config
    from hstu.trainer.tasks import get_task

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(cfg_path, overrides)
    task = get_task(cfg)
    if cfg.model.arch != "hstu":
        raise ConfigError(f"{cfg_path}: model.arch {cfg.model.arch!r}: hstu export supports hstu only (sasrec and "
                          "dlrm have no cached serving path)")
    cfg.ops.backend = "pytorch"  # the exported programs use plain torch ops; never needs Triton
    from hstu.trainer.plain_weights import read_plain_state

    streamed = tuple(getattr(task, "streamed_export_keys", ()))  # the task's hook streams these from ckpt
    ckpt, state = read_plain_state(resolve_checkpoint(run_dir, checkpoint, cfg.checkpoint.dir or None),
                                   "hstu export", verify=False, skip=streamed)
    source = {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.abspath(ckpt), "config": cfg_path}
    if dataset_dir:
        source["dataset_dir"] = os.path.abspath(dataset_dir)
    extra = {"chunk_rows": chunk_rows} if streamed else {}
    return task.export(state, ckpt, out, embedding_dtype=embedding_dtype, overwrite=overwrite, source=source,
                       **extra)



def export_retrieval_state(cfg, state: Dict[str, torch.Tensor], ckpt: str, out: str, *,
                           embedding_dtype: str = "fp32", overwrite: bool = False,
                           source: Optional[Dict[str, str]] = None, item_rows: Any = None,
                           chunk_rows: Optional[int] = None) -> Dict[str, Any]:
    """A retrieval run's plain weights ``state`` (read from ``ckpt``) -> artifact at ``out``; returns the
    manifest (the retrieval task's export hook, trainer/tasks/retrieval.py). When ``state`` lacks the item table
    it is streamed from ``ckpt`` (or ``item_rows``, a row reader: serving/table_stream.py) ``chunk_rows`` rows at
    a time, and the model's table stays on the meta device."""
    if ITEM_KEY not in state and item_rows is None:
        from hstu.serving.table_stream import open_item_rows
        from hstu.trainer.config import ConfigError

        try:
            rows = open_item_rows(ckpt, ITEM_KEY)
        except KeyError:
            raise ConfigError(f"{ckpt}: no {ITEM_KEY} (not a RetrievalModel checkpoint?)") from None
        try:
            return export_retrieval_state(cfg, state, ckpt, out, embedding_dtype=embedding_dtype,
                                          overwrite=overwrite, source=source, item_rows=rows, chunk_rows=chunk_rows)
        finally:
            rows.close()
    chunk_rows = DEFAULT_EXPORT_CHUNK_ROWS if chunk_rows is None else chunk_rows
    from hstu.modules.embeddings import tables_on
    from hstu.modules.item_tower import features_from_state
    from hstu.modules.model import build_model
    from hstu.trainer.config import ConfigError, to_dict
    from hstu.trainer.plain_weights import check_fits

    if item_rows is None and ITEM_KEY not in state:
        raise ConfigError(f"{ckpt}: no {ITEM_KEY} (not a RetrievalModel checkpoint?)")
    shape = tuple(item_rows.shape) if item_rows is not None else tuple(state[ITEM_KEY].shape)
    layout = features_from_state(state)  # the item tower's structure comes from the checkpoint, no data is read
    if cfg.model.item_features.enabled and layout is None:
        raise ConfigError(f"{ckpt}: model.item_features.enabled=true but the checkpoint has no item_tower.*")
    with tables_on("meta" if item_rows is not None else None):
        model = build_model(cfg, int(shape[0]) - 1, layout)
    if item_rows is not None and model.item_tower is not None:  # its feature tables were built on meta too: they
        model.item_tower.to_empty(device="cpu")  # are small and come from ``state`` (load_state_dict below)
    full = dict(state)
    if item_rows is not None:
        full[ITEM_KEY] = torch.empty(shape, device="meta")
    check_fits(model.state_dict(), full, ckpt, "hstu export")
    if item_rows is None:
        model.load_state_dict(state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert list(missing) == [ITEM_KEY] and not unexpected, (missing, unexpected)  # check_fits passed
    from hstu.serving.vocab import VocabError, export_vocabularies

    try:  # before the programs: a vocabulary that does not fit the table fails fast
        vocabularies = export_vocabularies(cfg, source, model.num_items)
    except VocabError as e:
        raise ConfigError(str(e)) from None
    return export_model(model, to_dict(cfg), out, embedding_dtype=embedding_dtype, overwrite=overwrite,
                        source=source, item_rows=item_rows, chunk_rows=chunk_rows, vocabularies=vocabularies)



# ---------------------------------------------------------------------------------------------- CLI
def add_export_arguments(p) -> None:
    """Arguments of ``hstu export`` (trainer/cli.py registers the subcommand)."""
    p.add_argument("--run-dir", metavar="DIR", required=True, help="a run directory written by `hstu train`")
    p.add_argument("--out", metavar="PATH", required=True, help="artifact directory to write (atomically)")
    p.add_argument("--embedding-dtype", choices=EMBEDDING_DTYPES, default="fp32",
                   help="item table storage: fp32 | bf16 | int8 (rowwise symmetric); default fp32")
    p.add_argument("--checkpoint", metavar="best|latest|PATH", help="best (RUN_DIR/best.pt, or RUN_DIR/best/ of "
                   "checkpoint.best_format=dcp), latest (the latest DCP checkpoint, sharded or not, read unsharded "
                   "in this one process) or a state_dict file / DCP directory (default: best, else the latest "
                   "checkpoint)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_EXPORT_CHUNK_ROWS, metavar="N",
                   help="item-table rows read from the checkpoint and written per step (bounds the export's memory; "
                   f"default {DEFAULT_EXPORT_CHUNK_ROWS})")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    p.add_argument("--dataset-dir", metavar="DIR", help="data.name=events runs: the prepared dataset whose raw-id "
                   "vocabularies the artifact carries (default: the one recorded in RUN_DIR/results.json, else the "
                   "cache folder the run's config hashes to)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied on top of the saved config")


def cmd_export(args) -> int:
    """``hstu export``: print a short JSON summary of the written artifact."""
    from hstu.trainer.config import ConfigError
    from hstu.trainer.metrics_log import setup_logging

    setup_logging(None, level=logging.WARNING)  # e.g. a damaged checkpoint skipped by --checkpoint latest
    try:
        manifest = export_run(args.run_dir, args.out, embedding_dtype=args.embedding_dtype,
                              checkpoint=args.checkpoint, overwrite=args.force, overrides=args.overrides,
                              dataset_dir=getattr(args, "dataset_dir", None),
                              chunk_rows=getattr(args, "chunk_rows", DEFAULT_EXPORT_CHUNK_ROWS))
    except (FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(json.dumps({"out": os.path.abspath(args.out), "format_version": manifest["format_version"],
                      "model": manifest["model"], "embedding_dtype": manifest["embedding"]["dtype"],
                      "bytes": {k: v["bytes"] for k, v in manifest["files"].items()}}, indent=2))
    return 0
