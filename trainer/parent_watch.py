"""Workers die with their launcher (docs/reliability.md, "No orphan workers").

``hstu train --nproc-per-node N`` runs the torchrun agent inside the launcher process and the agent starts the N
training processes as its children. When the launcher is killed with SIGKILL the agent cannot stop them, and
they would train to the end with nobody watching. :func:`die_with_parent` (called by every torchrun-launched
``hstu`` process) makes the kernel send SIGKILL when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``) and,
as a second line (other platforms, or a parent thread that exits), starts a daemon thread that polls the parent
pid and kills this process once it changes. Checkpoints are written to a temporary name and renamed, so being
killed at any moment leaves the newest complete checkpoint to resume from.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Optional

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
_started = False


def _set_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) via libc; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc / prctl
        return False


def _watch(parent: int, poll_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(poll_s):
        if os.getppid() != parent:  # reparented: the launcher is gone
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: Optional[int] = None, poll_s: float = POLL_SECONDS) -> None:
    """Kill this process (SIGKILL) as soon as its parent process ``parent`` (default: the current parent) dies.
    Idempotent; a parent that is already gone kills this process at once."""
    global _started
    if _started:
        return
    parent = os.getppid() if parent is None else int(parent)
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent, poll_s), name="hstu-parent-watch", daemon=True).start()
    _started = True
