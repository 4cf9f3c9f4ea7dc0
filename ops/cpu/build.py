"""JIT build of the C++ CPU kernels in ``ops/cpu/csrc`` (torch.utils.cpp_extension, cached per machine).

The first call compiles (~30-60 s on 2 cores; needs a C++ compiler and ninja - ``make install`` pins the ninja
wheel); later processes load the cached library (named by a hash of the sources and headers) from ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). A source change rebuilds. Concurrent processes (torchrun ranks) wait on
torch's build lock. AVX2/FMA code is chosen at run time, so one build serves every x86-64 CPU. OpenMP: the
kernels split rows with ``at::parallel_for`` on torch's own thread pool (``torch.set_num_threads``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
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


def load_kernel(name: str) -> ModuleType:
    """The compiled module of ``csrc/<name>.cpp`` (built once per process, cached on disk across processes).

    Raises RuntimeError naming the source file and the fix when no compiler / ninja is available."""
    if name in _LOADED:
        return _LOADED[name]
    from torch.utils import cpp_extension

    src = os.path.join(CSRC, f"{name}.cpp")
    digest = hashlib.sha256()  # the headers too: torch's own rebuild check hashes only the listed sources
    for path in [src] + sorted(glob.glob(os.path.join(CSRC, "*.h"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    _ninja_on_path()
    try:
        module = cpp_extension.load(name=f"hstu_{name}_{digest.hexdigest()[:12]}", sources=[src],
                                     extra_include_paths=[CSRC], extra_cflags=["-O3", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler / ninja, or a build error
        raise RuntimeError(f"ops.backend=cpu: building the C++ kernel {src} failed ({str(e).splitlines()[0]}); "
                           f"install a C++ compiler and ninja (`make install`), or set ops.backend=pytorch") from e
    _LOADED[name] = module
    return module
