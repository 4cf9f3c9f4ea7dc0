"""Scaling-law study on synthetic data: final train loss (and HR@10) vs training FLOPs, power-law fit.

    python benchmarks/scaling.py            # full study (~5 min on 2 CPU cores, 1 thread)
    python benchmarks/scaling.py --quick    # 3 tiny points (tests), --out DIR keeps the repo's files untouched

A grid over model width D (embedding_dim), depth (num_layers) and history length L (data.max_seq_len), each
trained for the same number of steps on the same synthetic data (1 thread). For every run: training FLOPs by
the formula of docs/scaling.md (:func:`train_flops_per_batch`, "useful" FLOPs: causal triangle only), the mean
train loss of the last ``--tail`` steps, and full-ranking HR@10 / NDCG@10 after training. Fit: least squares
of log(loss) on log(C) — loss ≈ a·C^b — over all points and over the compute frontier (points no cheaper run
beats). Writes benchmarks/results/scaling.json (points, fits, provenance) and docs/scaling.png.

The formula is checked against torch.utils.flop_counter.FlopCounterMode on one real train step in
tests/test_scaling.py (mode="executed" reproduces what the PyTorch CPU path runs: length-grouped padded
attention squares and the loss route actually taken).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["data.name=synthetic", "data.synthetic.num_users=2000", "data.synthetic.num_items=1000",
        "data.synthetic.num_interests=20", "data.synthetic.max_seq_len=80", "data.batch_size=64",
        "data.eval_batch_size=256", "loss.num_negatives=64", "optim.lr=0.003", "model.dropout=0.0",
        "train.progress=false", "eval.ks=[10]", "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10"]
# (embedding_dim, num_layers, max_seq_len); heads: 2, d_qk = d_v = D/2
FULL_GRID = [(d, n, l) for d in (8, 16, 32, 64) for n in (1, 2) for l in (16, 64)]
QUICK_GRID = [(8, 1, 16), (16, 1, 16), (16, 2, 32)]


# ---------------------------------------------------------------------------------------------- the formula


def layer_flops_per_token(D: int, H: int, dqk: int, dv: int, keys: float, variant: str = "research") -> float:
    """Forward FLOPs of one HSTU layer per token (2 FLOPs per multiply-add):
    projections 2·D·(2dv+2dqk)·H + 2·H·dv·D (production variant: 2·3·H·dv·D, its output layer reads
    concat(u, A·V, u⊙LN(A·V))), attention 2·keys·H·(dqk+dv) (QKᵀ and A·V; ``keys`` = keys each query attends to)."""
    out = 3 if variant == "production" else 1
    return 2.0 * D * (2 * dv + 2 * dqk) * H + 2.0 * out * H * dv * D + 2.0 * keys * H * (dqk + dv)


def train_flops_per_batch(model_cfg, lengths: Sequence[int], num_items: int, num_negatives: int,
                          mode: str = "useful", route: str = "sampled") -> Dict[str, float]:
    """Forward+backward FLOPs of one training batch of sequences ``lengths`` (×3: backward = 2× forward).

    mode "useful": the causal triangle (position i attends to i+1 keys, Σ = L(L+1)/2 per sequence) and the
    sampled-softmax logits 2·D·(1+R) per labelled position (every position but the last of each sequence).
    mode "executed": what the PyTorch reference runs on CPU — full padded squares per length group
    (ops/pytorch/hstu_attention.length_groups) and, for ``route`` all_items (loss.route), the all-items logit
    matmul 2·D·(num_items+1) per labelled position (the sampled route's sampled_addmm / embedding_bag and the
    gather route's elementwise product are not counted by FlopCounterMode). Embedding lookups, norms, SiLU and other elementwise work count 0.
    Returns {"linear", "attention", "loss", "total"}."""
    if model_cfg.arch != "hstu":
        raise ValueError(f"the formula covers HSTU only, got model.arch={model_cfg.arch!r}")
    D, H = model_cfg.embedding_dim, model_cfg.num_heads
    dqk, dv = model_cfg.attention_dim, model_cfg.linear_dim
    lengths = [int(x) for x in lengths if int(x) > 0]
    tokens = sum(lengths)
    labelled = sum(x - 1 for x in lengths)
    proj = layer_flops_per_token(D, H, dqk, dv, 0.0, model_cfg.variant)
    if mode == "useful":
        pairs = sum(x * (x + 1) / 2 for x in lengths)
        loss = 2.0 * D * (1 + num_negatives) * labelled
    elif mode == "executed":
        from hstu.ops.pytorch.hstu_attention import length_groups

        pairs = sum(len(members) * L * L for L, members in length_groups(lengths))
        loss = 2.0 * D * (num_items + 1) * labelled if route == "all_items" else 0.0
    else:
        raise ValueError(f"mode must be useful | executed, got {mode!r}")
    layers = model_cfg.num_layers
    linear = 3 * layers * proj * tokens
    attention = 3 * layers * 2.0 * pairs * H * (dqk + dv)
    loss = 3 * loss
    return {"linear": linear, "attention": attention, "loss": loss, "total": linear + attention + loss}


def measure_step_flops(model, batch, num_items: int, num_negatives: int, route: str = "sampled") -> int:
    """FLOPs FlopCounterMode counts for one forward + backward of the sampled-softmax loss on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    from hstu.modules.losses import next_item_labels, sampled_softmax_loss

    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        seq = model.encode(batch)
        labels, valid = next_item_labels(batch.item_ids, batch.offsets)
        loss = sampled_softmax_loss(seq, labels, valid, model.item_vectors, num_items, num_negatives, 0.05, gen,
                                    route=route)
        loss.backward()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------- one run


def run_point(D: int, layers: int, L: int, steps: int, tail: int, cache_dir: str) -> Dict[str, Any]:
    from hstu.modules.losses import next_item_labels, sampled_softmax_loss
    from hstu.modules.model import build_model
    from hstu.trainer.config import load_config
    from hstu.trainer.data import build_loaders, load_sequences
    from hstu.trainer.evaluate import evaluate

    heads = 2
    cfg = load_config(None, DATA + [f"data.cache_dir={cache_dir}", f"data.max_seq_len={L}",
                                    f"model.embedding_dim={D}", f"model.num_layers={layers}",
                                    f"model.num_heads={heads}", f"model.attention_dim={D // heads}",
                                    f"model.linear_dim={D // heads}"])
    torch.manual_seed(0)
    seqs = load_sequences(cfg.data, progress=False)
    train_loader, _, eval_loader = build_loaders(cfg.data, seqs)  # test split
    model = build_model(cfg, seqs.num_items)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator().manual_seed(1)
    params = sum(p.numel() for p in model.parameters())
    flops = flops_exec = 0.0
    losses: List[float] = []
    tokens, step, epoch, t0 = 0, 0, 0, time.perf_counter()
    model.train()
    while step < steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        for batch in train_loader:
            lengths = batch.lengths.tolist()
            flops += train_flops_per_batch(cfg.model, lengths, seqs.num_items, cfg.loss.num_negatives)["total"]
            flops_exec += train_flops_per_batch(cfg.model, lengths, seqs.num_items, cfg.loss.num_negatives,
                                                "executed")["total"]
            seq = model.encode(batch)
            labels, valid = next_item_labels(batch.item_ids, batch.offsets)
            loss = sampled_softmax_loss(seq, labels, valid, model.item_vectors, seqs.num_items,
                                        cfg.loss.num_negatives, cfg.loss.temperature, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            tokens += sum(lengths)
            step += 1
            if step >= steps:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, eval_loader, seqs.num_items, cfg.eval, "cpu")
    return {"embedding_dim": D, "num_layers": layers, "num_heads": heads, "max_seq_len": L, "steps": steps,
            "params": params, "non_embedding_params": params - (seqs.num_items + 1) * D, "train_tokens": tokens,
            "train_flops": flops, "executed_flops": flops_exec, "final_train_loss": float(np.mean(losses[-tail:])),
            "hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"], "train_seconds": round(seconds, 2),
            "achieved_gflops_per_s": round(flops_exec / max(seconds, 1e-9) / 1e9, 3)}


# ------------------------------------------------------------------------------------------------- the fit


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    """Least squares of log y = log a + b·log x: y ≈ a·x^b; also R² in log space."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    b, loga = np.polyfit(lx, ly, 1)
    pred = loga + b * lx
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(math.exp(loga)), "b": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "n": len(lx)}


def frontier(points: List[Dict[str, Any]], key: str = "final_train_loss") -> List[Dict[str, Any]]:
    """Points no run with fewer FLOPs beats (the compute-efficient frontier)."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda p: p["train_flops"]):
        if p[key] < best:
            out.append(p)
            best = p[key]
    return out


def compute_fits(points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Power laws of final train loss vs FLOPs (all points, frontier, per history length) and of the HR@10
    error (1 - HR@10) vs FLOPs."""
    c = [p["train_flops"] for p in points]
    front = frontier(points)
    per_len = {}
    for L in sorted({p["max_seq_len"] for p in points}):
        sel = [p for p in points if p["max_seq_len"] == L]
        if len(sel) >= 3:
            per_len[str(L)] = fit_power_law([p["train_flops"] for p in sel], [p["final_train_loss"] for p in sel])
    return {"fit_all": fit_power_law(c, [p["final_train_loss"] for p in points]),
            "fit_frontier": fit_power_law([p["train_flops"] for p in front], [p["final_train_loss"] for p in front])
            if len(front) >= 3 else None,
            "fit_per_max_seq_len": per_len,
            "fit_hr10_error": fit_power_law(c, [max(1.0 - p["hr@10"], 1e-6) for p in points]),
            "frontier": [[p["embedding_dim"], p["num_layers"], p["max_seq_len"]] for p in front]}


def plot(points, fits: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.logspace(math.log10(min(p["train_flops"] for p in points)),
                     math.log10(max(p["train_flops"] for p in points)), 50)
    for L, marker, color in zip(sorted({p["max_seq_len"] for p in points}), "os^vD", ("C0", "C3", "C2", "C1")):
        sel = [p for p in points if p["max_seq_len"] == L]
        sc = ax1.scatter([p["train_flops"] for p in sel], [p["final_train_loss"] for p in sel], marker=marker,
                         c=[math.log2(p["embedding_dim"]) for p in sel], cmap="viridis", label=f"L={L}")
        ax2.scatter([p["train_flops"] for p in sel], [p["hr@10"] for p in sel], marker=marker,
                    c=[math.log2(p["embedding_dim"]) for p in sel], cmap="viridis", label=f"L={L}")
        f = fits["fit_per_max_seq_len"].get(str(L))
        if f:
            ax1.plot(xs, f["a"] * xs ** f["b"], "-", color=color, lw=1,
                     label=f"L={L}: {f['a']:.3g}·C^{f['b']:.3f} (R²={f['r2']:.2f})")
    f = fits["fit_all"]
    ax1.plot(xs, f["a"] * xs ** f["b"], "k--", lw=1, label=f"all: {f['a']:.3g}·C^{f['b']:.3f} (R²={f['r2']:.2f})")
    for ax, ylabel in ((ax1, "final train loss (sampled softmax)"), (ax2, "HR@10 (full ranking)")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (docs/scaling.md formula)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.colorbar(sc, ax=ax2, label="log2 embedding_dim")
    fig.suptitle("HSTU on synthetic data: width x depth x history length, equal steps (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 tiny points (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="train steps per point (default 300; quick 10)")
    ap.add_argument("--tail", type=int, default=None, help="steps averaged for the final loss (default 30)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for scaling.json + scaling.png (default: "
                    "benchmarks/results and docs)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hstu"))
    ap.add_argument("--refit", metavar="JSON", help="recompute fits and plot from a saved scaling.json (no training)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    steps = args.steps or (10 if args.quick else 300)
    tail = min(args.tail or (5 if args.quick else 30), steps)
    t0 = time.time()
    if args.refit:  # recompute fits + plot from saved points (no training); keeps the original provenance
        with open(args.refit) as f:
            old = json.load(f)
        points = old["points"]
        base = {k: v for k, v in old.items() if not k.startswith("fit") and k not in ("frontier", "points")}
        base["refit"] = provenance()
    else:
        points = []
        for D, n, L in grid:
            p = run_point(D, n, L, steps, tail, args.cache_dir)
            points.append(p)
            print(f"D={D:3d} layers={n} L={L:3d}: {p['train_flops']:.3e} FLOPs, loss {p['final_train_loss']:.4f}, "
                  f"hr@10 {p['hr@10']:.4f}, {p['train_seconds']:.1f} s", flush=True)
        base = {**provenance(), "threads": args.threads, "steps_per_point": steps, "tail_steps": tail,
                "data": DATA, "grid": [list(g) for g in grid], "formula": "docs/scaling.md",
                "quality": "final_train_loss = mean sampled-softmax loss of the last tail_steps steps",
                "wall_seconds": round(time.time() - t0, 1)}
    fits = compute_fits(points)
    fit_all, fit_front = fits["fit_all"], fits["fit_frontier"]
    payload = {**base, **fits, "points": points}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        json_path, png_path = os.path.join(args.out, "scaling.json"), os.path.join(args.out, "scaling.png")
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
    else:
        json_path, png_path = write_json("scaling.json", payload), os.path.join(ROOT, "docs", "scaling.png")
    plot(points, fits, png_path)
    print(f"fit (all {fit_all['n']} points): loss = {fit_all['a']:.4g} * C^{fit_all['b']:.4f}, R2 {fit_all['r2']:.3f}")
    if fit_front:
        print(f"fit (frontier, {fit_front['n']} points): loss = {fit_front['a']:.4g} * C^{fit_front['b']:.4f}")
    for L, f in payload["fit_per_max_seq_len"].items():
        print(f"fit (max_seq_len {L}): loss = {f['a']:.4g} * C^{f['b']:.4f}, R2 {f['r2']:.3f}")
    h = payload["fit_hr10_error"]
    print(f"fit 1-HR@10 = {h['a']:.4g} * C^{h['b']:.4f}, R2 {h['r2']:.3f}")
    print(f"wrote {json_path} and {png_path} ({round(time.time() - t0, 1)} s)")
    return payload


if __name__ == "__main__":
    main()
