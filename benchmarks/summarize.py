"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json (never edit figures by hand)."""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


ML1M_PROTOCOL = (
    "**Protocol** (compare with hstu-spec.md, \"Retrieval loss and evaluation\"; docs/model.md \"Evaluation "
    "protocol\"). Each user's ratings are sorted by timestamp; ratings within the same second follow "
    "`data.tie_order` (default `random`: a shuffle seeded by `data.seed`, which carries no signal — GR sorts by "
    "timestamp only with an unstable sort, so its ties are in an arbitrary order too). Leave-one-out: the last item "
    "is the test target (its history: the 200 events before it, the validation item included), the second-to-last "
    "item the validation target; training sequences end before the validation item (GR also trains on it: our "
    "models see one target fewer per user). Full ranking over all item ids (no sampled candidates), the user's "
    "history items removed (as GR's code does). The epoch is selected on validation NDCG@10 "
    "(`eval.select_on=validation`); the test metrics are reported at that epoch and at the final epoch; each "
    "figure is the mean ± sample std over the seeds listed. HSTU's `file` and `item_id` rows (same config, other "
    "tie orders) measure what a non-random order of same-second ratings is worth. The *historical* rows below were measured under the "
    "old protocol — item-id tie order (the later of two same-second ratings always had the larger id, a signal the "
    "models learned), epoch selected on the test target itself, one seed — so they overstate the models by an "
    "amount that is unknown until they are rerun; they are kept for the record, not as results.")


def _pm(stat: Optional[dict], digits: int = 4) -> str:
    """mean ± sample std ("mean" alone for one seed)."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def _ml1m_multi_seed(summary: List[dict]) -> List[str]:
    """mean ± std per (config, tie order, select_on): test metrics at the selected and at the final epoch."""
    rows = [r for r in summary if not r.get("smoke")]
    if not rows:
        return ["_No run under this protocol is recorded yet: `python benchmarks/reproduce_ml1m.py --data-dir "
                "../shared/data/ml-1m` (3 seeds of SASRec, HSTU, HSTU-large + HSTU under the item-id order)._", ""]
    out = ["| config | tie order | selected on | seeds | HR@10 (paper) | NDCG@10 (paper) | HR@50 (paper) | "
           "HR@200 (paper) | MRR | final epoch HR@10 | final epoch NDCG@10 | selected epoch | train min |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sel, fin, p = r["selected"], r["final"], r.get("paper", {})
        seeds = ", ".join(str(x) for x in r["seeds"]) + ("" if r.get("complete", True) else " (time-capped)")
        cells = [r["config"], r["tie_order"], r["select_on"], seeds]
        cells += [f"{_pm(sel.get(m))} ({_fmt(p.get(m))})" for m in ("hr@10", "ndcg@10", "hr@50", "hr@200")]
        cells += [_pm(sel.get("mrr")), _pm(fin.get("hr@10")), _pm(fin.get("ndcg@10")),
                  _pm(r.get("selected_epoch"), 1), _pm(r.get("train_minutes"), 1)]
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", "HR/NDCG/MRR: test target at the validation-selected epoch unless labelled *final epoch*; one "
                      "row per run (seed, commit, machine, minutes): `benchmarks/results/ml-1m.json` → `runs`.", ""]


def _ml1m_section(payload) -> List[str]:
    """ml-1m.json: the multi-seed table (validation-selected) + the historical single-seed rows (old protocol)."""
    out = ["## ML-1M retrieval (full ranking) — `benchmarks/reproduce_ml1m.py`", "", ML1M_PROTOCOL, ""]
    if isinstance(payload, list):  # a file not yet converted: only old-protocol rows
        payload = {"historical": {"rows": payload}}
    out += ["### Multi-seed, validation-selected", ""] + _ml1m_multi_seed(payload.get("summary", []))
    hist = payload.get("historical")
    if hist and hist.get("rows"):
        out += ["### Historical — old protocol (item-id tie order, selected on the test target, 1 seed; must be "
                "rerun)", ""]
        if hist.get("protocol"):
            out += [f"_{hist['protocol']}._", ""]
        out += _ml1m_historical(hist["rows"])
    return out


def _ml1m_historical(rows: list) -> List[str]:
    """The single-seed rows of the old protocol (item-id tie order, epoch selected on the test target)."""
    out = ["| model | HR@10 (paper) | NDCG@10 (paper) | HR@50 (paper) | HR@200 (paper) | NDCG@200 | MRR | "
           "epochs (best) | train s | tokens/s | machine | date | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("paper", {})
        cells = [r["model"]] + [f"{_fmt(r.get(m))} ({_fmt(p.get(m))})" for m in ("hr@10", "ndcg@10", "hr@50", "hr@200")]
        done = "" if r.get("complete", True) else f" of {r.get('configured_epochs')}, time-capped"
        cells += [_fmt(r.get("ndcg@200")), _fmt(r.get("mrr")), f"{r.get('epochs')}{done} ({r.get('best_epoch')})",
                  _fmt(r.get("train_seconds")), _fmt(r.get("tokens_per_second")), r.get("machine", ""),
                  r.get("date", "")[:10], r.get("commit", "")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
        if "started" not in r:
            out.append(f"|  ↳ `commit` is HEAD when the run finished (runs before the script recorded the start commit) |"
                       + " |" * 12)
        if r.get("overrides"):
            out.append(f"|  ↳ overrides: `{' '.join(r['overrides'])}` |" + " |" * 12)
    return out + [""]


_LONG_CELL = 60  # longer strings / nested values go below the table as footnotes


def _is_row_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(r, dict) for r in x)


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else ""
    return _fmt(v).replace("|", "\\|")


def _row_table(rows: List[dict]) -> List[str]:
    """Compact markdown table of a list of row dicts: one column per key (first-seen order); values that are long
    strings or long nested values become numbered footnotes under the table."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    long_keys = [k for k in keys if any(len(_cell(r[k])) > _LONG_CELL for r in rows if k in r)]
    cols = [k for k in keys if k not in long_keys]
    out = ["| # | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    notes = []
    for i, r in enumerate(rows, 1):
        out.append(f"| {i} | " + " | ".join(_cell(r[k]) if k in r else "" for k in cols) + " |")
        notes += [f"- #{i} {k}: {_cell(r[k])}" for k in long_keys if r.get(k) not in (None, "", [], {})]
    return out + ([""] + notes if notes else []) + [""]


def _generic_section(name: str, payload) -> List[str]:
    out = [f"## {name}", ""]
    meta = payload if isinstance(payload, dict) else {}
    for key in ("machine", "date", "commit", "command", "device", "dtype"):
        if key in meta:
            out.append(f"- {key}: `{meta[key]}`")
    tables = []  # (title, rows): top-level lists of row dicts, and the children of a dict holding such lists
    if _is_row_list(payload):
        tables.append(("", payload))
    table_keys = set()
    for key, val in meta.items():
        if _is_row_list(val):
            tables.append((key, val))
            table_keys.add(key)
        elif isinstance(val, dict) and any(_is_row_list(v) for v in val.values()):
            table_keys.add(key)
            for k, v in val.items():  # row lists as tables, a single row dict as a one-row table
                tables.append((f"{key}.{k}", v if _is_row_list(v) else [v if isinstance(v, dict) else {k: v}]))
    suites = [key for key, val in meta.items() if _is_suite(val)]
    if not tables and not suites:
        return out + ["", "```json", json.dumps(payload, indent=1)[:4000], "```", ""]
    for key, val in meta.items():  # small scalar / dict settings, then notes
        if key in table_keys or key in suites or key in ("machine", "date", "commit", "command", "device", "dtype"):
            continue
        if isinstance(val, list) and all(isinstance(x, str) for x in val):
            out += [f"- {key}:"] + [f"  - {x}" for x in val]
        else:
            out.append(f"- {key}: {_cell(val)}")
    out.append("")
    for title, rows in tables:
        if title:
            out += [f"**{title}**", ""]
        out += _row_table(rows)
    for key in suites:
        out += _suite_lines(key, meta[key])
    return out


_RUN_COLS = ("processes", "steps", "train_seconds", "ms_per_step_median", "rank0_cpu_ms_per_step_median",
             "tokens_per_second_median", "tokens_per_second_overall", "best_epoch")


_SUITE_METRICS = ("hr@10", "ndcg@10", "ne_mean", "auc_mean", "gauc_mean")


def _is_suite(x) -> bool:
    """A process-comparison suite: {"results": {variant: {"processes": ..., ...}, scalars...}, provenance...}."""
    return isinstance(x, dict) and isinstance(x.get("results"), dict) and any(
        isinstance(v, dict) and "processes" in v for v in x["results"].values())


def _suite_lines(name: str, suite: dict) -> List[str]:
    """One suite: provenance bullets, scalar results as bullets, a row per variant (timing + key metrics)."""
    out = [f"### {name}", ""] + [f"- {k}: `{suite[k]}`" for k in ("machine", "date", "commit", "command")
                                  if k in suite]
    out += [f"- {k}: {_cell(v)}" for k, v in suite.items()
            if k not in ("machine", "date", "commit", "command", "results")]
    res = suite["results"]
    variants = {k: v for k, v in res.items() if isinstance(v, dict) and "processes" in v}
    out += [f"- {k}: {_cell(v)}" for k, v in res.items() if k not in variants] + [""]
    rows = []
    for vname, v in variants.items():
        row = {"variant": vname, **{c: v.get(c) for c in _RUN_COLS if c in v}}
        for which in ("final", "best"):
            m = v.get(f"{which}_metrics") or {}
            row.update({f"{which} {k}": m[k] for k in _SUITE_METRICS if k in m})
        rows.append(row)
    return out + (_row_table(rows) if rows else [])


def _distributed_section(payload: dict) -> List[str]:
    """distributed.json: one table per suite (a row per variant: timing + HR@10/NDCG@10), scalars as bullets."""
    out = ["## distributed.json — `benchmarks/distributed.py`", ""]
    suites = {k: v for k, v in payload.items() if isinstance(v, dict) and isinstance(v.get("results"), dict)}
    out += [f"- {k}: {_cell(v)}" for k, v in payload.items() if k not in suites] + [""]
    for name, suite in suites.items():
        out += _suite_lines(name, suite)
    return out


def _reliability_section(payload: dict) -> List[str]:
    """reliability.json: totals as bullets, one row per case (expected vs observed class, the error line)."""
    out = ["## reliability.json — `benchmarks/reliability.py`", ""]
    out += [f"- {k}: `{payload[k]}`" for k in ("machine", "date", "commit", "command") if k in payload]
    out += [f"- {k}: {_cell(v)}" for k, v in payload.get("totals", {}).items()] + [""]
    out += ["| # | case | expected | observed | ok | exit | s | error line |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(payload.get("cases", []), 1):
        msg = str(r.get("message") or "")
        msg = msg if len(msg) <= 110 else msg[:107] + "..."
        secs = "–" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        out.append(f"| {i} | {_cell(r.get('name'))} | {r.get('expected')} | {r.get('observed')} | "
                   f"{'yes' if r.get('ok') else '**no**'} | {_fmt(r.get('exit'))} | {secs} | "
                   f"{_cell(msg)} |")
    return out + ["", "Commands: `benchmarks/results/reliability.json` (`cases[].command`).", ""]


def _table_scale_section(payload: dict, name: str = "table_scale.json") -> List[str]:
    """table_scale*.json: a row per (world size, placement) run and per reload (worst rank's peak RSS vs shard)."""
    gib = 1024 ** 3
    out = [f"## {name} — `benchmarks/table_scale.py`", ""]
    out += [f"- {k}: `{payload[k]}`" for k in ("machine", "date", "commit", "command") if k in payload]
    out += [f"- table {payload.get('rows')} x {payload.get('dim')}, {payload.get('steps')} steps, "
            f"{payload.get('ids_per_step')} ids/rank/step; cap: {payload.get('cap')}"
            + (" (**smoke size**)" if payload.get("smoke") else ""), ""]
    out += ["| world | placement | ok | worst peak RSS GiB | shard GiB | peak / (shard + base) | cap < table | "
            "checkpoint GB | save GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in payload.get("runs", []):
        shard = max((k["shard"]["weights"] + k["shard"]["state"] for k in r.get("ranks", []) if "shard" in k),
                    default=0)
        out.append(f"| {r['world_size']} | {r['placement']} | {'yes' if r.get('ok') else '**no**'} | "
                   f"{_fmt((r.get('max_peak_rss') or 0) / gib)} | {_fmt(shard / gib)} | "
                   f"{_fmt(r.get('max_peak_over_shard_plus_base'))} | {_cell(r.get('cap_below_table'))} | "
                   f"{_fmt((r.get('checkpoint_bytes') or 0) / 1e9)} | {_fmt(r.get('save_gb_per_s'))} |")
    out += ["", "| reload | ok | same table + state | load GB/s | peak / (shard + base) |", "|---|---|---|---|---|"]
    for r in payload.get("reloads", []):
        out.append(f"| {r['from_world_size']} -> {r['to_world_size']} | {'yes' if r.get('ok') else '**no**'} | "
                   f"{_cell(r.get('sums_equal_saved'))} | {_fmt(r.get('load_gb_per_s'))} | "
                   f"{_fmt(r.get('max_peak_over_shard_plus_base'))} |")
    kr = payload.get("kill_resume") or {}
    if kr:
        out += ["", f"- kill and resume ({kr.get('world_size')} ranks, rank 0 SIGKILLed inside a save): killed "
                f"{_cell(kr.get('killed'))}, resumed from {kr.get('resumed_from')} (step {kr.get('resumed_step')}), "
                f"same table + state {_cell(kr.get('sums_equal_last_good_save'))}"]
    return out + _table_serving_lines(payload.get("serving") or {}) + [""]


def _table_serving_lines(sv: dict) -> List[str]:
    """table_scale.json "serving": streamed export + memory-mapped serving of the large table, per dtype."""
    if not sv:
        return []
    gib = 1024 ** 3
    size = f" ({sv['rows']} x {sv['dim']}, {sv['steps']} steps; `--serve-only`)" if "rows" in sv else ""
    src = (f"the fp32 checkpoint of {sv['from_world_size']} ranks{size}" if sv.get("from_world_size")
           else f"the kept checkpoint {sv.get('checkpoint')}")
    out = ["", f"Serving phase (benchmarks/table_serving.py): {src} exported in {sv.get('export_chunk_rows')}-row chunks and served memory-mapped, "
           f"{sv.get('threads')} thread(s), load average {_cell(sv.get('loadavg_start'))} → "
           f"{_cell(sv.get('loadavg_end'))}" + (f", run {sv['provenance'].get('date')} at commit "
                                                  f"{sv['provenance'].get('commit')}" if sv.get("provenance") else ""),
           "", "| dtype | ok | export s (table part) | export peak RSS GiB (growth) | table files GB | "
           "table map s (RSS growth MiB) | artifact load s | RSS after load GiB (anon) | top-K p50 / p99 ms | "
           "retrieve p50 ms | RSS after queries GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sv.get("runs", []):
        if not r.get("ok"):
            out.append(f"| {r.get('dtype')} | **no** | {_cell(r.get('error'))} |  |  |  |  |  |  |  |  |")
            continue
        out.append(f"| {r['dtype']} | yes | {_fmt(r['export_s'])} ({_fmt(r['export_table_s'])}) | "
                   f"{_fmt(r['export_peak_rss'] / gib)} ({_fmt(r['export_peak_growth'] / gib)}) | "
                   f"{_fmt(r['table_files_bytes'] / 1e9)} | {_fmt(r['table_map_s'])} "
                   f"({_fmt(r['table_map_rss_growth'] / 2 ** 20)}) | {_fmt(r['load_s'])} | "
                   f"{_fmt(r['rss_after_load'] / gib)} ({_fmt(r['rss_anon_after_load'] / gib)}) | "
                   f"{_fmt(r['topk_ms_p50'])} / {_fmt(r['topk_ms_p99'])} | {_fmt(r['retrieve_ms_p50'])} | "
                   f"{_fmt(r['rss_after_queries'] / gib)} |")
    return out


def _throughput_section(name: str, payload: dict) -> List[str]:
    """train_throughput*.json: one row per config (this tree vs baseline commit), the phase split, paper code."""
    peak = payload.get("matmul_peak_gflops")
    out = [f"## {name} — `benchmarks/train_throughput.py`", "",
           f"{payload.get('threads')} thread(s), allocator {_cell(payload.get('allocator'))}, fp32 matmul peak "
           f"{_fmt(peak)} GFLOP/s (runs {_cell(payload.get('matmul_peak_runs'))}), load average "
           f"{_cell(payload.get('loadavg_start'))} → {_cell(payload.get('loadavg_end'))}; {payload.get('machine')}, "
           f"{payload.get('date', '')[:10]}, commit {payload.get('commit')}, baseline {payload.get('baseline_commit')}.",
           "", "| config | tokens/s | baseline tokens/s | × baseline | ms/step | baseline ms/step | needed GFLOP/s | "
           "of peak | baseline of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for r in payload.get("rows", []):
        b = r.get("baseline", {})
        pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        out.append("| " + " | ".join([r["config"], _fmt(r.get("tokens_per_s")), _fmt(b.get("tokens_per_s")),
                                       _fmt(r.get("speedup_vs_baseline")), _fmt(r.get("ms_per_step")),
                                       _fmt(b.get("ms_per_step")), _fmt(r.get("needed_gflops_per_s")),
                                       pct(r.get("fraction_of_peak")), pct(b.get("fraction_of_peak"))]) + " |")
    phases = [p for p in ("batch_prep", "embedding_lookup", "attention", "rest_of_layers", "loss", "backward",
                          "optimizer")]
    out += ["", "ms per step by phase (separately timed steps; this tree / baseline):", "",
            "| config | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for r in payload.get("rows", []):
        mine, base = r.get("phases_ms", {}), r.get("baseline", {}).get("phases_ms", {})
        out.append("| " + r["config"] + " | " + " | ".join(
            f"{_fmt(mine.get(p))} / {_fmt(base.get(p))}" for p in phases) + " |")
    for r in payload.get("rows", []):
        for a in r.get("ablations", []):
            ph = a.get("phases_ms", {})
            out.append(f"| {r['config']}, {a['variant']} | " + " | ".join(_fmt(ph.get(p)) for p in phases) + " |")
    abl = [(r["config"], a) for r in payload.get("rows", []) for a in r.get("ablations", [])]
    if abl:
        out += ["", "| this tree with one change turned back | tokens/s | ms/step | this tree ms/step |", "|---|---|---|---|"]
        for cfg_name, a in abl:
            mine = next(r for r in payload["rows"] if r["config"] == cfg_name)
            out.append(f"| {cfg_name}: {a['variant']} | {_fmt(a.get('tokens_per_s'))} | {_fmt(a.get('ms_per_step'))} | "
                       f"{_fmt(mine.get('ms_per_step'))} |")
    peer = payload.get("paper_code")
    if peer:
        hstu = next((r for r in payload.get("rows", []) if r["config"] == "hstu"), {})
        out += ["", f"Paper's research code (HSTU, same data/threads/allocator): status {peer.get('status')}, "
                f"{_fmt(peer.get('s_per_batch_median'))} s/batch, ≈ {_fmt(peer.get('tokens_per_s'))} tokens/s; "
                f"this tree × {_fmt(hstu.get('speedup_vs_paper_code'))}; versions {_cell(peer.get('versions'))}."]
    return out + [""]


GPU_DIR = os.path.join(HERE, "results", "gpu")
_GPU_TABLE_DROP = {"kernels": ("errors",), "train": (), "attention": (),
                   "activation_memory": ("bytes_per_token_by_dtype", "bytes_per_token_by_category"), "mfalcon": ()}


def _small(x):
    """Errors and tolerances below 1e-3 keep two significant digits (the table format has four decimals)."""
    return f"{x:.2g}" if isinstance(x, float) and 0 < abs(x) < 1e-3 else x


def gpu_section(directory: str = GPU_DIR) -> List[str]:
    """results/gpu/ (benchmarks/gpu_check.py): the device, one row per section, then each section's rows."""
    out = ["## GPU check — `benchmarks/gpu_check.py`", ""]
    path = os.path.join(directory, "summary.json")
    if not os.path.exists(path):
        return out + ["_Not run yet on a GPU: `python benchmarks/gpu_check.py --out benchmarks/results/gpu` on a "
                      "CUDA machine (docs/install.md \"GPU\")._", ""]
    with open(path) as f:
        summary = json.load(f)
    v = summary.get("versions") or {}
    out += [f"- device: **{v.get('device', 'unknown')}** (compute capability {_fmt(v.get('capability'))}, "
            f"{_fmt(v.get('gpu_memory_gib'))} GiB); torch {v.get('torch')}, triton {v.get('triton')}, CUDA "
            f"{_fmt(v.get('cuda'))}, Python {v.get('python')}; mode {summary.get('mode')}"]
    out += [f"- {k}: `{summary[k]}`" for k in ("date", "commit", "command") if k in summary]
    out += [f"- {summary.get('ok')}/{len(summary.get('sections', {}))} sections ok in {summary.get('total_s')} s "
            f"(budget {summary.get('budget_s')} s)", "", "| section | status | s | cap s | error |",
            "|---|---|---|---|---|"]
    for name, sec in summary.get("sections", {}).items():
        err = str(sec.get("error") or "")
        out.append(f"| {name} | {'ok' if sec['status'] == 'ok' else '**' + sec['status'] + '**'} | "
                   f"{_fmt(sec.get('seconds'))} | {_fmt(sec.get('cap_s'))} | "
                   f"{_cell(err if len(err) <= 200 else err[:197] + '...')} |")
    out.append("")
    for name in summary.get("sections", {}):
        try:
            with open(os.path.join(directory, f"{name}.json")) as f:
                result = json.load(f).get("result") or {}
        except (OSError, ValueError):
            continue
        rows = [{k: _small(x) for k, x in r.items() if k not in _GPU_TABLE_DROP.get(name, ())}
                for r in result.get("rows", [])]
        if not rows:
            continue
        out += [f"### {name}", ""]
        out += [f"- {k}: {_cell(_small(result[k]))}" for k in ("summary", "matmul_peak", "tolerance", "setup", "reference",
                                                      "max_abs_error_vs_cpu_alone") if k in result]
        out += [""] + _row_table(rows)
    return out


def backend_parity_section(directory: str = os.path.join(HERE, "results", "ml1m-backend-parity")) -> List[str]:
    """results/ml1m-backend-parity/<backend>/ml-1m.json: the same ML-1M run (config, seed, epochs) per ops.backend
    — what the C++ CPU kernels (different float rounding, Philox dropout masks) do to quality."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*", "ml-1m.json"))):
        with open(path) as f:
            for r in json.load(f).get("runs", []):
                rows.append((os.path.basename(os.path.dirname(path)), r))
    if not rows:
        return []
    out = ["## ML-1M quality per ops backend — `reproduce_ml1m.py ops.backend=<backend>`", "",
           "| backend | config | tie order | seed | epochs | test HR@10 | test NDCG@10 | valid HR@10 | train min | "
           "commit | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for backend, r in rows:
        sel = r.get("selected", {})
        test, valid = sel.get("test", {}), sel.get("validation", {})
        out.append("| " + " | ".join([backend, r["config"], r["tie_order"], str(r["seed"]), str(r["epochs"]),
                                      _fmt(test.get("hr@10")), _fmt(test.get("ndcg@10")), _fmt(valid.get("hr@10")),
                                      _fmt(r.get("train_minutes")), r.get("commit", ""), r.get("date", "")[:10]]) + " |")
    return out + ["", "Same seed, data and epochs; runs of one table were started together on the same machine "
                      "(train minutes are comparable only inside one date).", ""]


def content_features_section(payload: dict) -> List[str]:
    """content_features.json (benchmarks/content_features.py): ids vs ids + features vs features, overall / cold /
    never-seen test metrics and the training cost per epoch."""
    out = [f"## Item content features — {payload.get('dataset', '')} (`content_features.py`)", ""]
    for key in ("machine", "date", "commit", "command", "config", "seed", "holdout_items_frac", "cold_max_events",
                "protocol"):
        if key in payload:
            out.append(f"- {key}: `{payload[key]}`")
    if payload.get("smoke"):
        out.append("- **smoke run (tiny synthetic data): plumbing only, not a measurement**")
    out += ["", "| variant | HR@10 | NDCG@10 | cold HR@10 | cold NDCG@10 | cold users | never-seen HR@10 | "
                "never-seen NDCG@10 | never-seen users | train s/epoch | epochs | selected epoch |",
            "|---" * 13 + "|"]
    cols = ("hr@10", "ndcg@10", "cold_hr@10", "cold_ndcg@10", "cold_num_users", "unseen_hr@10", "unseen_ndcg@10",
            "unseen_num_users", "train_seconds_per_epoch", "epochs", "best_epoch")
    for r in payload.get("variants", []):
        out.append("| " + " | ".join([str(r.get("variant", ""))] + [_fmt(r.get(c)) for c in cols]) + " |")
    return out + [""]


def quality_parity_section(payload: dict) -> List[str]:
    """quality_parity.json (benchmarks/quality_parity.py): test HR@10 / NDCG@10 of the fast path and the baseline
    commit's code paths at the compared epochs, same seed and tie order, |Δ| against the tolerance."""
    out = ["## quality_parity.json — `benchmarks/quality_parity.py`", "",
           f"`{payload.get('config', '')}`, fast arm (shipped config) vs reference arm "
           f"(`{' '.join(payload.get('arm_overrides', {}).get('reference', []))}`: the baseline commit's code paths), "
           f"tolerance ±{payload.get('tolerance')} on test HR@10 and NDCG@10.", ""]
    for key, run in sorted(payload.get("runs", {}).items()):
        arms = run.get("arms", {})
        out += [f"**{key}**: " + "; ".join(
            f"{name} {a.get('train_minutes', float('nan')):.1f} training min ({a.get('commit', '')}, "
            f"{a.get('date', '')[:10]}, `{' '.join(a.get('overrides', []))}`)" for name, a in sorted(arms.items())), "",
            "| epoch | HR@10 fast | HR@10 reference | Δ | NDCG@10 fast | NDCG@10 reference | Δ | within |",
            "|---|---|---|---|---|---|---|---|"]
        for r in run.get("comparison", []):
            h, n = r["hr@10"], r["ndcg@10"]
            out.append("| " + " | ".join([str(r["epoch"]), _fmt(h["fast"]), _fmt(h["reference"]), f"{h['delta']:+.4f}",
                                          _fmt(n["fast"]), _fmt(n["reference"]), f"{n['delta']:+.4f}",
                                          "yes" if r["within_tolerance"] else "**no**"]) + " |")
        if not run.get("comparison"):
            out.append("| (one arm only so far) | | | | | | | |")
        out.append("")
    return out


def write_results_md() -> str:
    lines = ["# Benchmark results", "",
             "Generated by `benchmarks/summarize.py` from `benchmarks/results/*.json`; every figure was written by the "
             "benchmark script that measured it (date, machine, commit and command are in each JSON).", ""]
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
        with open(path) as f:
            payload = json.load(f)
        name = os.path.basename(path)
        if name == "ml-1m.json":
            lines += _ml1m_section(payload)
        elif name == "distributed.json":
            lines += _distributed_section(payload)
        elif name == "reliability.json":
            lines += _reliability_section(payload)
        elif name.startswith("table_scale"):  # table_scale.json; table_scale-reload.json: a later partial rerun
            lines += _table_scale_section(payload, name)
        elif name.startswith("train_throughput"):
            lines += _throughput_section(name, payload)
        elif name == "content_features.json":
            lines += content_features_section(payload)
        elif name == "quality_parity.json":
            lines += quality_parity_section(payload)
        else:
            lines += _generic_section(name, payload)
    lines += backend_parity_section()
    lines += gpu_section()
    out = os.path.join(HERE, "RESULTS.md")
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(out + ".tmp", out)
    return out


if __name__ == "__main__":
    print(write_results_md())
