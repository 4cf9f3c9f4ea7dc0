"""Activation memory saved for backward, per token per layer: HSTU (research, production) vs a Transformer layer.

    python benchmarks/activation_memory.py                      # writes benchmarks/results/activation_memory.json
    python benchmarks/activation_memory.py --quick --out /tmp/r # tiny; used by tests/test_benchmarks_smoke.py

Method: one layer's forward runs inside ``torch.autograd.graph.saved_tensors_hooks``; the pack hook sees every
tensor an autograd node saves for backward. We count each distinct STORAGE once, with its full size (a saved view
keeps its whole storage alive), and skip storages of the layer's parameters. Everything the hook sees is kept
referenced until counting ends, so no storage can be freed and its address reused mid-measurement. The layer's
input is counted (its LayerNorm saves it; in a stack it is the previous layer's output, which no other layer
saves), the output is not (nothing in the layer saves it).

Layers (width D = H·d_v = H·d_qk, fp32 on CPU, training mode):
  hstu_research     hstu.modules.hstu.ResearchHSTULayer (rab position + time), jagged PyTorch reference op
  hstu_production   hstu.modules.hstu.ProductionHSTULayer, jagged PyTorch reference op
  transformer       torch.nn.TransformerEncoderLayer(D, H, dim_feedforward=4D, GELU, pre-LN, batch_first),
                    causal; run sequence by sequence ([1, L, D], no padding) so its figure is per real token
                    like HSTU's; its attention-probability dropout is 0 (HSTU has none, and on CPU SDPA with
                    dropout falls back to the math kernel that saves [H, L, L] probabilities).
Each at dropout 0 and ``--dropout`` (residual/FFN dropout; HSTU: the layer-output dropout).

Reported per layer: bytes/token (total), split into the attention op's O(L²) score-sized tensors
([.., L, L] for a group length L) and the rest (O(d) per token); ``elements_per_d`` = bytes / (T · D · 4) —
the same count in units of "d fp32 values", comparable with the paper's 14d (HSTU) vs 33d (Transformer). The paper
counts BYTES in bf16 with fused kernels (we read 33d as Korthikanti et al.'s 34·h bytes per token for an fp16
layer with 1-byte dropout masks), so ``bf16_bytes_per_d`` = 2 · elements_per_d (dropout masks as counted here)
is the like-for-like figure. docs/performance.md explains why the PyTorch reference saves more than 14d.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from attention import offsets_of, sample_lengths, _write_json_to  # noqa: E402
from common import RESULTS_DIR, provenance, write_json  # noqa: E402

RESULT_FILE = "activation_memory.json"
PAPER_BF16_BYTES_PER_D = {"hstu": 14, "transformer": 33}


class SavedTensorCounter:
    """Counts unique storages saved for backward (excluding the given parameters) inside ``with counter:``.

    ``category`` (a settable string) tags each storage with where it was first saved."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {self._key(p) for p in exclude}
        self.storages: Dict[tuple, dict] = {}
        self.keep: List[torch.Tensor] = []  # hold everything seen: no storage is freed and re-used while counting
        self.param_hits = 0
        self.category = "layer"
        self._ctx: Optional[contextlib.AbstractContextManager] = None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr(), st.nbytes())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.keep.append(t)
        key = self._key(t)
        if key in self.excluded:
            self.param_hits += 1
        elif key not in self.storages:
            self.storages[key] = {"nbytes": t.untyped_storage().nbytes(), "dtype": str(t.dtype).replace("torch.", ""),
                                  "shape": list(t.shape), "category": self.category}
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)

    @property
    def total_bytes(self) -> int:
        return sum(s["nbytes"] for s in self.storages.values())

    def bytes_where(self, pred) -> int:
        return sum(s["nbytes"] for s in self.storages.values() if pred(s))


class FusedAttentionStandIn(torch.autograd.Function):
    """What a fused (FlashAttention-style) HSTU kernel keeps for backward: its inputs q, k, v, the rab tables,
    offsets and timestamps — no [L, L] tensor. Forward = the PyTorch reference without autograd; backward
    recomputes it (correct gradients, only the saved set differs from the reference op)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_weights, time_weights, offsets, timestamps, query_timestamps, max_len, kw):
        from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention

        ctx.max_len, ctx.kw = max_len, kw
        ctx.save_for_backward(q, k, v, pos_weights, time_weights, offsets, timestamps, query_timestamps)
        with torch.no_grad():
            return jagged_hstu_attention(q, k, v, AttentionArgs(offsets, max_len, pos_weights=pos_weights,
                                                                time_weights=time_weights, timestamps=timestamps,
                                                                query_timestamps=query_timestamps, **kw),
                                         backend="pytorch")

    @staticmethod
    def backward(ctx, grad):
        from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention

        q, k, v, pw, tw, offsets, ts, qts = ctx.saved_tensors
        with torch.enable_grad():
            ins = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[i])
                   for i, t in enumerate((q, k, v, pw, tw))]
            args = AttentionArgs(offsets, ctx.max_len, pos_weights=ins[3], time_weights=ins[4], timestamps=ts,
                                 query_timestamps=qts, **ctx.kw)
            out = jagged_hstu_attention(ins[0], ins[1], ins[2], args, backend="pytorch")
            wanted = [t for t in ins if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        grads = [next(got) if t is not None and t.requires_grad else None for t in ins]
        return (*grads, None, None, None, None, None)


def fused_standin(q, k, v, args, *, backend=None, plan=None):
    """Drop-in for jagged_hstu_attention (same arguments) backed by :class:`FusedAttentionStandIn`."""
    kw = dict(alpha=args.alpha, norm=args.norm, causal=args.causal, time_bucket_base=args.time_bucket_base,
              num_targets=args.num_targets, contextual_len=args.contextual_len)
    return FusedAttentionStandIn.apply(q, k, v, args.pos_weights, args.time_weights, args.offsets, args.timestamps,
                                       args.query_timestamps, args.max_len, kw)


@contextlib.contextmanager
def tag_attention_op(counter: SavedTensorCounter, attention: str = "reference"):
    """Tag storages first saved inside hstu.modules.hstu's jagged_hstu_attention call as 'attention_op';
    attention="fused_standin" also swaps the op for :func:`fused_standin`."""
    import hstu.modules.hstu as hm

    original = hm.jagged_hstu_attention
    op = fused_standin if attention == "fused_standin" else original

    def wrapped(*a, **kw):
        counter.category = "attention_op"
        try:
            return op(*a, **kw)
        finally:
            counter.category = "layer"

    hm.jagged_hstu_attention = wrapped
    try:
        yield
    finally:
        hm.jagged_hstu_attention = original


def model_config(variant: str, D: int, H: int, dropout: float):
    from hstu.trainer.config import ModelConfig

    return ModelConfig(variant=variant, embedding_dim=D, num_layers=1, num_heads=H, attention_dim=D // H,
                       linear_dim=D // H, dropout=dropout)


def jagged_inputs(lengths: Sequence[int], D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = offsets_of(lengths, "cpu")
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ts = torch.cat([1_600_000_000 + torch.randint(0, 10 ** 5, (n,), generator=g).cumsum(0) for n in lengths])
    return x, offsets, ts


def measure_hstu(variant: str, lengths: Sequence[int], D: int, H: int, dropout: float, seed: int = 0,
                 max_seq_len: Optional[int] = None, attention: str = "reference", device: str = "cpu",
                 backend: str = "pytorch", autocast_dtype: Optional[torch.dtype] = None) -> SavedTensorCounter:
    """Saved storages of one HSTU layer's forward (training mode) on a jagged batch; attention = "reference"
    (the ops.backend op) or "fused_standin" (saves only what a fused kernel keeps); on ``device``, the layer's
    ops on ``backend``, under autocast to ``autocast_dtype`` when given (benchmarks/gpu_check.py: Triton, bf16)."""
    from hstu.modules.hstu import ProductionHSTULayer, ResearchHSTULayer
    from hstu.ops.pytorch.hstu_attention import length_groups

    torch.manual_seed(seed)
    N = max_seq_len or max(lengths)
    cls = ResearchHSTULayer if variant == "research" else ProductionHSTULayer
    layer = cls(model_config(variant, D, H, dropout), N, backend).to(device).train()
    x, offsets, ts = (t.detach().to(device) for t in jagged_inputs(lengths, D, seed))
    x.requires_grad_(True)
    counter = SavedTensorCounter(layer.parameters())
    group_lens = {L for L, _ in length_groups(list(lengths))}
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)
    with tag_attention_op(counter, attention), counter, autocast:
        out = layer(x, offsets, N, ts)
    for s in counter.storages.values():
        shape = s["shape"]
        if (s["category"] == "attention_op" and len(shape) >= 2 and shape[-1] == shape[-2]
                and shape[-1] in group_lens):
            s["category"] = "attention_scores"
    counter.out = out  # keep the graph alive with its saved tensors
    return counter


class _CausalPreLN(nn.Module):
    def __init__(self, D: int, H: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=4 * D, dropout=dropout, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.layer.self_attn.dropout = 0.0  # attention-probability dropout off (see module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, L, D]
        L = x.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(L)
        return self.layer(x, src_mask=mask, is_causal=True)


def measure_transformer(lengths: Sequence[int], D: int, H: int, dropout: float, seed: int = 0) -> SavedTensorCounter:
    torch.manual_seed(seed)
    block = _CausalPreLN(D, H, dropout).train()
    x, offsets, _ = jagged_inputs(lengths, D, seed)
    counter = SavedTensorCounter(block.parameters())
    outs = []
    with counter:
        for b in range(len(lengths)):
            xs = x[int(offsets[b]): int(offsets[b + 1])].unsqueeze(0)
            outs.append(block(xs))
    counter.out = outs
    return counter


def summarize(name: str, counter: SavedTensorCounter, T: int, D: int, dropout: float, score_entries: int,
              attention: str, elt: int = 4) -> dict:
    total = counter.total_bytes
    scores = counter.bytes_where(lambda s: s["category"] == "attention_scores")
    linear = total - scores
    row = {
        "layer": name, "attention": attention, "dropout": dropout, "tokens": T, "d": D,
        "bytes_per_token": round(total / T, 2),
        "elements_per_d": round(total / (T * D * elt), 3),
        "bf16_bytes_per_d": round(2 * total / (T * D * elt), 3),
        "linear_bytes_per_token": round(linear / T, 2),
        "linear_elements_per_d": round(linear / (T * D * elt), 3),
        "linear_bf16_bytes_per_d": round(2 * linear / (T * D * elt), 3),
        "score_bytes_per_token": round(scores / T, 2),
        "score_bytes_per_score_entry": round(scores / score_entries, 3) if score_entries and scores else 0.0,
        "paper_bf16_bytes_per_d": PAPER_BF16_BYTES_PER_D["transformer" if name == "transformer" else "hstu"],
        "num_storages": len(counter.storages),
        "param_storages_skipped": counter.param_hits,
    }
    by_dtype: Dict[str, int] = {}
    for s in counter.storages.values():
        by_dtype[s["dtype"]] = by_dtype.get(s["dtype"], 0) + s["nbytes"]
    row["bytes_per_token_by_dtype"] = {k: round(v / T, 2) for k, v in sorted(by_dtype.items())}
    by_cat: Dict[str, int] = {}
    for s in counter.storages.values():
        by_cat[s["category"]] = by_cat.get(s["category"], 0) + s["nbytes"]
    row["bytes_per_token_by_category"] = {k: round(v / T, 2) for k, v in sorted(by_cat.items())}
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256, help="model width D (= H · d_v = H · d_qk)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256, help="length cap of the jagged batch (= max_seq_len)")
    ap.add_argument("--tokens", type=int, default=4096, help="token budget of the jagged batch")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law tail index of the lengths")
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1, help="the non-zero dropout rate measured besides 0")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (shared machine: default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for activation_memory.json")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.dim, args.heads, args.max_len, args.tokens = 32, 2, 32, 256
    D, H = args.dim, args.heads
    if D % H:
        raise SystemExit(f"--dim {D} must be a multiple of --heads {H}")
    lengths = sample_lengths(args.max_len, args.tokens, args.alpha, args.min_len, args.seed, force_max_len=True)
    # no sequence may be as long as a head dim: the [.., L, L] score classification reads the last two dims
    lengths = [n + 1 if n == D // H else n for n in lengths]
    from hstu.ops.pytorch.hstu_attention import length_groups

    T = sum(lengths)
    score_entries = H * sum(len(m) * L * L for L, m in length_groups(lengths))
    t0 = time.perf_counter()
    rows = []
    for p in sorted({0.0, args.dropout}):
        for variant in ("research", "production"):
            for attention in ("reference", "fused_standin"):
                c = measure_hstu(variant, lengths, D, H, p, args.seed, max(lengths), attention)
                rows.append(summarize(f"hstu_{variant}", c, T, D, p, score_entries, attention=attention))
                del c
        c = measure_transformer(lengths, D, H, p, args.seed)
        rows.append(summarize("transformer", c, T, D, p, 0, attention="sdpa_flash"))
        del c
    for r in rows:
        print(f"{r['layer']:<16} {r['attention']:<14} dropout {r['dropout']}: {r['bytes_per_token']:>8} B/token "
              f"= {r['elements_per_d']:>6} d fp32 elements (without [L, L] scores {r['linear_elements_per_d']} d "
              f"-> bf16 {r['linear_bf16_bytes_per_d']}d bytes; paper {r['paper_bf16_bytes_per_d']}d)", flush=True)

    payload = dict(provenance())
    payload.update({
        "benchmark": "activation_memory",
        "device": "cpu", "dtype": "float32", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "setup": {"d": D, "heads": H, "d_qk": D // H, "d_v": D // H, "ffn_dim": 4 * D, "max_len": max(lengths),
                  "num_seqs": len(lengths), "tokens": T, "mean_len": round(T / len(lengths), 1),
                  "score_entries": score_entries, "score_entries_per_token": round(score_entries / T, 1),
                  "length_dist": f"power law L = min({args.max_len}, floor({args.min_len} * U^(-1/{args.alpha}))), "
                                 f"seed {args.seed}, first sequence = max_len",
                  "quick": args.quick},
        "notes": [
            "bytes: unique storages saved for backward (saved_tensors_hooks), parameters excluded, layer input "
            "included; elements_per_d = bytes / (tokens * d * 4); bf16_bytes_per_d = 2 * elements_per_d",
            "linear_* excludes the attention op's [.., L, L] score tensors (O(L) bytes per token, grows with "
            "sequence length; a fused kernel saves none); score_bytes_per_score_entry = those bytes / "
            "(H * sum over length groups of G * L^2)",
            "paper_bf16_bytes_per_d: the paper's 14d (HSTU) / 33d (Transformer), bf16 bytes with fused kernels",
            "CPU dropout saves a float32 scaled mask (4 B/element); CUDA's fused dropout saves a bool mask (1 B)",
        ],
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    os.makedirs(args.out, exist_ok=True)
    if os.path.abspath(args.out) == os.path.abspath(RESULTS_DIR):
        path = write_json(RESULT_FILE, payload)
    else:
        path = _write_json_to(args.out, RESULT_FILE, payload)
    print("wrote", path)
    payload["path"] = path
    return payload


if __name__ == "__main__":
    main()
