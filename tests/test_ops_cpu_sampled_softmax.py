"""ops.backend=cpu sampled-softmax loss: the fused C++ op against the reference route (value, dq, dtable),
hand-computed value, collisions with the positive, table/ids lookups, long rows, the portable path."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from cpu_kernel_utils import vector_and_scalar_results
from hstu.modules.losses import sampled_softmax_loss
from hstu.ops.cpu.sampled_softmax import cpu_sampled_softmax_loss


def _setup(V=300, D=50, N=97, R=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(N + 1, D, generator=g), dim=-1).requires_grad_()
    seq = F.normalize(torch.randn(V, D, generator=g), dim=-1).requires_grad_()
    pos = torch.randint(1, N + 1, (V,), generator=g)
    valid = torch.rand(V, generator=g) > 0.2
    neg = torch.randint(1, N + 1, (int(valid.sum()), R), generator=g)
    neg[::3, 4] = pos[valid][::3]  # collisions with the positive: masked
    return table, seq, pos, valid, neg, N, R


def _loss_and_grads(backend, table, seq, pos, valid, neg, N, R, **kw):
    table.grad = seq.grad = None
    loss = sampled_softmax_loss(seq, pos, valid, lambda ids: table[ids], N, R, 0.05, negatives=neg,
                                backend=backend, **kw)
    loss.backward()
    return loss.detach(), seq.grad.clone(), table.grad.clone()


@pytest.mark.parametrize("D,item_lookup", [(50, "auto"), (50, "unique"), (8, "all"), (3, "unique"), (300, "all")])
def test_cpu_loss_matches_reference_route(D, item_lookup):
    args = _setup(D=D)
    ref = _loss_and_grads("pytorch", *args, item_lookup=item_lookup)
    got = _loss_and_grads("cpu", *args, item_lookup=item_lookup)
    for name, a, b in zip(["loss", "dseq", "dtable"], got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7, msg=name)
    assert got[2].abs().sum() > 0


def test_cpu_loss_hand_computed_value_and_collision_masked():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    idx = torch.tensor([[1, 2, 1], [3, 1, 2]])  # row 0's last column repeats its positive: masked
    T = 0.5
    l0 = [1.0 / T, 0.6 / T]
    l1 = [1.0 / T, 0.0 / T, 0.8 / T]
    expect = ((math.log(sum(math.exp(x) for x in l0)) - l0[0]) + (math.log(sum(math.exp(x) for x in l1)) - l1[0])) / 2
    assert cpu_sampled_softmax_loss(q, table, idx, T).item() == pytest.approx(expect, rel=1e-6)


def test_cpu_loss_given_table_and_sorted_ids():
    table, seq, pos, valid, neg, N, R = _setup()
    ids = torch.unique(torch.cat([pos[valid], neg.reshape(-1)]))
    sub = table[ids].detach().requires_grad_()
    out = []
    for backend in ("pytorch", "cpu"):
        sub.grad = seq.grad = None
        loss = sampled_softmax_loss(seq, pos, valid, None, N, R, 0.05, negatives=neg, table=sub, table_ids=ids,
                                    backend=backend)
        loss.backward()
        out.append((loss.detach(), seq.grad.clone(), sub.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("split_bytes", [64 << 20, 0], ids=["split-copies", "row-blocks"])
def test_cpu_loss_rejects_bad_rows_and_is_thread_count_independent(monkeypatch, split_bytes):
    """Both item-table gradient paths (small table: 4 fixed query ranges into their own copies; large table,
    forced here with split_bytes=0: threads own blocks of 16 rows) match the reference route and give
    bit-identical sums for 1, 2 and 3 threads."""
    import hstu.ops.cpu.sampled_softmax as ss

    monkeypatch.setattr(ss, "SPLIT_BYTES", split_bytes)
    q = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_sampled_softmax_loss(q, torch.randn(3, 5), torch.tensor([[0, 1], [2, 3], [0, 0], [1, 1]]), 1.0)
    args = _setup(V=2000, N=197)
    ref = _loss_and_grads("pytorch", *args)
    threads = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            res.append(_loss_and_grads("cpu", *args))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(["loss", "dseq", "dtable"], res[0], ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7, msg=name)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.equal(a, b)  # fixed split / row-owned sums: bit-identical for any thread count


def test_cpu_loss_portable_path_matches(tmp_path):
    vec, sca = vector_and_scalar_results(
        "from test_ops_cpu_sampled_softmax import _setup, _loss_and_grads\n"
        "torch.save(_loss_and_grads('cpu', *_setup(D=37)), OUT)\n", tmp_path)
    for a, b in zip(vec, sca):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def test_stale_build_lock_is_removed_and_fresh_one_kept(tmp_path):
    import time

    from hstu.ops.cpu import build

    lock = tmp_path / "lock"
    lock.write_text("")
    build._clear_stale_lock(str(tmp_path))  # fresh: another process may be building right now
    assert lock.exists()
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale C\\+\\+ build lock"):
        build._clear_stale_lock(str(tmp_path))
    assert not lock.exists()


def test_sampled_softmax_benchmark_quick_writes_both_paths(tmp_path):
    """benchmarks/sampled_softmax.py --quick (no baseline build): a row per path and case, the paths agree."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sampled_softmax.py")
    spec = importlib.util.spec_from_file_location("bench_sampled_softmax", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payload = bench.main(["--quick", "--baseline", "", "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "sampled_softmax.json") as f:
        assert json.load(f)["rows"] == payload["rows"]
    for key in ("date", "machine", "commit", "command"):
        assert payload[key]
    impls = {(r["case"], r["impl"]) for r in payload["rows"]}
    # the small table runs both paths; the large one only the row blocks (its copies would not fit)
    assert impls == {("tiny", "split_copies"), ("tiny", "row_blocks"), ("tiny-large", "row_blocks")}
    for r in payload["rows"]:
        assert r["backward_wall_ms"] > 0 and r["forward_wall_ms"] > 0
        assert r["max_abs_diff_dq"] == 0.0  # dq does not depend on the table-gradient path
        assert r["max_abs_diff_dtable"] < 1e-6


def test_second_checkout_reuses_the_cached_kernel(tmp_path):
    """Two checkouts with the same kernel sources build once: the sources are staged by content hash, so torch's
    JIT sees the same paths and flags (before, a git worktree or fresh clone rebuilt every kernel on first use)."""
    import shutil
    import subprocess
    import sys

    from hstu.ops.cpu import build

    checkouts = []
    for name in ("a", "b"):
        d = tmp_path / name / "csrc"
        shutil.copytree(build.CSRC, d)
        checkouts.append(str(d))
    staged = [build.stage_sources([os.path.join(c, "silu_split_cpu.cpp"), os.path.join(c, "vec_math.h")],
                                  str(tmp_path / "stage" / "same")) for c in checkouts]
    assert staged[0] == staged[1] and sorted(os.listdir(staged[0])) == ["silu_split_cpu.cpp", "vec_math.h"]
    script = ("import sys, os, glob\nfrom hstu.ops.cpu import build\nbuild.CSRC = sys.argv[1]\n"
              "m = build.load_kernel('silu_split_cpu')\nlib = os.path.realpath(m.__file__)\n"
              "print(lib, os.stat(lib).st_mtime_ns)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    libs = []
    for c in checkouts:
        out = subprocess.run([sys.executable, "-c", script, c], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        libs.append(out.stdout.strip().splitlines()[-1])
    assert libs[0] == libs[1]  # the same library, not rebuilt (same path and modification time) for the second checkout
    builds = [d for d in os.listdir(tmp_path / "ext") if d.startswith("hstu_silu_split_cpu")]
    assert len(builds) == 1, builds
