"""Reliability corpus: replay damage / bad-config / bad-input cases against the real CLI (docs/reliability.md).

Each case runs ``python -m hstu.trainer.cli ARGV`` (or ``python ARGV`` when argv starts with "python") in a fresh
temporary directory and is classified:

- ``clear-error``: non-zero exit, the last stderr line is one ``hstu: error: ...`` line naming what the case
  lists in ``names`` (the key, file or argument), and no ``Traceback`` anywhere in the output;
- ``accepted``: exit 0 (a case's ``check`` may refine this to ``fallback`` or ``resume-bit-identical``);
- ``raw-error``: any other failure (a traceback, several lines, the key not named);
- ``lost-previous-work``: a file listed in ``ctx.protect`` (a previous run's files, checksummed before the
  case) changed or disappeared — whatever the exit status.

A case is plain data, :class:`ReliabilityCase`; ``setup(ctx)`` prepares files (``ctx`` is a :class:`CaseContext`),
``check(ctx, outcome)`` may return the observed class (or None to keep the default). Argument strings are
``str.format``-ed with ``ctx.paths()`` ({tmp}, {run}, {cache}, {data}, {art}, {template}). Other modules add cases
by defining ``CASES`` (a list of ReliabilityCase) in a file named in ``CASE_MODULES``
(``benchmarks/reliability_checkpoint_cases.py`` is imported when it exists); such a file imports
``from reliability import ReliabilityCase, CaseContext, TINY``. A protected file must keep its bytes; new files
beside it are fine.

    python benchmarks/reliability.py            # the whole corpus -> benchmarks/results/reliability.json
    python benchmarks/reliability.py --smoke    # a few fast cases, results to --out (default: a temp dir)
    python benchmarks/reliability.py --only optim.lr=nan --only k=-1
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

if __name__ == "__main__":  # case modules import this file as `reliability`: one module, not two copies
    sys.modules.setdefault("reliability", sys.modules[__name__])
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import provenance, write_json  # noqa: E402

CLASSES = ("resume-bit-identical", "fallback", "clear-error", "accepted")
CASE_TIMEOUT_S = 300
TINY = [  # a synthetic run that trains in seconds on a CPU
    "data.synthetic.num_users=200", "data.synthetic.num_items=100", "data.synthetic.max_seq_len=20",
    "data.max_seq_len=20", "data.batch_size=32", "model.embedding_dim=8", "model.attention_dim=4",
    "model.linear_dim=4", "model.num_heads=2", "loss.num_negatives=8", "train.progress=false",
    "train.tensorboard=false", "train.epochs=2", "train.eval_every_epochs=1", "train.num_threads=1",
    "eval.ks=[10]", "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10", "checkpoint.every_steps=5",
]


@dataclass
class ReliabilityCase:
    """One replayed situation. expected: one of CLASSES. names: fragments the error line must contain."""

    name: str
    argv: Union[List[str], Callable[["CaseContext"], List[str]]]  # format strings, or built from the context
    expected: str
    setup: Optional[Callable[["CaseContext"], None]] = None
    check: Optional[Callable[["CaseContext", "Outcome"], Optional[str]]] = None
    names: Sequence[str] = ()


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class CaseContext:
    """A case's temporary directory. ``protect``: paths (files or directories) whose files must survive the case
    byte for byte. ``template`` / ``artifact``: a finished tiny run / its serving artifact, built once per
    corpus run and copied or read by cases."""

    def __init__(self, tmp: Path, shared: "Shared") -> None:
        self.tmp, self.shared = tmp, shared
        self.run_dir, self.cache_dir, self.data_dir = tmp / "run", tmp / "cache", tmp / "data"
        self.protect: List[Path] = []
        self.env: Dict[str, str] = {}
        self.case_run = ""  # a case-dict module's run directory for this case (dict_cases)

    @property
    def template(self) -> Path:
        return self.shared.template()

    @property
    def artifact(self) -> Path:
        return self.shared.artifact()

    def paths(self) -> Dict[str, str]:
        lazy = {"template": lambda: self.template, "art": lambda: self.artifact}
        out = {"tmp": str(self.tmp), "run": str(self.run_dir), "cache": str(self.cache_dir), "data": str(self.data_dir)}
        return _LazyPaths(out, lazy)

    def previous_run(self) -> None:
        """Copy the finished tiny run into run_dir and protect it (a run that must not lose its files)."""
        shutil.copytree(self.template, self.run_dir)
        self.protect.append(self.run_dir)


class _LazyPaths(dict):
    def __init__(self, base: Dict[str, str], lazy: Dict[str, Callable[[], Path]]) -> None:
        super().__init__(base)
        self._lazy = lazy

    def __missing__(self, key: str) -> str:
        if key in self._lazy:
            self[key] = str(self._lazy[key]())
            return self[key]
        raise KeyError(key)


class Shared:
    """Things several cases need, built on first use: a finished tiny training run and its export."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._template: Optional[Path] = None
        self._artifact: Optional[Path] = None
        self.prepared: Dict[str, Dict[str, Any]] = {}  # per case module with prepare(root): its shared state

    def template(self) -> Path:
        if self._template is None:
            run = self.root / "template-run"
            _run_cli(["train", "--run-dir", str(run), f"data.cache_dir={self.root / 'template-cache'}", *TINY],
                     check=True)
            self._template = run
        return self._template

    def artifact(self) -> Path:
        if self._artifact is None:
            art = self.root / "template-artifact"
            _run_cli(["export", "--run-dir", str(self.template()), "--out", str(art)], check=True)
            self._artifact = art
        return self._artifact


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _command(argv: Sequence[str]) -> List[str]:
    if argv and argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return [sys.executable, "-m", "hstu.trainer.cli", *argv]


def _run_cli(argv: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = False,
             cwd: Optional[Path] = None) -> Outcome:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_command(argv), capture_output=True, text=True, env=_env(env), timeout=CASE_TIMEOUT_S,
                           cwd=str(cwd) if cwd else None)
        out = Outcome(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
    except subprocess.TimeoutExpired as e:
        out = Outcome(-9, str(e.stdout or ""), f"timed out after {CASE_TIMEOUT_S} s", time.perf_counter() - t0)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def checksums(paths: Sequence[Path]) -> Dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories)."""
    out: Dict[str, str] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def error_line(outcome: Outcome) -> str:
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def classify(case: ReliabilityCase, outcome: Outcome) -> str:
    """Default observed class from the exit status and the output (see the module docstring)."""
    if "Traceback" in outcome.stdout or "Traceback" in outcome.stderr:
        return "raw-error"
    if outcome.returncode == 0:
        return "accepted"
    line = error_line(outcome)
    errors = [ln for ln in outcome.stderr.splitlines() if ln.startswith("hstu: error:")]
    if len(errors) == 1 and line.startswith("hstu: error:") and all(n in line for n in case.names):
        return "clear-error"
    return "raw-error"


def run_case(case: ReliabilityCase, shared: Shared, workdir: Path) -> Dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=str(workdir)))
    ctx = CaseContext(tmp, shared)
    row: Dict[str, object] = {"name": case.name, "expected": case.expected}
    try:
        if case.setup is not None:
            case.setup(ctx)
        argv = case.argv(ctx) if callable(case.argv) else [a.format_map(ctx.paths()) for a in case.argv]
        row["command"] = " ".join(["hstu" if argv[:1] != ["python"] else "python", *argv[1 if argv[:1] == [
            "python"] else 0:]]).replace(str(tmp), "$TMP").replace(str(shared.root), "$SHARED")
        before = checksums(ctx.protect)
        outcome = _run_cli(argv, ctx.env, cwd=tmp)
        observed = classify(case, outcome)
        if case.check is not None:
            observed = case.check(ctx, outcome) or observed
        after = checksums(ctx.protect)
        lost = sorted(f for f, digest in before.items() if after.get(f) != digest)  # new files are fine
        if lost:
            observed = "lost-previous-work"
            row["lost"] = [f.replace(str(tmp), "$TMP") for f in lost][:20]
        row.update(observed=observed, exit=outcome.returncode, seconds=round(outcome.seconds, 1),
                   message=error_line(outcome)[:300] if outcome.returncode else "")
    except Exception as e:  # the harness itself failed: recorded, never hidden
        row.update(observed="harness-error", exit=None, seconds=None, message=f"{type(e).__name__}: {e}"[:300])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row["ok"] = row["observed"] == case.expected
    return row


# ------------------------------------------------------------------------------------------------ the corpus
CASE_MODULES = ("reliability_cases.py", "reliability_checkpoint_cases.py")  # CASES of each, when the file exists


# failure classes of the case-dict modules -> this runner's names (the totals count these)
DICT_CASE_CLASSES = {"traceback": "raw-error", "unclear-error": "raw-error", "lost-work": "lost-previous-work"}


def dict_cases(mod: Any) -> List[ReliabilityCase]:
    """The case dicts of a module with ``prepare(root)`` / ``new_case_dir(root, name, shared)`` (e.g.
    reliability_checkpoint_cases.py: ``setup(run_dir, shared)``, ``argv(run_dir, shared)``, ``check(run_dir, proc,
    shared)``) as ReliabilityCase: ``prepare`` runs once per corpus run, each case gets a fresh copy of its base."""
    def state(ctx: CaseContext) -> Dict[str, Any]:
        if mod.__name__ not in ctx.shared.prepared:
            ctx.shared.prepared[mod.__name__] = mod.prepare(str(ctx.shared.root / mod.__name__))
        return ctx.shared.prepared[mod.__name__]

    def adapt(case: Dict[str, Any]) -> ReliabilityCase:
        def setup(ctx: CaseContext) -> None:
            shared = state(ctx)
            ctx.case_run = mod.new_case_dir(shared["root"], case["name"], shared)
            case["setup"](ctx.case_run, shared)

        def check(ctx: CaseContext, outcome: Outcome) -> str:
            observed = case["check"](ctx.case_run, outcome, state(ctx))
            return DICT_CASE_CLASSES.get(observed, observed)

        return ReliabilityCase(case["name"], lambda ctx: case["argv"](ctx.case_run, state(ctx)), case["expected"],
                               setup=setup, check=check)

    return [adapt(c) for c in mod.CASES]


def all_cases() -> List[ReliabilityCase]:
    """Every case of the CASE_MODULES (config / CLI / data / serving inputs; checkpoint damage)."""
    cases: List[ReliabilityCase] = []
    for file in CASE_MODULES:
        path = HERE / file
        if path.exists():
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            found = list(getattr(mod, "CASES", []))
            cases += dict_cases(mod) if found and isinstance(found[0], dict) else found
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate case names: {dup}")
    return cases


SMOKE = ("optim.lr=nan", "--nproc-per-node -1", "prepare: BOM ratings.dat")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help=f"only {list(SMOKE)} (fast; for tests)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this case (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--out", help="results directory (default benchmarks/results; --smoke/--only: a temp dir)")
    args = ap.parse_args(argv)
    cases = all_cases()
    if args.list:
        print("\n".join(f"{c.name}  [{c.expected}]" for c in cases))
        return {}
    wanted = list(SMOKE) if args.smoke else args.only
    if wanted:
        unknown = [n for n in wanted if n not in {c.name for c in cases}]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; see --list")
        cases = [c for c in cases if c.name in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hstu-reliability-") as root:
        shared = Shared(Path(root))
        for i, case in enumerate(cases, 1):
            row = run_case(case, shared, Path(root))
            rows.append(row)
            print(f"[{i}/{len(cases)}] {'ok  ' if row['ok'] else 'FAIL'} {case.name}: expected {case.expected}, "
                  f"observed {row['observed']} ({row['seconds']} s)", flush=True)
    totals = {
        "cases": len(rows), "ok": sum(bool(r["ok"]) for r in rows), "failed": sum(not r["ok"] for r in rows),
        "lost_previous_work": sum(r["observed"] == "lost-previous-work" for r in rows),
        "raw_tracebacks_or_unclear_errors": sum(r["observed"] == "raw-error" for r in rows),
        "silently_accepted_invalid": sum((r["expected"] == "clear-error" and r["observed"] == "accepted")
                                         or r["observed"] == "silently-accepted" for r in rows),
        "by_expected": {c: sum(r["expected"] == c for r in rows) for c in CLASSES},
    }
    payload = {**provenance(), "totals": totals, "cases": rows}
    out_dir = args.out or (None if not (args.smoke or args.only) else tempfile.mkdtemp(prefix="reliability-out-"))
    if out_dir:
        import json

        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "reliability.json")
        with open(path + ".tmp", "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(path + ".tmp", path)
    else:
        path = write_json("reliability.json", payload)
    print(f"{totals['ok']}/{totals['cases']} cases as expected; lost previous work {totals['lost_previous_work']}, "
          f"raw errors {totals['raw_tracebacks_or_unclear_errors']}, silently accepted "
          f"{totals['silently_accepted_invalid']} -> {path}")
    payload["path"] = path
    return payload


if __name__ == "__main__":
    result = main()
    sys.exit(0 if not result or result["totals"]["failed"] == 0 else 1)
