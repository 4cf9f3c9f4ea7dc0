"""TorchX components (launch/components.py): AppDef shape, the SLURM sbatch script (dry run, no SLURM needed),
the first-node rendezvous endpoint, and real `torchx run -s local_cwd` trainings (1x1 and 1x2 gloo, ~30 s)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hstu.launch import components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
TINY = ["data.synthetic.num_users=300", "data.synthetic.num_items=200", "data.max_seq_len=30",
        "data.synthetic.max_seq_len=30", "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8",
        "train.epochs=3", "train.max_steps=10", "train.log_every_steps=5", "train.tensorboard=false",
        "eval.ks=[1,10]", "eval.ndcg_ks=[10]", "eval.popularity_baseline=false"]


def _script(app):
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role, role.args[1]


def test_train_appdef_multi_node_gpu(tmp_path):
    app = components.train("train.epochs=3", config="configs/ml-1m/hstu.yaml", run_dir=str(tmp_path / "r"),
                           j="2x4", device="cuda", memMB=200_000, max_retries=3)
    role, script = _script(app)
    assert role.num_replicas == 2 and role.min_replicas == 2 and role.max_retries == 3
    assert role.resource.gpu == 4 and role.resource.memMB == 200_000  # gpu=-1 -> one per process
    assert "--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d" in script
    assert "RDZV_HOST=${${rank0_env}:-localhost}" in script and "scontrol show hostnames" in script
    assert ":29500" in script
    for arg in ("train.device=cuda", "train.resume=true", "sharding.enabled=true", "train.epochs=3",
                f"--run-dir {tmp_path / 'r'}", f"--config {os.path.abspath('configs/ml-1m/hstu.yaml')}"):
        assert arg in script, arg


def test_train_appdef_single_node_cpu_defaults():
    role, script = _script(components.train(j="1x1", num_threads=1))
    assert role.num_replicas == 1 and role.resource.gpu == 0 and role.max_retries == 0
    assert "RDZV_ENDPOINT=localhost:0" in script  # one node: torchrun picks a free port
    assert "train.device=cpu" in script and "sharding.enabled" not in script  # world of 1: plain path
    assert role.env["OMP_NUM_THREADS"] == "1" and "train.num_threads=1" in script
    # an explicit override wins over what the component would add
    _, script = _script(components.train("train.resume=false", "sharding.enabled=false", j="1x2"))
    assert "train.resume=true" not in script and "sharding.enabled=true" not in script
    assert "train.resume=false" in _script(components.train(resume=False))[1]
    with pytest.raises(ValueError, match="device"):
        components.train(device="tpu")
    with pytest.raises(ValueError, match="elastic"):
        components.train(j="1:2x1")


def test_eval_and_export_components(tmp_path):
    (role,) = components.eval(run_dir=str(tmp_path)).roles
    assert role.args[:4] == ["-m", "hstu.trainer.cli", "eval", "--run-dir"] and role.num_replicas == 1
    (role,) = components.export(run_dir=str(tmp_path), out=str(tmp_path / "a"), force=True).roles
    assert role.args[2:4] == ["export", "--run-dir"] and "--force" in role.args and "--out" in role.args
    # --checkpoint: the CLI's keywords pass through (they were made into paths RUN_CWD/latest), paths made absolute
    for component in (components.eval, lambda **kw: components.export(out=str(tmp_path / "a"), **kw)):
        (role,) = component(run_dir=str(tmp_path), checkpoint="latest").roles
        assert role.args[role.args.index("--checkpoint") + 1] == "latest"
        (role,) = component(run_dir=str(tmp_path), checkpoint="ckpt/step_5").roles
        assert role.args[role.args.index("--checkpoint") + 1] == os.path.abspath("ckpt/step_5")


def test_slurm_dryrun_sbatch_script(tmp_path):
    """What torchx's SLURM scheduler would submit (sbatch is not called): one het group per node, requeue."""
    from torchx.runner import get_runner

    app = components.train(j="2x1", run_dir=str(tmp_path / "r"), cpu=1, memMB=1024, max_retries=2)
    with get_runner() as runner:
        info = runner.dryrun(app, "slurm", cfg={})
    script = info.request.materialize()
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script
    assert "--requeue" in script and "TORCHX_MAX_RETRIES=2" in script and "scontrol requeue" in script
    assert "SLURM_JOB_NODELIST_HET_GROUP_0" in script  # the rank0_env macro, resolved for slurm
    assert '"$SLURM_JOB_ID"' in script  # --rdzv_id = the job id


def test_rendezvous_endpoint_is_first_node_of_the_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\n# scontrol show hostnames LIST\necho node7; echo node8\n")
    (fake / "scontrol").chmod(0o755)
    snippet = components.rendezvous_shell(2, 29511).replace("${rank0_env}", "SLURM_JOB_NODELIST_HET_GROUP_0")
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST_HET_GROUP_0": "node[7-8]"}
    out = subprocess.run(["bash", "-c", snippet + '; echo "$RDZV_ENDPOINT"'], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "node7:29511"
    out = subprocess.run(["bash", "-c", snippet + '; echo "$RDZV_ENDPOINT"'], env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "localhost:29511"  # outside SLURM, no rank0 variable


def _torchx_local(tmp_path, j, run_dir, *extra):
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    cmd = [os.path.join(VENV_BIN, "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           f"{REPO}/launch/components.py:train", "-j", j, "--run_dir", run_dir, "--num_threads", "1",
           "--config", f"{REPO}/configs/synthetic/hstu-small.yaml", "--",
           f"data.cache_dir={tmp_path / 'cache'}", *TINY, *extra]
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(shutil.which("torchx", path=VENV_BIN) is None, reason="torchx not installed in the venv")
@pytest.mark.parametrize("j", ["1x1", "1x2"])
def test_torchx_local_cwd_trains(tmp_path, j):
    run = str(tmp_path / "run")
    p = _torchx_local(tmp_path, j, run, "checkpoint.every_steps=5")
    assert p.returncode == 0 and "SUCCEEDED" in p.stderr + p.stdout, p.stderr[-3000:]
    res = json.load(open(os.path.join(run, "results.json")))
    assert res["steps"] == 10 and "ndcg@10" in res["final_metrics"]
    kinds = [json.loads(l)["kind"] for l in open(os.path.join(run, "metrics.jsonl"))]
    assert "train" in kinds and "eval" in kinds and "checkpoint" in kinds
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_00000010"
    assert f"world size {j[-1]}" in open(os.path.join(run, "train.log")).read()
