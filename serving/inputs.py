"""Argument checks shared by every serving path (in-process engines and the standalone artifact loader).

Torch + the standard library only (serving/artifact.py must not import the trainer or hstu.modules). Each check
raises a ``ValueError`` that names the argument, the offending value (and index) and the rule
(docs/serving.md, "Input rules").
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def check_k(k: Any, name: str = "k") -> int:
    """``k`` (items to return) as an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        if not (isinstance(k, torch.Tensor) and k.numel() == 1 and not k.dtype.is_floating_point):
            raise ValueError(f"{name} = {k!r} must be an integer >= 1 (the number of items to return)")
        k = int(k.item())
    if int(k) < 1:
        raise ValueError(f"{name} = {int(k)} must be >= 1 (the number of items to return)")
    return int(k)


def check_time_order(ts: torch.Tensor, name: str) -> None:
    """Timestamps [n] must be non-decreasing (events in time order); the error names the first bad index."""
    if ts.numel() > 1:
        bad = (ts[1:] < ts[:-1]).nonzero()
        if bad.numel():
            i = int(bad[0]) + 1
            raise ValueError(f"{name} must be non-decreasing (events in time order): {name}[{i}] = {int(ts[i])} "
                             f"< {name}[{i - 1}] = {int(ts[i - 1])}")


def check_append_time(ts: torch.Tensor, last: Optional[int], name: str = "timestamps") -> None:
    """New events ``ts`` [r] are in time order and none is earlier than the cached state's last event ``last``."""
    check_time_order(ts, name)
    if ts.numel() and last is not None and int(ts[0]) < int(last):
        raise ValueError(f"{name}[0] = {int(ts[0])} is earlier than the cached history's last event ({int(last)}); "
                         "events must be appended in time order")


def query_time_or(query_time: Any, default: int, name: str = "query_time") -> int:
    """``query_time`` as an int timestamp (``default`` when None); NaN, inf, fractions and non-numbers refused."""
    if query_time is None:
        return int(default)
    qt = query_time
    if isinstance(qt, torch.Tensor):
        if qt.numel() != 1:
            raise ValueError(f"{name} must be one timestamp, got a tensor of shape {tuple(qt.shape)}")
        qt = qt.item()
    if isinstance(qt, bool) or not isinstance(qt, numbers.Real):
        raise ValueError(f"{name} = {query_time!r} must be an integer timestamp")
    if isinstance(qt, numbers.Integral):
        return int(qt)
    if not math.isfinite(float(qt)) or float(qt) != math.floor(float(qt)):
        raise ValueError(f"{name} = {query_time!r} must be a finite integer timestamp")
    return int(qt)
