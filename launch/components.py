"""TorchX components for the HSTU trainer: ``train`` (torchrun, nodes x processes), ``eval`` and ``export``.

Run them with the ``torchx`` CLI (the venv's ``bin`` on PATH) from the repository root::

    # here, one node, one process (local_cwd runs in the current directory with the current venv)
    torchx run -s local_cwd launch/components.py:train --config configs/synthetic/hstu-small.yaml \\
        --run_dir runs/tx-small -- train.epochs=1 train.max_steps=20

    # SLURM: 2 nodes x 8 GPUs, NCCL; re-queued up to 3 times, each attempt resumes from the latest checkpoint
    torchx run -s slurm -cfg partition=gpu,time=12:00:00 launch/components.py:train -j 2x8 --device cuda \\
        --gpu 8 --cpu 64 --memMB 480000 --max_retries 3 --config configs/ml-20m/hstu-large.yaml \\
        --run_dir /shared/runs/ml20m-large -- checkpoint.every_steps=500

How a job runs (see docs/cluster.md):

- one replica per node (torchx's SLURM scheduler: one het-group per replica, ``--ntasks-per-node=1``), each
  replica runs ONE ``torchrun`` that starts ``nproc_per_node`` trainer processes;
- rendezvous: c10d. With one node the endpoint is ``localhost:0`` (torchrun picks a free port, so jobs sharing
  a machine never collide); with several nodes it is ``<first node of the allocation>:rdzv_port``, the first
  node being the first hostname of ``$SLURM_JOB_NODELIST_HET_GROUP_0`` (``scontrol show hostnames``);
- process group backend: gloo for ``--device cpu``, nccl for ``--device cuda`` (the trainer picks it from
  ``train.device``, which ``--device`` sets; trainer/distributed.py); a world of more than one process adds
  ``sharding.enabled=true`` (the trainer's multi-process path) unless an override sets it;
- every attempt runs ``hstu train --run-dir RUN_DIR train.resume=true`` in the SAME run_dir, so a job that
  SLURM re-queues (``--max_retries``: torchx's sbatch script calls ``scontrol requeue`` after a failure; an
  admin/preemption requeue works the same) continues from the latest DCP checkpoint instead of starting over.
  The local_cwd scheduler does not retry (max_retries only matters on SLURM).

Overrides after ``--`` are the trainer's dotted ``key=value`` overrides (trainer/config.py).
``eval`` and ``export`` are thin one-process wrappers of ``hstu eval`` / ``hstu export`` (no torchrun).
"""

import os
import shlex
import sys
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import parse_nnodes
from torchx.specs import macros

DEFAULT_CONFIG = "configs/synthetic/hstu-small.yaml"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def _torchrun() -> List[str]:
    """The torchrun of the submitting interpreter's environment (venv), else the one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.path.exists(exe) else ["torchrun"]


def _trainer_has(dotted: str) -> bool:
    """True when the trainer's RunConfig has the (dotted) key — the component adapts to what the trainer has."""
    import dataclasses
    import typing

    from hstu.trainer.config import RunConfig

    cls = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return True


def _repo_root() -> str:
    # not __file__: torchx execs a file component's source with its own globals
    import hstu.launch

    return os.path.dirname(os.path.dirname(os.path.abspath(hstu.launch.__file__)))


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _checkpoint_arg(checkpoint: str) -> str:
    """``--checkpoint`` of eval / export: the keywords best | latest as they are, a path made absolute."""
    return checkpoint if checkpoint in ("best", "latest") else _abs(checkpoint)


def _config_path(config: str) -> str:
    """Absolute config path: relative to the current directory, else to the repository (configs/...)."""
    path = _abs(config)
    in_repo = os.path.join(_repo_root(), config)
    return in_repo if not os.path.exists(path) and os.path.exists(in_repo) else path


def rendezvous_shell(nnodes: int, rdzv_port: int) -> str:
    """Shell lines that set ``RDZV_ENDPOINT`` for torchrun (see the module docstring)."""
    if nnodes == 1:
        return "RDZV_ENDPOINT=localhost:0"
    # ${rank0_env} is a torchx macro: SLURM_JOB_NODELIST_HET_GROUP_0 on slurm, TORCHX_RANK0_HOST on local
    return ("RDZV_HOST=${${rank0_env}:-localhost}; "
            "if command -v scontrol >/dev/null 2>&1 && [ -n \"${SLURM_JOB_ID:-}\" ]; then "
            "RDZV_HOST=$(scontrol show hostnames \"$RDZV_HOST\" | head -n 1); fi; "
            f"RDZV_ENDPOINT=$RDZV_HOST:{rdzv_port}")


def trainer_args(config: str, run_dir: str, overrides: List[str], device: str, num_threads: int,
                 resume: bool, world_size: int) -> List[str]:
    """``hstu train`` arguments (module form) for one attempt of the job."""
    args = ["-m", "hstu.trainer.cli", "train", "--run-dir", _abs(run_dir)]
    if config:
        args += ["--config", _config_path(config)]
    keys = {o.split("=", 1)[0] for o in overrides}
    extra = []
    if "train.device" not in keys:
        extra.append(f"train.device={device}")
    if num_threads > 0 and "train.num_threads" not in keys:
        extra.append(f"train.num_threads={num_threads}")
    if "train.progress" not in keys:
        extra.append("train.progress=false")  # batch logs: no tqdm bars
    if "train.resume" not in keys and _trainer_has("train.resume"):
        extra.append(f"train.resume={'true' if resume else 'false'}")
    if world_size > 1 and "sharding.enabled" not in keys and _trainer_has("sharding.enabled"):
        extra.append("sharding.enabled=true")
    return args + extra + list(overrides)


def train(
    *overrides: str,
    config: str = DEFAULT_CONFIG,
    run_dir: str = "runs/torchx-train",
    j: str = "1x1",
    device: str = "cpu",
    cpu: int = 2,
    gpu: int = -1,
    memMB: int = 4096,
    h: Optional[str] = None,
    max_retries: int = 0,
    resume: bool = True,
    num_threads: int = 0,
    rdzv_port: int = 29500,
    name: str = "hstu-train",
    env: Optional[Dict[str, str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Train the HSTU model with torchrun on ``-j NNODESxNPROC`` (one torchrun per node, c10d rendezvous).

    Args:
        overrides: trainer overrides ``dotted.key=value`` (after ``--``), e.g. train.epochs=3 model.num_layers=4
        config: run config YAML (made absolute at submission; relative to the cwd, else to the repository)
        run_dir: the job's run directory (checkpoints, metrics.jsonl, results.json); every attempt reuses it
        j: {nnodes}x{nproc_per_node}, e.g. 1x1, 1x2 (CPU: gloo), 2x8 (GPU: one process per GPU)
        device: cpu (gloo) | cuda (nccl); sets train.device unless given as an override
        cpu: CPUs per node (SLURM --cpus-per-task)
        gpu: GPUs per node; -1 = nproc_per_node when device=cuda, else 0
        memMB: host memory per node in MB (SLURM --mem)
        h: a registered named resource (overrides cpu/gpu/memMB)
        max_retries: scheduler retries (SLURM requeues); each retry resumes from the latest checkpoint
        resume: train.resume=true: an attempt continues from run_dir's latest checkpoint (false: starts over)
        num_threads: torch intra-op threads per process (train.num_threads, OMP_NUM_THREADS); 0 = default
        rdzv_port: c10d rendezvous port on the first node (multi-node only; one node uses a free port)
        name: job name
        env: extra environment variables, e.g. NCCL_DEBUG=INFO,NCCL_SOCKET_IFNAME=ib0
        debug: set PyTorch distributed debug variables (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    if device not in BACKENDS:
        raise ValueError(f"--device must be one of {sorted(BACKENDS)}, got {device!r}")
    min_nnodes, max_nnodes, nproc, nnodes_rep = parse_nnodes(j)
    if min_nnodes != max_nnodes:
        raise ValueError(f"-j {j}: elastic node ranges are not supported (the trainer's sharding is fixed)")
    if gpu < 0:
        gpu = nproc if device == "cuda" else 0
    world = max_nnodes * nproc
    env = dict(env or {})
    env.setdefault("LOGLEVEL", os.getenv("LOGLEVEL", "WARNING"))
    if num_threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(num_threads))
    if debug:
        env.update(TORCH_DISTRIBUTED_DEBUG="DETAIL", TORCH_SHOW_CPP_STACKTRACES="1", NCCL_DEBUG="INFO")
    torchrun = _torchrun() + [
        "--nnodes", nnodes_rep, "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
        "--rdzv_id", macros.app_id, "--max_restarts", "0", "--role", "trainer",
    ]
    cmd = " ".join(shlex.quote(a) for a in torchrun) + ' --rdzv_endpoint "$RDZV_ENDPOINT" ' + " ".join(
        shlex.quote(a) for a in trainer_args(config, run_dir, list(overrides), device, num_threads, resume, world))
    script = f"set -e; {rendezvous_shell(max_nnodes, rdzv_port)}; exec {cmd}"
    return specs.AppDef(
        name=name,
        roles=[specs.Role(
            name="trainer",
            image=os.getcwd(),
            entrypoint="bash",
            args=["-c", script],
            num_replicas=max_nnodes,
            min_replicas=max_nnodes,
            resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
            env=env,
            port_map={"c10d": rdzv_port},
            max_retries=max_retries,
        )],
    )


def eval(
    run_dir: str,
    device: str = "cpu",
    checkpoint: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    name: str = "hstu-eval",
) -> specs.AppDef:
    """Full-ranking evaluation of a finished run (``hstu eval --run-dir RUN_DIR``), one process.

    Args:
        run_dir: run directory written by the train component (config.yaml + the best weights)
        device: cpu | cuda
        checkpoint: best | latest | a state_dict file or DCP checkpoint directory (default best: RUN_DIR/best.pt,
            or RUN_DIR/best/ with checkpoint.best_format=dcp)
        cpu: CPUs
        gpu: GPUs
        memMB: host memory in MB
        name: job name
    """
    args = ["-m", "hstu.trainer.cli", "eval", "--run-dir", _abs(run_dir), "--device", device]
    if checkpoint:
        args += ["--checkpoint", _checkpoint_arg(checkpoint)]
    return specs.AppDef(name=name, roles=[specs.Role(
        name="evaluator", image=os.getcwd(), entrypoint=sys.executable, args=args, num_replicas=1,
        resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB))])


def export(
    run_dir: str,
    out: str,
    embedding_dtype: str = "fp32",
    checkpoint: Optional[str] = None,
    force: bool = False,
    cpu: int = 2,
    memMB: int = 8192,
    name: str = "hstu-export",
) -> specs.AppDef:
    """Serving artifact of a finished run (``hstu export --run-dir RUN_DIR --out OUT``), one CPU process.

    Args:
        run_dir: run directory written by the train component
        out: artifact directory to write
        embedding_dtype: item table storage: fp32 | bf16 | int8
        checkpoint: best | latest | a state_dict file or DCP checkpoint directory (default: the best weights,
            RUN_DIR/best.pt or RUN_DIR/best/, else the latest checkpoint)
        force: replace an existing artifact at out
        cpu: CPUs
        memMB: host memory in MB (the item table is gathered into one process)
        name: job name
    """
    args = ["-m", "hstu.trainer.cli", "export", "--run-dir", _abs(run_dir), "--out", _abs(out),
            "--embedding-dtype", embedding_dtype]
    if checkpoint:
        args += ["--checkpoint", _checkpoint_arg(checkpoint)]
    if force:
        args.append("--force")
    return specs.AppDef(name=name, roles=[specs.Role(
        name="exporter", image=os.getcwd(), entrypoint=sys.executable, args=args, num_replicas=1,
        resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB))])
