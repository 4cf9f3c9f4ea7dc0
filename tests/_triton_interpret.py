"""Shared setup of the Triton kernel tests (tests/test_ops_triton_*.py). Import it FIRST in those files.

Without CUDA, Triton kernels run only in the interpreter, and Triton decides interpreter-or-compiler when a
kernel is *decorated*, for its own library functions (tl.sigmoid, tl.rand, ...) too: TRITON_INTERPRET=1 must
be in the environment before `triton` is first imported in the process. So:
  * on a machine without CUDA this module sets TRITON_INTERPRET=1 (setdefault) when the test file is collected;
    on CPU that is the only mode Triton can run in, so later users of triton in the same process are unaffected;
    with CUDA nothing is set and the kernels are compiled for the GPU (device = "cuda");
  * if something imported triton earlier in this pytest process without the variable (another test module, a
    torch.compile run, ...), the kernels cannot run here: IN_PROCESS is False, the in-process tests skip, and
    each file's `test_subprocess_fallback` runs the file again in a fresh interpreter with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _triton_runs_in_process() -> bool:
    if ON_GPU:
        return True
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    import triton.language.random as tl_random  # noqa: F401  (imports triton: in interpreter mode if first)
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl_random.rand, InterpretedFunction)


IN_PROCESS = _triton_runs_in_process()


def run_file_in_subprocess(path: str, timeout: float = 600.0) -> None:
    """Run one test file in a fresh interpreter with TRITON_INTERPRET=1; fail with its output if it fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
