"""MovieLens / Amazon parsers on tiny fixtures written here: values, tie-breaks, and clear errors."""

import numpy as np
import pytest

from hstu.trainer.data import textparse
from hstu.trainer.data.amazon import k_core_mask, load_amazon_books
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.movielens import ML_FORMATS, load_movielens, read_movielens_events

ML1M = b"1::1193::5::978300760\n1::661::3::978302109\n2::914::4::978301968\n"


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_ml1m_values(tmp_path):
    ev = read_movielens_events("ml-1m", _write(tmp_path, "ratings.dat", ML1M), progress=False)
    assert ev.user.tolist() == [1, 1, 2]
    assert ev.item.tolist() == [1193, 661, 914]
    assert ev.rating.tolist() == [5, 3, 4] and ev.rating.dtype == np.int8
    assert ev.timestamp.tolist() == [978300760, 978302109, 978301968]


def test_ml20m_header_and_half_stars(tmp_path):
    data = b"userId,movieId,rating,timestamp\r\n1,2,3.5,1112486027\r\n1,29,0.5,1112484676\r\n2,5,5.0,1\r\n"
    ev = read_movielens_events("ml-20m", _write(tmp_path, "ratings.csv", data), progress=False)
    assert ev.item.tolist() == [2, 29, 5]
    assert ev.rating.tolist() == [7, 1, 10]  # stored doubled
    assert ev.timestamp.tolist() == [1112486027, 1112484676, 1]


def test_ml100k_tabs_blank_lines_and_missing_final_newline(tmp_path):
    data = b"196\t242\t3\t881250949\n\n186\t302\t3\t891717742\n22\t377\t1\t878887116"
    ev = read_movielens_events("ml-100k", _write(tmp_path, "u.data", data), progress=False)
    assert ev.user.tolist() == [196, 186, 22] and ev.item.tolist() == [242, 302, 377]


def test_load_movielens_sorts_by_timestamp_in_each_tie_order(tmp_path):
    data = b"5::30::1::100\n5::10::2::100\n5::20::3::50\n6::1::4::7\n6::2::4::8\n6::3::4::9\n5::40::5::100\n"
    (tmp_path / "ml-1m").mkdir()
    _write(tmp_path / "ml-1m", "ratings.dat", data)
    s = load_movielens("ml-1m", tmp_path, max_seq_len=10, min_seq_len=3, progress=False,  # finds ml-1m/ subdir
                       tie_order="item_id")
    assert s.user_ids.tolist() == [5, 6]
    assert s.user(0).tolist() == [20, 10, 30, 40]
    assert s.ratings[:4].tolist() == [3, 2, 1, 5]
    assert s.num_items == 40
    f = load_movielens("ml-1m", tmp_path, max_seq_len=10, min_seq_len=3, progress=False, tie_order="file")
    assert f.user(0).tolist() == [20, 30, 10, 40] and f.ratings[:4].tolist() == [3, 1, 2, 5]  # as listed
    seen = set()
    for seed in range(12):
        r = load_movielens("ml-1m", tmp_path, max_seq_len=10, min_seq_len=3, progress=False, tie_seed=seed)
        row = r.user(0).tolist()  # default tie order: random
        assert row[0] == 20 and sorted(row[1:]) == [10, 30, 40]
        assert r.ratings[:4].tolist() == [{20: 3, 30: 1, 10: 2, 40: 5}[x] for x in row]  # ratings travel along
        seen.add(tuple(row))
    assert len(seen) >= 3


BAD_ML1M = [
    (b"1::abc::5::978300760", "item", "'abc'", "not a non-negative integer"),
    (b"1::1193::5", "timestamp", "'1::1193::5'", "missing field"),
    (b"1::1193::5::978300760::7", "#5 (extra)", "'7'", "expected 4 fields"),
    (b"1::1193::5::9.5e8", "timestamp", "'9.5e8'", "not a non-negative integer"),
    (b"1::0::5::978300760", "item", "'0'", "out of range"),
    (b"-1::3::5::978300760", "user", "'-1'", "not a non-negative integer"),
    (b"1::1193::9::978300760", "rating", "'9'", "out of range"),
    (b"1:1193::5::978300760", "user", "'1:1193'", "not a non-negative integer"),
    (b"1::\xff\xfe::5::978300760", "item", "'\\\\xff\\\\xfe'", "invalid UTF-8"),
    (b"1:: 2::5::978300760", "item", "' 2'", "not a non-negative integer"),
]


@pytest.mark.parametrize("bad_line,field,value,problem", BAD_ML1M)
def test_malformed_row_names_file_line_field_value(tmp_path, bad_line, field, value, problem):
    path = _write(tmp_path, "ratings.dat", ML1M + b"\n" + bad_line + b"\n" + ML1M)  # bad row is line 5
    with pytest.raises(DataError) as err:
        read_movielens_events("ml-1m", path, progress=False)
    msg = str(err.value)
    assert str(path) in msg and "line 5" in msg and f"field '{field}'" in msg and problem in msg, msg
    assert value in msg, msg
    assert err.value.line == 5 and err.value.field == field


def test_error_line_number_across_chunks(tmp_path):
    good = b"".join(b"%d::%d::3::1000\n" % (u, i) for u in range(1, 40) for i in range(1, 4))  # 117 lines
    path = _write(tmp_path, "ratings.dat", good + b"\n\n" + good + b"7::8::3::x1\n" + good)
    with pytest.raises(DataError, match=r"line 237: field 'timestamp'.*'x1'"):
        textparse.read_table(path, ML_FORMATS["ml-1m"], progress=False, chunk_bytes=100)
    # without the bad line, tiny chunks and one big chunk agree
    ok = _write(tmp_path, "ok.dat", good + b"\n\n" + good)
    a = textparse.read_table(ok, ML_FORMATS["ml-1m"], progress=False, chunk_bytes=100)
    b = textparse.read_table(ok, ML_FORMATS["ml-1m"], progress=False)
    assert a["user"].size == 234
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_fast_and_slow_paths_agree(tmp_path):
    rng = np.random.default_rng(0)
    rows = [b"%d::%d::%d::%d" % tuple(x) for x in zip(*(rng.integers(1, 1000, 200) for _ in range(2)),
                                                      rng.integers(1, 6, 200), rng.integers(0, 2**31, 200))]
    chunk = b"\n".join(rows) + b"\n"
    fmt = ML_FORMATS["ml-1m"]
    fast = textparse._parse_chunk_fast(chunk, fmt)
    slow = textparse._parse_chunk_slow(chunk, 1, fmt, "x")
    assert fast is not None
    for k in slow:
        np.testing.assert_array_equal(fast[k], slow[k])


def test_ml20m_bad_header_and_bad_half_star(tmp_path):
    path = _write(tmp_path, "ratings.csv", b"user,movie,rating,timestamp\n1,2,3.5,1\n")
    with pytest.raises(DataError, match=r"line 1: field 'header'"):
        read_movielens_events("ml-20m", path, progress=False)
    path = _write(tmp_path, "ratings.csv", b"userId,movieId,rating,timestamp\n1,2,3.5,1\n1,3,3.25,2\n")
    with pytest.raises(DataError, match=r"line 3: field 'rating'.*multiple of 0.5.*'3.25'"):
        read_movielens_events("ml-20m", path, progress=False)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        read_movielens_events("ml-1m", tmp_path / "nope.dat", progress=False)
    assert "nope.dat" in str(err.value)
    with pytest.raises(DataError, match="ratings.dat not found"):
        load_movielens("ml-1m", tmp_path, 10, 2, progress=False)
    with pytest.raises(DataError, match="no ratings"):
        read_movielens_events("ml-1m", _write(tmp_path, "empty.dat", b""), progress=False)


def _amazon_rows():
    rows = []
    for u in range(1, 7):  # 6 users x items i1..i5 -> survives
        rows += [(f"u{u}", f"i{k}", 5.0, 1000 * u + k) for k in range(1, 6)]
    rows += [("short", f"i{k}", 3.0, 10 + k) for k in range(1, 4)]  # 3 + 1 events -> dropped
    rows += [(f"u{u}", "rare", 4.0, 50_000 + u) for u in range(1, 5)] + [("short", "rare", 2.0, 99)]
    return rows


def test_amazon_iterative_5core_and_deterministic_remap(tmp_path):
    rows = _amazon_rows()
    text = "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows).encode()
    (tmp_path / "ratings_Books.csv").write_bytes(text)
    stats = {}
    s = load_amazon_books(tmp_path, max_seq_len=50, min_seq_len=2, progress=False, stats=stats, tie_order="item_id")
    assert stats == dict(raw_events=38, raw_users=7, raw_items=6, core_events=30, core_users=6, core_items=5)
    # 'rare' has 5 ratings in the first pass, but 'short' (4 events) goes, then 'rare' has 4 and goes too
    assert s.num_users == 6 and s.num_items == 5 and s.num_events == 30
    assert s.user_ids.tolist() == [1, 2, 3, 4, 5, 6]  # u1..u6 -> 1..6 in sorted id order
    assert s.user(0).tolist() == [1, 2, 3, 4, 5]  # i1..i5 -> 1..5, in timestamp order
    assert set(s.ratings.tolist()) == {5}
    # shuffled input rows -> identical result
    perm = np.random.default_rng(1).permutation(len(rows))
    (tmp_path / "ratings_Books.csv").write_bytes("".join(
        "{},{},{},{}\n".format(*rows[k]) for k in perm).encode())
    s2 = load_amazon_books(tmp_path, max_seq_len=50, min_seq_len=2, progress=False, tie_order="item_id")
    np.testing.assert_array_equal(s2.item_ids, s.item_ids)
    np.testing.assert_array_equal(s2.user_ids, s.user_ids)


def test_k_core_mask_single_vs_iterative():
    user = np.array([0, 0, 1, 1, 1, 2])
    item = np.array([0, 1, 0, 1, 2, 2])
    assert k_core_mask(user, item, 2).tolist() == [True, True, True, True, False, False]


def test_amazon_utf8_ids_and_bad_rows(tmp_path):
    rows = [(f"ü{u}", f"B{k:03d}", 5.0, k) for u in range(5) for k in range(5)]
    text = "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows).encode("utf-8")
    (tmp_path / "ratings_Books.csv").write_bytes(text)
    s = load_amazon_books(tmp_path, 50, 2, progress=False)
    assert s.num_users == 5 and s.num_items == 5
    (tmp_path / "ratings_Books.csv").write_bytes(text + b"A1,\xe9t\xe9,5.0,3\n")  # Latin-1 bytes
    with pytest.raises(DataError, match=r"line 26: field 'item': invalid UTF-8"):
        load_amazon_books(tmp_path, 50, 2, progress=False)
    (tmp_path / "ratings_Books.csv").write_bytes(text + b"A1,B7,five,3\n")
    with pytest.raises(DataError, match=r"line 26: field 'rating'.*'five'"):
        load_amazon_books(tmp_path, 50, 2, progress=False)
    (tmp_path / "ratings_Books.csv").write_bytes(text + b"A1,,5.0,3\n")
    with pytest.raises(DataError, match=r"line 26: field 'item': empty id"):
        load_amazon_books(tmp_path, 50, 2, progress=False)
