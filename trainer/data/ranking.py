"""Ranking data (task=ranking; docs/ranking.md): per-user events with actions and multi-task labels, contextual
features, slowly changing side series; the chronological split; the loaders.

ML-1M
- action token = the rating (1..5); binary tasks ``like`` = rating >= 4, ``love`` = rating == 5; regression
  target ``rating`` (1..5, used when ranking.regression_weight > 0);
- contextual tokens from users.dat (``UserID::Gender::Age::Occupation::Zip-code``): gender, age, occupation,
  zip (the first ranking.zip_prefix_len characters); no slowly changing series (the demographics never change).
Synthetic: trainer/data/synthetic_ranking.py (click / like / share / complete, followed creators, region).

Split (chronological, per user, like leave-one-out with validation): the last K = min(ranking.num_eval_targets,
n − 1) events of a user are the TEST candidates (history: the at most data.max_seq_len events before them); the
K_v = min(K, n − K − 1) events before those are the VALIDATION candidates (history: the at most max_seq_len events
before them). Training uses exactly the validation history window (loss at every item), so no validation or test
event is ever trained on; evaluation appends the candidates to their history window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.ranking_batch import RankingLoader
from hstu.trainer.data.sequentialize import SideTokens, contextual_matrix
from hstu.trainer.data.textparse import UTF8_BOM

ML1M_TASKS = ("like", "love")
ML1M_CONTEXT = ("gender", "age", "occupation", "zip")
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)
ML1M_OCCUPATIONS = 21  # 0..20


@dataclass
class RankingData:
    """All users of one ranking dataset, CSR over events (user u owns events [offsets[u], offsets[u+1])).

    user_ids [U], offsets [U+1], item_ids [E] (1..num_items), timestamps [E] (non-decreasing per user),
    actions [E] (action token ids 1..num_actions), labels [E, K] float32 (binary tasks ``task_names``),
    regression [E] float32 | None (``regression_name``), context [U, C] int64 (0 = unknown; feature c has
    ``context_vocab[c]`` rows incl. 0), side: SideTokens | None (``side_vocab[f]`` rows incl. 0)."""

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray
    labels: np.ndarray
    task_names: Tuple[str, ...]
    num_items: int
    num_actions: int
    context: np.ndarray
    context_names: Tuple[str, ...] = ()
    context_vocab: Tuple[int, ...] = ()
    side: Optional[SideTokens] = None
    side_vocab: Tuple[int, ...] = ()
    regression: Optional[np.ndarray] = None
    regression_name: Optional[str] = None
    num_pre: Optional[np.ndarray] = None  # [U] events before the cutoff (own logs, data.events.split=time)
    dataset_dir: Optional[str] = None  # own logs: the prepared dataset (hstu export copies its vocabularies)

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_events(self) -> int:
        return int(self.item_ids.shape[0])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ------------------------------------------------------------------------------------------------ selection


def _pick(names: Sequence[str], wanted: Optional[Sequence[str]], what: str, source: str) -> List[int]:
    if wanted is None:
        return list(range(len(names)))
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise DataError(f"{source}: unknown {what} {unknown} (this dataset has: {', '.join(names) or 'none'})")
    return [list(names).index(w) for w in wanted]


def select_features(data: RankingData, tasks: Optional[Sequence[str]], contextual: Optional[Sequence[str]],
                    side_series: Optional[Sequence[str]], source: str = "ranking") -> RankingData:
    """Keep only the requested binary tasks / contextual features / side series (None or [] tasks = all)."""
    t = _pick(data.task_names, list(tasks) if tasks else None, "ranking.tasks", source)
    c = _pick(data.context_names, contextual, "ranking.contextual feature", source)
    side, side_vocab = data.side, data.side_vocab
    if side is not None:
        f = _pick(side.names, side_series, "ranking.side_series", source)
        remap = np.full(len(side.names), -1, dtype=np.int64)
        remap[f] = np.arange(len(f))
        keep = remap[side.feature] >= 0
        owner = np.repeat(np.arange(side.offsets.size - 1), np.diff(side.offsets))
        offsets = np.zeros_like(side.offsets)
        np.cumsum(np.bincount(owner[keep], minlength=side.offsets.size - 1), out=offsets[1:])
        side = SideTokens(tuple(side.names[i] for i in f), offsets, remap[side.feature[keep]], side.values[keep],
                          side.timestamps[keep], side.insert_at[keep])
        side_vocab = tuple(data.side_vocab[i] for i in f)
        if not f:
            side, side_vocab = None, ()
    elif side_series:
        raise DataError(f"{source}: ranking.side_series {list(side_series)} but this dataset has no side series")
    return dataclasses.replace(
        data, labels=np.ascontiguousarray(data.labels[:, t]), task_names=tuple(data.task_names[i] for i in t),
        context=np.ascontiguousarray(data.context[:, c]), context_names=tuple(data.context_names[i] for i in c),
        context_vocab=tuple(data.context_vocab[i] for i in c), side=side, side_vocab=side_vocab)


# ------------------------------------------------------------------------------------------------ split/loaders


@dataclass
class RankingSplit:
    """Per-user windows (row-aligned, event indices within the user): rows [U']; the TEST eval: hist_start /
    hist_end [U'] (history window), num_candidates [U'] (candidates = events [hist_end, hist_end + num_candidates));
    training: train_start / train_end [U'] (the window the loss sees) — also the VALIDATION history, whose
    candidates are events [train_end, train_end + valid_candidates) (valid_candidates [U'], 0 = none)."""

    rows: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    num_candidates: np.ndarray
    train_start: np.ndarray
    train_end: np.ndarray
    valid_candidates: np.ndarray


def chronological_split(data: RankingData, max_seq_len: int, num_eval_targets: int) -> RankingSplit:
    """Users with n >= 2 events: the last K = min(num_eval_targets, n − 1) events are test candidates (history: the
    last ``max_seq_len`` events before them); the K_v = min(K, n − K − 1) events before those are validation
    candidates; the training window is the last ``max_seq_len`` events before the validation candidates (>= 1
    event), so a user with n <= 2 has no validation candidates."""
    if num_eval_targets < 1:
        raise DataError(f"ranking.num_eval_targets must be >= 1, got {num_eval_targets}")
    n = data.lengths()
    if data.num_pre is not None:  # own logs with a time cutoff: trainer/data/events_ranking.py
        from hstu.trainer.data.events_ranking import time_cutoff_windows

        return RankingSplit(*time_cutoff_windows(n, data.num_pre, max_seq_len, num_eval_targets))
    rows = np.flatnonzero(n >= 2)
    k = np.minimum(num_eval_targets, n[rows] - 1)
    end = n[rows] - k
    start = np.maximum(0, end - max_seq_len)
    k_valid = np.minimum(num_eval_targets, end - 1)
    train_end = end - k_valid
    return RankingSplit(rows, start, end, k, np.maximum(0, train_end - max_seq_len), train_end, k_valid)


def validation_loader(data: RankingData, split: RankingSplit, eval_batch_size: int, max_side_tokens: int,
                      rank: int = 0, world_size: int = 1) -> Optional[RankingLoader]:
    """Eval loader of the validation candidates (users that have some, in user order), or None when no user has
    any (or fewer users than processes)."""
    has = split.valid_candidates > 0
    if not has.any() or int(has.sum()) < world_size:
        return None
    return RankingLoader(data, split.rows[has], split.train_start[has], split.train_end[has],
                         split.valid_candidates[has], eval_batch_size, predict="candidates", shuffle=False,
                         max_side_tokens=max_side_tokens, rank=rank, world_size=world_size)


def build_ranking_loaders(data: RankingData, split: RankingSplit, batch_size: int, eval_batch_size: int,
                          seed: int, max_side_tokens: int, rank: int = 0, world_size: int = 1
                          ) -> Tuple[RankingLoader, RankingLoader]:
    """(train loader: training windows (they end before the validation candidates), shuffled per (seed, epoch),
    loss at every item; eval loader: the TEST history windows + candidates, in user order). Both read this rank's
    slice of every global batch (RankingLoader). The validation loader: :func:`validation_loader`."""
    train = RankingLoader(data, split.rows, split.train_start, split.train_end, np.zeros_like(split.rows),
                          batch_size, predict="history", shuffle=True, seed=seed, max_side_tokens=max_side_tokens,
                          rank=rank, world_size=world_size)
    has = split.num_candidates > 0  # every user but, with a time cutoff, those with no event after it
    evaluation = RankingLoader(data, split.rows[has], split.hist_start[has], split.hist_end[has],
                               split.num_candidates[has], eval_batch_size, predict="candidates", shuffle=False,
                               max_side_tokens=max_side_tokens, rank=rank, world_size=world_size)
    return train, evaluation


# ------------------------------------------------------------------------------------------------ ML-1M


@dataclass
class UserRecord:
    """One users.dat row: gender "M" | "F", age (one of ML1M_AGES), occupation 0..20, zip code (text)."""

    gender: str
    age: int
    occupation: int
    zip: str


def read_users_dat(path: "str | Path") -> Dict[int, UserRecord]:
    """Parse ML-1M ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``) -> {user id: UserRecord}.

    Raises DataError naming the file, the 1-based line, the field and the value on any malformed row (wrong
    field count, non-integer or non-positive id, duplicate id, gender not M/F, age not one of the ML-1M age
    groups, occupation outside 0..20, empty or non-printable zip). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found (ML-1M ranking needs users.dat next to ratings.dat)", path=str(path))
    names = ("UserID", "Gender", "Age", "Occupation", "Zip-code")
    out: Dict[int, UserRecord] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if line_no == 1 and raw.startswith(UTF8_BOM):  # a byte-order mark is not data
                raw = raw[len(UTF8_BOM):]
            if not raw.strip():
                continue
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise DataError("non-ASCII bytes", path=str(path), line=line_no, field="line",
                                value=raw.decode("utf-8", "backslashreplace")) from None
            tokens = text.split("::")
            if len(tokens) != 5:
                field = names[len(tokens)] if len(tokens) < 5 else "#6 (extra)"
                raise DataError(f"expected 5 fields ({'::'.join(names)}), got {len(tokens)}", path=str(path),
                                line=line_no, field=field, value=text)
            uid, gender, age, occ, zip_code = tokens

            def bad(field: str, value: str, why: str) -> DataError:
                return DataError(why, path=str(path), line=line_no, field=field, value=value)

            if not uid.isdigit() or int(uid) < 1:
                raise bad("UserID", uid, "not a positive integer")
            if int(uid) in out:
                raise bad("UserID", uid, "duplicate user id")
            if gender not in ("M", "F"):
                raise bad("Gender", gender, "must be 'M' or 'F'")
            if not age.isdigit() or int(age) not in ML1M_AGES:
                raise bad("Age", age, f"not an ML-1M age group {list(ML1M_AGES)}")
            if not occ.isdigit() or not 0 <= int(occ) < ML1M_OCCUPATIONS:
                raise bad("Occupation", occ, f"not an occupation code 0..{ML1M_OCCUPATIONS - 1}")
            if not zip_code or not zip_code.isprintable() or " " in zip_code:
                raise bad("Zip-code", zip_code, "empty or not printable")
            out[int(uid)] = UserRecord(gender, int(age), int(occ), zip_code)
    if not out:
        raise DataError("no users in file", path=str(path))
    return out


def ml1m_context(users: Dict[int, UserRecord], user_ids: np.ndarray, zip_prefix_len: int
                 ) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """Contextual ids [U, 4] (gender, age, occupation, zip prefix; 0 = user missing from users.dat) and the
    vocab sizes (rows incl. 0). Zip prefixes are numbered in sorted order over all users of users.dat."""
    if zip_prefix_len < 1:
        raise DataError(f"ranking.zip_prefix_len must be >= 1, got {zip_prefix_len}")
    zips = sorted({r.zip[:zip_prefix_len] for r in users.values()})
    zip_id = {z: i + 1 for i, z in enumerate(zips)}
    tables = {
        "gender": {u: 1 + (r.gender == "M") for u, r in users.items()},
        "age": {u: 1 + ML1M_AGES.index(r.age) for u, r in users.items()},
        "occupation": {u: 1 + r.occupation for u, r in users.items()},
        "zip": {u: zip_id[r.zip[:zip_prefix_len]] for u, r in users.items()},
    }
    return contextual_matrix(user_ids, tables), (3, len(ML1M_AGES) + 1, ML1M_OCCUPATIONS + 1, len(zips) + 1)


def ml1m_ranking_data(seqs, users: Dict[int, UserRecord], zip_prefix_len: int = 2) -> RankingData:
    """UserSequences with ratings (1..5) + users.dat records -> RankingData (actions = ratings; labels like =
    rating >= 4, love = rating == 5; regression = rating)."""
    if seqs.ratings is None:
        raise DataError("ML-1M ranking needs ratings")
    r = seqs.ratings.astype(np.int64)
    if r.size and (r.min() < 1 or r.max() > 5):
        raise DataError(f"ML-1M ratings must be 1..5, got {int(r.min())}..{int(r.max())}")
    context, vocab = ml1m_context(users, seqs.user_ids, zip_prefix_len)
    labels = np.stack([r >= 4, r == 5], 1).astype(np.float32)
    return RankingData(
        user_ids=seqs.user_ids, offsets=seqs.offsets, item_ids=seqs.item_ids, timestamps=seqs.timestamps,
        actions=r, labels=labels, task_names=ML1M_TASKS, num_items=seqs.num_items, num_actions=5,
        context=context, context_names=ML1M_CONTEXT, context_vocab=vocab,
        regression=r.astype(np.float32), regression_name="rating")


def users_file(data_cfg, progress: bool = True) -> Path:
    """users.dat of ML-1M: in data.data_dir (or data_dir/ml-1m/), else in the downloaded raw folder."""
    if data_cfg.data_dir:
        base = Path(data_cfg.data_dir).expanduser()
    else:
        from hstu.trainer.data.download import download_dataset

        base = download_dataset("ml-1m", data_cfg.cache_dir, progress=progress)
    for candidate in (base / "users.dat", base / "ml-1m" / "users.dat"):
        if candidate.is_file():
            return candidate
    return base / "users.dat"  # read_users_dat raises a DataError naming it


def ranking_data_config(cfg) -> Any:
    """The DataConfig of the ranking sequence cache: each user's last data.max_seq_len + 2K events (history window +
    K validation and K test candidates). The sequence cache keeps max_seq_len + KEPT_BEYOND_MAX_LEN events per
    user, so ask for data.max_seq_len + 2K - KEPT_BEYOND_MAX_LEN; same tie order (data.tie_order / data.seed) as
    the retrieval data, so both tasks see the same events."""
    from hstu.trainer.data.sequences import KEPT_BEYOND_MAX_LEN

    K = cfg.ranking.num_eval_targets
    out = dataclasses.replace(cfg.data, max_seq_len=cfg.data.max_seq_len + 2 * K - KEPT_BEYOND_MAX_LEN,
                              min_seq_len=max(cfg.data.min_seq_len, 2))
    if cfg.data.name == "events":
        from hstu.trainer.data.events_ranking import events_ranking_config

        out = events_ranking_config(cfg, out)
    return out


def prepare_ranking(cfg, progress: bool = True) -> Dict[str, Any]:
    """``hstu prepare`` of a task=ranking config: builds the sequence cache entry the ranking data reads and reads
    and validates every other file it uses (ml-1m: users.dat, ratings 1..5), so a malformed file fails here, not
    at train time. Synthetic ranking data is generated when training starts (nothing to read)."""
    from hstu.trainer.data import prepare

    if cfg.data.name not in ("ml-1m", "events"):
        return prepare(cfg.data, progress)
    summary = prepare(ranking_data_config(cfg), progress)
    data = load_ranking_data(cfg, progress)
    if cfg.data.name == "ml-1m":
        summary["users_file"] = str(users_file(cfg.data, progress))
    summary.update(ranking_users=int(len(data.user_ids)), ranking_tasks=list(data.task_names))
    return summary


def load_ranking_data(cfg, progress: bool = True) -> RankingData:
    """RunConfig (task=ranking) -> RankingData with the configured tasks / features selected.

    ml-1m: ratings through the sequence cache (each user's last data.max_seq_len + 2K events, same-second events in
    data.tie_order) + users.dat;
    synthetic: the streaming generator (cfg.ranking.synthetic)."""
    rc, name = cfg.ranking, cfg.data.name
    if name == "ml-1m":
        from hstu.trainer.data import load_sequences

        seqs = load_sequences(ranking_data_config(cfg), progress=progress)
        data = ml1m_ranking_data(seqs, read_users_dat(users_file(cfg.data, progress)), rc.zip_prefix_len)
    elif name == "synthetic":
        from hstu.trainer.data.synthetic_ranking import generate_ranking

        data = generate_ranking(rc.synthetic, progress=progress)
    elif name == "events":  # own logs: trainer/data/events_ranking.py
        from hstu.trainer.data.events_ranking import events_ranking_data

        data = events_ranking_data(cfg, progress)
    else:
        raise DataError(f"task=ranking supports data.name ml-1m | synthetic | events, got {name!r}")
    if rc.regression_weight > 0 and data.regression is None:
        raise DataError(f"ranking.regression_weight > 0 but dataset {name} has no regression target")
    return select_features(data, rc.tasks, rc.contextual, rc.side_series, source=f"dataset {name}")
