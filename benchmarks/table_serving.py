"""The serving phase of benchmarks/table_scale.py: the large item table exported and served without 2x memory.

From the fp32 DCP checkpoint the training phases wrote (row-wise sharded over P ranks), for each embedding dtype
(``--serve-dtypes``, default fp32 int8):

1. **export** (a fresh process): a small HSTU model (embedding_dim = the table's dim, 2 layers, seeded) whose
   item table is that checkpoint's table, written by ``serving/export.py:export_model`` — the code ``hstu
   export`` runs — streaming the table ``--export-chunk-rows`` rows at a time from the per-rank DCP shards
   (serving/table_stream.py). Recorded: wall seconds, the process's peak RSS and its growth over the RSS after
   imports, artifact bytes.
2. **serve** (another fresh process): the item table alone mapped (seconds, RSS growth), then
   ``hstu.serving.load`` (no record replay, no checksums; its time and RSS are mostly the torch.export programs),
   seconds and RSS after load (anonymous / file-backed); then ``--serve-queries`` single-query exact
   top-``k`` scans of the mapped table (p50 / p99 ms, after 3 warm-up queries), a few full ``retrieve`` calls
   (encode a 20-item history + top-k), the RSS after them, and a load with sha256 checks of every file.

The artifact is deleted after each dtype unless ``--keep-checkpoints``. Run as part of table_scale.py; the
worker modes of this file are internal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ensure_hstu_importable  # noqa: E402

TABLE_SUFFIX = ".weight"  # the table_scale checkpoint's item table: model.embeddings.<table>.weight


def _status() -> Dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def _model_overrides(dim: int) -> List[str]:
    heads = 2
    return ["data.name=synthetic", "data.max_seq_len=50", f"model.embedding_dim={dim}", "model.num_layers=2",
            f"model.num_heads={heads}", f"model.attention_dim={max(4, dim // heads)}",
            f"model.linear_dim={max(4, dim // heads)}", "model.dropout=0.0"]


def export_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    from hstu.modules.embeddings import tables_on
    from hstu.modules.model import build_model
    from hstu.serving.export import export_model
    from hstu.serving.table_stream import DcpRows
    from hstu.trainer.config import load_config, to_dict

    torch.set_num_threads(spec["threads"])
    meta = dcp.FileSystemReader(spec["checkpoint"]).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.startswith("model.") and k.endswith(TABLE_SUFFIX)]
    if len(keys) != 1:
        raise ValueError(f"{spec['checkpoint']}: expected one model.*{TABLE_SUFFIX}, found {keys}")
    rows = DcpRows(spec["checkpoint"], keys[0], meta)
    cfg = load_config(None, _model_overrides(rows.shape[1]))
    torch.manual_seed(0)
    with tables_on("meta"):  # the item table is never allocated: the export reads it from the checkpoint
        model = build_model(cfg, rows.shape[0] - 1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS (after imports and the model)
    base = _status()
    t0, timings = time.perf_counter(), {}
    manifest = export_model(model, to_dict(cfg), spec["out"], embedding_dtype=spec["dtype"], item_rows=rows,
                            chunk_rows=spec["chunk_rows"], source={"checkpoint": spec["checkpoint"]},
                            timings=timings)
    seconds = time.perf_counter() - t0
    after = _status()
    files = manifest["files"]
    table_files = [manifest["embedding"][k] for k in ("file", "scale_file", "factor_file")
                   if k in manifest["embedding"]]
    return {"export_s": round(seconds, 3), "export_table_s": round(timings["table_s"], 3),
            "export_records_s": round(timings["records_s"], 3), "export_peak_rss": after["VmHWM"],
            "export_rss_base": base["VmRSS"],
            "export_peak_growth": after["VmHWM"] - base["VmRSS"],
            "shard_chunks": len(rows.chunks), "byte_range_reads": all(c["raw"] is not None for c in rows.chunks),
            "artifact_bytes": sum(v["bytes"] for v in files.values()),
            "table_files_bytes": sum(files[n]["bytes"] for n in table_files)}


def serve_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import hstu.serving
    from hstu.serving.retrieval import topk_inner_product

    from hstu.serving.artifact import _load_table

    torch.set_num_threads(spec["threads"])
    with open(os.path.join(spec["out"], "manifest.json")) as f:
        manifest = json.load(f)
    base = _status()
    t0 = time.perf_counter()
    table = _load_table(spec["out"], manifest)  # the item table alone: memory-mapped, no row read
    table_s = time.perf_counter() - t0
    mapped = _status()
    del table
    t0 = time.perf_counter()
    sm = hstu.serving.load(spec["out"], verify=False, verify_checksums=False)
    load_s = time.perf_counter() - t0
    loaded = _status()
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(spec["queries"] + 3, sm.table.dim, generator=g), dim=1)
    lat = []
    for i in range(q.shape[0]):
        t0 = time.perf_counter()
        top = topk_inner_product(q[i], sm.table, spec["k"])
        if i >= 3:
            lat.append((time.perf_counter() - t0) * 1000)
    assert top.ids.numel() == min(spec["k"], sm.num_items)
    lat.sort()
    ret = []
    for i in range(5):
        ids = torch.randint(1, sm.num_items + 1, (20,), generator=g)
        ts = 1_600_000_000 + torch.arange(20) * 3600
        t0 = time.perf_counter()
        sm.retrieve(ids, ts, spec["k"])
        ret.append((time.perf_counter() - t0) * 1000)
    queried = _status()
    t0 = time.perf_counter()
    hstu.serving.load(spec["out"], verify=False, verify_checksums=True)
    checks_s = time.perf_counter() - t0

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

    return {"table_map_s": round(table_s, 5), "table_map_rss_growth": mapped["VmRSS"] - base["VmRSS"],
            "load_s": round(load_s, 4), "rss_base": base["VmRSS"], "rss_after_load": loaded["VmRSS"],
            "rss_anon_after_load": loaded["RssAnon"], "rss_file_after_load": loaded["RssFile"],
            "load_rss_growth": loaded["VmRSS"] - base["VmRSS"], "queries": len(lat), "k": spec["k"],
            "topk_ms_p50": pct(0.5), "topk_ms_p99": pct(0.99), "topk_ms_mean": round(sum(lat) / len(lat), 3),
            "retrieve_ms_p50": round(sorted(ret)[len(ret) // 2], 3),
            "rss_after_queries": queried["VmRSS"], "rss_anon_after_queries": queried["RssAnon"],
            "load_with_checksums_s": round(checks_s, 3)}


def _run_worker(mode: str, spec: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="table_serving_") as tmp:
        spec_path, result = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MALLOC_ARENA_MAX="2")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), mode, spec_path, result], env=env,
                           capture_output=True, text=True, timeout=timeout_s)
        if p.returncode != 0 or not os.path.exists(result):
            tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
            return {"error": f"{mode}: exit {p.returncode}: {tail}"}
        with open(result) as f:
            return json.load(f)


def serving_phase(checkpoint: str, workdir: str, *, dtypes: List[str], chunk_rows: int, queries: int, k: int,
                  threads: int, keep: bool, timeout_s: float) -> Dict[str, Any]:
    """Export + serve the item table of ``checkpoint`` for each dtype (module doc); a dict for the results."""
    out: Dict[str, Any] = {"checkpoint": checkpoint, "export_chunk_rows": chunk_rows, "threads": threads,
                           "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                           "model": "HSTU 2 layers (seeded, untrained dense part) over the trained item table",
                           "runs": []}
    for dtype in dtypes:
        art = os.path.join(workdir, f"artifact_{dtype}")
        spec = {"checkpoint": checkpoint, "out": art, "dtype": dtype, "chunk_rows": chunk_rows,
                "threads": threads, "queries": queries, "k": k}
        entry: Dict[str, Any] = {"dtype": dtype, **_run_worker("--export-worker", spec, timeout_s)}
        if "error" not in entry:
            entry.update(_run_worker("--serve-worker", spec, timeout_s))
        entry["ok"] = "error" not in entry
        out["runs"].append(entry)
        if not keep:
            shutil.rmtree(art, ignore_errors=True)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


if __name__ == "__main__":
    ensure_hstu_importable()
    mode, spec_file, result_file = sys.argv[1:4]
    with open(spec_file) as fh:
        worker_spec = json.load(fh)
    res = (export_worker if mode == "--export-worker" else serve_worker)(worker_spec)
    with open(result_file, "w") as fh:
        json.dump(res, fh)
