"""``hstu`` command line: ``hstu prepare | train | eval | export | sweep | plan`` (see ``hstu --help``).

Config errors and data errors print one line ``hstu: error: ...`` and exit with status 2 (no traceback);
a non-finite training loss exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence

import torch

from hstu.trainer import run_dir as rd
from hstu.trainer.config import ConfigError, RunConfig, load_config

EXIT_USAGE = 2


def _user_error_types() -> tuple:
    """Errors caused by the command line, config or input files: printed as one ``hstu: error:`` line, exit 2.
    ValueError covers ConfigError and the argument checks of the modules (they name the argument and the rule)."""
    types: tuple = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
    try:
        from hstu.trainer.data.errors import DataError

        types += (DataError,)
    except ImportError:  # pragma: no cover - data package not installed
        pass
    return types


def _sections_epilog() -> str:
    lines = ["config sections (override any field as dotted.key=value, value parsed as YAML):"]
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        section = getattr(defaults, f.name)
        if dataclasses.is_dataclass(section):
            doc = (type(section).__doc__ or "").strip().splitlines()
            keys = textwrap.fill("keys: " + ", ".join(x.name for x in dataclasses.fields(section)), width=110,
                                 initial_indent=" " * 10, subsequent_indent=" " * 16)
            lines.append(f"  {f.name:<7} {doc[0] if doc else ''}\n{keys}")
    lines.append("  run_dir output directory (also --run-dir)")
    lines.append("examples:\n  hstu train --config configs/ml-1m/hstu.yaml --data-dir ~/data/ml-1m train.epochs=3"
                 "\n  hstu eval --run-dir runs/ml-1m-hstu-20260101-120000"
                 "\n  hstu prepare --config configs/ml-1m/base.yaml --data-dir ~/data/ml-1m")
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser, with_run_dir: bool) -> None:
    p.add_argument("--config", metavar="YAML", help="run config file (e.g. configs/ml-1m/hstu.yaml); "
                   "without it the built-in defaults (synthetic data) are used")
    p.add_argument("--data-dir", metavar="DIR", help="directory with the raw dataset files (= data.data_dir)")
    if with_run_dir:
        p.add_argument("--run-dir", metavar="DIR", help="output directory (= run_dir; default "
                       "runs/<config-name>-<timestamp>); a previous run there is replaced")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.epochs=3 model.num_layers=4 data.batch_size=64")


def build_parser() -> argparse.ArgumentParser:
    """The ``hstu`` argument parser (subcommands prepare, train, eval)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hstu", formatter_class=fmt, epilog=_sections_epilog(),
        description="HSTU generative-recommender trainer: prepare data, train a retrieval model (HSTU or SASRec) "
                    "with sampled softmax, and evaluate it by full ranking over all items (HR@K, NDCG@K, MRR).")
    sub = parser.add_subparsers(dest="command", metavar="{prepare,train,eval,sweep,export,plan}")
    sub.required = True

    p = sub.add_parser("prepare", formatter_class=fmt, epilog=_sections_epilog(),
                       help="load/preprocess a dataset into the cache and print a summary",
                       description="Read the raw dataset (or generate the synthetic one), build per-user sequences, "
                                   "cache them in data.cache_dir and print a summary (users, items, events, lengths).")
    _add_config_args(p, with_run_dir=False)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", formatter_class=fmt, epilog=_sections_epilog(),
                       help="train a model; writes config.yaml, metrics.jsonl, best.pt, results.json",
                       description="Train as configured. The run directory receives config.yaml (resolved config), "
                                   "metrics.jsonl, train.log, tensorboard/, best.pt (best epoch by "
                                   "eval.selection_metric) and results.json.")
    _add_config_args(p, with_run_dir=True)
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of a metrics table")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train with N processes on this machine: re-launches itself under torch.distributed.run "
                        "(= torchrun --standalone --nproc_per_node=N -m hstu.trainer.cli train ...); N > 1 "
                        "needs sharding.enabled=true (docs/distributed.md)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", formatter_class=fmt, epilog=_sections_epilog(),
                       help="full-ranking evaluation of a trained run (config.yaml + best.pt)",
                       description="Load RUN_DIR/config.yaml and the checkpoint, rebuild the data and the model, "
                                   "rank every user's held-out item against all items and print the metrics as "
                                   "JSON (also written to RUN_DIR/eval.json unless --output is given).")
    p.add_argument("--run-dir", metavar="DIR", required=True, help="a run directory written by `hstu train`")
    p.add_argument("--checkpoint", metavar="best|latest|PATH",
                   help="best (RUN_DIR/best.pt or, checkpoint.best_format=dcp, RUN_DIR/best/; the default), latest "
                        "(the newest checkpoint in checkpoint.dir that verifies) or a state_dict file / DCP "
                        "checkpoint directory; always verified")
    p.add_argument("--data-dir", metavar="DIR", help="raw dataset directory, if it moved since training")
    p.add_argument("--device", metavar="DEV", help="cpu | cuda[:N] (default: the run's train.device)")
    p.add_argument("--output", metavar="FILE", help="where to write the metrics JSON (default RUN_DIR/eval.json)")
    p.add_argument("--baseline", action="store_true",
                   help="also evaluate the task's baseline (retrieval: most-popular, ranking: item rate)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied on top of the saved config, e.g. eval.remove_history=false")
    p.set_defaults(func=cmd_eval)

    from hstu.serving import export as export_mod  # torch-only until an export runs

    p = sub.add_parser("export", formatter_class=fmt, help="write a serving artifact of a trained run",
                       description=export_mod.__doc__)
    export_mod.add_export_arguments(p)
    p.set_defaults(func=export_mod.cmd_export)

    from hstu.trainer.parallel import plan as plan_mod  # torch-only until a plan is made

    p = sub.add_parser("plan", formatter_class=fmt, help="print/write the sharding plan the trainer would use on a "
                       "topology (no training, no table allocation)", description=plan_mod.__doc__)
    plan_mod.add_plan_arguments(p)
    p.set_defaults(func=plan_mod.cmd_plan)

    from hstu.launch import sweep as sweep_mod  # light import (submitit/matplotlib load when a sweep runs)

    p = sub.add_parser("sweep", formatter_class=fmt, help="hyper-parameter sweep from a YAML spec (submitit)",
                       description=sweep_mod.__doc__)
    sweep_mod.add_sweep_arguments(p)
    p.set_defaults(func=sweep_mod.cmd_sweep)
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, args.overrides)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    return cfg


def cmd_prepare(args: argparse.Namespace) -> int:
    from hstu.trainer.data import summary_lines
    from hstu.trainer.tasks import get_task

    cfg = _load(args)
    summary = get_task(cfg).prepare(progress=cfg.train.progress)  # the task's cache entry + files it reads
    print("\n".join(summary_lines(summary)))
    return 0


LAUNCHER_PID_ENV = "HSTU_LAUNCHER_PID"  # set by relaunch(): the process that runs the torchrun agent


def _watch_launcher() -> None:
    """Kill this worker when its parent (the torchrun agent; with --nproc-per-node, the ``hstu`` launcher) dies."""
    from hstu.trainer.parent_watch import die_with_parent

    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if launcher and launcher != os.getppid():
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:  # the launcher died before this worker got here
            print(f"hstu: error: launcher process {launcher} is gone; stopping", file=sys.stderr)
            os._exit(1)
        except PermissionError:
            pass
        launcher = 0  # alive but not our parent: an agent in between; watch the direct parent
    die_with_parent(launcher or None)


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def relaunch(args: argparse.Namespace, run_dir: str) -> int:
    """Run this ``hstu train`` command line in ``args.nproc_per_node`` processes (torch.distributed.run)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest, skip = [], False
    for a in args.argv:  # drop --nproc-per-node (and its value) from the forwarded command line
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    if not args.run_dir:  # every rank must use the same run_dir (not one timestamp per process)
        rest = rest[:1] + ["--run-dir", run_dir] + rest[1:]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # workers die with this process (trainer/parent_watch.py)
    try:
        torchrun.main(["--standalone", f"--nproc_per_node={args.nproc_per_node}", "-m", "hstu.trainer.cli",
                       *rest])
    except ChildFailedError as e:
        print(f"hstu: error: a training process failed: {e}", file=sys.stderr)
        return 1
    return 0


def check_run_dir_path(run_dir: str) -> None:
    """The run directory must be a directory or not exist yet, and its parent must not be a file."""
    path = os.path.abspath(os.path.expanduser(run_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--run-dir / run_dir = {run_dir!r} is an existing file, not a directory")
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:  # the nearest existing ancestor
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"--run-dir / run_dir = {run_dir!r}: {parent} is a file, not a directory")


def cmd_train(args: argparse.Namespace) -> int:
    from hstu.trainer.train import train

    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node = {args.nproc_per_node} must be >= 1 (processes on this machine)")
    cfg = _load(args)
    cfg.run_dir = args.run_dir or cfg.run_dir or rd.default_run_dir(rd.config_name(args.config))
    check_run_dir_path(cfg.run_dir)
    if args.nproc_per_node and not _launched_by_torchrun():
        if args.nproc_per_node > 1 and not cfg.sharding.enabled:
            raise ConfigError(f"--nproc-per-node {args.nproc_per_node} needs sharding.enabled=true (the plain "
                              "nn.Embedding path is single-process; see docs/distributed.md)")
        return relaunch(args, cfg.run_dir)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result.to_dict()))
    return 0


def format_result(result: Dict[str, Any]) -> str:
    """A compact metrics table: at the selected epoch the selection split's (validation) and the test metrics,
    the test metrics at the final epoch, and the task's baseline (most-popular for retrieval, per-item rate for
    ranking) on the test split."""
    best, final, base = result["best_metrics"], result["final_metrics"], result.get("baseline_metrics") or {}
    valid = (result.get("selected") or {}).get("validation") or {}
    final_epoch = (result.get("final") or {}).get("epoch", result.get("epochs_run"))
    fmt = lambda x: f"{x:.4f}" if x is not None else "-"  # noqa: E731
    cols = [f"valid @{result['best_epoch']}"] if valid else []
    cols += [f"test @{result['best_epoch']}", f"test final @{final_epoch}", "baseline"]
    lines = [f"{'metric':<10}" + "".join(f"{c:>16}" for c in cols)]
    for name in best:
        if name == "num_users":
            continue
        cells = ([valid.get(name)] if valid else []) + [best[name], final.get(name), base.get(name)]
        lines.append(f"{name:<10}" + "".join(f"{fmt(c):>16}" for c in cells))
    lines.append(f"epoch {result['best_epoch']} selected on {result.get('select_on', 'test')} "
                 f"{result['selection_metric']}; baseline on test")
    lines.append(f"{result['epochs_run']} epochs, {result['steps']} steps, {result['train_seconds']:.1f} s training, "
                 f"{result['tokens_per_second']:,.0f} tokens/s; run dir {result['run_dir']} (results.json)")
    return "\n".join(lines)


def load_trained_run(run_dir: str, overrides: Sequence[str] = (), checkpoint: Optional[str] = None,
                     data_dir: Optional[str] = None, device: Optional[str] = None, purpose: str = "hstu eval"):
    """(cfg, task with its data built, model with the run's weights on cfg.train.device, checkpoint path) of a
    trained run directory: RUN_DIR/config.yaml + ``overrides``, the checkpoint resolved as ``--checkpoint`` says
    (best | latest | a path; verified, damaged newer ones skipped) and its shapes checked against the model."""
    from hstu.trainer.tasks import get_task

    cfg_path = os.path.join(run_dir, rd.CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{run_dir} is not a run directory (no {rd.CONFIG_FILE})")
    cfg = load_config(cfg_path, overrides)
    if data_dir:
        cfg.data.data_dir = data_dir
    if device:
        cfg.train.device = device
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    from hstu.trainer.integrity import resolve_run_checkpoint
    from hstu.trainer.plain_weights import check_fits, read_plain_state

    ckpt, state = read_plain_state(resolve_run_checkpoint(run_dir, checkpoint, cfg.checkpoint.dir or None),
                                   purpose, verify=False)
    dev = torch.device(cfg.train.device)
    task = get_task(cfg)
    task.build_data()
    model = task.build_model(dev)
    check_fits(model.state_dict(), state, ckpt, purpose)
    model.load_state_dict(state)
    return cfg, task, model.to(dev), ckpt


def evaluate_run(run_dir: str, overrides: Sequence[str] = (), checkpoint: Optional[str] = None,
                 data_dir: Optional[str] = None, device: Optional[str] = None,
                 baseline: bool = False) -> Dict[str, Any]:
    """Evaluate a trained run on its test split: {"metrics": {...}, "baseline": {...}?, "checkpoint", "run_dir"}
    (the run's task spec, trainer/tasks/, builds its data and model, evaluates and computes the baseline)."""
    cfg, task, model, ckpt = load_trained_run(run_dir, overrides, checkpoint, data_dir, device)
    out: Dict[str, Any] = {"run_dir": run_dir, "checkpoint": ckpt,
                           "metrics": task.evaluate(model, torch.device(cfg.train.device))}
    if baseline:
        out["baseline"] = task.baseline_metrics()
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    import logging

    from hstu.trainer.metrics_log import setup_logging

    setup_logging(None, level=logging.WARNING)  # e.g. a damaged checkpoint skipped by --checkpoint latest
    out = evaluate_run(args.run_dir, args.overrides, args.checkpoint, args.data_dir, args.device, args.baseline)
    rd.write_json(out, args.output or os.path.join(args.run_dir, "eval.json"))
    print(json.dumps(out, indent=2))
    return 0


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (its type named when it is not one of ours)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ConfigError) or type(e).__module__.startswith("hstu") else \
        f"{type(e).__name__}: {text}"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``hstu`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: die with the agent/launcher (no orphans)
        _watch_launcher()
    try:
        return int(args.func(args) or 0)
    except _user_error_types() as e:
        print(f"hstu: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hstu: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from hstu.trainer.train import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"hstu: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
