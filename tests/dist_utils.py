"""Run a function on N gloo ranks in spawned processes (free port, timeout, results back to the test).

    results = run_distributed(worker_fn, world_size=2, args=(cfg_dict,), timeout_s=120)

``worker_fn(rank, world_size, *args)`` must be a module-level function (spawn pickles it by name); it runs with
the default process group initialised (gloo, env://) and 1 intra-op thread; its return value (torch.save-able)
comes back in ``results[rank]``. A failure on any rank raises here with that rank's traceback; a hang is killed
after ``timeout_s`` and raises TimeoutError.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def find_free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: Sequence[Any], out_dir: str,
           backend: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: a rank destroying its group while a peer still talks to it can abort
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), timeout_s: float = 180,
                    backend: str = "gloo") -> List[Any]:
    """Spawn ``world_size`` ranks running ``fn(rank, world_size, *args)``; return their results by rank."""
    with tempfile.TemporaryDirectory(prefix="hstu_dist_") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, find_free_port(), tuple(args), out_dir, backend),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout_s:.0f} s")
        except ProcessException as e:
            errs = [open(os.path.join(out_dir, n)).read() for n in sorted(os.listdir(out_dir)) if n.endswith(".err")]
            raise RuntimeError("rank failed:\n" + ("\n".join(errs) or str(e))) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()  # only the ranks we spawned
                    p.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
