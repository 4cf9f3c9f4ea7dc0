"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard scalars and python logging to train.log.

metrics.jsonl lines carry a ``kind`` field:
- ``"train"``: step, epoch, loss, lr, tokens_per_second, ...
- ``"eval"``: the TEST split: step, epoch, metric names as in evaluate.py ("hr@10", "ndcg@10", "mrr",
  "num_users"), split, is_best (this evaluation is the selected one so far); TensorBoard ``eval/<metric>``
- ``"valid"``: the same for the validation split (retrieval), TensorBoard ``valid/<metric>``
- ``"baseline"``: most-popular baseline metrics; ``"best"``: best-epoch record; ``"error"``: why training stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

LOGGER_NAME = "hstu"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # tensors / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


def setup_logging(run_dir: Optional[str], level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """Logger "hstu" writing to run_dir/train.log (and stderr); handlers from a previous call are replaced."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    return logger


class MetricsLogger:
    """Appends JSON lines to run_dir/metrics.jsonl and mirrors numeric fields to TensorBoard (``<kind>/<name>``).

    ``enabled=False`` (ranks other than 0) writes nothing; ``purge_step`` (a resumed run) drops TensorBoard
    events at steps >= it that an interrupted run had written."""

    def __init__(self, run_dir: str, tensorboard: bool = True, enabled: bool = True,
                 purge_step: Optional[int] = None) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: importing tensorboard takes ~1 s

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

    def log(self, kind: str, step: int, **fields: Any) -> Dict[str, Any]:
        """Write one line {"kind", "step", "time", **fields}; returns the written record."""
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        if self._file is None:
            return record
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))
        return record

    def log_train(self, step: int, epoch: int, loss: float, **fields: Any) -> Dict[str, Any]:
        return self.log("train", step, epoch=epoch, loss=loss, **fields)

    def log_eval(self, step: int, epoch: int, metrics: Dict[str, Any], **fields: Any) -> Dict[str, Any]:
        return self.log("eval", step, epoch=epoch, **metrics, **fields)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """Parse a metrics.jsonl (optionally only lines of one ``kind``)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
