"""``silu(x).split(widths, 1)`` — the HSTU research projection's activation and split into u, v, q, k.

Dispatcher: ``Backend.CPU`` with a float32 CPU input that needs a gradient takes ops/cpu/silu_split.py (same
forward; backward in one pass over the parts' gradients, no [T, W] concatenation); every other case is the PyTorch
reference below (Triton has no kernel for it: on GPU the split's concatenation is cheap next to the rest).
x [T, W] -> tuple of views [T, w_p], sum w_p = W.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from hstu.ops.backend import Backend, BackendLike, resolve_backend


def silu_split_reference(x: torch.Tensor, widths: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """PyTorch reference: F.silu then torch.split along columns."""
    return torch.split(F.silu(x), list(widths), dim=1)


def silu_split(x: torch.Tensor, widths: Sequence[int], backend: BackendLike = Backend.PYTORCH) -> Tuple[torch.Tensor, ...]:
    """silu(x) [T, W] split into column blocks of ``widths``; see the module docstring for the backends."""
    if (resolve_backend(backend) == Backend.CPU and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.dim() == 2 and x.requires_grad and torch.is_grad_enabled()):
        from hstu.ops.cpu.silu_split import cpu_silu_split

        return cpu_silu_split(x, widths)
    return silu_split_reference(x, widths)
