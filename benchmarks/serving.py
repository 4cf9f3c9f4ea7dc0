"""Serving benchmark: M-FALCON vs one full pass per candidate vs the history-only encode; retrieval latency.

    python benchmarks/serving.py [--quick] [--sizes 16,128] [--sections ranking_model]
        -> benchmarks/results/serving.json (merged: sections not run keep their stored figures)

Model: ML-1M-sized HSTU (research variant: D = 50, 2 layers x 1 head, d_qk = d_v = 50, max_seq_len 200,
3952 items; random weights: timing does not depend on them), history length 200, ONE CPU thread, fp32.
- history_encode: the training model's encode of the history alone (jagged reference op, one user).
- mfalcon: encode the history once (KV cache) + score m candidates in micro-batches of b_m (serving/mfalcon.py),
  eager (in-process) and through the exported artifact (serving/artifact.py).
- per_candidate: the full model run once per candidate on history + [candidate] (B = 1); timed on a subset of
  candidates and extrapolated linearly to m (flagged); batched: all m sequences in one jagged batch (timed up
  to MAX_BATCHED, extrapolated above).
- retrieval: exact chunked top-100 over 1M items (D = 64) for fp32 / bf16 / int8 tables, one user.
- ranking_model: the generative RANKING model (HSTURankingModel as configs/ml-1m/ranking-hstu.yaml: production,
  D = 64, 2 layers x 2 heads, d = 32; ML-1M layout: 4 contextual tokens + 100 (item, action) events = 204 tokens,
  2 tasks + regression): M-FALCON (serving/ranking.py) vs one training-model pass per candidate (each alone, as
  the reference) vs the history-only encode, eager and through the exported ranking artifact; append: one new
  event after the cached 100-event history (``append``, incremental) vs encoding the 101-event history (window
  max_seq_len = events + 1, so nothing shifts), production in process and through the artifact, research in process.
Times are medians of process CPU time over repeats, the compared paths interleaved (the machine is shared:
CPU time and interleaving resist other processes; the wall time of M-FALCON is recorded too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, provenance, write_json  # noqa: E402

MS = [16, 128, 1024, 4096]
SECTIONS = ("ranking", "retrieval", "ranking_model")  # ranking: the retrieval model's M-FALCON (historical key)
PER_CANDIDATE_SUBSET = 16
MAX_BATCHED = 128


def _median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median CPU time (ms, this process) of fn: robust to other processes sharing the cores."""
    return _paired({"f": fn}, repeats, warmup)["f"]["cpu_ms"]


def _paired(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Interleaved timing (f1, f2, ..., f1, f2, ...) so every function sees the same machine load; returns
    {name: {"cpu_ms": median process CPU time, "wall_ms": median wall time}}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append((time.process_time() - c) * 1e3)
            wall[k].append((time.perf_counter() - w) * 1e3)
    return {k: {"cpu_ms": statistics.median(cpu[k]), "wall_ms": statistics.median(wall[k])} for k in fns}


def _model(num_items: int, max_len: int):
    from hstu.modules.model import RetrievalModel
    from hstu.trainer.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(variant="research", embedding_dim=50, num_layers=2, num_heads=1, attention_dim=50,
                      linear_dim=50, dropout=0.2)
    return RetrievalModel(cfg, num_items, max_len).eval(), cfg


def ranking(args) -> dict:
    from hstu.serving.export import _batch, export_model, reference_rank_scores
    from hstu.serving.mfalcon import MFalcon
    from hstu.trainer.config import RunConfig, to_dict

    model, mcfg = _model(args.num_items, args.max_seq_len)
    g = torch.Generator().manual_seed(1)
    n = args.history
    ids = torch.randint(1, args.num_items + 1, (n,), generator=g)
    ts = 1_600_000_000 + torch.randint(0, 86_400, (n,), generator=g).cumsum(0)
    qt = int(ts[-1]) + 3600
    cands = torch.randint(1, args.num_items + 1, (max(MS),), generator=g)
    eng = MFalcon.from_model(model)
    rep = args.repeats
    hist_fn = lambda: model.encode(_batch([(ids, ts)], [qt]))  # noqa: E731
    with torch.inference_mode():
        state = eng.encode(ids, ts, qt)
        one = torch.cat([ids, cands[:1]]), torch.cat([ts, torch.tensor([qt])])
        per_cand_ms = _median_ms(lambda: model.encode(_batch([one], [qt])), rep * 2)
        seq_subset_ms = _median_ms(lambda: [model.encode(_batch([(torch.cat([ids, c.view(1)]), one[1])], [qt]))
                                            for c in cands[:PER_CANDIDATE_SUBSET]], max(1, rep // 2))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig()
        cfg.model, cfg.data.max_seq_len = mcfg, args.max_seq_len
        t0 = time.perf_counter()
        export_model(model, to_dict(cfg), os.path.join(tmp, "art"))
        export_s = time.perf_counter() - t0
        import hstu.serving

        t0 = time.perf_counter()
        sm = hstu.serving.load(os.path.join(tmp, "art"))
        load_s = time.perf_counter() - t0
    art_state = sm.encode(ids, ts, qt)
    check = reference_rank_scores(model, ids, ts, qt, cands[:64])
    max_err = max(float((eng.rank(state, cands[:64]) - check).abs().max()),
                  float((sm.rank_state(art_state, cands[:64]) - check).abs().max()))
    rows = []
    for m in args.sizes:
        c = cands[:m]
        r = max(3, rep if m <= 1024 else rep // 2)
        with torch.inference_mode():
            t = _paired({"history": hist_fn, "encode": lambda: eng.encode(ids, ts, qt),
                         "rank": lambda: eng.rank(state, c), "art_encode": lambda: sm.encode(ids, ts, qt),
                         "art_rank": lambda: sm.rank_state(art_state, c)}, r)
            bm = min(m, MAX_BATCHED)
            batch = _batch([(torch.cat([ids, x.view(1)]), one[1]) for x in c[:bm]], [qt] * bm)
            batched_ms = _median_ms(lambda: model.encode(batch), max(1, rep // 2)) * m / bm
        hist_ms, enc_ms, mf_ms = t["history"]["cpu_ms"], t["encode"]["cpu_ms"], t["rank"]["cpu_ms"]
        art_ms = t["art_rank"]["cpu_ms"]
        seq_ms = seq_subset_ms / PER_CANDIDATE_SUBSET * m
        total = enc_ms + mf_ms
        rows.append({
            "m": m, "history_encode_ms": round(hist_ms, 3), "mfalcon_encode_ms": round(enc_ms, 3),
            "mfalcon_rank_ms": round(mf_ms, 3), "mfalcon_total_ms": round(total, 3),
            "mfalcon_total_wall_ms": round(t["encode"]["wall_ms"] + t["rank"]["wall_ms"], 3),
            "artifact_total_ms": round(t["art_encode"]["cpu_ms"] + art_ms, 3),
            "per_candidate_pass_ms": round(seq_ms, 1),
            "per_candidate_extrapolated": m > PER_CANDIDATE_SUBSET,
            "batched_full_pass_ms": round(batched_ms, 1), "batched_extrapolated": m > MAX_BATCHED,
            "total_over_history_encode": round(total / hist_ms, 2),
            "speedup_vs_per_candidate": round(seq_ms / total, 1),
            "speedup_vs_batched": round(batched_ms / total, 1),
            "candidates_per_s": round(m / (mf_ms / 1e3)),
            "artifact_candidates_per_s": round(m / (art_ms / 1e3)),
        })
    c1024 = cands[:1024]
    sweep = [{"micro_batch": b, "rank_ms_m1024": round(_median_ms(lambda: eng.rank(state, c1024, b), rep), 3)}
             for b in (32, 128, 256, 1024)]
    r1024 = next((r for r in rows if r["m"] == 1024), None)  # None when --sizes leaves 1024 out
    at = lambda key: r1024[key] if r1024 else None  # noqa: E731
    return {
        "setup": {"variant": "research", "embedding_dim": 50, "num_layers": 2, "num_heads": 1, "d": 50,
                  "max_seq_len": args.max_seq_len, "history": n, "num_items": args.num_items,
                  "micro_batch": eng.micro_batch, "threads": torch.get_num_threads(),
                  "per_candidate_subset": PER_CANDIDATE_SUBSET, "max_batched_measured": MAX_BATCHED},
        "summary": {"m1024_total_over_history_encode": at("total_over_history_encode"),
                    "goal_m1024_le_2x_history_encode": r1024 and r1024["total_over_history_encode"] <= 2.0,
                    "m1024_speedup_vs_per_candidate": at("speedup_vs_per_candidate"),
                    "goal_m1024_ge_50x_vs_per_candidate": r1024 and r1024["speedup_vs_per_candidate"] >= 50,
                    "single_candidate_full_pass_ms": round(per_cand_ms, 3),
                    "max_abs_error_vs_alone": max_err,
                    "export_s": round(export_s, 1), "artifact_load_s": round(load_s, 2)},
        "rows": rows, "micro_batch_sweep": sweep,
    }


def _ranking_model(events: int, variant: str = "production"):
    """Model + a history of `events` events; the window (max_seq_len) is events + 1: room for one appended event."""
    from hstu.modules.ranking import HSTURankingModel, RankingSpec
    from hstu.serving.ranking import RankingHistory
    from hstu.trainer.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, embedding_dim=64, num_layers=2, num_heads=2, attention_dim=32,
                      linear_dim=32, dropout=0.2)
    spec = RankingSpec(num_items=3952, num_actions=5, contextual_vocab=(3, 8, 22, 100), side_vocab=(),
                       task_names=("like", "love"), regression=True, max_tokens=4 + 2 * (events + 1) + 1)
    g = torch.Generator().manual_seed(1)
    hist = RankingHistory(torch.randint(1, 3953, (events,), generator=g), torch.randint(1, 6, (events,), generator=g),
                          1_000_000_000 + torch.randint(0, 86_400, (events,), generator=g).cumsum(0), [1, 3, 7, 42])
    return HSTURankingModel(cfg, spec).eval(), cfg, hist


def ranking_model(args) -> dict:
    """Ranking-model M-FALCON figures (see the module docstring), rows per m in args.sizes."""
    from types import SimpleNamespace

    from hstu.serving.export_ranking import alone_batch, export_ranking_model
    from hstu.serving.ranking import RankingMFalcon
    from hstu.trainer.config import RunConfig, to_dict

    events, sizes = args.ranking_events, args.sizes
    window = events + 1  # room for the appended event (the history itself fits either way)
    model, mcfg, hist = _ranking_model(events)
    eng = RankingMFalcon.from_model(model, max_seq_len=window, max_side_tokens=0)
    lay = eng.layout(hist)
    qt = lay.last_event_time + 3600
    cands = torch.randint(1, 3953, (max(sizes),), generator=torch.Generator().manual_seed(2))
    T = int(lay.ids.numel())
    history_batch = SimpleNamespace(token_ids=lay.ids, token_kinds=lay.kinds, token_features=lay.features,
                                    paired_items=lay.paired, timestamps=lay.timestamps, positions=lay.positions,
                                    time_gaps=lay.gaps, offsets=torch.tensor([0, T]), max_len=T,
                                    num_targets=torch.zeros(1, dtype=torch.int64), contextual_len=lay.contextual_len,
                                    pred_rows=torch.tensor([T - 1]))
    rep = args.repeats
    with torch.inference_mode():
        state = eng.encode(hist, qt)
        subset = cands[:PER_CANDIDATE_SUBSET]
        one_ms = _median_ms(lambda: [model(alone_batch(lay, c.view(1), qt)) for c in subset], max(1, rep // 2))
        check = model(alone_batch(lay, cands[:64], qt))[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig()
        cfg.task, cfg.model, cfg.data.max_seq_len, cfg.data.name = "ranking", mcfg, window, "ml-1m"
        t0 = time.perf_counter()
        export_ranking_model(model, to_dict(cfg), os.path.join(tmp, "art"),
                             context_names=("gender", "age", "occupation", "zip"))
        export_s = time.perf_counter() - t0
        import hstu.serving

        t0 = time.perf_counter()
        sm = hstu.serving.load(os.path.join(tmp, "art"), task="ranking")
        load_s = time.perf_counter() - t0
    art_state = sm.encode(hist, qt)
    max_err = max(float((eng.rank(state, cands[:64]).logits - check).abs().max()),
                  float((sm.rank_state(art_state, cands[:64]).logits - check).abs().max()))
    rows = []
    for m in sizes:
        c = cands[:m]
        r = max(3, rep if m <= 1024 else rep // 2)
        with torch.inference_mode():
            t = _paired({"history": lambda: model.encode(history_batch), "encode": lambda: eng.encode(hist, qt),
                         "rank": lambda: eng.rank(state, c), "art_encode": lambda: sm.encode(hist, qt),
                         "art_rank": lambda: sm.rank_state(art_state, c)}, r)
        hist_ms, enc_ms, mf_ms = t["history"]["cpu_ms"], t["encode"]["cpu_ms"], t["rank"]["cpu_ms"]
        art_ms, total = t["art_rank"]["cpu_ms"], enc_ms + mf_ms
        seq_ms = one_ms / PER_CANDIDATE_SUBSET * m
        rows.append({
            "m": m, "history_encode_ms": round(hist_ms, 3), "mfalcon_encode_ms": round(enc_ms, 3),
            "mfalcon_rank_ms": round(mf_ms, 3), "mfalcon_total_ms": round(total, 3),
            "mfalcon_total_wall_ms": round(t["encode"]["wall_ms"] + t["rank"]["wall_ms"], 3),
            "artifact_total_ms": round(t["art_encode"]["cpu_ms"] + art_ms, 3),
            "per_candidate_pass_ms": round(seq_ms, 1), "per_candidate_extrapolated": m > PER_CANDIDATE_SUBSET,
            "total_over_history_encode": round(total / hist_ms, 2),
            "speedup_vs_per_candidate": round(seq_ms / total, 1),
            "candidates_per_s": round(m / (mf_ms / 1e3)), "artifact_candidates_per_s": round(m / (art_ms / 1e3)),
        })
    appended = _ranking_append(eng, sm, hist, max(3, rep))
    return {
        "setup": {"model": "HSTURankingModel (configs/ml-1m/ranking-hstu.yaml dims)", "variant": "production",
                  "embedding_dim": 64, "num_layers": 2, "num_heads": 2, "d": 32, "events": events,
                  "history_tokens": T, "contextual": 4, "tasks": 2, "regression": True,
                  "max_seq_len": window, "micro_batch": eng.micro_batch, "threads": torch.get_num_threads(),
                  "per_candidate_subset": PER_CANDIDATE_SUBSET},
        "summary": {"single_candidate_full_pass_ms": round(one_ms / PER_CANDIDATE_SUBSET, 3),
                    "max_abs_logit_error_vs_alone": max_err, "export_s": round(export_s, 1),
                    "artifact_load_s": round(load_s, 2)},
        "rows": rows,
        "append": appended,
    }


def _ranking_append(eng, sm, hist, repeats: int) -> list:
    """One event appended to the cached history (RankingMFalcon.append) vs encoding the whole new history: CPU
    medians, rows recomputed, max |difference| of the K/V caches and of the scores of 64 candidates."""
    from hstu.serving.ranking import RankingHistory, RankingMFalcon

    events = int(hist.item_ids.numel())
    new = {"item_ids": torch.tensor([17]), "actions": torch.tensor([3]),
           "timestamps": hist.timestamps[-1:] + 600}
    full = RankingHistory(torch.cat([hist.item_ids, new["item_ids"]]), torch.cat([hist.actions, new["actions"]]),
                          torch.cat([hist.timestamps, new["timestamps"]]), hist.context)
    cands = torch.arange(1, 65)
    research, _, _ = _ranking_model(events, "research")
    paths = [("production", "model", eng), ("production", "artifact", sm),
             ("research", "model", RankingMFalcon.from_model(research, max_seq_len=eng.max_seq_len,
                                                             max_side_tokens=0))]
    rows = []
    for variant, where, e in paths:
        with torch.inference_mode():
            base = e.encode(hist)
            got, ref = e.append(base, new), e.encode(full)
            t = _paired({"append": lambda: e.append(base, new), "encode": lambda: e.encode(full)}, repeats)
            rank = e.rank_state if where == "artifact" else e.rank
            err = max(float((got.k - ref.k).abs().max()), float((got.v - ref.v).abs().max()),
                      float((rank(got, cands).logits - rank(ref, cands).logits).abs().max()))
        rows.append({"variant": variant, "path": where, "history_events": events, "appended_events": 1,
                     "history_tokens": base.length, "rows_recomputed": got.recomputed, "rows_total": got.length,
                     "append_ms": round(t["append"]["cpu_ms"], 3), "full_encode_ms": round(t["encode"]["cpu_ms"], 3),
                     "append_over_full_encode": round(t["append"]["cpu_ms"] / t["encode"]["cpu_ms"], 3),
                     "max_abs_diff_vs_full_encode": err})
    return rows


def retrieval(args) -> dict:
    from hstu.serving.retrieval import ItemTable, brute_force_topk, topk_inner_product

    g = torch.Generator().manual_seed(2)
    w = torch.randn(args.items + 1, args.dim, generator=g) * 0.02
    q = torch.nn.functional.normalize(torch.randn(args.dim, generator=g), dim=0)
    ref = None
    rows = []
    for dtype in ("fp32", "bf16", "int8"):
        table = ItemTable.quantize(w, dtype)
        top = topk_inner_product(q, table, 100)
        if ref is None:
            ref = brute_force_topk(q, table, 100)
            assert torch.equal(top.ids, ref.ids)
        rows.append({"dtype": dtype, "items": args.items, "dim": args.dim, "k": 100, "chunk": table.default_chunk,
                     "latency_ms": round(_median_ms(lambda: topk_inner_product(q, table, 100), args.repeats), 2),
                     "table_mb": round(table.weight.numel() * table.weight.element_size() / 2**20, 1),
                     "recall@100_vs_fp32": len(set(top.ids.tolist()) & set(ref.ids.tolist())) / 100})
        del table
    full = ItemTable.quantize(w, "fp32")
    rows.append({"dtype": "fp32 brute force (all scores + sort)", "items": args.items, "dim": args.dim, "k": 100,
                 "latency_ms": round(_median_ms(lambda: brute_force_topk(q, full, 100), 3), 2)})
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, 100k items (smoke test)")
    p.add_argument("--history", type=int, default=200)
    p.add_argument("--max-seq-len", type=int, default=200)
    p.add_argument("--num-items", type=int, default=3952)
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size for retrieval")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="serving.json")
    p.add_argument("--sizes", default=",".join(map(str, MS)), help="candidate counts m, comma-separated")
    p.add_argument("--ranking-events", type=int, default=100, help="ranking_model: history events")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {SECTIONS}; sections not run keep their stored figures")
    args = p.parse_args(argv)
    args.sizes = sorted({int(x) for x in str(args.sizes).split(",") if x})
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not args.sizes:
        p.error(f"--sections: unknown {unknown} (choose from {SECTIONS})" if unknown else "--sizes: empty")
    if args.quick:
        args.repeats, args.items = 2, 100_000
    torch.set_num_threads(1)
    payload = provenance()
    payload["notes"] = [
        "CPU, 1 thread, fp32, shared machine: *_ms are medians of process CPU time, paths interleaved.",
        "per_candidate_pass_ms: the full model once per candidate (history + candidate, B = 1), timed on "
        f"{PER_CANDIDATE_SUBSET} candidates and extrapolated linearly (per_candidate_extrapolated).",
        f"batched_full_pass_ms: m sequences in one jagged batch, timed up to {MAX_BATCHED}, extrapolated above.",
        "mfalcon_total_ms = mfalcon_encode_ms (history once, KV cache) + mfalcon_rank_ms (m candidates).",
        "artifact_*: the same through the exported torch.export programs (hstu.serving.load).",
    ]
    runners = {"ranking": ranking, "retrieval": retrieval, "ranking_model": ranking_model}
    stored = os.path.join(RESULTS_DIR, args.out)
    merged = {}
    if os.path.exists(stored):  # keep the sections (and their provenance) this run does not measure
        with open(stored, encoding="utf-8") as f:
            merged = json.load(f)
    if set(sections) != set(SECTIONS):
        payload = {k: v for k, v in payload.items() if k != "notes"}
        merged.update({name: dict(runners[name](args), provenance=payload) for name in sections})
    else:
        merged.update(payload)
        merged.update({name: runners[name](args) for name in sections})
    print(write_json(args.out, merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
