"""Streamed export and the memory-mapped serving table (issue 18, deliverable 4).

- ``hstu export --chunk-rows`` of a REAL 2-process (gloo) row-wise sharded run writes, for fp32 / bf16 / int8,
  exactly the bytes of the old whole-table export (the full table read back unsharded, quantised at once);
- the memory-mapped table gives the same top-K (ids and scores, bit for bit) as the same table in memory, and a
  format-2 artifact (embeddings.pt) still loads and answers the same;
- the export's table part is bounded by the chunk: its peak RSS growth (a fresh process, VmHWM) is a fraction of
  the table, while reading the table whole (the old path) grows by at least the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(600)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=70",
    "data.synthetic.max_seq_len=10", "data.max_seq_len=10", "data.batch_size=16", "data.eval_batch_size=24",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.dropout=0.0", "loss.num_negatives=8", "optim.warmup_steps=1", "train.epochs=1", "train.max_steps=2",
    "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false", "eval.ks=[10]",
    "eval.ndcg_ks=[10]", "eval.popularity_baseline=false", "sharding.enabled=true",
    "sharding.sharding_type=row_wise", "checkpoint.every_steps=2",
]


def _train(rank: int, world: int, run_dir: str, cache: str, extra: tuple = ()) -> int:
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    train(load_config(None, CONFIG + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]))
    return rank


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    run_dir = str(root / "run")
    run_distributed(_train, 2, (run_dir, str(root / "cache")), timeout_s=240)
    return run_dir


def _whole_table_reference(run_dir: str, dtype: str):
    """The old export: every tensor read unsharded, the model built with its full table, all rows quantised at
    once (ItemTable.quantize + the table's own row factor)."""
    from hstu.modules.model import L2_EPS, build_model
    from hstu.serving.export import resolve_checkpoint
    from hstu.serving.retrieval import ItemTable
    from hstu.trainer.config import load_config
    from hstu.trainer.plain_weights import ITEM_KEY, read_plain_state

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    _, state = read_plain_state(resolve_checkpoint(run_dir, "latest"))
    model = build_model(cfg, int(state[ITEM_KEY].shape[0]) - 1)
    model.load_state_dict(state)
    with torch.no_grad():
        rows = model.embed_items(torch.arange(model.num_items + 1))
    return ItemTable.quantize(rows, dtype, l2_norm=model.l2_norm_output, eps=L2_EPS)


def test_streamed_export_of_a_column_wise_run_equals_the_whole_table_export(tmp_path):
    """Column-wise shards (every row split across the ranks' column blocks) are stitched per chunk."""
    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.serving.table_stream import open_item_rows
    from hstu.trainer.cli import main
    from hstu.trainer.plain_weights import ITEM_KEY

    run_dir = str(tmp_path / "col")
    extra = ("sharding.sharding_type=column_wise", "model.embedding_dim=16", "model.attention_dim=8",
             "model.linear_dim=8")
    run_distributed(_train, 2, (run_dir, str(tmp_path / "cache"), extra), timeout_s=240)
    rows = open_item_rows(resolve_checkpoint(run_dir, "latest"), ITEM_KEY)
    assert rows.shape == (71, 16) and len({c["col0"] for c in rows.chunks}) == 2, rows.chunks  # 2 column blocks
    rows.close()
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", run_dir, "--out", out, "--checkpoint", "latest", "--embedding-dtype",
                 "int8", "--chunk-rows", "9"]) == 0
    sm, ref = hstu.serving.load(out), _whole_table_reference(run_dir, "int8")
    for got, want in ((sm.table.weight, ref.weight), (sm.table.scale, ref.scale), (sm.table.row_factor,
                                                                                    ref.row_factor)):
        assert torch.equal(_bits(got), _bits(want))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_streamed_export_of_a_sharded_run_equals_the_whole_table_export(sharded_run, tmp_path, dtype):
    import torch.distributed.checkpoint as dcp

    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.serving.table_stream import open_item_rows
    from hstu.trainer.cli import main
    from hstu.trainer.plain_weights import ITEM_KEY

    latest = resolve_checkpoint(sharded_run, "latest")
    meta = dcp.FileSystemReader(latest).read_metadata().state_dict_metadata
    assert len(meta[[k for k in meta if k.startswith("model.") and "item_id" in k][0]].chunks) == 2  # 2 shards
    rows = open_item_rows(latest, ITEM_KEY)
    assert rows.shape == (71, 8) and all(c["raw"] is not None for c in rows.chunks)  # byte-range reads
    rows.close()

    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", sharded_run, "--out", out, "--checkpoint", "latest",
                 "--embedding-dtype", dtype, "--chunk-rows", "16"]) == 0  # 71 rows: 5 chunks, one across shards
    sm = hstu.serving.load(out)  # replays the records
    emb = sm.manifest["embedding"]
    assert emb["chunk_rows"] == 16 and emb["dtype"] == dtype and sm.manifest["format_version"] == 3
    ref = _whole_table_reference(sharded_run, dtype)
    assert torch.equal(_bits(sm.table.weight), _bits(ref.weight))
    assert (sm.table.scale is None) == (ref.scale is None)
    if ref.scale is not None:
        assert torch.equal(_bits(sm.table.scale), _bits(ref.scale))
    assert torch.equal(_bits(sm.table.row_factor), _bits(ref.row_factor))
    assert os.path.getsize(os.path.join(out, "item_table.bin")) == ref.weight.numel() * ref.weight.element_size()


def _as_format_2(art: str, dest: str) -> str:
    """A copy of a format-3 artifact rewritten the way format 2 stored the table (embeddings.pt, in memory)."""
    from hstu.serving.retrieval import ItemTable

    shutil.copytree(art, dest)
    mp = os.path.join(dest, "manifest.json")
    man = json.load(open(mp))
    emb = man["embedding"]
    table = ItemTable.open_raw(os.path.join(dest, emb["file"]), emb["dtype"], emb["rows"], emb["dim"],
                               scale_file=emb.get("scale_file") and os.path.join(dest, emb["scale_file"]),
                               factor_file=emb.get("factor_file") and os.path.join(dest, emb["factor_file"]),
                               l2_norm=man["model"]["l2_norm_output"])
    state = {"weight": table.weight.clone()} if table.scale is None else {"weight": table.weight.clone(),
                                                                           "scale": table.scale.clone()}
    torch.save(state, os.path.join(dest, "embeddings.pt"))
    for key in ("file", "scale_file", "factor_file"):
        if key in emb:
            os.remove(os.path.join(dest, emb[key]))
            man["files"].pop(emb[key])
    man["embedding"] = {"file": "embeddings.pt", "dtype": emb["dtype"], "rows": emb["rows"], "dim": emb["dim"]}
    man["files"]["embeddings.pt"] = {"bytes": os.path.getsize(os.path.join(dest, "embeddings.pt")), "sha256": ""}
    man["format_version"] = 2
    json.dump(man, open(mp, "w"))
    return dest


def _mapped_file(t: torch.Tensor):
    """The file whose mapping holds ``t``'s data (/proc/self/maps), None for anonymous memory."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
    return None


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_mapped_table_topk_equals_the_in_memory_table(sharded_run, tmp_path, dtype):
    import hstu.serving
    from hstu.serving.retrieval import ItemTable, brute_force_topk, topk_inner_product
    from hstu.trainer.cli import main

    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", sharded_run, "--out", out, "--embedding-dtype", dtype,
                 "--chunk-rows", "7"]) == 0
    sm = hstu.serving.load(out)
    mapped = sm.table
    assert _mapped_file(mapped.weight) == os.path.join(out, "item_table.bin")  # mapped, not read
    memory = ItemTable(mapped.weight.clone(), None if mapped.scale is None else mapped.scale.clone(),
                       l2_norm=mapped.l2_norm, eps=mapped.eps)  # its own row factor, computed in memory
    q = torch.randn(6, mapped.dim, generator=torch.Generator().manual_seed(3))
    for chunk in (5, 64):
        a = topk_inner_product(q, mapped, 12, chunk_size=chunk)
        b = topk_inner_product(q, memory, 12, chunk_size=chunk)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    assert torch.equal(brute_force_topk(q, mapped, 12).ids, brute_force_topk(q, memory, 12).ids)
    old = hstu.serving.load(_as_format_2(out, str(tmp_path / "v2")), verify_checksums=False)
    assert _mapped_file(old.table.weight) is None  # format 2: read into memory
    ids, ts = torch.tensor([3, 9, 27, 4]), torch.tensor([100, 200, 300, 400]) + 1_600_000_000
    r_new, r_old = sm.retrieve(ids, ts, 10), old.retrieve(ids, ts, 10)
    assert torch.equal(r_new.ids, r_old.ids) and torch.equal(r_new.scores, r_old.scores)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import torch
    from hstu.serving.table_stream import open_item_rows, write_raw_item_table
    mode, ckpt, out_dir = sys.argv[1:4]
    def kib(field):
        return int([l for l in open('/proc/self/status') if l.startswith(field + ':')][0].split()[1])
    import torch.distributed.checkpoint
    from hstu.trainer.plain_weights import _collection_key, read_plain_state
    _collection_key()  # imports torchrec: all imports done before the baseline
    open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS
    base = kib('VmRSS')
    if mode == 'stream':
        rows = open_item_rows(ckpt, 'item_embeddings.table.weight')
        write_raw_item_table(out_dir, rows.shape[0], rows.shape[1], lambda s, e: rows.read(s, e).float(), 'int8',
                             l2_norm=True, eps=1e-6, chunk_rows=4096)
    else:  # the old path: the whole table read unsharded
        _, state = read_plain_state(ckpt, verify=False)
    print(json.dumps({'growth_bytes': (kib('VmHWM') - base) * 1024}))
""")


def test_streamed_export_memory_is_bounded_by_the_chunk(tmp_path):
    """A 640k x 32 fp32 table (82 MB) saved as a DCP checkpoint: the streamed writer (4096-row chunks, int8 +
    row factor) grows the peak RSS of a fresh process by well under the table; reading it whole grows it by at
    least the table (so the measurement does see a whole-table read)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    rows, dim = 640_000, 32
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    ckpt = str(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"item_embeddings.table.weight": table}}, storage_writer=dcp.FileSystemWriter(ckpt))
    table_bytes = table.numel() * 4
    del table
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")  # no heap-threshold drift
    growth = {}
    for mode in ("stream", "whole"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, ckpt, str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[mode] = json.loads(out.stdout.strip().splitlines()[-1])["growth_bytes"]
    assert os.path.getsize(tmp_path / "item_table.bin") == rows * dim
    assert growth["whole"] >= table_bytes, growth
    assert growth["stream"] < table_bytes / 4, growth


def test_two_rank_chunked_evaluation_equals_one_process(sharded_run):
    """The 2-rank run's test-split evaluation (chunked collective lookups, no rank holding the item table)
    equals `hstu eval` of its checkpoint in one process (plain model)."""
    import math

    from hstu.trainer.cli import evaluate_run
    from hstu.trainer.metrics_log import read_metrics

    logged = read_metrics(os.path.join(sharded_run, "metrics.jsonl"), kind="eval")[-1]
    out = evaluate_run(sharded_run, [], "latest", None, None, False)
    assert out["checkpoint"].endswith(f"step_{logged['step']:08d}")
    assert out["metrics"]["num_users"] == logged["num_users"] == 48
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert math.isclose(out["metrics"][key], logged[key], rel_tol=1e-6, abs_tol=1e-9), key
