"""The run directory's lifecycle around one training run (docs/reliability.md): where it is, whether the run
resumes, preparing it, and when a previous run's files are finally dropped or put back.

``resume_point`` (all ranks agree on rank 0's run_dir and resume checkpoint) → ``start`` (rank 0 prepares the
run_dir: a fresh run stashes a previous run's files, a resumed one rewinds metrics.jsonl; config.yaml; train.log)
→ ``commit`` once the run has its own checkpoint or result (the stashed previous run is deleted) — or, when the
run fails before that, ``restore_previous`` (run_dir.py) puts the previous run back. ``EarlyLog`` keeps what is
logged before train.log exists. File-level mechanics: trainer/run_dir.py; checkpoints: trainer/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

from hstu.trainer import checkpoint as ckpt
from hstu.trainer import distributed as hd
from hstu.trainer import run_dir as rd
from hstu.trainer.config import RunConfig, save_config
from hstu.trainer.metrics_log import setup_logging

log = logging.getLogger("hstu")


def resolve_run_dir(cfg: RunConfig) -> RunConfig:
    """Copy of cfg whose run_dir is set (default runs/<data.name>-<arch>-<timestamp>)."""
    if cfg.run_dir:
        return cfg
    return dataclasses.replace(cfg, run_dir=rd.default_run_dir(f"{cfg.data.name}-{cfg.model.arch}"))


class EarlyLog:
    """Console logging before the run directory exists; ``replay()`` writes the records it buffered into the
    train.log that ``start`` opened (the console already showed them)."""

    class _Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records = []  # kept when setup_logging closes this handler

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    def __init__(self, env: hd.DistEnv) -> None:
        setup_logging(None, level=logging.INFO if env.is_main else logging.WARNING)
        self.collect = self._Collect()
        log.addHandler(self.collect)

    def replay(self) -> None:
        for h in (h for h in log.handlers if isinstance(h, logging.FileHandler)):
            for record in self.collect.records:
                h.handle(record)


def resume_point(cfg: RunConfig, env: hd.DistEnv):
    """Rank 0's run_dir for all ranks and its resume decision. Returns (cfg, checkpoint path to resume from or
    None, the Resolution behind it). Reads only, except that a previous-run swap a kill interrupted is finished
    first (run_dir.recover). The checkpoint is the newest that verifies (trainer/integrity.py), found by
    scanning; when checkpoints exist but none verifies, every rank raises the same one-line CheckpointError."""
    cfg = dataclasses.replace(cfg, run_dir=env.broadcast_object(resolve_run_dir(cfg).run_dir))
    found: Any = None
    if env.is_main:
        ckpt_dir = ckpt.checkpoint_dir(cfg)
        if os.path.isdir(cfg.run_dir):
            done = rd.recover(cfg.run_dir, ckpt_dir)
            if done:
                log.warning("run_dir %s: an interrupted replacement of a previous run was %s", cfg.run_dir,
                            "completed" if done == "committed" else "undone (the previous run is back)")
        if cfg.train.resume:
            try:
                found = ckpt.resolve_resume(ckpt_dir)
            except ckpt.CheckpointError as e:
                found = e
    found = env.broadcast_object(found)
    if isinstance(found, Exception):
        raise ckpt.CheckpointError(f"{found} — nothing was deleted; repair them, or start over with "
                                   "train.resume=false (the old run is kept until the new one has a checkpoint)")
    if found is not None and env.is_main:
        found.warn()
    return cfg, (found.path if found is not None else None), found


def start(cfg: RunConfig, env: hd.DistEnv, resume_from: Optional[str], found: Any = None) -> None:
    """run_dir / checkpoint dir preparation (rank 0), config.yaml, train.log. A fresh run moves a previous
    run's files aside (run_dir.stash_previous); they are deleted once this run has a checkpoint or result."""
    ckpt_dir = ckpt.checkpoint_dir(cfg)
    moved, damaged = [], []
    if env.is_main:
        moved = rd.prepare_run_dir(cfg.run_dir, keep=resume_from is not None, ckpt_dir=ckpt_dir)
        ckpt.clean_dir(ckpt_dir)
        if resume_from:  # what the resumed run logs again is dropped
            if found is not None and found.skipped:
                damaged = ckpt.set_aside(ckpt_dir, found.skipped)
            ckpt.rewind_metrics(os.path.join(cfg.run_dir, rd.METRICS_FILE), ckpt.checkpoint_step(resume_from))
        save_config(cfg, os.path.join(cfg.run_dir, rd.CONFIG_FILE))
    env.barrier()
    setup_logging(cfg.run_dir if env.is_main else None, level=logging.INFO if env.is_main else logging.WARNING)
    if moved:
        log.warning("run_dir %s held a previous run: its %s moved to %s until this run has a checkpoint or result",
                    cfg.run_dir, ", ".join(moved), rd.PREVIOUS)
    for path in damaged:
        log.warning("unusable checkpoint kept as %s (not resumed from, never pruned)", path)


def commit(cfg: RunConfig, env: hd.DistEnv) -> None:
    """Rank 0, once this run has its own checkpoint or result: drop a stashed previous run."""
    if env.is_main and rd.commit_run(cfg.run_dir, ckpt.checkpoint_dir(cfg)):
        log.info("previous run's files in %s removed (this run has a checkpoint or result now)", cfg.run_dir)
