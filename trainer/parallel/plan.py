"""``hstu plan``: the sharding plan the trainer would use for a config on a given topology, without training or
allocating the tables (docs/distributed.md).

The model is built as ``train()`` builds it with ``sharding.table_init=per_shard`` (tables on the meta device,
the task's TorchRec collection around them) and planned by :func:`hstu.trainer.parallel.sharding.plan_sharding`,
the trainer's own planner path; only the topology differs: ``--world-size``, ``--nodes`` (processes per host =
world / nodes), ``--hbm-bytes`` / ``--ddr-bytes`` per rank (= sharding.hbm_cap_bytes / ddr_cap_bytes) and
``--compute-device``. Bytes are exact tensor sizes of each rank's shards: weights (``sharding.weight_dtype``)
and rowwise AdamW state (fp32 momentum1 [rows, cols] + momentum2 [rows]), on HBM or host DDR as the trainer
places them, plus the 2-bytes-per-element case (bf16 weights on HBM, state in host DDR). Beside them,
``planner_hbm`` / ``planner_ddr``: TorchRec's own per-rank estimate (shards + its input/output buffers), what it
checks against the caps.

Torch-only at import (the CLI builds its parser from this module); torchrec loads when a plan is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import torch

GIB = 1024 ** 3


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run config (default: the built-in defaults)")
    p.add_argument("--data-dir", metavar="DIR", help="raw dataset directory (= data.data_dir)")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="total processes (ranks)")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="hosts; world size must be a multiple")
    p.add_argument("--hbm-bytes", type=float, default=None, metavar="B",
                   help="per-rank device memory for the planner (default sharding.hbm_cap_bytes; e.g. 80e9)")
    p.add_argument("--ddr-bytes", type=float, default=None, metavar="B",
                   help="per-rank host memory for the planner (default sharding.ddr_cap_bytes)")
    p.add_argument("--compute-device", choices=("cuda", "cpu"), default="cuda",
                   help="device the ranks compute on (cuda: weights in HBM; cpu: everything in DDR)")
    p.add_argument("--num-items", type=int, default=None, metavar="N",
                   help="retrieval only: plan an item table of N items (+1 padding row) without loading data")
    p.add_argument("--output", metavar="FILE", help="write the plan as JSON here (default: print only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _model_with_meta_tables(cfg: Any, num_items: Optional[int]) -> torch.nn.Module:
    """The task's model with its tables on the meta device inside the task's TorchRec collection."""
    from hstu.modules.embeddings import tables_on
    from hstu.trainer.tasks import get_task

    task = get_task(cfg)
    with tables_on("meta"):
        if num_items is not None:
            build_for_items = getattr(task, "build_model_for_items", None)
            if build_for_items is None:
                raise ValueError(f"--num-items is for task=retrieval (task={task.name}: its tables come from data)")
            model = build_for_items(num_items, torch.device("cpu"))
        else:
            task.build_data(None)
            model = task.build_model(torch.device("cpu"))
    task.wrap_sharded_tables(model, cfg.sharding.weight_dtype, cfg.train.seed)
    return model


def describe_plan(plan: Any, module: torch.nn.Module, cfg: Any, world_size: int, compute_device: str
                  ) -> Dict[str, Any]:
    """ShardingPlan -> {"tables": {name: {...}}, "ranks": [{...} per rank]} with exact shard byte counts."""
    from hstu.trainer.parallel.sharding import optimizer_state_bytes

    configs = {c.name: c for m in module.modules() if hasattr(m, "embedding_configs")
               for c in m.embedding_configs()}
    wbytes = 2 if cfg.sharding.weight_dtype == "bfloat16" else 4
    cuda = compute_device == "cuda"
    state_on_hbm = cuda and cfg.sharding.state_placement == "device"
    zero = {"weights": 0, "state": 0, "hbm": 0, "ddr": 0, "bf16_host_state_hbm": 0, "bf16_host_state_ddr": 0}
    ranks: List[Dict[str, int]] = [dict(zero) for _ in range(world_size)]
    tables: Dict[str, Any] = {}
    for module_path, module_plan in sorted(plan.plan.items()):
        for name, ps in sorted(module_plan.items()):
            shards = []
            for md in ps.sharding_spec.shards:
                rows, cols = (int(x) for x in md.shard_sizes)
                rank = int(md.placement.rank())
                w, st = rows * cols * wbytes, optimizer_state_bytes(rows, cols)
                shards.append({"rank": rank, "row_offset": int(md.shard_offsets[0]),
                               "col_offset": int(md.shard_offsets[1]), "rows": rows, "cols": cols,
                               "weight_bytes": w, "state_bytes": st})
                r = ranks[rank]
                r["weights"] += w
                r["state"] += st
                r["hbm"] += (w if cuda else 0) + (st if state_on_hbm else 0)
                r["ddr"] += (0 if cuda else w) + (0 if state_on_hbm else st)
                r["bf16_host_state_hbm"] += rows * cols * 2 if cuda else 0
                r["bf16_host_state_ddr"] += st + (0 if cuda else rows * cols * 2)
            c = configs[name]
            per_rank: Dict[int, int] = {}
            for s in shards:
                per_rank[s["rank"]] = per_rank.get(s["rank"], 0) + 1
            tables[name] = {"module": module_path, "rows": c.num_embeddings, "dim": c.embedding_dim,
                            "sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                            "shards_per_rank": {str(k): v for k, v in sorted(per_rank.items())},
                            "shards": shards}
    return {"tables": tables, "ranks": [{"rank": i, **r} for i, r in enumerate(ranks)]}


def make_plan(cfg: Any, world_size: int, nodes: int = 1, compute_device: str = "cuda",
              num_items: Optional[int] = None) -> Dict[str, Any]:
    """The plan report (JSON-able) for ``cfg`` on ``world_size`` ranks over ``nodes`` hosts; see module doc."""
    from hstu.trainer.parallel.sharding import plan_sharding

    if world_size < 1 or nodes < 1 or world_size % nodes:
        raise ValueError(f"--world-size {world_size} must be >= 1 and a multiple of --nodes {nodes}")
    sharding = cfg.sharding.resolved(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                     weight_decay=cfg.optim.weight_decay)
    model = _model_with_meta_tables(cfg, num_items)
    plan, _, planner = plan_sharding(model, sharding, world_size, compute_device, world_size // nodes)
    report = describe_plan(plan, model, cfg, world_size, compute_device)
    for option in getattr(planner, "_best_plan", None) or []:  # TorchRec's estimate: shards + its I/O buffers
        for shard in option.shards:
            r = report["ranks"][shard.rank]
            r["planner_hbm"] = r.get("planner_hbm", 0) + int(shard.storage.hbm)
            r["planner_ddr"] = r.get("planner_ddr", 0) + int(shard.storage.ddr)
    dense = sum(p.numel() for n, p in model.named_parameters() if not p.is_meta)
    report["topology"] = {"world_size": world_size, "nodes": nodes, "local_world_size": world_size // nodes,
                          "compute_device": compute_device, "hbm_cap_bytes": cfg.sharding.hbm_cap_bytes or None,
                          "ddr_cap_bytes": cfg.sharding.ddr_cap_bytes or None}
    report["sharding"] = {k: getattr(cfg.sharding, k) for k in
                          ("sharding_type", "weight_dtype", "state_placement", "table_init", "batch_size")}
    # the dense tower is replicated: fp32 weights + grads + AdamW m and v = 16 bytes per parameter on every rank
    report["dense"] = {"parameters": dense, "bytes_per_rank": 16 * dense}
    return report


def format_plan(report: Dict[str, Any]) -> str:
    """Human-readable summary: one line per table, one per rank (GiB)."""
    t = report["topology"]
    lines = [f"plan: {t['world_size']} ranks on {t['nodes']} node(s), compute {t['compute_device']}, "
             f"sharding {report['sharding']['sharding_type']}, weights {report['sharding']['weight_dtype']}, "
             f"state on {report['sharding']['state_placement']}"]
    for name, tb in report["tables"].items():
        lines.append(f"  table {name}: {tb['rows']} x {tb['dim']} {tb['sharding_type']}, shards per rank "
                     f"{tb['shards_per_rank']}")
    for r in report["ranks"]:
        lines.append(f"  rank {r['rank']}: weights {r['weights'] / GIB:.3f} GiB, optimizer state "
                     f"{r['state'] / GIB:.3f} GiB -> HBM {r['hbm'] / GIB:.3f} GiB, DDR {r['ddr'] / GIB:.3f} GiB; "
                     f"bf16 weights + host state: HBM {r['bf16_host_state_hbm'] / GIB:.3f} GiB, "
                     f"DDR {r['bf16_host_state_ddr'] / GIB:.3f} GiB"
                     + (f"; planner estimate incl. I/O buffers: HBM {r['planner_hbm'] / GIB:.3f} GiB, "
                        f"DDR {r['planner_ddr'] / GIB:.3f} GiB" if "planner_hbm" in r else ""))
    lines.append(f"  dense tower (replicated): {report['dense']['parameters']} parameters, "
                 f"{report['dense']['bytes_per_rank'] / GIB:.3f} GiB per rank with AdamW")
    return "\n".join(lines)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_plan(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from hstu.trainer.config import load_config

    cfg = load_config(args.config, list(args.overrides) + ["sharding.enabled=true"])
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    for flag, value, key in (("--hbm-bytes", args.hbm_bytes, "hbm_cap_bytes"),
                             ("--ddr-bytes", args.ddr_bytes, "ddr_cap_bytes")):
        if value is not None:
            if value <= 0:
                raise ValueError(f"{flag} = {value:g}: must be > 0")
            cfg.sharding = dataclasses.replace(cfg.sharding, **{key: int(value)})
    if args.num_items is not None and args.num_items < 1:
        raise ValueError(f"--num-items = {args.num_items}: must be >= 1")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    from torchrec.distributed.planner.types import PlannerError

    try:
        report = make_plan(cfg, args.world_size, args.nodes, args.compute_device, args.num_items)
    except PlannerError as e:  # e.g. the tables do not fit the per-rank caps: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"no sharding plan fits {args.world_size} ranks with hbm_cap_bytes="
                         f"{cfg.sharding.hbm_cap_bytes or 'default'}, ddr_cap_bytes="
                         f"{cfg.sharding.ddr_cap_bytes or 'default'}: {first}") from None
    print(format_plan(report))
    if args.output:
        write_json_atomic(args.output, report)
        print(f"plan written to {args.output}")
    return 0


__all__ = ["add_plan_arguments", "cmd_plan", "describe_plan", "format_plan", "make_plan"]
