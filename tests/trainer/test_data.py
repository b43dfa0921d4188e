"""Loaders, validation, the load report and the MovieLens download: trainer.data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.data import (
    DataError, data_dir_from_env, ensure_movielens, generate, load_interactions, load_movielens,
    validate_interactions, write_movielens_like,
)
from trainer.data.dataset import make_dataset, read_table, to_int64
from trainer.data.generic import detect_separator
from trainer.splits import split_by_name
from trainer.data.download import MOVIELENS_MD5, safe_extract, verify_md5

GENRES_100K = "unknown|0\nAction|1\nComedy|2\n\n"
ITEMS_100K = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
              "2|Misérables, Les (1995)|||http://x|0|1|1\n"
              "3|unknown||||1|0|0\n")
USERS_100K = "1|24|M|technician|85711\n2|53|F|other|T8H1N\n"
DATA_100K = "1\t1\t5\t881250949\n2\t2\t3\t881250950\n1\t3\t4\t881250951\n"


def write_log(path: Path, text: str) -> Path:
    """``text`` written to ``path`` as UTF-8, gzip-compressed when the name ends in .gz."""
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


def write_100k(folder: Path, *, data: str = DATA_100K, items: str = ITEMS_100K, users: str = USERS_100K) -> Path:
    """A tiny MovieLens-100K-layout folder (u.item and u.user Latin-1 encoded, as the real files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(data)
    (folder / "u.genre").write_text(GENRES_100K, encoding="latin-1")
    (folder / "u.item").write_text(items, encoding="latin-1")
    (folder / "u.user").write_text(users, encoding="latin-1")
    return folder


@pytest.fixture(scope="module")
def small() -> object:
    return generate(60, 80, 600, seed=7)


# --- the real MovieLens 100K ---------------------------------------------------------------------

def test_ml100k_loads_with_side_tables(ml100k_dir):
    data = load_movielens(ml100k_dir)
    frame, report = data.interactions, data.report
    assert (report.n_users, report.n_items, report.rows_kept, report.rows_read) == (943, 1682, 100_000, 100_000)
    assert report.dropped == {} and report.warnings == []
    assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in frame.dtypes] == ["str", "int64", "float32", "int64"]
    keys = list(zip(frame["timestamp"], frame["user_id"], frame["item_id"]))
    assert keys == sorted(keys)
    items = data.items.set_index("item_id")
    assert items.loc[1, "title"] == "Toy Story (1995)"
    assert items.loc[1, "genres"] == "Animation|Children's|Comedy"
    assert items.loc[543, "title"] == "Misérables, Les (1995)"  # Latin-1 decoded
    assert items.loc[1, "year"] == 1995.0 and np.isnan(items.loc[267, "year"])
    assert items.loc[267, "genres"] == ""  # the "unknown" genre flag is no genre
    users = data.users.set_index("user_id")
    assert len(users) == 943 and users.loc["1", "age"] == 24.0
    assert users.loc["1", ["gender", "occupation", "zip_region"]].tolist() == ["M", "technician", "8"]
    assert set(users["zip_region"]) <= set("0123456789?") and "?" in set(users["zip_region"])
    summary = report.summary()
    assert "943" in summary and "1,682" in summary and "100,000" in summary and "1997-09-20" in summary


# --- the 100K layout on tiny files ---------------------------------------------------------------

def test_100k_layout_parses_genres_years_and_zip_regions(tmp_path):
    data = load_movielens(write_100k(tmp_path / "ml-tiny"))
    assert data.name == "ml-tiny"
    items = data.items.set_index("item_id")
    assert items["genres"].tolist() == ["Comedy", "Action|Comedy", ""]
    assert items.loc[2, "title"] == "Misérables, Les (1995)"
    assert items.loc[2, "year"] == 1995.0  # no release date: taken from the title
    assert data.users["zip_region"].tolist() == ["8", "?"]
    assert data.interactions["item_id"].tolist() == [1, 2, 3]


def test_blank_duplicate_and_unknown_rows_are_counted_never_silently_dropped(tmp_path):
    data = DATA_100K + "\n1\t1\t5\t881250949\n9\t1\t5\t881250960\n1\t99\t5\t881250961\n"
    loaded = load_movielens(write_100k(tmp_path / "ml", data=data))
    report = loaded.report
    assert report.rows_read == 7 and report.rows_kept == 3
    assert report.dropped == {"blank line": 1, "duplicate (user,item,timestamp)": 1,
                              "unknown user id": 1, "unknown item id": 1}
    summary = report.summary()
    for reason in report.dropped:
        assert reason in summary


@pytest.mark.parametrize(("data", "message"), [
    ("1,1,5,881250949\n", "u.data, line 1: expected 4 fields separated by '\\t', found 1"),
    ("1\t1\t5\t881250949\n1\t1\tfive\t881250950\n",
     "u.data, line 2, column 'rating': rating must be a number, got 'five'"),
    ("1\t1\t5\t881250949\n2\t1\t5\n", "u.data, line 2, column 'timestamp': timestamp is missing"),
    ("1\t1\t5\t881250949\n\n1\t1\t5\t881250949\t7\n", "u.data, line 3: expected 4 fields separated by '\\t', found 5"),
    ("1\t1.5\t5\t881250949\n", "u.data, line 1, column 'item_id': item_id must be an integer, got"),
    ("1\t-4\t5\t881250949\n", "u.data, line 1, column 'item_id': item_id must be in [0, inf], got"),
    ("1\t1\tinf\t881250949\n", "u.data, line 1, column 'rating': rating must be finite"),
    ("", "u.data: the file is empty"),
])
def test_bad_ratings_file_names_file_line_and_column(tmp_path, data, message):
    folder = write_100k(tmp_path / "ml", data=data)
    with pytest.raises(DataError) as caught:
        load_movielens(folder)
    assert message in str(caught.value)
    assert str(folder / "u.data") in str(caught.value)


def test_bad_item_and_user_tables_name_their_line(tmp_path):
    items = ITEMS_100K.replace("3|unknown||||1|0|0", "3|unknown||||1|0|2")
    with pytest.raises(DataError, match=r"u.item, line 3, column 'Comedy': Comedy must be in \[0, 1\], got '2'"):
        load_movielens(write_100k(tmp_path / "a", items=items))
    with pytest.raises(DataError, match=r"u.user, line 2, column 'age': age must be a number, got 'old'"):
        load_movielens(write_100k(tmp_path / "b", users=USERS_100K.replace("|53|", "|old|")))
    with pytest.raises(DataError, match=r"u.user, line 2, column 'user_id': user_id is missing"):
        load_movielens(write_100k(tmp_path / "c", users=USERS_100K.replace("2|53", "|53")))
    with pytest.raises(DataError, match=r"u.genre, line 1, column 'index': index must be an integer"):
        folder = write_100k(tmp_path / "d")
        (folder / "u.genre").write_text("unknown|zero\n")
        load_movielens(folder)


def test_side_table_with_repeated_ids_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"\(users\): user_id must be unique, got '1' twice"):
        load_movielens(write_100k(tmp_path / "ml", users=USERS_100K + "1|30|F|artist|12345\n"))


def test_missing_side_file_and_unknown_folder(tmp_path):
    folder = write_100k(tmp_path / "ml")
    (folder / "u.user").unlink()
    with pytest.raises(DataError, match=r"u.user: file not found"):
        load_movielens(folder)
    with pytest.raises(DataError, match="not a MovieLens folder"):
        load_movielens(tmp_path)


# --- 1M and latest layouts, written from synthetic data ------------------------------------------

@pytest.mark.parametrize("fmt", ["1m", "latest"])
def test_written_movielens_like_files_load_back_identically(tmp_path, small, fmt):
    folder = write_movielens_like(small, tmp_path / f"ml-{fmt}", fmt)
    loaded = load_movielens(folder)
    pd.testing.assert_frame_equal(loaded.interactions, small.interactions)
    pd.testing.assert_frame_equal(loaded.items, small.items)
    if fmt == "1m":
        pd.testing.assert_frame_equal(loaded.users, small.users)
    else:
        assert loaded.users is None
    assert loaded.report.rows_kept == small.report.rows_kept == 600


def test_1m_layout_decodes_latin1_and_maps_occupation_codes(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::978300760\n2::20::3.5::978300761\n")
    (folder / "movies.dat").write_bytes("10::Misérables, Les (1995)::Drama|War\n20::Ça (1990)::\n".encode("latin-1"))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    data = load_movielens(folder)
    assert data.items["title"].tolist() == ["Misérables, Les (1995)", "Ça (1990)"]
    assert data.items["genres"].tolist() == ["Drama|War", ""]
    assert data.users["occupation"].tolist() == ["K-12 student", "self-employed"]
    assert data.interactions["rating"].tolist() == [5.0, 3.5]
    (folder / "users.dat").write_text("1::F::1::21::48067\n2::M::56::16::70072\n")
    with pytest.raises(DataError, match=r"users.dat, line 1, column 'occupation': occupation must be in \[0, 20\]"):
        load_movielens(folder)
    (folder / "ratings.dat").write_text("1::10::5::978300760\n2::20::x::978300761\n")
    with pytest.raises(DataError, match=r"ratings.dat, line 2, column 'rating': rating must be a number, got 'x'"):
        load_movielens(folder)


def test_compressed_generic_logs_are_sniffed_through_their_decompressor(tmp_path):
    import bz2
    import gzip
    text = "user_id;item_id;rating\nu1;7;4\nu2;8;2\n"
    for name, opener in (("log.csv.gz", gzip.open), ("log.csv.bz2", bz2.open)):
        with opener(tmp_path / name, "wt") as out:
            out.write(text)
        data = load_interactions(tmp_path / name)
        assert data.name == "log" and data.interactions["item_id"].tolist() == [7, 8]
    with gzip.open(tmp_path / "log.tsv.gz", "wt") as out:
        out.write(text.replace(";", "\t"))
    assert load_interactions(tmp_path / "log.tsv.gz").interactions["rating"].tolist() == [4.0, 2.0]
    import zipfile
    with zipfile.ZipFile(tmp_path / "log.zip", "w") as archive:
        archive.writestr("export/log.csv", text)
    assert load_interactions(tmp_path / "log.zip").interactions["user_id"].tolist() == ["u1", "u2"]
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.csv", text)
        archive.writestr("b.csv", text)
    with pytest.raises(DataError, match=r"two.zip: a zipped log must hold exactly one file, found 2: \['a.csv', 'b.csv'\]"):
        load_interactions(tmp_path / "two.zip")
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"broken.csv.gz: cannot be read as a .gz file"):
        load_interactions(tmp_path / "broken.csv.gz")


def test_movielens_folders_without_their_movies_file_load_with_a_warning(tmp_path):
    latest = tmp_path / "latest"
    latest.mkdir()
    (latest / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,0.5,964982224\n")
    data = load_movielens(latest)
    assert data.items is None and data.interactions["item_id"].tolist() == [2, 1]
    assert "no movies.csv: the items have no titles or genres" in data.report.warnings
    dat = tmp_path / "ten"
    dat.mkdir()
    (dat / "ratings.dat").write_text("1::5::3.5::978300760\n2::5::4::978300761\n")
    data = load_movielens(dat)
    assert data.items is None and data.users is None and data.interactions["rating"].tolist() == [3.5, 4.0]
    assert "no movies.dat: the items have no titles or genres" in data.report.warnings


def test_latest_layout_checks_the_header_and_reads_quoted_titles(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,0.5,964982224\n")
    (folder / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
                                       "2,Cosmos (2019–2020),(no genres listed)\n")
    data = load_movielens(folder)
    assert data.items["title"].tolist() == ["American President, The (1995)", "Cosmos (2019–2020)"]
    assert data.items["genres"].tolist() == ["Comedy|Drama", ""]
    assert data.items["year"].tolist() == [1995.0, 2019.0]
    (folder / "ratings.csv").write_text("userId;movieId;rating;timestamp\n1;1;4.0;964982703\n")
    with pytest.raises(DataError, match=r"ratings.csv, line 1: missing column 'userId'.*wrong separator"):
        load_movielens(folder)
    (folder / "ratings.csv").write_text('userId,movieId,rating,timestamp\n"1,1,4.0,964982703\n')
    with pytest.raises(DataError, match=r"ratings.csv: Error tokenizing data. C error: EOF inside string"):
        load_movielens(folder)
    (folder / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n\xff,1,4.0,964982703\n")
    with pytest.raises(DataError, match=r"ratings.csv: not valid utf-8 text"):
        load_movielens(folder)


def test_double_colon_reader_reports_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match=r"nothing.dat: file not found"):
        read_table(tmp_path / "nothing.dat", sep="::", names=("a", "b"))
    (tmp_path / "bad.dat").write_bytes(b"1::\xff\n")
    with pytest.raises(DataError, match=r"bad.dat: not valid utf-8 text"):
        read_table(tmp_path / "bad.dat", sep="::", names=("a", "b"))


# --- validate_interactions and make_dataset ------------------------------------------------------

def _frame(**overrides) -> pd.DataFrame:
    columns = {"user_id": ["a", "b"], "item_id": [1, 2], "rating": [4.0, 5.0], "timestamp": [10, 20]}
    columns.update(overrides)
    return pd.DataFrame(columns)


def test_validate_interactions_coerces_contract_dtypes_and_keeps_the_index():
    frame = _frame(user_id=[7, 8], item_id=[1.0, 2.0], rating=["4", "4.5"], timestamp=np.array([10, 20], np.int32))
    frame.index = pd.RangeIndex(5, 7, name="line")
    checked = validate_interactions(frame, "log.csv")
    assert [str(t) for t in checked.dtypes] == ["str", "int64", "float32", "int64"]
    assert checked["user_id"].tolist() == ["7", "8"] and checked["rating"].tolist() == [4.0, 4.5]
    assert checked.index.tolist() == [5, 6]


@pytest.mark.parametrize(("frame", "message"), [
    (_frame().iloc[:0], "log: no interactions (the table is empty)"),
    (_frame().drop(columns="rating"), "log: missing column 'rating'"),
    (_frame(rating=[True, False]), "log: column 'rating' has dtype bool, expected a number"),
    (_frame(timestamp=pd.to_datetime(["2024-01-01", "2024-01-02"])), "log: column 'timestamp' has dtype"),
    (_frame(user_id=[1.5, 2.5]), "log: column 'user_id' has dtype float64, expected strings or integers"),
    (_frame(user_id=["a", None]), "log, row 2, column 'user_id': user_id is missing"),
    (_frame(user_id=["a", ""]), "log, row 2, column 'user_id': user_id must be 1..128 UTF-8 bytes, got ''"),
    (_frame(user_id=["a", "é" * 65]), "user_id must be 1..128 UTF-8 bytes"),
    (_frame(item_id=["1", "x"]), "log, row 2, column 'item_id': item_id must be an integer, got 'x'"),
    (_frame(rating=[4.0, np.nan]), "log, row 2, column 'rating': rating is missing"),
])
def test_validate_interactions_refuses_bad_frames(frame, message):
    with pytest.raises(DataError) as caught:
        validate_interactions(frame, "log")
    assert message in str(caught.value)


def test_data_error_is_a_value_error_and_to_int64_checks_the_upper_bound():
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match=r"f, row 2, column 'flag': flag must be in \[0, 1\], got 3"):
        to_int64(pd.Series([1, 3]), source="f", column="flag", minimum=0, maximum=1)


def test_make_dataset_refuses_when_nothing_is_left():
    items = pd.DataFrame({"item_id": [99], "title": ["x"], "genres": [""]})
    with pytest.raises(DataError, match=r"log: no interactions left after dropping \{'unknown item id': 2\}"):
        make_dataset("log", validate_interactions(_frame(), "log"), source="log", rows_read=2, items=items)


def test_summary_reports_bins_for_many_distinct_ratings():
    frame = _frame(user_id=[str(i) for i in range(30)], item_id=list(range(30)),
                   rating=np.linspace(0, 1, 30), timestamp=list(range(30)))
    data = make_dataset("scores", validate_interactions(frame, "scores"), source="scores", rows_read=30)
    assert len(data.report.rating_histogram) == 10 and sum(c for _, c in data.report.rating_histogram) == 30
    assert "0..0.1" in data.report.summary()


# --- generic CSV / Parquet -----------------------------------------------------------------------

def test_generic_csv_with_mapping_iso_timestamps_and_implicit_ratings(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("uid,sku,when,channel\nu1,5,2024-01-01T00:00:00Z,web\nu2,6,2024-01-01 00:00:01,app\n"
                    "u1,5,2024-01-01T01:00:00+01:00,web\n")
    data = load_interactions(path, columns={"user_id": "uid", "item_id": "sku", "timestamp": "when"})
    assert data.name == "clicks"
    assert data.interactions["timestamp"].tolist() == [1_704_067_200, 1_704_067_201]
    assert data.interactions["rating"].tolist() == [1.0, 1.0]
    assert data.report.dropped == {"duplicate (user,item,timestamp)": 1}
    assert any("implicit feedback" in w for w in data.report.warnings)
    assert any("ignored columns ['channel']" in w for w in data.report.warnings)


def test_generic_parquet_with_datetime_column_and_tab_csv(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [3, 4], "item_id": [1, 2], "rating": [2.0, 3.0],
                  "timestamp": pd.to_datetime(["1970-01-01 00:00:05", "1970-01-02 00:00:00"])}).to_parquet(path)
    data = load_interactions(path)
    assert data.interactions["user_id"].tolist() == ["3", "4"]
    assert data.interactions["timestamp"].tolist() == [5, 86_400]
    tsv = tmp_path / "log.tsv"
    tsv.write_text("user_id\titem_id\trating\ttimestamp\n1\t2\t3\t4\n")
    assert load_interactions(tsv, sep="\t").interactions["item_id"].tolist() == [2]


def test_generic_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts\na,1,2024-01-01\nb,2,yesterday\n")
    mapping = {"user_id": "user", "item_id": "item", "timestamp": "ts"}
    with pytest.raises(DataError, match=r"log.csv, line 3, column 'timestamp': timestamp must be Unix seconds "
                                        r"or an ISO 8601 date-time, got 'yesterday'"):
        load_interactions(path, columns=mapping)
    with pytest.raises(DataError, match=r"log.csv, line 1: missing column 'stars'"):
        load_interactions(path, columns={**mapping, "rating": "stars"})
    with pytest.raises(ValueError, match=r"columns keys must be among .*, got 'score'"):
        load_interactions(path, columns={"score": "ts"})
    with pytest.raises(DataError, match=r"missing.parquet: file not found"):
        load_interactions(tmp_path / "missing.parquet")
    path.write_text("user,item,ts\na,1,1704067200\nb,2,\n")
    with pytest.raises(DataError, match=r"log.csv, line 3, column 'timestamp': timestamp is missing"):
        load_interactions(path, columns=mapping)
    parquet = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["a", "b"], "item_id": [1, 2], "timestamp": [1, None]}).to_parquet(parquet)
    with pytest.raises(DataError, match=r"bad.parquet, row 2, column 'timestamp': timestamp is missing"):
        load_interactions(parquet)


def test_generic_csv_without_timestamps_takes_the_file_order_as_time(tmp_path):
    """A log with no timestamp column loads (it used to be refused): row i happens at second i, so the
    time-ordered protocols follow the file; the report says so."""
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id,rating\nb,9,4\na,8,3\na,7,5\n\na,3,2\nb,9,1\n")
    data = load_interactions(path)
    rows = data.interactions
    assert rows[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["b", 9, 0], ["a", 8, 1], ["a", 7, 2], ["a", 3, 3], ["b", 9, 4]]
    assert rows["rating"].tolist() == [4.0, 3.0, 5.0, 2.0, 1.0]
    assert any("file's order is the time order" in w for w in data.report.warnings)
    assert data.report.dropped == {"blank line": 1}
    split = split_by_name("leave_one_out", rows, seed=0)
    assert split.test[["user_id", "item_id"]].values.tolist() == [["a", 3]]      # a's last row in the file
    assert split.val[["user_id", "item_id"]].values.tolist() == [["a", 7]]


def test_generic_string_item_ids_are_coded_and_keep_their_original_as_title(tmp_path):
    """SKU-like ids (and ids with leading zeros, which are not the same item as without them) become
    codes 1..n in sorted order; the items table maps each code back to the original id."""
    path = tmp_path / "orders.csv"
    path.write_text("user_id,item_id,timestamp\nu1,B00X,10\nu2,007,11\nu1,7,12\nu2,B00X,13\n")
    data = load_interactions(path)
    assert data.items[["item_id", "title"]].values.tolist() == [[1, "007"], [2, "7"], [3, "B00X"]]
    assert data.interactions["item_id"].tolist() == [3, 1, 2, 3]
    warning = next(w for w in data.report.warnings if "not all plain non-negative integers" in w)
    assert "'B00X' at " in warning and "line 2, column 'item_id'" in warning and "1..3" in warning
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id,item_id,timestamp\nu1,5,10\nu2,6.0,11\n")   # integers as text pass through
    data = load_interactions(plain)
    assert data.items is None and data.interactions["item_id"].tolist() == [5, 6]
    gap = tmp_path / "gap.csv"
    gap.write_text("user_id,item_id,timestamp\nu1,B1,10\nu2,,11\n")
    with pytest.raises(DataError, match=r"gap.csv, line 3, column 'item_id': item_id is missing"):
        load_interactions(gap)


def test_generic_csv_without_a_header_line_is_read_in_contract_order(tmp_path):
    """Dumps such as Amazon's reviews (user,item,rating,timestamp, no header) load as they are."""
    dump = tmp_path / "ratings_Books.csv"
    dump.write_text("AX1,0312,5.0,1341100800\nBY2,0312,3.0,1341100900\nAX1,0451,4.0,1341101000\n")
    data = load_interactions(dump)
    assert data.interactions[["user_id", "rating", "timestamp"]].values.tolist() == [
        ["AX1", 5.0, 1341100800], ["BY2", 3.0, 1341100900], ["AX1", 4.0, 1341101000]]
    assert data.items["title"].tolist() == ["0312", "0451"]               # leading zeros kept: coded ids
    assert data.report.rows_read == 3
    assert any(w.startswith("no header line (the first line is data: ['AX1', '0312', '5.0', '1341100800'])")
               for w in data.report.warnings)
    three = tmp_path / "three.csv"
    three.write_text("u1,7,4\nu2,8,2\n")                                 # a small third field: a rating
    assert load_interactions(three).interactions["rating"].tolist() == [4.0, 2.0]
    three.write_text("u1,7,1341100800\nu2,8,1341100900\n")               # epoch seconds: a timestamp
    loaded = load_interactions(three)
    assert loaded.interactions["timestamp"].tolist() == [1341100800, 1341100900]
    assert loaded.interactions["rating"].tolist() == [1.0, 1.0]


def test_a_header_with_other_names_is_not_taken_for_data(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,score,ts\nu1,7,4,10\n")
    data = load_interactions(path)                                      # usual spellings: read as a header
    assert data.interactions[["user_id", "item_id", "rating", "timestamp"]].values.tolist() == [["u1", 7, 4.0, 10]]
    path.write_text("who,what,score,ts\nu1,7,4,10\n")
    with pytest.raises(DataError, match=r"log.csv, line 1: no user_id column .* the file's columns are "
                                        r"\['who', 'what', 'score', 'ts'\]: name yours with --set data.column_map="):
        load_interactions(path)
    data = load_interactions(path, columns={"user_id": "who", "item_id": "what", "rating": "score", "timestamp": "ts"})
    assert data.interactions["item_id"].tolist() == [7]
    path.write_text("u1,7,4,10\nu2,8,2,11\n")                            # a mapping says a header is there
    with pytest.raises(DataError, match=r"missing column 'uid'"):
        load_interactions(path, columns={"user_id": "uid"})


def test_a_column_whose_name_ends_with_a_usual_spelling_is_taken_when_none_matches_exactly(tmp_path):
    """Book-Crossing's ``"User-ID";"ISBN";"Book-Rating"`` lost its ratings ("ignored columns ['Book-Rating']"),
    and Last.fm's ``userID artistID weight`` had no item column."""
    books = tmp_path / "BX-Book-Ratings.csv"
    books.write_text('"User-ID";"ISBN";"Book-Rating";"event_timestamp";"daytime_flag"\n'
                     '"276725";"034545104X";"0";1600000000;1\n"276726";"0155061224";"5";1600000001;0\n')
    data = load_interactions(books)
    assert sorted(data.interactions["rating"].tolist()) == [0.0, 5.0]
    assert sorted(data.interactions["timestamp"].tolist()) == [1600000000, 1600000001]
    assert "column 'Book-Rating' read as rating (its name ends with a usual spelling; set data.column_map to choose)" \
        in data.report.warnings
    assert "ignored columns ['daytime_flag']" in data.report.warnings
    plays = tmp_path / "user_artists.dat"
    plays.write_text("userID\tartistID\tweight\n2\t51\t13883\n2\t52\t11690\n")
    data = load_interactions(plays, sep="\t")
    assert data.interactions["item_id"].tolist() == [51, 52]
    assert data.interactions["rating"].tolist() == [1.0, 1.0]                    # a play count is not a rating
    assert "ignored columns ['weight']" in data.report.warnings


def test_usual_column_spellings_are_read_as_the_contract_names(tmp_path):
    """MovieLens' ratings.csv, Amazon's review columns, a retail export: each loads without a column map,
    and the load report says which column was read as what."""
    movielens = tmp_path / "ratings.csv"
    movielens.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n")
    data = load_interactions(movielens)
    assert data.interactions[["user_id", "item_id", "rating", "timestamp"]].values.tolist() == [
        ["1", 31, 2.5, 1260759144], ["1", 1029, 3.0, 1260759179]]
    assert "column 'userId' read as user_id (a usual spelling; set data.column_map to choose)" in data.report.warnings
    assert "column 'movieId' read as item_id (a usual spelling; set data.column_map to choose)" in data.report.warnings
    amazon = tmp_path / "reviews.csv"
    amazon.write_text("reviewerID,asin,overall,unixReviewTime,summary\nAX1,0312,5.0,1341100800,good\n"
                      "BY2,0451,4.0,1341100900,fine\n")
    data = load_interactions(amazon)
    assert data.items["title"].tolist() == ["0312", "0451"]            # read as text: leading zeros kept
    assert data.interactions["rating"].tolist() == [5.0, 4.0]
    assert data.interactions["timestamp"].tolist() == [1341100800, 1341100900]
    assert any("ignored columns ['summary']" in w for w in data.report.warnings)
    retail = tmp_path / "orders.csv"
    retail.write_text("Customer ID,Product ID,Date\nc1,p1,2024-01-01\nc2,p1,2024-01-02\n")
    data = load_interactions(retail)
    assert data.interactions["timestamp"].tolist() == [1_704_067_200, 1_704_153_600]
    assert data.interactions["rating"].tolist() == [1.0, 1.0]            # no rating column: implicit
    # A column found by its spelling whose values are not ratings or times is left out again, with a note.
    us = tmp_path / "us.csv"
    us.write_text("user,item,score,date\nu1,7,good,12/31/2020\nu2,7,bad,01/01/2021\n")
    data = load_interactions(us)
    assert data.interactions["rating"].tolist() == [1.0, 1.0] and data.interactions["timestamp"].tolist() == [0, 1]
    assert "column 'score' not read as rating: it holds values that are not numbers" in data.report.warnings
    assert any(w.startswith("column 'date' not read as timestamp: ") and "got '12/31/2020'" in w
               for w in data.report.warnings)
    # A column map still decides: here "score" is not the rating, and no alias replaces a mapped name.
    both = tmp_path / "both.csv"
    both.write_text("user,item,score,stars\nu1,7,0.5,4\n")
    assert load_interactions(both, columns={"rating": "stars"}).interactions["rating"].tolist() == [4.0]
    assert load_interactions(both).interactions["rating"].tolist() == [0.5]


@pytest.mark.parametrize("name,text,ids,times", [
    # Food.com's RAW_interactions.csv: the recipe is the item.
    ("foodcom.csv", "user_id,recipe_id,date,rating,review\n38094,40893,2003-02-17,4,Great\n"
                    "1293707,40893,2011-12-21,5,So simple\n",
     [("38094", 40893), ("1293707", 40893)], [1_045_440_000, 1_324_425_600]),
    # KuaiRec's small_matrix.csv: the video; its own "timestamp" wins over "time" and "date".
    ("kuairec.csv", "user_id,video_id,play_duration,video_duration,time,date,timestamp,watch_ratio\n"
                    "14,148,4381,6067,2020-07-05 05:27:48.378,20200705.0,1593898068,0.72\n"
                    "14,183,11635,6100,2020-07-05 05:28:00.057,20200705.0,1593898080,1.90\n",
     [("14", 148), ("14", 183)], [1_593_898_068, 1_593_898_080]),
    # H&M's transactions_train.csv: t_dat is the purchase day.
    ("hm.csv", "t_dat,customer_id,article_id,price,sales_channel_id\n"
               "2018-09-20,000058a12d5b43e6,0663713001,0.0508,2\n2018-09-21,00007d2de826758b,0505221004,0.0305,2\n",
     [("000058a12d5b43e6", "0663713001"), ("00007d2de826758b", "0505221004")], [1_537_401_600, 1_537_488_000]),
    # The UCI Online Retail export: StockCode is the product; its InvoiceDate, month first, is left out (file order).
    ("retail.csv", "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                   "536365,85123A,WHITE HANGING HEART,6,12/1/2010 8:26,2.55,17850,United Kingdom\n"
                   "536366,22633,HAND WARMER,6,12/1/2010 8:28,1.85,17851,United Kingdom\n",
     [("17850", "85123A"), ("17851", "22633")], [0, 1]),
    # Ta-Feng: TRANSACTION_DT.
    ("tafeng.csv", "TRANSACTION_DT,CUSTOMER_ID,AGE_GROUP,PRODUCT_ID,AMOUNT\n"
                   "2000-11-01,1104905,45-49,4710199010372,2\n2000-11-02,418683,45-49,4710857472535,1\n",
     [("1104905", 4710199010372), ("418683", 4710857472535)], [973_036_800, 973_123_200]),
])
def test_the_headers_of_other_domains_public_logs_load_without_a_column_map(tmp_path, name, text, ids, times):
    """Logs of recipes, short videos, fashion and retail purchases name their columns their own way; each loads
    without data.column_map, the report naming what was read as what."""
    path = tmp_path / name
    path.write_text(text)
    data = load_interactions(path)
    frame = data.interactions
    # Integer item ids stay numbers; other ids become numbers with the original kept as the item's title.
    numeric = isinstance(ids[0][1], int)
    original = {} if numeric else dict(zip(data.items["item_id"], data.items["title"]))
    read = [(str(u), i if numeric else original[i]) for u, i in zip(frame["user_id"], frame["item_id"])]
    assert read == [(u, i) for u, i in ids]
    assert frame["timestamp"].tolist() == times
    assert any("read as item_id" in w for w in data.report.warnings)


@pytest.mark.parametrize("scale,unit", [(1, None), (10**3, "milliseconds"), (10**6, "microseconds"),
                                        (10**9, "nanoseconds")])
def test_generic_epoch_numbers_in_smaller_units_are_read_as_seconds(tmp_path, scale, unit):
    """Logs in milliseconds (and finer) used to crash the report (year 55,000) and skew every time feature."""
    seconds = [1_704_067_200, 1_704_067_201, 86_400]
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": [1, 2, 3],
                  "timestamp": [t * scale + scale // 2 for t in seconds]}).to_parquet(path)
    data = load_interactions(path)
    assert sorted(data.interactions["timestamp"].tolist()) == sorted(seconds)
    notes = [w for w in data.report.warnings if "since the epoch" in w]
    assert (notes[0].startswith(f"timestamps read as {unit}") if unit else notes == [])
    assert "1970-01-02 .. 2024-01-01" in data.report.summary()


def test_a_timestamp_column_half_numbers_half_dates_names_the_row_that_dropping_drops(tmp_path):
    """As many Unix seconds as dates in one column: the load's error and ``data.bad_rows=drop`` agree on
    which reading wins (numbers, as on a majority of numbers), so the row the error names is the row the
    suggested setting drops."""
    path = tmp_path / "tied.csv"
    path.write_text("user_id,item_id,timestamp\n"
                    "u1,1,1600000000\n"
                    "u2,2,2020-09-13T12:26:40Z\n")
    with pytest.raises(DataError, match=r"tied.csv, line 3, column 'timestamp': timestamp must be Unix seconds or "
                                        r"an ISO 8601 date-time, got '2020-09-13T12:26:40Z'; or drop every such row"):
        load_interactions(path)
    data = load_interactions(path, bad_rows="drop")
    assert data.interactions[["user_id", "item_id", "timestamp"]].values.tolist() == [["u1", 1, 1600000000]]
    assert data.report.dropped == {"unreadable timestamp": 1}


def test_unreadable_rows_stop_the_load_with_a_hint_or_are_dropped_and_counted(tmp_path):
    """``data.bad_rows``: by default the first row with a missing or unreadable value stops the load (its line
    and column, and the setting that drops such rows); with ``drop`` every such row is dropped, counted by
    reason in the load report, and nothing else is lost."""
    path = tmp_path / "dirty.csv"
    long_user = "u" * 200
    path.write_text("user_id,item_id,rating,timestamp\n"
                    "u1,1,4,1600000000\n"
                    ",2,4,1600000001\n"             # line 3: no user
                    "u2,3,,1600000002\n"            # line 4: no rating
                    "u2,4,good,1600000003\n"        # line 5: a word for a rating
                    "u3,5,inf,1600000004\n"         # line 6: not finite
                    "u3,6,3,yesterday\n"            # line 7: a word in a numeric time column
                    f"{long_user},7,3,1600000006\n"  # line 8: an id too long to serve
                    "u4,8,5,1600000007\n")
    with pytest.raises(DataError, match=r"dirty.csv, line 7, column 'timestamp': timestamp must be Unix seconds or "
                                        r"an ISO 8601 date-time, got 'yesterday'; or drop every such row \(counted "
                                        r"in the load report\) with --set data.bad_rows=drop"):
        load_interactions(path)
    path.with_name("no_user.csv").write_text("user_id,item_id\nu1,1\n,2\n")
    with pytest.raises(DataError, match=r"no_user.csv, line 3, column 'user_id': user_id is missing .*data.bad_rows=drop"):
        load_interactions(path.with_name("no_user.csv"))
    data = load_interactions(path, bad_rows="drop")
    assert data.interactions.sort_values("timestamp")[["user_id", "item_id", "rating"]].values.tolist() == [
        ["u1", 1, 4.0], ["u4", 8, 5.0]]
    assert data.report.rows_read == 8 and data.report.rows_kept == 2
    assert data.report.dropped == {"missing user_id": 1, "unreadable user_id": 1, "missing rating": 1,
                                   "unreadable rating": 2, "unreadable timestamp": 1}
    notes = [w for w in data.report.warnings if w.startswith("dropped")]
    assert notes[0] == f"dropped 1 row(s): missing user_id (data.bad_rows=drop); the first at {path}, line 3, column 'user_id': nan"
    assert any("unreadable rating" in n and "line 5" in n and "'good'" in n for n in notes)
    assert any("unreadable timestamp" in n and "line 7" in n and "'yesterday'" in n for n in notes)


def test_dropping_bad_rows_reads_a_date_column_as_dates_and_a_number_column_as_numbers(tmp_path):
    dates = tmp_path / "dates.csv"
    dates.write_text("user_id,item_id,timestamp\nu1,1,2024-01-01T10:00:00Z\nu1,2,17\nu2,3,2024-01-02\n")
    data = load_interactions(dates, bad_rows="drop")
    assert data.report.dropped == {"unreadable timestamp": 1} and len(data.interactions) == 2
    numeric_items = tmp_path / "items.parquet"
    pd.DataFrame({"user_id": ["a", "b", "c", "d"], "item_id": [1.0, -2.0, 3.5, np.nan]}).to_parquet(numeric_items)
    data = load_interactions(numeric_items, bad_rows="drop")
    assert data.report.dropped == {"missing item_id": 1, "unreadable item_id": 2}
    assert data.interactions["item_id"].tolist() == [1]
    everything = tmp_path / "nothing.csv"
    everything.write_text("user_id,item_id,rating\nu1,1,x\nu2,2,y\n")
    with pytest.raises(DataError, match=r"nothing.csv: no interactions left after dropping \{'blank line': 0, "
                                        r"'unreadable rating': 2\}"):
        load_interactions(everything, bad_rows="drop")
    with pytest.raises(ValueError, match=r"bad_rows must be one of \('error', 'drop'\), got 'skip'"):
        load_interactions(everything, bad_rows="skip")


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_log_that_is_not_utf8_is_read_as_latin1_with_every_id_kept_distinct(tmp_path, suffix):
    """A Windows export (cp1252) or a Cyrillic one (cp1251) stopped the load with "not valid utf-8 text".
    Latin-1 maps each byte to one character, so ids that differ in their bytes stay different ids."""
    lines = ["user,item,rating", "Zoë,Café,4", "Zoe,Cafe,3", "Анна,Café,5", "Zoë,Crème,2", "Анна,Чай,1"]
    text = ("\n".join(lines) + "\n")
    raw = text.replace("Анна", "\xc0\xed\xed\xe0").replace("Чай", "\xd7\xe0\xe9").encode("latin-1")  # cp1251 bytes
    path = tmp_path / f"export{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    data = load_interactions(path)
    assert data.report.warnings[0].startswith("not valid UTF-8 text (")
    assert "read as Latin-1" in data.report.warnings[0]
    assert data.report.n_users == 3 and data.report.n_items == 4 and len(data.interactions) == 5
    assert sorted(data.items["title"]) == ["Cafe", "Café", "Crème", "×àé"]
    assert sorted(data.interactions["user_id"].unique()) == sorted(["Zoe", "Zoë", "Àííà"])
    plain = tmp_path / "plain.csv"
    plain.write_text(text, encoding="utf-8")
    assert not any("Latin-1" in w for w in load_interactions(plain).report.warnings)
    assert sorted(load_interactions(plain).interactions["user_id"].unique()) == ["Zoe", "Zoë", "Анна"]


@pytest.mark.parametrize("name", ["events.jsonl", "events.ndjson.gz"])
def test_json_lines_logs_are_read_with_the_usual_spellings(tmp_path, name):
    """Event exports are often JSON Lines; they were read as CSV and failed on the first brace."""
    text = ('{"user": "u1", "item_id": "007", "rating": 4, "ts": "2024-01-01T10:00:00Z"}\n'
            '{"user": "u2", "item_id": "7", "rating": 3.5, "ts": "2024-01-02T10:00:00Z"}\n\n'
            '{"user": "u1", "item_id": "8", "rating": 5, "ts": "2024-01-03T10:00:00Z"}\n')
    path = write_log(tmp_path / name, text)
    data = load_interactions(path)
    assert data.name == "events" and len(data.interactions) == 3
    assert sorted(data.items["title"]) == ["007", "7", "8"]                  # ids as written: leading zeros kept
    assert sorted(data.interactions["timestamp"].tolist()) == [1704103200, 1704189600, 1704276000]
    assert "column 'ts' read as timestamp (a usual spelling; set data.column_map to choose)" in data.report.warnings
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"user": "u1", "item_id": 1}\n{"user": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: not JSON Lines \(one object per line\)"):
        load_interactions(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"user": "u1", "item_id": 1, "rating": 4}\n{"user": "u2", "item_id": 2}\n')
    with pytest.raises(DataError, match=r"missing.jsonl, row 2, column 'rating': rating is missing"):
        load_interactions(missing)


@pytest.mark.parametrize("name", ["Books_5.json", "Books_5.json.gz"])
def test_json_files_are_read_as_json_lines_or_as_one_array(tmp_path, name):
    """Amazon's review dumps (``Books_5.json.gz``) and Yelp's reviews are JSON Lines named ``.json``; they were read
    as CSV and refused with the first line's fragments for columns."""
    text = ('{"overall": 5.0, "reviewerID": "A1", "asin": "0000013714", "reviewText": "Good, \\"really\\"", '
            '"unixReviewTime": 1360000000}\n'
            '{"overall": 3.0, "reviewerID": "A2", "asin": "B00001", "reviewText": "ok", "unixReviewTime": 1360000100}\n')
    path = write_log(tmp_path / name, text)
    data = load_interactions(path)
    assert data.name == "Books_5"
    assert data.interactions[["user_id", "rating", "timestamp"]].values.tolist() == [["A1", 5.0, 1360000000],
                                                                                    ["A2", 3.0, 1360000100]]
    assert sorted(data.items["title"]) == ["0000013714", "B00001"]          # ids as written
    assert data.report.warnings[0] == "a .json file of one object per line: read as JSON Lines"
    assert "column 'asin' read as item_id (a usual spelling; set data.column_map to choose)" in data.report.warnings
    array = tmp_path / "ratings.json"
    array.write_text('[\n  {"user": "u1", "item": 3, "rating": 4},\n  {"user": "u2", "item": 4, "rating": 5}\n]\n')
    data = load_interactions(array)
    assert data.interactions[["user_id", "item_id", "rating"]].values.tolist() == [["u1", 3, 4.0], ["u2", 4, 5.0]]
    assert data.report.warnings[0] == "a JSON array: one interaction per object"
    nested = tmp_path / "export.json"
    nested.write_text('{\n  "ratings": [{"user": "u1", "item": 3}]\n}\n')
    with pytest.raises(DataError, match=r"export.json: not JSON Lines \(one object per line\)"):
        load_interactions(nested)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty.json: no interactions \(the array is empty\)"):
        load_interactions(tmp_path / "empty.json")


def test_goodreads_date_times_are_read_as_timestamps(tmp_path):
    """Goodreads' interaction dumps time each shelving as ``date_added`` in "Mon Jul 24 02:48:17 -0700 2017" (not
    ISO 8601, not a usual spelling): such logs took the file's order as their time."""
    text = ('{"user_id": "8842281e1d1347389f2ab93d60773d4d", "book_id": "24375664", "rating": 5, '
            '"date_added": "Mon Aug 01 13:41:57 -0700 2011", "read_at": ""}\n'
            '{"user_id": "8842281e1d1347389f2ab93d60773d4d", "book_id": "18245960", "rating": 0, '
            '"date_added": "Sun Jul 30 07:44:10 -0700 2017", "read_at": ""}\n')
    data = load_interactions(write_log(tmp_path / "goodreads_interactions.json", text))
    assert data.interactions["timestamp"].tolist() == [1312231317, 1501425850]     # 20:41:57 and 14:44:10 UTC
    assert "column 'date_added' read as timestamp (a usual spelling; set data.column_map to choose)" in (
        data.report.warnings)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("user,item,timestamp\nu1,1,2017-07-30T14:44:10Z\nu1,2,Sun Jul 30 07:44:10 -0700 2017\n"
                     "u2,1,yesterday\n")
    assert load_interactions(mixed, bad_rows="drop").interactions["timestamp"].tolist() == [1501425850, 1501425850]
    with pytest.raises(DataError, match=r"mixed.csv, line 4, column 'timestamp': timestamp must be Unix seconds "
                                        r"or an ISO 8601 date-time, got 'yesterday'"):
        load_interactions(mixed)


def test_generic_epoch_seconds_with_fractions_are_floored_with_a_note(tmp_path):
    """Unix seconds with a fraction (``time.time()`` dumps, event exports) were refused: "timestamp must be
    an integer, got 1600000037.25". They are floored to whole seconds, as milliseconds and ISO times are."""
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu1,4,1600000037.25\nu2,5,1600000038\nu1,6,-0.5\n")
    data = load_interactions(path)
    assert sorted(data.interactions["timestamp"].tolist()) == [-1, 1600000037, 1600000038]
    assert [w for w in data.report.warnings if "fractions of a second" in w] == [
        "2 timestamps have fractions of a second (e.g. 1600000037.25): floored to whole seconds"]
    whole = tmp_path / "whole.csv"
    whole.write_text("user_id,item_id,timestamp\nu1,4,1600000037.0\n")
    assert not [w for w in load_interactions(whole).report.warnings if "fractions" in w]


def test_space_separated_logs_are_read_with_runs_of_spaces_as_one_separator(tmp_path):
    """Research dumps such as FilmTrust's ``ratings.txt`` are ``user item rating`` separated by spaces, some
    aligned with several; they were read as one column ("no user_id column")."""
    dump = tmp_path / "ratings.txt"
    dump.write_text("1 1 2\n1  2 4\n 2 1 3.5 \n2 3 4\n")
    assert detect_separator(dump) == " "
    data = load_interactions(dump)
    assert data.interactions.sort_values(["user_id", "item_id"])[["user_id", "item_id", "rating"]].values.tolist() == [
        ["1", 1, 2.0], ["1", 2, 4.0], ["2", 1, 3.5], ["2", 3, 4.0]]
    assert data.report.warnings[0] == ("no header line (the first line is data: ['1', '1', '2.0']): the columns are "
                                       "read as ['user_id', 'item_id', 'rating']")
    headed = tmp_path / "log.txt"
    headed.write_text("user item  rating timestamp\nu1 7 5 1600000000\n")
    assert load_interactions(headed).interactions.values.tolist() == [["u1", 7, 5.0, 1600000000]]
    spaced_names = tmp_path / "names.csv"
    spaced_names.write_text("User ID,Item ID\nu1,7\n")                # spaces inside names: still a comma file
    assert detect_separator(spaced_names) == ","
    assert load_interactions(spaced_names).interactions["item_id"].tolist() == [7]
    assert detect_separator(spaced_names, " ") == " "


@pytest.mark.parametrize("name,sep", [("log.tsv", "\t"), ("log.txt", ";"), ("log.csv", "|"), ("log.csv", ",")])
def test_generic_separator_is_detected_from_the_suffix_or_the_header(tmp_path, name, sep):
    path = tmp_path / name
    path.write_text(sep.join(["user_id", "item_id", "rating", "timestamp"]) + "\n" + sep.join(["u", "4", "3.5", "9"])
                    + "\n")
    assert detect_separator(path) == sep
    assert load_interactions(path).interactions["item_id"].tolist() == [4]
    assert detect_separator(path, ",") == ","           # an explicit separator is taken as given


# --- download ------------------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    assert data_dir_from_env() == tmp_path
    monkeypatch.delenv("RECSYS_DATA_DIR")
    assert data_dir_from_env().parts[-2:] == ("shared", "data")


def test_present_folder_is_returned_without_network(tmp_path):
    write_100k(tmp_path / "ml-100k")
    assert ensure_movielens("ml-100k", tmp_path, base_url="http://127.0.0.1:9/") == tmp_path / "ml-100k"
    (tmp_path / "ml-1m").mkdir()
    with pytest.raises(DataError, match=r"ml-1m exists but has no ratings.dat"):
        ensure_movielens("ml-1m", tmp_path)
    with pytest.raises(ValueError, match=r"name must be one of \['ml-100k', 'ml-1m'\], got 'ml-25m'"):
        ensure_movielens("ml-25m", tmp_path)


def test_checksum_and_extraction(tmp_path):
    archive = _zip(tmp_path / "ok.zip", {"ml-100k/u.data": DATA_100K})
    verify_md5(archive, hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DataError, match=r"ok.zip: md5 must be 0e33842e24a9c977be4e0107933c0723, got"):
        verify_md5(archive, "0e33842e24a9c977be4e0107933c0723")
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "ml-100k" / "u.data").read_text() == DATA_100K


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ml-100k/../../evil.txt", "C:/evil.txt"])
def test_unsafe_zip_member_is_refused_before_anything_is_written(tmp_path, member):
    archive = _zip(tmp_path / "bad.zip", {"ml-100k/u.data": DATA_100K, member: "x"})
    with pytest.raises(DataError, match="refusing unsafe member"):
        safe_extract(archive, tmp_path / "out" / "inner")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_symlink_member_and_non_zip_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        info = zipfile.ZipInfo("ml-100k/u.data")
        info.external_attr = (0o120777 << 16)  # a symlink's Unix mode
        zipped.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="refusing unsafe member 'ml-100k/u.data'"):
        safe_extract(archive, tmp_path / "out")
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(DataError, match="fake.zip: not a zip archive"):
        safe_extract(tmp_path / "fake.zip", tmp_path / "out")


def test_offline_download_says_where_to_put_the_folder(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError) as caught:
        ensure_movielens("ml-100k", tmp_path / "data", base_url=f"http://127.0.0.1:{port}/", timeout_s=5)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}/ml-100k.zip" in message
    assert str(tmp_path / "data") in message and "RECSYS_DATA_DIR" in message
    assert list((tmp_path / "data").iterdir()) == []  # no partial download left behind


@pytest.fixture
def zip_server(tmp_path):
    """A local HTTP server over tmp_path/served; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_downloaded_zip_with_wrong_checksum_is_refused_and_removed(tmp_path, zip_server):
    served, url = zip_server
    _zip(served / "ml-100k.zip", {"ml-100k/u.data": DATA_100K})
    with pytest.raises(DataError, match=r"md5 must be 0e33842e24a9c977be4e0107933c0723"):
        ensure_movielens("ml-100k", tmp_path / "data", base_url=url, timeout_s=5)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_extracts_into_place_when_the_checksum_matches(tmp_path, zip_server, monkeypatch):
    served, url = zip_server
    archive = write_100k(tmp_path / "src" / "ml-100k")
    with zipfile.ZipFile(served / "ml-100k.zip", "w") as zipped:
        for file in sorted(archive.iterdir()):
            zipped.write(file, f"ml-100k/{file.name}")
    # The real archive's md5 is pinned; this local stand-in has its own.
    monkeypatch.setitem(MOVIELENS_MD5, "ml-100k", hashlib.md5((served / "ml-100k.zip").read_bytes()).hexdigest())
    folder = ensure_movielens("ml-100k", tmp_path / "data", base_url=url, timeout_s=5)
    assert folder == tmp_path / "data" / "ml-100k"
    assert load_movielens(folder).report.rows_kept == 3
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-100k"]  # work folder removed
    _zip(served / "ml-1m.zip", {"ml-1m/README": "no ratings here"})
    monkeypatch.setitem(MOVIELENS_MD5, "ml-1m", hashlib.md5((served / "ml-1m.zip").read_bytes()).hexdigest())
    with pytest.raises(DataError, match=r"ml-1m.zip: the archive has no ml-1m/ratings.dat"):
        ensure_movielens("ml-1m", tmp_path / "data", base_url=url, timeout_s=5)


def test_a_headerless_log_is_read_by_the_field_positions_column_map_names(tmp_path):
    """Dumps such as Last.fm's ``user<TAB>artist id<TAB>artist name<TAB>plays`` have no header line and text in
    their third field, so the first line cannot be told from a header: ``data.column_map`` then names fields by
    their 0-based position."""
    dump = tmp_path / "plays.tsv"
    dump.write_text('u-1\tart-9\tThe "Band", Ltd\t12\nu-2\tart-9\tThe "Band", Ltd\t3\nu-1\tart-4\tSolo\t7\n')
    with pytest.raises(DataError, match="no user_id column"):
        load_interactions(dump)                                    # read as a header: no usual spellings there
    data = load_interactions(dump, columns={"user_id": "0", "item_id": "1", "rating": "3"})
    assert data.interactions[["user_id", "rating"]].values.tolist() == [["u-1", 12.0], ["u-2", 3.0], ["u-1", 7.0]]
    assert sorted(data.items["title"]) == ["art-4", "art-9"]      # SKU-like ids: codes, the id as the title
    assert data.report.rows_read == 3                              # the first line is data, not a header
    assert data.report.warnings[0] == ("no header line (data.column_map names fields by position): "
                                       "user_id = field 0, item_id = field 1, rating = field 3")
    with pytest.raises(DataError, match=r"plays.tsv, line 1: data.column_map's item_id is field 4, but the line "
                                        r"has 4 field\(s\) separated by '\\t' \(0 to 3\)"):
        load_interactions(dump, columns={"user_id": "0", "item_id": "4"})
    table = tmp_path / "plays.parquet"
    pd.DataFrame({"user": ["u-1"], "item": [9]}).to_parquet(table)
    with pytest.raises(DataError, match="names fields by position .* which only a delimited text log without a "
                                        "header has"):
        load_interactions(table, columns={"user_id": "0", "item_id": "1"})
