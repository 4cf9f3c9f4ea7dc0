"""JIT build of the C++ CPU kernels in ``ops/cpu/csrc`` (torch.utils.cpp_extension, cached per machine).

The first call compiles (~30-60 s on 2 cores; needs a C++ compiler and ninja - ``make install`` pins the ninja
wheel); later processes load the cached library (named by a hash of the sources and headers) from ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). A source change rebuilds; another checkout of the same sources does not (they are
built from a copy named by their hash: ``stage_sources``). Concurrent processes (torchrun ranks) wait on
torch's build lock. AVX2/FMA code is chosen at run time, so one build serves every x86-64 CPU. OpenMP: the
kernels split rows with ``at::parallel_for`` on torch's own thread pool (``torch.set_num_threads``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import time
import warnings
from types import ModuleType
from typing import Dict

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_LOADED: Dict[str, ModuleType] = {}


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pinned wheel installs it next to this interpreter."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel (requirements/cpu.txt)

        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for d in candidates:
        if os.path.exists(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


STALE_LOCK_SECONDS = 900  # a build takes < 2 min; a lock this old was left by a killed process


def _clear_stale_lock(build_dir: str) -> None:
    """torch waits forever on the ``lock`` file of a build another process started; a process killed while
    building leaves it behind. Remove it when it is older than any real build (with a warning naming it)."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"removing a stale C++ build lock {lock} ({age / 60:.0f} min old, left by a killed build)")
        try:
            os.remove(lock)
        except OSError:
            pass


def stage_sources(files, folder: str) -> str:
    """Copy a kernel's source and headers into ``folder`` (named by their content hash) once; returns it.

    torch's JIT build records the absolute source and include paths, so building from the checkout itself made a
    second checkout (a git worktree, the benchmark's baseline tree, a fresh clone) rebuild every kernel on first
    use (~2.5 min on 2 cores, counted in the first epoch). The same content now always builds from the same paths
    and the cached library is reused. Written to a temporary folder and renamed: concurrent processes (torchrun
    ranks) never see a half-copied folder."""
    if os.path.isdir(folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for path in files:
        shutil.copy2(path, tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process staged it first (same content)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_kernel(name: str) -> ModuleType:
    """The compiled module of ``csrc/<name>.cpp`` (built once per process, cached on disk across processes).

    Raises RuntimeError naming the source file and the fix when no compiler / ninja is available."""
    if name in _LOADED:
        return _LOADED[name]
    from torch.utils import cpp_extension

    src = os.path.join(CSRC, f"{name}.cpp")
    files = [src] + sorted(glob.glob(os.path.join(CSRC, "*.h")))
    digest = hashlib.sha256()  # the headers too: torch's own rebuild check hashes only the listed sources
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    _ninja_on_path()
    name_hash = f"hstu_{name}_{digest.hexdigest()[:12]}"
    build_dir = cpp_extension._get_build_directory(name_hash, verbose=False)
    _clear_stale_lock(build_dir)
    staged = stage_sources(files, os.path.join(os.path.dirname(build_dir), "hstu_sources", name_hash))
    try:
        module = cpp_extension.load(name=name_hash, sources=[os.path.join(staged, os.path.basename(src))],
                                     extra_include_paths=[staged], extra_cflags=["-O3", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler / ninja, or a build error
        raise RuntimeError(f"ops.backend=cpu: building the C++ kernel {src} failed ({str(e).splitlines()[0]}); "
                           f"install a C++ compiler and ninja (`make install`), or set ops.backend=pytorch") from e
    _LOADED[name] = module
    return module
