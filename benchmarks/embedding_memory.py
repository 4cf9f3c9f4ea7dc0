"""Bytes per embedding element (device / host) and step time of the rowwise AdamW embedding, by placement.

Measured from the real tensors of a sharded (TorchRec DMP, 1 rank, gloo) item table:
  fp32 weights + device state | fp32 weights + host state | bf16 weights + host state | bf16 + device state,
plus plain fp32 torch Adam on an nn.Embedding for comparison (weights + exp_avg + exp_avg_sq = 12 B/element).
Step time = one forward + backward (the update is fused into backward) on CPU; on a CPU-only machine "host"
and "device" are the same DRAM, so host vs device differ only by the code path (no transfers).

    python benchmarks/embedding_memory.py [--rows 100000 --dim 64 --batch 128 --seq-len 160 --iters 20]

Timings depend on the allocator (docs/stack-notes: glibc malloc page-faults on every fresh [ids, dim] temporary);
the committed result ran with LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,
muzzy_decay_ms:-1 (recorded under "env").

Writes benchmarks/results/embedding_memory.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common import provenance, write_json  # noqa: E402

RESULT_FILE = "embedding_memory.json"


def _batches(args: argparse.Namespace, n: int) -> List[Any]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(args.seq_len // 2, args.seq_len * 3 // 2 + 1, (args.batch,), generator=g)
        ids = torch.randint(0, args.rows, (int(lengths.sum()),), generator=g)
        out.append((KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=ids, lengths=lengths), ids))
    return out


def _time_steps(step_fn: Any, batches: List[Any], warmup: int) -> Dict[str, float]:
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        step_fn(b)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"step_ms_median": round(statistics.median(times), 2), "step_ms_min": round(min(times), 2)}


def measure_rowwise(args: argparse.Namespace, weight_dtype: str, placement: str) -> Dict[str, Any]:
    from hstu.trainer.parallel.config import ShardingConfig
    from hstu.trainer.parallel.sharding import element_bytes, make_item_embedding_collection, shard_embedding_collection

    cfg = ShardingConfig(sharding_type="table_wise", weight_dtype=weight_dtype, state_placement=placement,
                         batch_size=args.batch)
    dmp = shard_embedding_collection(make_item_embedding_collection(args.rows, args.dim, weight_dtype, seed=0), cfg)

    def step(b: Any) -> None:
        out = dmp(b[0])["item_id"].values()
        out.float().square().mean().backward()

    res = {"weight_dtype": weight_dtype, "state_placement": placement, **element_bytes(dmp)}
    res.update(_time_steps(step, _batches(args, args.iters + args.warmup), args.warmup))
    return res


def measure_dense_adam(args: argparse.Namespace) -> Dict[str, Any]:
    """Plain fp32 torch.optim.Adam over an nn.Embedding (dense update of the whole table)."""
    emb = torch.nn.Embedding(args.rows, args.dim)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)

    def step(b: Any) -> None:
        opt.zero_grad(set_to_none=True)
        emb(b[1]).square().mean().backward()
        opt.step()

    timing = _time_steps(step, _batches(args, args.iters + args.warmup), args.warmup)
    tensors = [emb.weight] + [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"weight_dtype": "float32", "state_placement": "device", "device": nbytes / emb.weight.numel(),
            "host": 0.0, "elements": float(emb.weight.numel()), **timing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=160, help="mean ids per sequence (128 x 160 ~ 20k ids/step)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0 = torch default; 1 = stable timings on a shared 2-core box)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t0, load_before = time.time(), os.getloadavg()[0]
    results = {
        "rowwise_adamw": [measure_rowwise(args, wd, pl) for wd, pl in
                          [("float32", "device"), ("float32", "host"), ("bfloat16", "host"), ("bfloat16", "device")]],
        "dense_adam_fp32": measure_dense_adam(args),
    }
    dist.destroy_process_group()
    report = {
        **provenance(),  # date, machine, commit, command
        "platform": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.is_available()},
        "env": {k: os.environ.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF", "OMP_NUM_THREADS")},
        "versions": {"torch": torch.__version__, "torchrec": __import__("torchrec").__version__},
        "setup": {"rows": args.rows, "dim": args.dim, "batch": args.batch, "seq_len_mean": args.seq_len,
                  "ids_per_step_mean": args.batch * args.seq_len, "iters": args.iters, "warmup": args.warmup,
                  "world_size": 1, "sharding_type": "table_wise"},
        "notes": ["bytes are per embedding element (rows*dim) from the real tensors: weights count as device, "
                  "momentum1 [rows, dim] + momentum2 [rows] (fp32) as host or device by placement",
                  "CPU-only machine: host and device are the same DRAM; on CUDA host state is pinned host memory "
                  "mapped into the GPU (fbgemm new_unified_tensor is_host_mapped=True)",
                  "step = forward + backward with the fused update; dense_adam_fp32 = nn.Embedding + torch Adam"],
        "results": results,
        "elapsed_s": round(time.time() - t0, 1),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2),
                        "note": "shared 2-core machine: other jobs slow the timings; bytes are exact"},
    }
    path = write_json(RESULT_FILE, report)
    for r in results["rowwise_adamw"] + [results["dense_adam_fp32"]]:
        print(f"{r['weight_dtype']:>9} state={r['state_placement']:<6} device={r['device']:.4f} B/el "
              f"host={r['host']:.4f} B/el  step {r['step_ms_median']:.1f} ms")
    print("wrote", path)


if __name__ == "__main__":
    main()
