"""benchmarks/gpu_check.py --cpu-smoke (its CPU twin): every section's code path on tiny sizes under the Triton
interpreter, from a bare copy of the checkout (what the device tool carries: no install, no hstu/<folder> links)
with torchrec / fbgemm-gpu / torchx / submitit / iopath unimportable, as on the GPU machine; a failing or
over-time section is recorded and the others still run; benchmarks/summarize.py renders the result."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from import_blocker import ROOT, bare_checkout, blocked_env  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
SECTIONS = ("kernels", "train", "attention", "activation_memory", "mfalcon")
CARRY_LIMIT = 64 * 1024 * 1024  # the device tool carries at most 64 MiB


def _run(script, args, env=None, timeout=600):
    return subprocess.run([sys.executable, script, "--cpu-smoke", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    repo, out = str(tmp / "repo"), str(tmp / "out")
    size = bare_checkout(repo)
    proc = _run(os.path.join(repo, "benchmarks", "gpu_check.py"), ["--out", out], env=blocked_env(str(tmp)))
    # default --work-dir: the copy's git-ignored runs/gpu_check; --out holds only what the device tool brings back
    return {"repo": repo, "out": out, "size": size, "proc": proc}


def _load(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def test_cpu_smoke_every_section_ok_from_bare_checkout(smoke):
    proc, out = smoke["proc"], smoke["out"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert smoke["size"] < CARRY_LIMIT
    assert sorted(os.listdir(out)) == sorted(f"{n}.json" for n in SECTIONS + ("summary",))  # <= 8 files
    assert os.path.exists(os.path.join(smoke["repo"], "runs", "gpu_check", "raw", "attention.json"))
    summary = _load(out, "summary")
    assert list(summary["sections"]) == list(SECTIONS)
    assert summary["ok"] == len(SECTIONS), summary["sections"]
    assert summary["versions"]["triton"] and summary["versions"]["triton_interpret"] == "1"
    for name in SECTIONS:
        rec = _load(out, name)
        assert rec["status"] == "ok" and rec["error"] == "", (name, rec["error"])
        assert rec["device"] == "cpu" and rec["mode"] == "cpu-smoke"
        assert {"date", "machine", "commit", "command", "versions"} <= rec.keys()
        assert rec["hstu_ops"] == os.path.join(smoke["repo"], "ops")  # the copy's code, not an installed one


def test_cpu_smoke_kernel_checks_cover_every_option(smoke):
    from gpu_sections import ATTENTION_CASES, TOLERANCE

    rows = _load(smoke["out"], "kernels")["result"]["rows"]
    got = {(r["op"], r["case"], r["dtype"]) for r in rows}
    assert {("hstu_attention", c, d) for c in ATTENTION_CASES for d in ("float32", "float16")} <= got
    assert {("norm_gating", f"{v}_dropout{p}", d) for v in ("research", "production_concat_affine")
            for p in (0.0, 0.1) for d in ("float32", "bfloat16")} <= got
    for r in rows:  # independent of the section's own verdict
        assert r["max_rel_err"] <= TOLERANCE[r["dtype"]], r
        assert len(r["errors"]) >= 3  # output + at least two gradients compared
    assert {"dpos_weights", "dtime_weights"} <= set(
        next(r for r in rows if r["case"] == "causal_all")["errors"])


def test_cpu_smoke_train_trajectories(smoke):
    res = _load(smoke["out"], "train")["result"]
    traj = res["trajectories"]
    assert set(traj) == {"pytorch_float32", "triton_float32", "pytorch_bfloat16"}
    assert all(len(v) == 3 for v in traj.values())
    for a, b in zip(traj["triton_float32"], traj["pytorch_float32"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert traj["pytorch_bfloat16"] != traj["pytorch_float32"]  # autocast really ran in bf16
    for a, b in zip(traj["pytorch_bfloat16"], traj["pytorch_float32"]):
        assert abs(a - b) <= 3e-2 * abs(b)
    assert all(r["tokens_per_s_median"] > 0 for r in res["rows"])


def test_cpu_smoke_attention_activation_mfalcon(smoke):
    att = _load(smoke["out"], "attention")["result"]
    assert att["matmul_peak"]["tflops"] > 0
    tri = [r for r in att["rows"] if r["impl"] == "hstu_jagged_triton"]
    assert tri and all(r["status"] == "skipped: no GPU" for r in tri)  # the interpreter is never timed
    sdpa = [r for r in att["rows"] if r["impl"] == "sdpa_padded"]
    assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_of_peak"] > 0 for r in sdpa)
    act = _load(smoke["out"], "activation_memory")["result"]["rows"]
    fused = [r for r in act if r["attention"] == "triton"]
    ref = [r for r in act if r["attention"] == "pytorch"]
    assert len(fused) == len(ref) == 4
    assert all(r["score_bytes_per_token"] == 0 for r in fused)  # the fused kernel saves no [L, L] scores
    assert all(r["score_bytes_per_token"] > 0 for r in ref)
    assert all(f["bytes_per_token"] < r["bytes_per_token"] for f, r in zip(fused, ref))
    mf = _load(smoke["out"], "mfalcon")["result"]
    assert mf["max_abs_error_vs_cpu_alone"] <= 1e-3 and [r["m"] for r in mf["rows"]] == [16, 64]


def test_summarize_renders_the_gpu_section(smoke, tmp_path):
    import summarize

    text = "\n".join(summarize.gpu_section(smoke["out"]))
    assert "device: **cpu**" in text and "5/5 sections ok" in text
    for name in SECTIONS:
        assert f"| {name} | ok |" in text and f"### {name}" in text
    assert "Not run yet" in "\n".join(summarize.gpu_section(str(tmp_path / "none")))


def test_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "no-such-ml-1m")
    proc = _run(os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                ["--out", out, "--sections", "train,mfalcon", "--ml1m-dir", missing, "--work-dir",
                 str(tmp_path / "work")], timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    train, mfalcon, summary = _load(out, "train"), _load(out, "mfalcon"), _load(out, "summary")
    assert train["status"] == "error" and missing in train["error"] and "not a directory" in train["error"]
    assert train["result"]["rows"][0]["run"] == "pytorch_float32"  # every variant tried and named
    assert mfalcon["status"] == "ok" and summary["ok"] == 1
    assert summary["sections"]["train"]["error"] == train["error"]


def test_section_over_its_time_cap_is_killed_and_recorded(tmp_path):
    out = str(tmp_path / "out")
    proc = _run(os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                ["--out", out, "--sections", "kernels,mfalcon", "--budget-s", "5.5", "--work-dir",
                 str(tmp_path / "work")], timeout=300)
    assert proc.returncode == 1
    kernels, mfalcon = _load(out, "kernels"), _load(out, "mfalcon")
    # killed at its cap, or stopped at its own deadline just before (then its unfinished checks are named)
    assert kernels["status"] == "error" and (kernels["error"].startswith("timed out after 5 s")
                                             or "not finished before the section's deadline" in kernels["error"])
    assert mfalcon["status"] == "error" and "budget" in mfalcon["error"]


def test_full_check_without_cuda_is_a_clear_error(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device is visible" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


def test_one_failing_check_or_variant_keeps_the_rest_of_its_section(monkeypatch, tmp_path):
    """Inside a section: a kernel option that raises (or misses its tolerance), a training variant that raises,
    are recorded as failed checks and the other checks / variants still report."""
    from types import SimpleNamespace

    import torch

    import gpu_sections as gs
    import hstu.trainer.train as train_mod

    def attention(opts, dtype, ctx):
        if opts.get("ctx"):
            raise RuntimeError("compile failed")
        return {"out": 0.0, "dq": 0.0}

    monkeypatch.setattr(gs, "check_attention", attention)
    monkeypatch.setattr(gs, "check_norm_gating", lambda concat, p, dtype, ctx: {"out": 0.5 if p else 0.0})
    ctx = SimpleNamespace(device=torch.device("cpu"), smoke=True, work=str(tmp_path), ml1m_dir="",
                          kernel_workers=0)  # in this process: the fakes above are not seen by spawned workers
    res = gs.section_kernels(ctx)
    n_ctx = sum(1 for o in gs.ATTENTION_CASES.values() if o.get("ctx"))
    assert len(res["rows"]) == 2 * len(gs.ATTENTION_CASES) + 8
    assert len(res["failed_checks"]) == 2 * n_ctx + 4 and res["summary"]["passed"] == len(res["rows"]) - 2 * n_ctx - 4
    assert sum("compile failed" in f for f in res["failed_checks"]) == 2 * n_ctx

    real_train = train_mod.train

    def train(cfg):
        if cfg.ops.backend == "triton":
            raise RuntimeError("triton variant broke")
        return real_train(cfg)

    monkeypatch.setattr(train_mod, "train", train)
    res = gs.section_train(ctx)
    assert set(res["trajectories"]) == {"pytorch_float32", "pytorch_bfloat16"}
    assert res["failed_checks"] == ["triton_float32: RuntimeError: triton variant broke"]
    assert {r["run"]: r.get("ok") for r in res["rows"]} == {"triton_float32": None, "pytorch_float32": True,
                                                           "pytorch_bfloat16": True}


def test_a_section_that_raises_writes_its_error_and_traceback(monkeypatch, tmp_path):
    import torch

    import gpu_check
    import gpu_sections

    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_sections.SECTIONS, "mfalcon", (broken, 1, 1))
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path), "--cpu-smoke", "--section", "mfalcon",
                                                "--work-dir", str(tmp_path / "work")])
    threads = torch.get_num_threads()
    try:
        assert gpu_check.run_one(args) == 0
    finally:
        torch.set_num_threads(threads)  # run_one sets 1 thread for --cpu-smoke
    rec = _load(str(tmp_path), "mfalcon")
    assert rec["status"] == "error" and rec["error"] == "RuntimeError: CUDA error: an illegal memory access was " \
                                                        "encountered"
    assert "Traceback" in rec["traceback"] and "broken" in rec["traceback"]
