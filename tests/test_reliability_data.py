"""Data inputs (issue 14 §4): `hstu prepare` reads and validates every file the config will use (a ranking
config: users.dat too), and a UTF-8 byte-order mark at the start of a data file is accepted, not reported as a
bad user id."""

from __future__ import annotations

import pytest

from hstu.trainer.cli import main
from hstu.trainer.data.movielens import read_movielens_events
from hstu.trainer.data.ranking import read_users_dat

BOM = b"\xef\xbb\xbf"
USERS = b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\n"
RATINGS = b"".join(f"{u}::{i}::{r}::{t}\n".encode() for u, i, r, t in [
    (1, 10, 5, 100), (1, 11, 3, 200), (1, 12, 4, 300), (1, 13, 1, 400), (1, 14, 5, 500),
    (2, 10, 2, 50), (2, 12, 4, 60), (2, 15, 5, 70), (3, 11, 4, 10), (3, 12, 4, 20), (3, 13, 4, 30)])
RANKING = ["task=ranking", "data.name=ml-1m", "data.max_seq_len=3", "data.min_seq_len=2",
           "ranking.num_eval_targets=2", "ranking.zip_prefix_len=1", "train.progress=false"]


def _prepare(capsys, tmp_path, *extra):
    code = main(["prepare", "--data-dir", str(tmp_path), f"data.cache_dir={tmp_path / 'cache'}", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name,data,header", [
    ("ml-1m", RATINGS, b""),
    ("ml-1m", RATINGS.replace(b"\n", b"\r\n"), b""),
    ("ml-20m", b"".join(f"{u},{i},{r}.0,{t}\n".encode() for u, i, r, t in [(1, 2, 3, 4), (1, 3, 4, 5)]),
     b"userId,movieId,rating,timestamp\n"),
])
def test_utf8_bom_at_the_start_of_a_ratings_file_is_skipped(tmp_path, name, data, header):
    fname = "ratings.dat" if name == "ml-1m" else "ratings.csv"
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / fname).write_bytes(header + data)
    (tmp_path / "bom" / fname).write_bytes(BOM + header + data)
    ref = read_movielens_events(name, tmp_path / "plain" / fname, progress=False)
    got = read_movielens_events(name, tmp_path / "bom" / fname, progress=False)
    assert got.user.tolist() == ref.user.tolist() and got.item.tolist() == ref.item.tolist()
    assert got.timestamp.tolist() == ref.timestamp.tolist()


def test_bom_in_users_dat_is_skipped_and_a_bom_later_is_still_an_error(tmp_path):
    (tmp_path / "users.dat").write_bytes(BOM + USERS)
    assert sorted(read_users_dat(tmp_path / "users.dat")) == [1, 2, 3]
    (tmp_path / "users.dat").write_bytes(USERS + BOM + b"4::F::1::10::48067\n")
    from hstu.trainer.data.errors import DataError

    with pytest.raises(DataError, match=r"users.dat.*line 4"):
        read_users_dat(tmp_path / "users.dat")


def test_prepare_with_bom_files_succeeds(capsys, tmp_path):
    (tmp_path / "ratings.dat").write_bytes(BOM + RATINGS)
    (tmp_path / "users.dat").write_bytes(BOM + USERS)
    code, out, err = _prepare(capsys, tmp_path, *RANKING)
    assert code == 0, err
    assert "users: 3" in out and "users.dat" in out


@pytest.mark.parametrize("users,fragment", [
    (USERS.replace(b"2::M::56", b"2::X::56"), "line 2"),
    (USERS + b"4::F::1::10\n", "line 4"),
    (USERS.replace(b"3::M::25", b"3::M::26"), "Age"),
])
def test_prepare_of_a_ranking_config_validates_users_dat(capsys, tmp_path, users, fragment):
    (tmp_path / "ratings.dat").write_bytes(RATINGS)
    (tmp_path / "users.dat").write_bytes(users)
    code, out, err = _prepare(capsys, tmp_path, *RANKING)
    assert code == 2 and "users.dat" in err and fragment in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _prepare(capsys, tmp_path, "data.name=ml-1m", "train.progress=false")  # retrieval: not read
    assert code == 0, err


def test_prepare_of_a_ranking_config_needs_users_dat(capsys, tmp_path):
    (tmp_path / "ratings.dat").write_bytes(RATINGS)
    code, _, err = _prepare(capsys, tmp_path, *RANKING)
    assert code == 2 and "users.dat" in err and "Traceback" not in err
