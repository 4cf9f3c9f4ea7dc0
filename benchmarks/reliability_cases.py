"""Reliability cases of issue 14 §2-4 (config values, CLI arguments, data files, serving inputs) for
benchmarks/reliability.py. Plain data: each is a ReliabilityCase(name, argv, expected, setup, check, names)."""

from __future__ import annotations

from typing import List

from reliability import TINY, CaseContext, ReliabilityCase

BOM = b"\xef\xbb\xbf"
USERS = b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\n"
RATINGS = b"".join(f"{u}::{i}::{r}::{978300000 + t}\n".encode() for u, i, r, t in [
    (1, 10, 5, 100), (1, 11, 3, 200), (1, 12, 4, 300), (1, 13, 1, 400), (1, 14, 5, 500),
    (2, 10, 2, 50), (2, 12, 4, 60), (2, 15, 5, 70), (3, 11, 4, 10), (3, 12, 4, 20), (3, 13, 4, 30)])
RANKING_ML1M = ["task=ranking", "data.name=ml-1m", "data.max_seq_len=3", "data.min_seq_len=2",
                "ranking.num_eval_targets=2", "ranking.zip_prefix_len=1"]


def _previous_run(ctx: CaseContext) -> None:
    ctx.previous_run()


def _train(override: str, *extra: str) -> List[str]:
    return ["train", "--run-dir", "{run}", "data.cache_dir={cache}", *TINY, *extra, override]


# ------------------------------------------------------------------- config values (a previous run must survive)
BAD_VALUES = [  # (override, what the one-line error must name)
    ("optim.lr=nan", "optim.lr"), ("optim.lr=-0.001", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("optim.betas=[2.0,0.9]", "optim.betas[0]"),
    ("optim.eps=0", "optim.eps"), ("optim.warmup_steps=-10", "optim.warmup_steps"),
    ("optim.grad_clip_norm=-1", "optim.grad_clip_norm"), ("model.attention_dim=0", "model.attention_dim"),
    ("model.num_heads=0", "model.num_heads"), ("model.dropout=1.5", "model.dropout"),
    ("model.num_layers=0", "model.num_layers"), ("eval.ks=[0]", "eval.ks[0]"),
    ("data.max_seq_len=1", "data.max_seq_len"), ("data.min_seq_len=1", "data.min_seq_len"),
    ("data.batch_size=0", "data.batch_size"), ("train.max_steps=-5", "train.max_steps"),
    ("train.epochs=0", "train.epochs"), ("loss.num_negatives=0", "loss.num_negatives"),
    ("loss.num_negatives=100000000", "loss.num_negatives"), ("loss.temperature=0", "loss.temperature"),
    ("sharding.sharding_type=diagonal", "sharding.sharding_type"), ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("model.arch=transformer", "model.arch"), ("train.stochastic_length.alpha=nan", "train.stochastic_length.alpha"),
]
CONFIG_CASES = [ReliabilityCase(override, _train(override), "clear-error", setup=_previous_run, names=(f"'{key}'",))
                for override, key in BAD_VALUES]
CONFIG_CASES += [
    ReliabilityCase("ranking.num_eval_targets=0", _train("ranking.num_eval_targets=0", "task=ranking"),
                    "clear-error", setup=_previous_run, names=("'ranking.num_eval_targets'",)),
    ReliabilityCase("valid tiny run (control)", _train("train.epochs=1"), "accepted"),
]


# ------------------------------------------------------------------------------------------------ CLI arguments
def _file_at_run(ctx: CaseContext) -> None:
    ctx.tmp.mkdir(parents=True, exist_ok=True)
    ctx.run_dir.write_text("not a directory\n")
    ctx.protect.append(ctx.run_dir)


def _config_dir(ctx: CaseContext) -> None:
    (ctx.tmp / "configdir").mkdir()


CLI_CASES = [
    ReliabilityCase("--nproc-per-node -1", ["train", "--nproc-per-node", "-1", "--run-dir", "{run}", *TINY],
                    "clear-error", names=("--nproc-per-node",)),
    ReliabilityCase("--nproc-per-node 0", ["train", "--nproc-per-node", "0", "--run-dir", "{run}", *TINY],
                    "clear-error", names=("--nproc-per-node",)),
    ReliabilityCase("--run-dir is a file", ["train", "--run-dir", "{run}", "data.cache_dir={cache}", *TINY],
                    "clear-error", setup=_file_at_run, names=("run_dir", "existing file")),
    ReliabilityCase("--config is a directory", ["train", "--config", "{tmp}/configdir", "--run-dir", "{run}"],
                    "clear-error", setup=_config_dir, names=("configdir", "is a directory")),
    ReliabilityCase("--config missing", ["train", "--config", "{tmp}/missing.yaml", "--run-dir", "{run}"],
                    "clear-error", names=("missing.yaml",)),
]


# ------------------------------------------------------------------------------------------------ data files
def _data(ratings: bytes, users: bytes = b"") -> object:
    def setup(ctx: CaseContext) -> None:
        ctx.data_dir.mkdir(parents=True)
        (ctx.data_dir / "ratings.dat").write_bytes(ratings)
        if users:
            (ctx.data_dir / "users.dat").write_bytes(users)
    return setup


PREPARE = ["prepare", "--data-dir", "{data}", "data.cache_dir={cache}", "data.name=ml-1m", "train.progress=false"]
DATA_CASES = [
    ReliabilityCase("prepare: BOM ratings.dat", PREPARE, "accepted", setup=_data(BOM + RATINGS)),
    ReliabilityCase("prepare ranking: BOM users.dat", PREPARE + RANKING_ML1M, "accepted",
                    setup=_data(BOM + RATINGS, BOM + USERS)),
    ReliabilityCase("prepare ranking: malformed users.dat", PREPARE + RANKING_ML1M, "clear-error",
                    setup=_data(RATINGS, USERS.replace(b"2::M::56", b"2::X::56")), names=("users.dat", "line 2")),
    ReliabilityCase("prepare ranking: users.dat missing", PREPARE + RANKING_ML1M, "clear-error",
                    setup=_data(RATINGS), names=("users.dat",)),
    ReliabilityCase("prepare: bad ratings.dat row", PREPARE, "clear-error",
                    setup=_data(RATINGS + b"4::x::3::978300000\n"), names=("ratings.dat", "line 12")),
]


# ---------------------------------------------------------------------------------------------- serving inputs
SERVE = """
import sys, hstu.serving
model = hstu.serving.load(sys.argv[1])
state = model.encode([3, 5, 7], [10, 20, 30])
try:
    {call}
except ValueError as e:  # the documented error type of bad serving arguments; anything else: a traceback
    print("hstu: error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)
"""


def _serve(name: str, call: str, expected: str, *names: str) -> ReliabilityCase:
    return ReliabilityCase(name, ["python", "-c", SERVE.format(call=call), "{art}"], expected, names=names)


SERVING_CASES = [
    _serve("serving: empty history retrieve", "model.retrieve([], [], k=5)", "clear-error", "history_ids"),
    _serve("serving: k=-1", "model.retrieve([3, 5], [10, 20], k=-1)", "clear-error", "k = -1"),
    _serve("serving: k=0", "model.retrieve([3, 5], [10, 20], k=0)", "clear-error", "k = 0"),
    _serve("serving: decreasing timestamps", "model.retrieve([3, 5, 7], [10, 20, 5], k=5)", "clear-error",
           "history_timestamps[2]"),
    _serve("serving: append earlier than the state", "model.append(state, [4], [5])", "clear-error",
           "timestamps[0]"),
    _serve("serving: query_time=nan", "model.retrieve([3, 5], [10, 20], k=5, query_time=float('nan'))",
           "clear-error", "query_time"),
    _serve("serving: item id out of range", "model.retrieve([3, 10**6], [10, 20], k=5)", "clear-error",
           "history_ids"),
    _serve("serving: mismatched lengths", "model.rank([3, 5, 7], [10, 20], [1, 2])", "clear-error",
           "differ in length"),
    _serve("serving: candidate id 0", "model.rank([3, 5], [10, 20], [0, 2])", "clear-error", "candidates"),
    _serve("serving: empty history rank (documented cold start)", "model.rank([], [], [1, 2], query_time=40)",
           "accepted"),
]

CASES = CONFIG_CASES + CLI_CASES + DATA_CASES + SERVING_CASES
