"""An item table larger than any one process: per-rank memory under an enforced cap, DCP save/load, resharding.

For each world size P (``--worlds``, default 2 4) and each placement (fp32 weights + state beside them;
bf16 weights + host state), P processes (gloo, one thread each) build the item table [rows, dim] on the meta
device and let DMP materialise and initialise only their row-wise shards (``sharding.table_init=per_shard``
path: trainer/parallel/table_init.py), train ``--steps`` steps of random ids (forward + backward with the fused
rowwise AdamW) and save a checkpoint with the trainer's CheckpointManager (DCP files + sha256 manifest + atomic
rename). Each fp32 checkpoint is then loaded by a fresh set of processes at the other world size (2 -> 4, 4 -> 2)
into a meta-initialised table; the float64 sums of weights and optimizer state over all ranks must equal the
saving run's (no rank ever holds the full table). Last, one kill: at the largest world size rank 0 is SIGKILLed
inside a second save (DCP files written, before the rename); the restart resolves the newest checkpoint that
verifies and must load the first save's table and state exactly. Then the serving phase
(benchmarks/table_serving.py): the fp32 checkpoint of the largest world size is exported per dtype
(``--serve-dtypes``) by the streaming export, in ``--export-chunk-rows`` chunks, and served from the
memory-mapped table: export seconds and peak RSS, artifact bytes, load seconds, RSS after load, top-K latency.

Memory cap: RLIMIT_AS, set by each rank after its imports and process-group start to (its address space then)
+ 1.3 x its theoretical shard (weights + rowwise AdamW state) + ``--overhead-mib``. Why RLIMIT_AS: it needs no
privileges and is per process; the cgroup (v1) memory hierarchy of this machine belongs to the sandbox that runs
it. It caps virtual memory, a superset of what is resident, so it is stricter than an RSS cap for the same
number; an allocation past it fails with an error (recorded) instead of swapping. Recorded per rank: peak RSS
(VmHWM, reset between phases) of init, train, save and load, vs the theoretical shard size.

    python benchmarks/table_scale.py                       # 25M x 64 (~13 GB with state), 100 steps: hours here
    python benchmarks/table_scale.py --smoke --out /tmp/x  # seconds: what the test suite runs
    python benchmarks/table_scale.py --serve-only --worlds 2 --steps 10  # the serving phase alone: one fp32
                          # training launch writes its checkpoint; replaces "serving" in the existing results file
    python benchmarks/table_scale.py --serve-only --serve-from STEP_DIR  # ... on a kept fp32 checkpoint

Writes benchmarks/results/table_scale.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, ensure_hstu_importable, provenance, write_json  # noqa: E402

RESULT_FILE = "table_scale.json"
PLACEMENTS = {"fp32_device_state": ("float32", "device"), "bf16_host_state": ("bfloat16", "host")}
SMOKE = {"rows": 20_000, "dim": 16, "steps": 5, "ids_per_step": 256, "worlds": [1, 2], "serve_queries": 20,
         "export_chunk_rows": 4096}


def find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux clear_refs 5), so each phase has its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _shard_bytes(rows: int, dim: int, world: int, rank: int, weight_bytes: int) -> Dict[str, int]:
    """Theoretical row-wise shard of ``rank``: TorchRec blocks of ceil(rows / world) rows."""
    block = math.ceil(rows / world)
    local = max(0, min(block, rows - block * rank))
    return {"rows": local, "weights": local * dim * weight_bytes, "state": local * (dim + 1) * 4}


def _build(spec: Dict[str, Any], env: Any) -> Any:
    """The meta-device item table, sharded row-wise by the trainer's planner path, initialised per shard."""
    import torch

    from hstu.trainer.parallel.config import ShardingConfig
    from hstu.trainer.parallel.sharding import TABLE_NAME, make_item_embedding_collection, shard_embedding_collection
    from hstu.trainer.parallel.table_init import seeded_init_fn

    dtype, placement = spec["weight_dtype"], spec["state_placement"]
    ec = make_item_embedding_collection(spec["rows"], spec["dim"], dtype, torch.device("meta"),
                                        init_fn=seeded_init_fn(spec["seed"], TABLE_NAME))
    cfg = ShardingConfig(enabled=True, sharding_type="row_wise", weight_dtype=dtype, state_placement=placement)
    return shard_embedding_collection(ec, cfg, device=env.device)


def _sums(dmp: Any) -> Dict[str, float]:
    """float64 sums over ALL ranks of the table and its optimizer state (collective)."""
    import torch
    import torch.distributed as dist

    from hstu.trainer.parallel.sharding import rowwise_kernels

    def total(x: Any, block: int = 1 << 22) -> float:  # in blocks: a float64 copy of a shard breaks the cap
        flat = x.reshape(-1)
        return sum(float(flat[i:i + block].double().sum()) for i in range(0, flat.numel(), block))

    e = [k.emb_module for k in rowwise_kernels(dmp)]
    t = torch.tensor([sum(total(x.weights) for x in e), sum(total(x.momentum1) for x in e),
                      sum(total(x.momentum2) for x in e)], dtype=torch.float64)
    dist.all_reduce(t)
    return {"weights": float(t[0]), "momentum1": float(t[1]), "momentum2": float(t[2])}


def _manager(dmp: Any, env: Any, ckpt_dir: str, progress: Any) -> Any:
    from hstu.trainer.checkpoint_manager import DCP, META, AttributeState, CheckpointManager

    return (CheckpointManager(env, ckpt_dir, keep_last=1).register("model", dmp, DCP)
            .register("sparse_optim", dmp.fused_optimizer, DCP)
            .register("progress", AttributeState(progress, ("step",)), META, flat=True))


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One rank (RANK / WORLD_SIZE / MASTER_* in the environment): build -> train -> save, or build -> load."""
    import torch
    import torch.distributed as dist

    import hstu.trainer.checkpoint_manager  # noqa: F401 - imported before the base RSS is read
    import hstu.trainer.parallel.sharding  # noqa: F401
    from hstu.trainer import distributed as hd

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = hd.DistEnv(rank, world, rank, torch.device("cpu"), True, False)
    wbytes = 2 if spec["weight_dtype"] == "bfloat16" else 4
    shard = _shard_bytes(spec["rows"], spec["dim"], world, rank, wbytes)
    base_vm, base_rss = _status_kib("VmSize") * 1024, _status_kib("VmRSS") * 1024
    cap = base_vm + int(1.3 * (shard["weights"] + shard["state"])) + spec["overhead_mib"] * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out: Dict[str, Any] = {"rank": rank, "shard": shard, "rss_base": base_rss, "vm_base": base_vm,
                           "cap_as_bytes": cap, "cap_above_base": cap - base_vm, "peak_rss": {}, "seconds": {}}

    def phase(name: str, fn: Any) -> Any:
        _reset_peak()
        t0 = time.perf_counter()
        result = fn()
        dist.barrier()
        out["seconds"][name] = round(time.perf_counter() - t0, 3)
        out["peak_rss"][name] = _status_kib("VmHWM") * 1024
        return result

    dmp = phase("init", lambda: _build(spec, env))
    progress = type("Progress", (), {"step": 0})()
    if spec["role"] == "train":
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        gen = torch.Generator().manual_seed(1000 + rank)

        def train() -> None:
            for _ in range(spec["steps"]):
                n = spec["ids_per_step"]
                ids = torch.randint(1, spec["rows"], (n,), generator=gen)
                kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.tensor([n // 2, n - n // 2]))
                vals = dmp(kjt)["item_id"].values().float()
                (vals * torch.randn(vals.shape, generator=gen)).sum().backward()
                progress.step += 1

        phase("train", train)
        out["sums"] = _sums(dmp)
        manager = _manager(dmp, env, spec["ckpt_dir"], progress)
        out["checkpoint"] = phase("save", lambda: manager.save(progress.step))
        if spec.get("kill_in_second_save"):  # train on, then rank 0 dies inside the next save (before rename)
            with open(spec["result"] + ".partial", "w") as f:
                json.dump(out, f)
            train()
            from hstu.trainer import checkpoint as ckpt

            ckpt._crash_point = lambda stage: (rank == 0 and stage == "before_rename"
                                               and os.kill(os.getpid(), signal.SIGKILL))
            manager.save(progress.step)
            raise RuntimeError("the injected kill did not happen")
    else:
        load_from = spec["load_from"]
        if load_from == "resume":  # what a restarted run does: the newest checkpoint that verifies
            from hstu.trainer import checkpoint as ckpt

            load_from = ckpt.resolve_resume(spec["ckpt_dir"]).path
            out["resumed_from"] = os.path.basename(load_from or "")
        meta = phase("load", lambda: _manager(dmp, env, "", progress).load(load_from))
        out["loaded_step"] = int(meta["step"])
        out["sums"] = _sums(dmp)
    dist.destroy_process_group()
    return out


def launch(spec: Dict[str, Any], world: int, timeout_s: float) -> List[Dict[str, Any]]:
    """Run ``world`` worker processes of this script with ``spec``; their results by rank (an error dict for a
    rank that failed). When one rank dies the others are killed (as torchrun's agent does), not left waiting
    in a collective; ``partial``: what a rank wrote before it died."""
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="table_scale_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        procs, logs = [], []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
            logs.append(open(os.path.join(tmp, f"rank{rank}.log"), "w+"))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path,
                                           "--result", os.path.join(tmp, f"rank{rank}.json")], env=env,
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()  # only the ranks this call started
                        p.wait()
                break
            time.sleep(0.2)
        results = []
        for rank, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{rank}.json")
            partial = path + ".partial"
            if p.returncode == 0 and os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
                continue
            logs[rank].seek(0)
            tail = logs[rank].read().strip().splitlines()[-3:]
            entry: Dict[str, Any] = {"rank": rank, "error": f"exit {p.returncode}: " + " | ".join(tail)}
            if os.path.exists(partial):
                with open(partial) as f:
                    entry["partial"] = json.load(f)
            results.append(entry)
        for log_file in logs:
            log_file.close()
        return results


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _summary(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Worst rank's peak RSS over (theoretical shard + its base RSS); goal <= 1.3."""
    ok = [r for r in results if "error" not in r]
    if len(ok) != len(results):
        return {"ok": False, "errors": [r["error"] for r in results if "error" in r]}
    ratios = [max(r["peak_rss"].values()) / (r["shard"]["weights"] + r["shard"]["state"] + r["rss_base"])
              for r in ok]
    return {"ok": True, "max_peak_rss": max(max(r["peak_rss"].values()) for r in ok),
            "max_peak_over_shard_plus_base": round(max(ratios), 3)}


def _kill_and_resume(args: argparse.Namespace, workdir: str, world: int) -> Dict[str, Any]:
    """fp32 run at ``world``: save at ``steps``, train ``steps`` more, SIGKILL rank 0 inside the second save
    (after the DCP files, before the rename); a restart resolves the newest verified checkpoint and must load the
    first save's table and state exactly."""
    dtype, placement = PLACEMENTS["fp32_device_state"]
    base = {"rows": args.rows, "dim": args.dim, "steps": args.steps, "ids_per_step": args.ids_per_step, "seed": 0,
            "weight_dtype": dtype, "state_placement": placement, "overhead_mib": args.overhead_mib,
            "ckpt_dir": os.path.join(workdir, f"kill_w{world}")}
    killed = launch({**base, "role": "train", "kill_in_second_save": True}, world, args.timeout_s)
    first = killed[0].get("partial")
    out: Dict[str, Any] = {"world_size": world, "rank0_exit": killed[0].get("error", "").split(":")[0],
                           "killed": "exit -9" in killed[0].get("error", "")}
    if first is None or not out["killed"]:
        return {**out, "ok": False, "errors": [r.get("error", "") for r in killed]}
    resumed = launch({**base, "role": "load", "load_from": "resume", "seed": 2}, world, args.timeout_s)
    out.update(_summary(resumed))
    if out["ok"]:
        out["resumed_from"] = resumed[0]["resumed_from"]
        out["resumed_step"] = resumed[0]["loaded_step"]
        out["sums_equal_last_good_save"] = all(
            math.isclose(resumed[0]["sums"][k], first["sums"][k], rel_tol=1e-9, abs_tol=1e-6) for k in first["sums"])
        out["load_s"] = max(r["seconds"]["load"] for r in resumed)
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    workdir = args.workdir or tempfile.mkdtemp(prefix="table_scale_ckpt_")
    table_total = {k: args.rows * args.dim * (2 if v[0] == "bfloat16" else 4) + args.rows * (args.dim + 1) * 4
                   for k, v in PLACEMENTS.items()}
    runs: List[Dict[str, Any]] = []
    reloads: List[Dict[str, Any]] = []
    kill_resume: Dict[str, Any] = {}
    serving: Dict[str, Any] = {}
    try:
        for world in args.worlds:
            for name, (dtype, placement) in PLACEMENTS.items():
                if name not in args.placements:
                    continue
                ckpt_dir = os.path.join(workdir, f"w{world}_{name}")
                spec = {"role": "train", "rows": args.rows, "dim": args.dim, "steps": args.steps, "seed": 0,
                        "ids_per_step": args.ids_per_step, "weight_dtype": dtype, "state_placement": placement,
                        "overhead_mib": args.overhead_mib, "ckpt_dir": ckpt_dir}
                t0 = time.perf_counter()
                res = launch(spec, world, args.timeout_s)
                entry = {"world_size": world, "placement": name, "wall_s": round(time.perf_counter() - t0, 1),
                         "table_bytes_with_state": table_total[name], "ranks": res, **_summary(res)}
                if entry["ok"]:
                    path = res[0]["checkpoint"]
                    entry["checkpoint_bytes"] = _dir_bytes(path)
                    save_s = max(r["seconds"]["save"] for r in res)
                    entry["save_gb_per_s"] = round(entry["checkpoint_bytes"] / 1e9 / save_s, 3)
                    entry["cap_below_table"] = all(r["cap_above_base"] < table_total[name] for r in res)
                    entry["checkpoint"] = path
                runs.append(entry)
        for saved in [r for r in runs if r["ok"] and r["placement"] == "fp32_device_state"]:
            others = [w for w in args.worlds if w != saved["world_size"]]
            for world in others[:1]:
                dtype, placement = PLACEMENTS["fp32_device_state"]
                spec = {"role": "load", "rows": args.rows, "dim": args.dim, "seed": 1, "weight_dtype": dtype,
                        "state_placement": placement, "overhead_mib": args.overhead_mib,
                        "load_from": saved["checkpoint"]}
                res = launch(spec, world, args.timeout_s)
                entry = {"from_world_size": saved["world_size"], "to_world_size": world, "ranks": res,
                         **_summary(res)}
                if entry["ok"]:
                    load_s = max(r["seconds"]["load"] for r in res)
                    entry["load_gb_per_s"] = round(saved["checkpoint_bytes"] / 1e9 / load_s, 3)
                    want = saved["ranks"][0]["sums"]
                    entry["sums_equal_saved"] = all(
                        math.isclose(res[0]["sums"][k], want[k], rel_tol=1e-9, abs_tol=1e-6) for k in want)
                    entry["loaded_step"] = res[0]["loaded_step"]
                reloads.append(entry)
        kill_resume = _kill_and_resume(args, workdir, args.worlds[-1])
        fp32 = [r for r in runs if r["ok"] and r["placement"] == "fp32_device_state"]
        if fp32 and args.serve_dtypes:
            from table_serving import serving_phase

            saved = max(fp32, key=lambda r: r["world_size"])
            serving = serving_phase(saved["checkpoint"], workdir, dtypes=args.serve_dtypes,
                                    chunk_rows=args.export_chunk_rows, queries=args.serve_queries, k=args.serve_k,
                                    threads=args.serve_threads, keep=args.keep_checkpoints, timeout_s=args.timeout_s)
            serving["from_world_size"] = saved["world_size"]
    finally:
        if not args.keep_checkpoints:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": args.rows, "dim": args.dim, "steps": args.steps, "ids_per_step": args.ids_per_step,
            "cap": "RLIMIT_AS per rank = address space after startup + 1.3 x shard + overhead_mib",
            "overhead_mib": args.overhead_mib, "runs": runs, "reloads": reloads, "kill_resume": kill_resume,
            "serving": serving}


def _serve_only(args: argparse.Namespace) -> Dict[str, Any]:
    """--serve-only: the serving phase alone, merged into the existing results file (its other phases kept), on
    --serve-from or on the checkpoint of one fp32 training launch at --worlds[0] (removed after)."""
    from table_serving import serving_phase

    path = os.path.join(args.out or RESULTS_DIR, RESULT_FILE)
    payload: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    workdir = args.workdir or tempfile.mkdtemp(prefix="table_serving_")
    try:
        source, world = args.serve_from, None
        if not source:
            world = args.worlds[0]
            dtype, placement = PLACEMENTS["fp32_device_state"]
            spec = {"role": "train", "rows": args.rows, "dim": args.dim, "steps": args.steps, "seed": 0,
                    "ids_per_step": args.ids_per_step, "weight_dtype": dtype, "state_placement": placement,
                    "overhead_mib": args.overhead_mib, "ckpt_dir": os.path.join(workdir, f"w{world}_serve")}
            res = launch(spec, world, args.timeout_s)
            if not _summary(res)["ok"]:
                raise RuntimeError(f"the fp32 training launch failed: {_summary(res)['errors']}")
            source = res[0]["checkpoint"]
        serving = serving_phase(os.path.abspath(source), workdir, dtypes=args.serve_dtypes,
                                chunk_rows=args.export_chunk_rows, queries=args.serve_queries, k=args.serve_k,
                                threads=args.serve_threads, keep=args.keep_checkpoints, timeout_s=args.timeout_s)
    finally:
        if not args.keep_checkpoints and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    payload["serving"] = {**serving, "provenance": provenance(), "from_world_size": world}
    if world is not None:
        payload["serving"].update(rows=args.rows, dim=args.dim, steps=args.steps)
    path = write_json(RESULT_FILE, payload, args.out)
    print(f"wrote {path}")
    return payload


def main(argv: List[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=25_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ids-per-step", type=int, default=8192, help="ids looked up per rank and step")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS),
                   help="trained placements (the reloads and the kill use fp32_device_state)")
    p.add_argument("--overhead-mib", type=int, default=768, help="fixed per-rank allowance above 1.3 x shard")
    p.add_argument("--timeout-s", type=float, default=6 * 3600, help="per launch")
    p.add_argument("--workdir", help="checkpoint directory (default a temp dir, removed unless --keep-checkpoints)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--serve-dtypes", nargs="*", default=["fp32", "int8"], choices=["fp32", "bf16", "int8"],
                   help="serving phase: artifact dtypes exported and served (none: skip the phase)")
    p.add_argument("--export-chunk-rows", type=int, default=1 << 18, help="rows per streamed export chunk")
    p.add_argument("--serve-queries", type=int, default=100, help="single-query top-k scans timed per dtype")
    p.add_argument("--serve-k", type=int, default=10)
    p.add_argument("--serve-threads", type=int, default=1, help="torch threads of the export / serving process")
    p.add_argument("--serve-only", action="store_true", help="run only the serving phase (on --serve-from, else on "
                   "one fp32 training launch at the first --worlds) and replace the \"serving\" entry of the "
                   "results file, keeping its other phases")
    p.add_argument("--serve-from", metavar="STEP_DIR", help="with --serve-only: a kept fp32 checkpoint step directory")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes for the test suite: {SMOKE}")
    p.add_argument("--out", default="", help="results directory (default benchmarks/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ensure_hstu_importable()
    if args.worker:
        with open(args.worker) as f:
            result = worker({**json.load(f), "result": args.result})
        with open(args.result, "w") as f:
            json.dump(result, f)
        return result
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.serve_only:
        return _serve_only(args)
    payload = {**provenance(), "smoke": args.smoke, **run(args)}
    path = write_json(RESULT_FILE, payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
