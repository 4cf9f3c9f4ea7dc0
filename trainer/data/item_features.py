"""Item content features: ML-1M ``movies.dat``, ML-100K ``u.item`` and the synthetic world's clusters.

Every feature becomes a fixed-width int64 column block of :class:`ItemFeatureTable` (row = item id, 0 = none /
padding): ``genre`` (a bag of genre indices 1..G), ``year`` (release year bucketed: 1 + (clip(year, YEAR_MIN,
YEAR_MAX) - YEAR_MIN) // year_bucket_years), ``title`` (a bag of title words hashed into 1..title_buckets with
crc32, so a new title needs no vocabulary), ``cluster`` (synthetic: the item's hidden interest cluster 1..C).
The item tower (modules/item_tower.py) pools each block (mean | sum over its non-zero slots).

The files are small (ML-1M: 3,883 lines) and parsed line by line; nothing is cached. ``movies.dat`` is latin-1
(``id::Title (Year)::Genre|Genre``); ``u.item`` is latin-1 too (``id|title|release date|video date|url|19 genre
flags``). A UTF-8 byte-order mark at the start of a file is skipped. A malformed row raises :class:`DataError`
naming the file, the 1-based line, the field and the value.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.config_checks import ITEM_FEATURES_BY_DATASET  # the one definition (a stdlib-only module)
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.movielens import dataset_file
from hstu.trainer.data.textparse import UTF8_BOM

ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
               "Western")
ML100K_GENRES = ("unknown",) + ML1M_GENRES  # u.item's 19 flag columns, in file order (u.genre)
YEAR_MIN, YEAR_MAX = 1900, 2030
MAX_TITLE_WORDS = 16
MAX_MULTI_VALUES = 32  # own-logs multi-valued columns: the first this many values of an item are kept
FEATURES_BY_DATASET = ITEM_FEATURES_BY_DATASET
FEATURE_FILES = {"ml-1m": "movies.dat", "ml-100k": "u.item"}
_TITLE_YEAR = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")
_WORD = re.compile(r"[a-z0-9]+")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                        "Nov", "Dec"), 1)}


@dataclass
class ItemFeatureTable:
    """Features of items 0..num_items. values [num_items + 1, sum(widths)] int64 (row 0 and missing slots 0);
    feature f occupies columns offsets[f]..offsets[f] + widths[f] with indices in 0..cardinalities[f] - 1."""

    names: Tuple[str, ...]
    widths: Tuple[int, ...]
    cardinalities: Tuple[int, ...]  # table rows per feature, row 0 = padding
    values: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.values.shape[0]) - 1

    def block(self, name: str) -> np.ndarray:
        """[num_items + 1, width] columns of feature ``name``."""
        f = self.names.index(name)
        lo = int(sum(self.widths[:f]))
        return self.values[:, lo:lo + self.widths[f]]


@dataclass
class MovieRow:
    """One parsed item: genre indices (1-based), release year (None = unknown), title text."""

    item: int
    genres: List[int]
    year: Optional[int]
    title: str


def year_bucket(year: Optional[int], bucket_years: int) -> int:
    """Release year -> 1 + (clip(year) - YEAR_MIN) // bucket_years; 0 for unknown."""
    if year is None:
        return 0
    return 1 + (min(max(year, YEAR_MIN), YEAR_MAX) - YEAR_MIN) // bucket_years


def num_year_buckets(bucket_years: int) -> int:
    """Table rows of the year feature (padding included)."""
    return year_bucket(YEAR_MAX, bucket_years) + 1


def title_words(title: str, buckets: int) -> List[int]:
    """Lower-cased alphanumeric words of ``title`` -> distinct hashed ids 1..buckets (crc32, first
    MAX_TITLE_WORDS words)."""
    out: List[int] = []
    for w in _WORD.findall(title.lower()):
        h = 1 + zlib.crc32(w.encode("utf-8")) % buckets
        if h not in out:
            out.append(h)
    return out[:MAX_TITLE_WORDS]


def _lines(path: Path):
    """(1-based line number, text) of a latin-1 file, BOM skipped, blank lines left out."""
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    raw = path.read_bytes()
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    for i, line in enumerate(raw.decode("latin-1").split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield i, line


def _item_id(text: str, path: Path, line: int) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DataError("not a positive integer", path=str(path), line=line, field="item", value=text)
    return int(text)


def _item_rows(path: Path, sep: str, num_fields: int, layout: str):
    """(line, fields, item id) of every row with exactly ``num_fields`` ``sep``-separated fields and a new
    positive item id in field 0 (DataError otherwise; ``layout`` names the fields in the message)."""
    seen = set()
    for line, text in _lines(path):
        parts = text.split(sep)
        if len(parts) != num_fields:
            raise DataError(f"expected {num_fields} fields ({layout}), got {len(parts)}", path=str(path), line=line,
                            field="line", value=text)
        item = _item_id(parts[0], path, line)
        if item in seen:
            raise DataError("duplicate item id", path=str(path), line=line, field="item", value=parts[0])
        seen.add(item)
        yield line, parts, item


def parse_movies_dat(path: "str | Path") -> List[MovieRow]:
    """ML-1M ``movies.dat`` (``MovieID::Title (Year)::Genre|Genre|...``) -> rows."""
    path, rows = Path(path), []
    for line, parts, item in _item_rows(path, "::", 3, "item::title::genres"):
        m = _TITLE_YEAR.match(parts[1])
        if m is None:
            raise DataError("title must end with the release year '(YYYY)'", path=str(path), line=line,
                            field="title", value=parts[1])
        genres = []
        for g in parts[2].split("|"):
            if g not in ML1M_GENRES:
                raise DataError(f"unknown genre (known: {', '.join(ML1M_GENRES)})", path=str(path), line=line,
                                field="genres", value=g)
            genres.append(1 + ML1M_GENRES.index(g))
        rows.append(MovieRow(item, genres, int(m.group(2)), m.group(1)))
    if not rows:
        raise DataError("no items in file", path=str(path))
    return rows


def _release_year(text: str, path: Path, line: int) -> Optional[int]:
    """u.item release date ``01-Jan-1995`` -> 1995; empty -> None."""
    if not text:
        return None
    parts = text.split("-")
    if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in _MONTHS or not re.fullmatch(r"\d{4}", parts[2]):
        raise DataError("release date must look like 01-Jan-1995 (or be empty)", path=str(path), line=line,
                        field="release_date", value=text)
    return int(parts[2])


def parse_u_item(path: "str | Path") -> List[MovieRow]:
    """ML-100K ``u.item`` (``id|title|release date|video release date|IMDb URL|19 genre flags``) -> rows."""
    path, rows = Path(path), []
    layout = "item|title|release date|video release date|url|" + "|".join(ML100K_GENRES)
    for line, parts, item in _item_rows(path, "|", 5 + len(ML100K_GENRES), layout):
        genres = []
        for g, flag in enumerate(parts[5:]):
            if flag not in ("0", "1"):
                raise DataError("genre flag must be 0 or 1", path=str(path), line=line,
                                field=f"genre {ML100K_GENRES[g]}", value=flag)
            if flag == "1":
                genres.append(1 + g)
        m = _TITLE_YEAR.match(parts[1])
        rows.append(MovieRow(item, genres, _release_year(parts[2], path, line), m.group(1) if m else parts[1]))
    if not rows:
        raise DataError("no items in file", path=str(path))
    return rows


def _pad(lists: Sequence[List[int]], width: int) -> np.ndarray:
    out = np.zeros((len(lists), max(width, 1)), dtype=np.int64)
    for i, vals in enumerate(lists):
        out[i, :len(vals)] = vals
    return out


def movie_table(rows: Sequence[MovieRow], num_items: int, names: Sequence[str], num_genres: int,
                title_buckets: int, year_bucket_years: int) -> ItemFeatureTable:
    """Parsed rows -> ItemFeatureTable over items 0..num_items (items without a row keep zeros; rows of ids
    beyond num_items — never rated — are left out)."""
    per: Dict[str, List[List[int]]] = {n: [[] for _ in range(num_items + 1)] for n in names}
    for r in rows:
        if r.item > num_items:
            continue
        if "genre" in per:
            per["genre"][r.item] = list(r.genres)
        if "year" in per:
            b = year_bucket(r.year, year_bucket_years)
            per["year"][r.item] = [b] if b else []
        if "title" in per:
            per["title"][r.item] = title_words(r.title, title_buckets)
    card = {"genre": num_genres + 1, "year": num_year_buckets(year_bucket_years), "title": title_buckets + 1}
    fixed = {"genre": num_genres, "year": 1, "title": MAX_TITLE_WORDS}  # widths do not depend on the data
    blocks = [_pad(per[n], fixed[n]) for n in names]
    return ItemFeatureTable(tuple(names), tuple(b.shape[1] for b in blocks), tuple(card[n] for n in names),
                            np.concatenate(blocks, axis=1))


def synthetic_table(data_cfg, num_items: int) -> ItemFeatureTable:
    """The synthetic world's hidden interest cluster of every item, as the categorical feature ``cluster``."""
    from hstu.trainer.data.synthetic import build_world

    world = build_world(data_cfg.synthetic)
    cluster = np.zeros((num_items + 1, 1), dtype=np.int64)
    n = min(num_items, world.cluster_of.shape[0] - 1)
    cluster[1:n + 1, 0] = world.cluster_of[1:n + 1] + 1
    return ItemFeatureTable(("cluster",), (1,), (world.num_clusters + 1,), cluster)


def feature_encodings(name: str, feat_cfg: Any, events_features: Any = None) -> Dict[str, str]:
    """How raw item metadata maps to each feature's indices (recorded in a serving artifact's manifest, so a new
    item's features can be encoded without the trainer). ``events_features``: data.events.item_features (a
    dict or the config) of an own-logs run."""
    genres = ML1M_GENRES if name == "ml-1m" else ML100K_GENRES
    get = (lambda k: feat_cfg[k]) if isinstance(feat_cfg, dict) else (lambda k: getattr(feat_cfg, k))  # noqa: E731
    if name == "events":
        ev = events_features or {}
        eget = (lambda k: ev.get(k, [])) if isinstance(ev, dict) else (lambda k: getattr(ev, k))  # noqa: E731
        out = {c: f"1 + rank of the raw value in the sorted values of vocab/feature-{c}.parquet (0 = missing)"
               for c in eget("columns")}
        out.update({c: f"each value: 1 + its rank in vocab/feature-{c}.parquet, file order, first "
                       f"{MAX_MULTI_VALUES} values" for c in eget("multi_columns")})
        return out
    return {
        "genre": "1 + index in [" + ", ".join(genres) + "]",
        "year": f"1 + (clip(year, {YEAR_MIN}, {YEAR_MAX}) - {YEAR_MIN}) // {get('year_bucket_years')}",
        "title": f"distinct lower-cased [a-z0-9]+ words, 1 + crc32(utf-8 word) % {get('title_buckets')}, "
                 f"first {MAX_TITLE_WORDS}",
        "cluster": "1 + synthetic interest cluster",
    }


def features_file(name: str, data_dir: "str | Path") -> Path:
    """movies.dat / u.item of dataset ``name`` in ``data_dir`` (or ``data_dir/<name>/``)."""
    if name not in FEATURE_FILES:
        raise DataError(f"{name}: no item feature file (item features exist for {', '.join(FEATURES_BY_DATASET)})")
    return dataset_file(name, data_dir, FEATURE_FILES[name])


def load_item_features(data_cfg, feat_cfg, num_items: int, raw_dir: "Optional[str | Path]" = None,
                       dataset_dir: "Optional[str | Path]" = None) -> ItemFeatureTable:
    """DataConfig + ItemFeaturesConfig -> the table of the configured features (all the dataset has when
    ``feat_cfg.features`` is empty). ``raw_dir``: the folder with the raw files (MovieLens); ``dataset_dir``: the
    prepared own-logs dataset (data.name=events; default: found / prepared from ``data_cfg``)."""
    name = data_cfg.name
    known = events_feature_names(data_cfg) if name == "events" else FEATURES_BY_DATASET.get(name)
    if known is None:
        raise DataError(f"data.name = {name!r} has no item features (known: {', '.join(FEATURES_BY_DATASET)})")
    names = tuple(feat_cfg.features) or known
    bad = [n for n in names if n not in known]
    if bad:
        raise DataError(f"model.item_features.features: {bad} not available for {name} (available: {list(known)})")
    if name == "synthetic":
        return synthetic_table(data_cfg, num_items)
    if name == "events":
        return events_table(data_cfg, names, num_items, dataset_dir)
    path = features_file(name, raw_dir if raw_dir is not None else data_cfg.data_dir)
    rows = parse_movies_dat(path) if name == "ml-1m" else parse_u_item(path)
    genres = ML1M_GENRES if name == "ml-1m" else ML100K_GENRES
    return movie_table(rows, num_items, names, len(genres), feat_cfg.title_buckets, feat_cfg.year_bucket_years)


def ranking_synthetic_table(ranking_synthetic_cfg, num_items: int) -> ItemFeatureTable:
    """The synthetic RANKING world's cluster of every item (trainer/data/synthetic_ranking.py), as ``cluster``."""
    from hstu.trainer.data.synthetic_ranking import build_world

    world = build_world(ranking_synthetic_cfg)
    n = min(num_items, world.num_items)
    cluster = np.zeros((num_items + 1, 1), dtype=np.int64)
    cluster[1:n + 1, 0] = world.cluster_of(np.arange(1, n + 1)) + 1
    return ItemFeatureTable(("cluster",), (1,), (world.num_clusters + 1,), cluster)


def load_ranking_item_features(cfg, num_items: int) -> ItemFeatureTable:
    """RunConfig of task=ranking -> the item tower's feature table: the synthetic ranking world's clusters, or
    what :func:`load_item_features` reads (ML-1M movies.dat from the raw folder, an own-logs side table)."""
    name, feat_cfg = cfg.data.name, cfg.model.item_features
    if name == "synthetic":
        bad = [n for n in feat_cfg.features if n != "cluster"]
        if bad:
            raise DataError(f"model.item_features.features: {bad} not available for synthetic (available: "
                            "['cluster'])")
        return ranking_synthetic_table(cfg.ranking.synthetic, num_items)
    from hstu.trainer.data import load_item_features as load_from_raw  # finds / downloads the raw folder
    from hstu.trainer.data.ranking import ranking_data_config

    # own logs: the dataset the ranking task prepared (its data config, so the same cache key: no second prepare)
    return load_from_raw(ranking_data_config(cfg), feat_cfg, num_items)


# ---------------------------------------------------------------------------------------------- own logs
def events_feature_names(data_cfg) -> Tuple[str, ...]:
    """The item features of data.name=events: the columns of its side-feature table (data.events.item_features:
    categorical, then multi-valued); () without a table."""
    feats = data_cfg.events.item_features
    return tuple(feats.columns) + tuple(feats.multi_columns) if feats.paths else ()


def events_table(data_cfg, names: Sequence[str], num_items: int, dataset_dir: "Optional[str | Path]" = None
                 ) -> ItemFeatureTable:
    """The prepared side-feature table of an own-logs dataset (``vocab/item_features.parquet``, written by
    trainer/data/events_features.py) -> ItemFeatureTable of the columns ``names``: a categorical column is a
    width-1 block of its value id, a multi-valued one a bag of its value ids (width = the longest list, at most
    MAX_MULTI_VALUES); cardinality = the column's vocabulary size + 1. Items without a row keep zeros."""
    import duckdb

    from hstu.trainer.data.events_prepare import prepare_events, read_manifest

    if dataset_dir is None:
        manifest, folder, _ = prepare_events(data_cfg, progress=False)
    else:
        folder = Path(dataset_dir)
        manifest = read_manifest(folder)
    record = manifest.get("item_features")
    if not record:
        raise DataError("the prepared dataset has no item side-feature table (set data.events.item_features.paths "
                        "and .columns / .multi_columns)", path=str(folder / "manifest.json"))
    path = folder / record["file"]
    columns = record["columns"]
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(f"model.item_features.features: {missing} not in the side-feature table (columns: "
                        f"{list(columns)})", path=str(path))
    select = ", ".join(["id"] + [f'"{n}"' for n in names])
    rows = duckdb.connect().execute(f"SELECT {select} FROM read_parquet(?) ORDER BY id", [str(path)]).fetchall()
    blocks, cards = [], []
    for f, n in enumerate(names, start=1):
        multi = columns[n]["kind"] == "multi"
        lists = [[] for _ in range(num_items + 1)]
        for row in rows:
            item = int(row[0])
            if not 1 <= item <= num_items:
                raise DataError(f"item id {item} outside 1..{num_items}", path=str(path), column="id")
            value = row[f]
            lists[item] = [int(v) for v in value][:MAX_MULTI_VALUES] if multi else ([int(value)] if value else [])
        width = max((len(v) for v in lists), default=1) if multi else 1
        blocks.append(_pad(lists, width))
        cards.append(int(columns[n]["vocab_size"]) + 1)
    return ItemFeatureTable(tuple(names), tuple(b.shape[1] for b in blocks), tuple(cards),
                            np.concatenate(blocks, axis=1))
