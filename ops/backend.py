"""Kernel backend selection for every op in ``hstu.ops``: one enum, resolved once from config.

Each op is a dispatcher (``ops/<op>.py``) + a PyTorch reference (``ops/pytorch/<op>.py``) + a Triton kernel
(``ops/triton/<op>.py``, imported lazily only when :attr:`Backend.TRITON` is requested); ops with a C++ CPU kernel
(``ops/cpu/<op>.py``, JIT-built on first use) run it under :attr:`Backend.CPU` - the others run their PyTorch
reference there (the dispatchers say which).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Union


class Backend(str, Enum):
    """Which implementation an op dispatches to."""

    PYTORCH = "pytorch"
    TRITON = "triton"
    CPU = "cpu"  # C++ CPU kernels where an op has one (ops/cpu), else the PyTorch reference


BackendLike = Union["Backend", str, Any]


def resolve_backend(spec: BackendLike = None) -> Backend:
    """Backend from a :class:`Backend`, a string (``"pytorch"`` | ``"triton"`` | ``"cpu"``, any case), an ``OpsConfig``
    (has ``.backend``), a ``RunConfig`` (has ``.ops.backend``) or ``None`` (-> PYTORCH)."""
    if spec is None:
        return Backend.PYTORCH
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str):
        if hasattr(spec, "ops"):  # RunConfig
            spec = spec.ops
        if hasattr(spec, "backend"):  # OpsConfig
            return resolve_backend(spec.backend)
        raise TypeError(f"cannot resolve an ops backend from {type(spec).__name__}: {spec!r}")
    try:
        return Backend(spec.strip().lower())
    except ValueError:
        raise ValueError(f"unknown ops backend {spec!r}; expected one of {[b.value for b in Backend]}") from None
