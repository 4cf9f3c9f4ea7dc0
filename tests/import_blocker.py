"""Subprocess helpers that prove code imports and runs WITHOUT some installed packages, from a bare checkout.

The GPU machine of docs/install.md "GPU" has torch, triton, numpy, pyyaml, tqdm, tensorboard, pyarrow — and no
torchrec, fbgemm-gpu, torchx, submitit or iopath; it receives only the checkout's files (no ``pip install -e .``,
no git-ignored ``hstu/<folder>`` links). :func:`blocked_env` makes every python process started with it (children
too) unable to import the packages; :func:`bare_checkout` copies what the device tool carries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from typing import Iterable, Sequence

OPTIONAL_DEPS = ("torchrec", "fbgemm_gpu", "torchx", "submitit", "iopath")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocker_source(blocked: Sequence[str] = OPTIONAL_DEPS) -> str:
    """Python source that installs a meta-path finder refusing ``blocked`` top-level packages (and submodules)."""
    return textwrap.dedent(f"""
        import sys

        class _BlockOptionalDeps:
            BLOCKED = {tuple(blocked)!r}

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ModuleNotFoundError("blocked for this test: " + name, name=name)
                return None

        sys.meta_path.insert(0, _BlockOptionalDeps())
    """)


def blocked_env(tmp: str, blocked: Sequence[str] = OPTIONAL_DEPS, pythonpath: Iterable[str] = ()) -> dict:
    """os.environ + PYTHONPATH = [a folder whose sitecustomize.py installs the blocker, *pythonpath]."""
    site = os.path.join(tmp, "blocker_site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(blocker_source(blocked))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([site, *pythonpath]))


def bare_checkout(dst: str, root: str = ROOT) -> int:
    """Copy the files git tracks or would track (not ignored) from root to dst — what the device tool carries;
    returns their total size in bytes."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    total = 0
    for name in filter(None, names):
        src = os.path.join(root, name)
        if os.path.islink(src) or not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, name))
        total += os.path.getsize(src)
    return total


SERVING_BLOCKED = ("hstu.trainer", "hstu.modules", "hstu.ops", "triton", "torchrec", "fbgemm_gpu")


def run_torch_only(body: str, timeout_s: int = 120) -> str:
    """Run python ``body`` in a subprocess whose imports of SERVING_BLOCKED (prefixes) fail, then print the blocked
    modules that got loaded anyway as ``LOADED [...]``; returns stdout (raises AssertionError on a failure)."""
    import sys

    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {SERVING_BLOCKED!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
    """) + textwrap.dedent(body) + '\nprint("LOADED", sorted(k for k in sys.modules if k.startswith(BLOCKED)))\n'
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
