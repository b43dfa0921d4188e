"""MovieLens loaders: ``load_movielens(path)`` detects the release by the files in the folder.

- 100K: ``u.data`` (tab: user, item, rating, timestamp), ``u.user`` and ``u.item`` (``|``, Latin-1;
  u.item ends in one 0/1 flag per genre of ``u.genre``).
- 1M / 10M: ``ratings.dat``, ``movies.dat`` and (1M only) ``users.dat``, ``::``-separated, Latin-1;
  genres ``|``-separated; users.dat's occupation is a code into ``ML1M_OCCUPATIONS``.
- latest / 20M / 25M: ``ratings.csv`` (``userId,movieId,rating,timestamp``) and ``movies.csv``
  (``movieId,title,genres``), UTF-8 CSV; no users table.

Genres become one ``|``-separated string ("" for none: the 100K "unknown" flag and
"(no genres listed)" are no genre). ``year`` comes from the release date, else from the title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trainer.data.dataset import (
    INTERACTION_COLUMNS, DataError, Dataset, make_dataset, read_table, require_columns, to_float,
    to_int64, validate_interactions,
)

# users.dat's occupation codes 0..20, from the MovieLens 1M README.
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
NO_GENRE_NAMES = ("unknown", "(no genres listed)")
_LATIN1 = "latin-1"
_BLANK = "blank line"


_NO_MOVIES = "no {name}: the items have no titles or genres"


def is_movielens_folder(path: Path) -> bool:
    """Whether ``path`` holds one of the MovieLens ratings files ``load_movielens`` reads: ``u.data``,
    ``ratings.dat``, or a ``ratings.csv`` whose header names MovieLens' ``userId`` and ``movieId`` (other
    releases of the form, goodbooks' ``user_id,book_id,rating`` for one, are generic logs)."""
    if any((path / name).is_file() for name in _LAYOUTS if name != "ratings.csv"):
        return True
    ratings = path / "ratings.csv"
    return ratings.is_file() and {"userId", "movieId"} <= set(_header_fields(ratings))


def _header_fields(path: Path) -> list[str]:
    """The comma-separated names on a CSV's first line, quotes and a byte-order mark stripped."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        line = handle.readline()
    return [field.strip().strip('"').strip() for field in line.rstrip("\r\n").split(",")]


def load_movielens(path: Path | str) -> Dataset:
    """Load a MovieLens folder (100K, 1M/10M or latest/20M/25M layout) into a Dataset."""
    path = Path(path)
    for name, load in _LAYOUTS.items():
        if (path / name).is_file():
            return load(path)
    raise DataError(f"{path}: not a MovieLens folder; expected u.data (100K), ratings.dat (1M/10M) "
                    "or ratings.csv (latest/20M/25M)")


def _load_100k(path: Path) -> Dataset:
    ratings = path / "u.data"
    raw, blank = read_table(ratings, sep="\t", names=INTERACTION_COLUMNS, str_columns=("user_id",))
    interactions = validate_interactions(raw, str(ratings))
    genres = _read_100k_genres(path / "u.genre")
    items_file = path / "u.item"
    fields = ("item_id", "title", "release_date", "video_release_date", "url", *genres)
    raw_items, _ = read_table(items_file, sep="|", names=fields, encoding=_LATIN1, text=True)
    flags = np.stack([to_int64(raw_items[name], source=str(items_file), column=name, minimum=0, maximum=1)
                      for name in genres], axis=1).astype(bool)  # (N, G)
    items = _items(raw_items, str(items_file), _join_flags(flags, genres), raw_items["release_date"])
    return make_dataset(path.name, interactions, source=str(path), rows_read=len(raw) + blank,
                        users=_read_users(path / "u.user", "|", ("user_id", "age", "gender", "occupation", "zip")),
                        items=items, dropped={_BLANK: blank})


def _read_100k_genres(path: Path) -> list[str]:
    """Genre names in flag order (u.genre lines are ``name|index``)."""
    raw, _ = read_table(path, sep="|", names=("name", "index"), encoding=_LATIN1, text=True)
    index = to_int64(raw["index"], source=str(path), column="index", minimum=0)
    return list(raw["name"].to_numpy()[np.argsort(index.to_numpy())])


def _load_dat(path: Path) -> Dataset:
    ratings = path / "ratings.dat"
    raw, blank = read_table(ratings, sep="::", names=INTERACTION_COLUMNS, encoding=_LATIN1,
                            str_columns=("user_id",))
    interactions = validate_interactions(raw, str(ratings))
    movies = path / "movies.dat"
    items, notes = None, []
    if movies.is_file():
        raw_items, _ = read_table(movies, sep="::", names=("item_id", "title", "genres"), encoding=_LATIN1, text=True)
        items = _items(raw_items, str(movies), _clean_genres(raw_items["genres"]), None)
    else:
        notes.append(_NO_MOVIES.format(name="movies.dat"))
    users_file = path / "users.dat"
    users = None
    if users_file.is_file():
        users = _read_users(users_file, "::", ("user_id", "gender", "age", "occupation", "zip"))
    return make_dataset(path.name, interactions, source=str(path), rows_read=len(raw) + blank,
                        users=users, items=items, dropped={_BLANK: blank}, warnings=notes)


def _load_csv(path: Path) -> Dataset:
    ratings = path / "ratings.csv"
    raw, blank = read_table(ratings, sep=",", str_columns=("userId",), quoted=True)
    require_columns(raw, ("userId", "movieId", "rating", "timestamp"), f"{ratings}, line 1")
    raw = raw.rename(columns={"userId": "user_id", "movieId": "item_id"})
    interactions = validate_interactions(raw, str(ratings))
    movies = path / "movies.csv"
    items, notes = None, []
    if movies.is_file():
        raw_items, _ = read_table(movies, sep=",", text=True, quoted=True)
        require_columns(raw_items, ("movieId", "title", "genres"), f"{movies}, line 1")
        raw_items = raw_items.rename(columns={"movieId": "item_id"})
        items = _items(raw_items, str(movies), _clean_genres(raw_items["genres"]), None)
    else:
        notes.append(_NO_MOVIES.format(name="movies.csv"))
    return make_dataset(path.name, interactions, source=str(path), rows_read=len(raw) + blank,
                        items=items, dropped={_BLANK: blank}, warnings=notes)


def _items(raw: pd.DataFrame, source: str, genres: pd.Series, release_date: pd.Series | None) -> pd.DataFrame:
    """The items table: item_id int64, title, genres, year (float, NaN when unknown)."""
    titles = raw["title"].astype("str").str.strip()
    year = _title_year(titles)
    if release_date is not None:
        year = release_date.str.extract(r"(\d{4})\s*$", expand=False).astype(float).fillna(year)
    return pd.DataFrame({
        "item_id": to_int64(raw["item_id"], source=source, column="item_id", minimum=0).to_numpy(),
        "title": titles.to_numpy(),
        "genres": genres.astype("str").to_numpy(),
        "year": year.astype(np.float64).to_numpy(),
    }).astype({"title": "str", "genres": "str"})


def _title_year(titles: pd.Series) -> pd.Series:
    """The year in a trailing "(1995)" (or "(2006-2007)", first year) of a title; NaN if none."""
    return titles.str.extract(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)$", expand=False).astype(float)


def _join_flags(flags: np.ndarray, genres: list[str]) -> pd.Series:
    """``|``-joined names of the set flags of each row of ``flags`` (N, G)."""
    named = [g not in NO_GENRE_NAMES for g in genres]
    return pd.Series(["|".join(g for g, on, keep in zip(genres, row, named) if on and keep) for row in flags])


def _clean_genres(genres: pd.Series) -> pd.Series:
    """Drop the "no genre" markers from ``|``-separated genre strings."""
    def clean(value: str) -> str:
        return "|".join(g for g in value.split("|") if g and g not in NO_GENRE_NAMES)
    return genres.astype("str").map(clean)


def _read_users(path: Path, sep: str, fields: tuple[str, ...]) -> pd.DataFrame:
    """users table: user_id, age (float, NaN if missing), gender, occupation, zip_region."""
    raw, _ = read_table(path, sep=sep, names=fields, encoding=_LATIN1, text=True)
    source = str(path)
    occupation = raw["occupation"].str.strip()
    if sep == "::":  # the 1M file stores occupation codes
        codes = to_int64(raw["occupation"], source=source, column="occupation",
                         minimum=0, maximum=len(ML1M_OCCUPATIONS) - 1)
        occupation = pd.Series(np.asarray(ML1M_OCCUPATIONS)[codes.to_numpy()], index=raw.index)
    user_ids = raw["user_id"].str.strip()
    if (user_ids == "").any():
        pos = int(np.argmax((user_ids == "").to_numpy()))
        raise DataError(f"{source}, line {raw.index[pos]}, column 'user_id': user_id is missing")
    zips = raw["zip"].str.strip()
    return pd.DataFrame({
        "user_id": user_ids.to_numpy(),
        "age": to_float(raw["age"], source=source, column="age", allow_missing=True).to_numpy(),
        "gender": raw["gender"].str.strip().to_numpy(),
        "occupation": occupation.to_numpy(),
        "zip_region": zips.str[:1].where(zips.str.match(r"\d"), "?").to_numpy(),
    }).astype({"user_id": "str", "gender": "str", "occupation": "str", "zip_region": "str"})


# Each layout's ratings file and its reader, in the order a folder is tried (``load_movielens``).
_LAYOUTS = {"u.data": _load_100k, "ratings.dat": _load_dat, "ratings.csv": _load_csv}
