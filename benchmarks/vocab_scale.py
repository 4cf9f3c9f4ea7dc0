"""Raw-id vocabularies of a serving artifact at scale (issue 17; serving/vocab.py): export and lookup of a large
string item vocabulary, in bounded memory.

    python benchmarks/vocab_scale.py [--ids 10000000] [--threads 1]
    python benchmarks/vocab_scale.py --smoke [--out DIR]   # 20k ids, seconds; never the real JSON

Generates (never commits) a prepared-dataset stand-in under ``--work-dir``: ``vocab/items.parquet`` with ``--ids``
string ids (``sku-`` + 12 hex digits, ids 1..N in raw order, as ``hstu prepare`` writes them), a tiny users
vocabulary and the manifest fields export reads. Then, each in a fresh process (peak RSS = its VmHWM):

- ``export``: ``export_vocabularies`` + its writer (DuckDB, chunked, memory_limit = half of 2048 MB): seconds,
  peak RSS, artifact bytes per id;
- ``serve``: ``load_vocabularies`` (memory-mapped) and lookups: RSS after loading, median latency of mapping a
  200-id history (190 known + 10 unknown raw ids) and of mapping 100 ids back to raw ids, RSS after 200 such
  requests split into anonymous memory (RssAnon: what the process allocated) and mapped file pages (RssFile:
  the vocabulary pages lookups touched — page cache, evictable, shared between processes), peak RSS. For scale:
  a Python dict of N such strings would hold ~130 bytes per entry of anonymous memory.

Results: benchmarks/results/vocab_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, provenance, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, os, resource, sys, time
from types import SimpleNamespace
import numpy as np
sys.path.insert(0, os.environ["VOCAB_REPO"])
import hstu.serving.vocab as sv

def rss_mb(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None

mode, folder, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
n = json.load(open(os.path.join(folder, "manifest.json")))["num_items"] - 1
if mode == "export":
    cfg = SimpleNamespace(data=SimpleNamespace(name="events", events=SimpleNamespace(prepare_memory_mb=2048,
                                                                                       prepare_threads=threads)))
    t0 = time.perf_counter()
    meta, files = sv.export_vocabularies(cfg, {"dataset_dir": folder}, n + 1)
    os.makedirs(out, exist_ok=True)
    for name, write in files.items():
        write(os.path.join(out, name))
    json.dump(meta, open(os.path.join(out, "vocab-meta.json"), "w"))
    res = {"seconds": time.perf_counter() - t0, "peak_rss_mb": rss_mb("VmHWM"),
           "artifact_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".npy"))}
else:
    meta = json.load(open(os.path.join(out, "vocab-meta.json")))
    base, anon0 = rss_mb(), rss_mb("RssAnon")
    t0 = time.perf_counter()
    vocab = sv.load_vocabularies(out, {"vocabularies": meta, "model": {"num_items": n + 1}})["items"]
    load_s = time.perf_counter() - t0
    after_load = rss_mb()
    rng = np.random.default_rng(0)
    to_ids, to_raw = [], []
    for r in range(200):
        ids = rng.integers(1, n + 1, 190)
        raw = vocab.to_raw(ids) + [f"unknown-{r}-{j}" for j in range(10)]
        t = time.perf_counter(); got = vocab.to_ids(raw); to_ids.append(time.perf_counter() - t)
        assert got[:190].tolist() == ids.tolist() and (got[190:] == n + 1).all()
        t = time.perf_counter(); vocab.to_raw(ids[:100]); to_raw.append(time.perf_counter() - t)
    res = {"load_seconds": load_s, "rss_before_load_mb": base, "rss_after_load_mb": after_load,
           "anon_rss_before_load_mb": anon0, "anon_rss_after_200_requests_mb": rss_mb("RssAnon"),
           "file_rss_after_200_requests_mb": rss_mb("RssFile"),
           "rss_after_200_requests_mb": rss_mb(), "peak_rss_mb": rss_mb("VmHWM"),
           "history_200_to_ids_ms_median": float(np.median(to_ids)) * 1e3,
           "top100_to_raw_ms_median": float(np.median(to_raw)) * 1e3, "unknown_seen": vocab.unknown_seen}
print("RESULT " + json.dumps(res))
'''


def make_dataset(folder: str, n: int, threads: int) -> float:
    """vocab/items.parquet (n string ids, ids in raw order), vocab/users.parquet, manifest.json -> seconds."""
    import duckdb

    os.makedirs(os.path.join(folder, "vocab"), exist_ok=True)
    t0 = time.perf_counter()
    con = duckdb.connect(config={"memory_limit": "1GB", "temp_directory": os.path.join(folder, "spill"),
                                 **({"threads": threads} if threads else {})})
    items = os.path.join(folder, "vocab", "items.parquet")
    con.execute(f"COPY (SELECT raw, row_number() OVER (ORDER BY raw) AS id, 1 AS count FROM (SELECT DISTINCT "
                f"'sku-' || md5(i::VARCHAR)[1:12] AS raw FROM range({n}) t(i)) ORDER BY raw) TO '{items}' "
                "(FORMAT parquet)")
    kept = int(con.execute(f"SELECT count(*) FROM read_parquet('{items}')").fetchone()[0])  # md5 prefix dupes
    con.execute(f"COPY (SELECT 'u' || i AS raw, i + 1 AS id FROM range(10) t(i)) TO "
                f"'{os.path.join(folder, 'vocab', 'users.parquet')}' (FORMAT parquet)")
    con.close()
    shutil.rmtree(os.path.join(folder, "spill"), ignore_errors=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"num_items": kept + 1, "counts": {"raw_users": 10, "oov_id": kept + 1},
                   "options": {"item_ids": "vocab"}}, f)
    return time.perf_counter() - t0


def child(mode: str, folder: str, out: str, threads: int) -> dict:
    env = dict(os.environ, VOCAB_REPO=REPO, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, folder, out, str(threads)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ids", type=int, default=10_000_000)
    p.add_argument("--threads", type=int, default=1, help="DuckDB threads (0 = all cores)")
    p.add_argument("--work-dir", default="")
    p.add_argument("--smoke", action="store_true", help="20k ids; writes to --out (default: a temp dir), never "
                   "the real results")
    p.add_argument("--out", default="")
    args = p.parse_args()
    n = 20_000 if args.smoke else args.ids
    work = tempfile.mkdtemp(prefix="vocab-scale-", dir=args.work_dir or None)
    try:
        folder, art = os.path.join(work, "dataset"), os.path.join(work, "artifact")
        gen_s = make_dataset(folder, n, args.threads)
        ids = json.load(open(os.path.join(folder, "manifest.json")))["num_items"] - 1
        export = child("export", folder, art, args.threads)
        export["artifact_bytes_per_id"] = export["artifact_bytes"] / ids
        serve = child("serve", folder, art, args.threads)
        payload = {**provenance(), "ids": ids, "id_format": "sku-<12 hex digits> (16 bytes)",
                   "generate_seconds": gen_s, "export": export, "serve": serve,
                   "python_dict_estimate_mb": ids * 130 / 2**20}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or (tempfile.mkdtemp(prefix="vocab-scale-out-") if args.smoke else RESULTS_DIR)
    print(write_json("vocab_scale.json", payload, out))
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
