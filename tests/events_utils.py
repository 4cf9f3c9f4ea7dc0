"""Small generated event logs (Parquet / CSV via DuckDB) for the own-event-log tests; never real data."""

from pathlib import Path
from typing import Dict

import numpy as np


def write_table(path: "str | Path", columns: Dict[str, np.ndarray], fmt: str = "parquet") -> Path:
    """Write ``columns`` (name -> [N] numpy array; object arrays of str/None allowed) as Parquet or CSV (header)."""
    import duckdb

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events_table = {k: np.asarray(v) for k, v in columns.items()}  # noqa: F841 (read by DuckDB's replacement scan)
    con = duckdb.connect()
    option = "FORMAT parquet" if fmt == "parquet" else "HEADER, DELIMITER ','"
    con.execute(f"COPY (SELECT * FROM events_table) TO '{path}' ({option})")
    con.close()
    return path


def ml1m_like(num_users: int = 40, num_items: int = 60, seed: int = 0, ties: bool = True) -> Dict[str, np.ndarray]:
    """ML-1M-format events (user, item >= 1, rating 1..5, timestamp seconds in 2000-2003), with same-second ties."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 30, num_users)
    user = np.repeat(np.arange(1, num_users + 1), lengths)
    n = user.size
    item = np.concatenate([rng.choice(np.arange(1, num_items + 1), size=k, replace=False) for k in lengths])
    step = rng.integers(0 if ties else 1, 4, n)
    ts = 956703932 + np.cumsum(step) % 90_000_000
    rating = rng.integers(1, 6, n)
    order = rng.permutation(n)
    return {"user_id": user[order], "item_id": item[order], "rating": rating[order], "timestamp": ts[order]}
