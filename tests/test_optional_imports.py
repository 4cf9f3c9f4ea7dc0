"""The unsharded model, the ops (PyTorch and Triton), the plain trainer, M-FALCON serving and
benchmarks/gpu_check.py with everything it imports work without torchrec, fbgemm-gpu, torchx, submitit and iopath
(the GPU machine of docs/install.md "GPU" has none of them); only the sharded paths need them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_blocker import OPTIONAL_DEPS, ROOT, blocked_env  # noqa: E402

MODULES = ["hstu.ops", "hstu.ops.hstu_attention", "hstu.ops.norm_gating", "hstu.ops.jagged",
           "hstu.ops.triton.hstu_attention", "hstu.ops.triton.norm_gating", "hstu.modules.model",
           "hstu.modules.hstu", "hstu.modules.ranking", "hstu.trainer.train", "hstu.trainer.cli",
           "hstu.trainer.tasks", "hstu.serving.mfalcon", "hstu.serving.export",
           # benchmarks/gpu_check.py and what its sections import
           "gpu_check", "gpu_sections", "attention", "activation_memory", "serving", "train_throughput"]


def test_model_ops_trainer_and_gpu_check_import_and_train_without_optional_deps(tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
        import importlib
        for name in {MODULES!r}:
            importlib.import_module(name)
        from hstu.trainer.config import load_config
        from hstu.trainer.train import train
        from train_throughput import SMOKE_OVERRIDES
        # a plain run with step checkpoints: the checkpoint code's paths work without iopath
        cfg = load_config({os.path.join(ROOT, "configs/synthetic/hstu-small.yaml")!r}, SMOKE_OVERRIDES + [
            "train.max_steps=2", "train.epochs=1", "checkpoint.every_steps=1", "train.progress=false",
            "train.tensorboard=false", "data.cache_dir={tmp_path / 'cache'}", "run_dir={run_dir}"])
        result = train(cfg)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL_DEPS!r})
        import hstu.trainer.checkpoint as ckpt
        print("RESULT", json.dumps({{"steps": result.steps, "loaded": loaded, "paths": type(ckpt.pm).__name__}}))
    """)
    env = blocked_env(str(tmp_path), pythonpath=[ROOT])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out == {"steps": 2, "loaded": [], "paths": "LocalPaths"}
    names = os.listdir(run_dir / "checkpoints")
    assert "latest" in names and "step_00000002" in names, names


def test_blocker_really_blocks(tmp_path):
    """The test above could pass vacuously if the blocker did nothing: torchrec (installed here) must fail."""
    pytest.importorskip("torchrec")
    proc = subprocess.run([sys.executable, "-c", "import torchrec"], env=blocked_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked for this test: torchrec" in proc.stderr


def test_local_paths_stand_in_for_iopath(tmp_path):
    from hstu.trainer.checkpoint import LocalPaths

    pm = LocalPaths()
    d = str(tmp_path / "a" / "b")
    assert not pm.exists(d)
    pm.mkdirs(d)
    with pm.open(os.path.join(d, "x.txt"), "w") as f:
        f.write("1")
    assert pm.exists(d) and pm.ls(d) == ["x.txt"] and pm.get_local_path(d) == d
    with pytest.raises(ValueError, match=r"'manifold://bucket/ckpt' is a URI but iopath is not installed"):
        pm.exists("manifold://bucket/ckpt")
