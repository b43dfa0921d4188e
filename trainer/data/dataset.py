"""The interaction log every loader returns, its load report, and the checks all loaders share.

Lives here: ``Dataset`` (interactions + optional user/item side tables, docs/ARCHITECTURE.md
"Interaction log"), ``LoadReport``, ``DataError``, the line-numbered ``read_table`` used by the text
loaders, the column parsers ``to_int64`` / ``to_float``, ``validate_interactions`` (columns, dtypes,
values) and ``make_dataset`` (drops and counts duplicates and unknown ids, sorts, reports).

Line numbers: ``read_table`` indexes each frame by the 1-based line of the row in its file (index
name ``"line"``); the Parquet loader indexes by 1-based row (``"row"``). Errors cite that index, so
they name the file, the line and the column. No row is dropped without being counted in the report.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
MAX_USER_ID_BYTES = 128
# Ratings with at most this many distinct values get one histogram bar per value, else 10 bins.
_MAX_HISTOGRAM_VALUES = 20
# pandas' fast parser takes one-character separators; "::" is swapped for this unused control char.
_UNIT_SEPARATOR = "\x1f"


class DataError(ValueError):
    """Data that cannot be loaded as is; the message names the file, line and column where known."""


@dataclass(frozen=True)
class LoadReport:
    """What a loader read, kept and dropped (by reason), and the shape of what it kept."""

    source: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    warnings: list[str]
    n_users: int
    n_items: int  # distinct items with at least one interaction
    rating_histogram: tuple[tuple[str, int], ...]  # (value or bin label, count)
    time_range: tuple[int, int]  # first and last timestamp, Unix seconds

    def summary(self) -> str:
        """A readable dataset report: sizes, density, ratings, time range, dropped rows, warnings."""
        density = self.rows_kept / (self.n_users * self.n_items)
        first, last = (_utc_day(t) for t in self.time_range)
        lines = [
            f"Dataset report: {self.source}",
            f"  users         {self.n_users:>12,}",
            f"  items         {self.n_items:>12,}",
            f"  interactions  {self.rows_kept:>12,}   density {density:.4%}",
            f"  time range    {first} .. {last} (UTC)",
            "  ratings:",
        ]
        peak = max(count for _, count in self.rating_histogram)
        for label, count in self.rating_histogram:
            lines.append(f"    {label:>12} {count:>12,}  {'#' * round(40 * count / peak)}")
        lines.append(f"  rows read {self.rows_read:,}, kept {self.rows_kept:,}, "
                     f"dropped {self.rows_read - self.rows_kept:,}")
        lines += [f"    {reason}: {count:,}" for reason, count in sorted(self.dropped.items())]
        if self.warnings:
            lines.append("  warnings:")
            lines += [f"    - {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class Dataset:
    """An interaction log sorted by (timestamp, user_id, item_id) with its optional side tables."""

    name: str
    interactions: pd.DataFrame  # user_id str, item_id int64, rating float32, timestamp int64 (s)
    users: pd.DataFrame | None  # user_id str + feature columns
    items: pd.DataFrame | None  # item_id int64, title str, genres str ("|"-separated), + features
    report: LoadReport


def read_table(path: Path, *, sep: str, names: Sequence[str] | None = None, encoding: str = "utf-8",
               text: bool = False, str_columns: Sequence[str] = (), quoted: bool = False,
               nrows: int | None = None) -> tuple[pd.DataFrame, int]:
    """Read a delimited text file; returns (frame indexed by line number, blank lines dropped).

    ``names``: the fields of a headerless file, whose first line must have exactly that many;
    ``None``: the first line is the header. ``text``: every column as str with empty fields as "";
    otherwise pandas infers numbers except for ``str_columns``. ``quoted``: honour "..." (CSV);
    the MovieLens tab, "|" and "::" files are unquoted, so a quote is part of a title. ``nrows``: read
    at most this many data lines (0: the header's columns only).
    """
    source: Path | io.StringIO = path
    if len(sep) > 1:
        try:
            source = io.StringIO(path.read_text(encoding=encoding).replace(sep, _UNIT_SEPARATOR))
        except (FileNotFoundError, UnicodeDecodeError) as error:
            raise _read_error(path, sep, encoding, error) from error
    options: dict = {"dtype": str, "keep_default_na": False} if text else {}
    if not text and str_columns:
        options["dtype"] = {(list(names).index(c) if names else c): "str" for c in str_columns}
    try:
        frame = pd.read_csv(
            source, sep=r"\s+" if sep == " " else _UNIT_SEPARATOR if len(sep) > 1 else sep, header=None if names else 0,
            index_col=False, skip_blank_lines=False, encoding=encoding,
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, nrows=nrows, **options)
    except (FileNotFoundError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as error:
        raise _read_error(path, sep, encoding, error) from error
    if names:
        if frame.shape[1] != len(names):
            raise DataError(f"{path}, line 1: expected {len(names)} fields separated by {sep!r}, "
                            f"found {frame.shape[1]} (wrong separator?)")
        frame.columns = list(names)
    first_line = 1 if names else 2
    frame.index = pd.RangeIndex(first_line, first_line + len(frame), name="line")
    blank = (frame == "").all(axis=1) if text else frame.isna().all(axis=1)
    return frame[~blank], int(blank.sum())


def _read_error(path: Path, sep: str, encoding: str, error: Exception) -> DataError:
    if isinstance(error, FileNotFoundError):
        return DataError(f"{path}: file not found")
    if isinstance(error, UnicodeDecodeError):
        return DataError(f"{path}: not valid {encoding} text ({error})")
    if isinstance(error, pd.errors.EmptyDataError):
        return DataError(f"{path}: the file is empty")
    # pandas counts file lines from 1, header and blank lines included, as we do.
    extra = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(error))
    if extra:
        expected, line, found = extra.groups()
        return DataError(f"{path}, line {line}: expected {expected} fields separated by {sep!r}, found {found}")
    return DataError(f"{path}: {str(error).strip()}")


def require_columns(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    """Raise DataError naming the first of ``columns`` that ``frame`` lacks."""
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{where}: missing column {column!r}; expected {list(columns)}, "
                            f"found {[str(c) for c in frame.columns]} (wrong separator?)")


def location(values: pd.Series, pos: int, source: str, column: str) -> str:
    """Where the row at position ``pos`` came from: ``file, line N, column 'c'`` (``row N`` if unnumbered)."""
    unit = values.index.name or "row"
    label = values.index[pos] if values.index.name else pos + 1
    return f"{source}, {unit} {label}, column {column!r}"


def _value(values: pd.Series, pos: int) -> object:
    """The raw value at ``pos`` as a plain Python object, for error messages."""
    value = values.iloc[pos]
    return value.item() if isinstance(value, np.generic) else value


def to_float(values: pd.Series, *, source: str, column: str, allow_missing: bool = False) -> pd.Series:
    """Parse a column as float64; DataError at the first non-numeric (or missing) value."""
    return _numeric(values, source, column, "a number", allow_missing).astype(np.float64)


def to_int64(values: pd.Series, *, source: str, column: str, minimum: int | None = None,
             maximum: int | None = None) -> pd.Series:
    """Parse a column as int64; DataError at the first missing, fractional or out-of-range value."""
    numbers = _numeric(values, source, column, "an integer", allow_missing=False)
    if numbers.dtype.kind == "f":
        array = numbers.to_numpy()
        fractional = ~np.isfinite(array) | (array != np.floor(array))
        if fractional.any():
            pos = int(np.argmax(fractional))
            raise DataError(f"{location(values, pos, source, column)}: {column} must be an integer, "
                            f"got {_value(values, pos)!r}")
    result = numbers.astype(np.int64)
    outside = np.zeros(len(result), dtype=bool)
    if minimum is not None:
        outside |= result.to_numpy() < minimum
    if maximum is not None:
        outside |= result.to_numpy() > maximum
    if outside.any():
        pos = int(np.argmax(outside))
        raise DataError(f"{location(values, pos, source, column)}: {column} must be in "
                        f"[{minimum}, {maximum if maximum is not None else 'inf'}], got {_value(values, pos)!r}")
    return result


def _numeric(values: pd.Series, source: str, column: str, expected: str, allow_missing: bool) -> pd.Series:
    kind = values.dtype.kind
    if kind in "bMm":
        raise DataError(f"{source}: column {column!r} has dtype {values.dtype}, expected {expected}")
    if kind in "iuf":
        numbers, missing = values, values.isna()
    else:  # text: a non-numeric value (or an empty field of a text-read table) somewhere
        text = values.astype("str").str.strip()
        missing = values.isna() | (text == "")
        numbers = pd.to_numeric(text.where(~missing), errors="coerce")
        bad = numbers.isna() & ~missing
        if bad.any():
            pos = int(np.argmax(bad.to_numpy()))
            raise DataError(f"{location(values, pos, source, column)}: {column} must be {expected}, "
                            f"got {_value(values, pos)!r}")
    if missing.any() and not allow_missing:
        pos = int(np.argmax(missing.to_numpy()))
        raise DataError(f"{location(values, pos, source, column)}: {column} is missing "
                        "(too few fields? check the separator)")
    return numbers


def _user_ids(values: pd.Series, source: str) -> pd.Series:
    missing = values.isna().to_numpy()
    if missing.any():
        pos = int(np.argmax(missing))
        raise DataError(f"{location(values, pos, source, 'user_id')}: user_id is missing "
                        "(too few fields? check the separator)")
    if values.dtype.kind not in "iuOT":
        raise DataError(f"{source}: column 'user_id' has dtype {values.dtype}, expected strings or integers")
    ids = values.astype("str")
    sizes = pc.binary_length(pa.array(ids)).to_numpy(zero_copy_only=False)  # UTF-8 bytes per id
    bad = (sizes < 1) | (sizes > MAX_USER_ID_BYTES)
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataError(f"{location(values, pos, source, 'user_id')}: user_id must be 1..{MAX_USER_ID_BYTES} "
                        f"UTF-8 bytes, got {ids.iloc[pos]!r}")
    return ids


def validate_interactions(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check an interaction frame and return its four columns with the contract dtypes.

    DataError (naming ``source``, the line/row from the index and the column) for an empty frame,
    a missing column, a wrong dtype, or a missing, non-numeric or out-of-range value. Keeps the index.
    """
    if len(df) == 0:
        raise DataError(f"{source}: no interactions (the table is empty)")
    require_columns(df, INTERACTION_COLUMNS, source)
    rating = to_float(df["rating"], source=source, column="rating")
    infinite = ~np.isfinite(rating.to_numpy())
    if infinite.any():
        pos = int(np.argmax(infinite))
        raise DataError(f"{location(df['rating'], pos, source, 'rating')}: rating must be finite, "
                        f"got {_value(df['rating'], pos)!r}")
    return pd.DataFrame({
        "user_id": _user_ids(df["user_id"], source),
        "item_id": to_int64(df["item_id"], source=source, column="item_id", minimum=0),
        "rating": rating.astype(np.float32),
        "timestamp": to_int64(df["timestamp"], source=source, column="timestamp"),
    }, index=df.index)


def make_dataset(name: str, interactions: pd.DataFrame, *, source: str, rows_read: int,
                 users: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
                 dropped: Mapping[str, int] | None = None, warnings: Sequence[str] = ()) -> Dataset:
    """Build a Dataset from validated interactions and the counts of rows already dropped.

    Drops rows whose id is missing from a given side table, then repeated (user, item, timestamp)
    rows (keeping the first in file order), counting each reason; sorts by (timestamp, user_id,
    item_id). DataError for a side table with repeated ids, or when no interaction is left.
    """
    counts = {reason: n for reason, n in (dropped or {}).items() if n}
    notes = list(warnings)
    keep = np.ones(len(interactions), dtype=bool)
    if items is not None:
        _require_unique(items["item_id"], "item_id", f"{source} (items)")
        keep &= _count_drop(_is_in(interactions["item_id"], items["item_id"]), keep, "unknown item id", counts)
    if users is not None:
        _require_unique(users["user_id"], "user_id", f"{source} (users)")
        keep &= _count_drop(_is_in(interactions["user_id"], users["user_id"]), keep, "unknown user id", counts)
    kept = interactions if keep.all() else interactions[keep]
    user_codes = pd.factorize(kept["user_id"], sort=True)[0]  # codes in string order
    item_ids, times = kept["item_id"].to_numpy(), kept["timestamp"].to_numpy()
    rows = np.arange(len(kept))
    presorted = _is_sorted(times, user_codes, item_ids)
    if not presorted:
        rows = np.lexsort((item_ids, user_codes, times))  # stable: ties keep file order
        user_codes, item_ids, times = user_codes[rows], item_ids[rows], times[rows]
    repeated = np.zeros(len(rows), dtype=bool)
    repeated[1:] = ((times[1:] == times[:-1]) & (user_codes[1:] == user_codes[:-1])
                    & (item_ids[1:] == item_ids[:-1]))
    if repeated.any():
        counts["duplicate (user,item,timestamp)"] = int(repeated.sum())
    # Already sorted and nothing repeated (e.g. synthetic data): keep the columns, copy nothing.
    frame = kept if presorted and not repeated.any() else kept.iloc[rows[~repeated]]
    frame = frame.reset_index(drop=True)
    if len(frame) == 0:
        raise DataError(f"{source}: no interactions left after dropping {counts}")
    if items is not None:
        _warn_unused(items["item_id"], frame["item_id"], "items", notes)
    if users is not None:
        _warn_unused(users["user_id"], frame["user_id"], "users", notes)
    assert rows_read - sum(counts.values()) == len(frame), "every dropped row must be counted"
    report = LoadReport(
        source=source, rows_read=rows_read, rows_kept=len(frame), dropped=counts, warnings=notes,
        n_users=int(frame["user_id"].nunique()), n_items=int(frame["item_id"].nunique()),
        rating_histogram=_rating_histogram(frame["rating"].to_numpy()),
        time_range=(int(frame["timestamp"].iloc[0]), int(frame["timestamp"].iloc[-1])))
    return Dataset(name=name, interactions=frame, users=users, items=items, report=report)


def _is_sorted(times: np.ndarray, user_codes: np.ndarray, item_ids: np.ndarray) -> bool:
    """Whether rows are already in (timestamp, user, item) order, ties allowed."""
    later, same_time = times[1:] > times[:-1], times[1:] == times[:-1]
    user_after, same_user = user_codes[1:] > user_codes[:-1], user_codes[1:] == user_codes[:-1]
    in_order = later | (same_time & (user_after | (same_user & (item_ids[1:] >= item_ids[:-1]))))
    return bool(in_order.all())


def _count_drop(known: np.ndarray, keep: np.ndarray, reason: str, counts: dict[str, int]) -> np.ndarray:
    unknown = int((~known & keep).sum())
    if unknown:
        counts[reason] = unknown
    return known


def _is_in(values: pd.Series, known: pd.Series) -> np.ndarray:
    """Which ``values`` occur in ``known``; strings go through pyarrow's hash set, as pandas'
    ``isin`` first turns ``known`` into a Python list."""
    if values.dtype.kind in "iu":
        return np.isin(values.to_numpy(), known.to_numpy())
    found = pc.is_in(pa.array(values.astype("str")), value_set=pa.array(known.astype("str")))
    return found.to_numpy(zero_copy_only=False)


def _require_unique(ids: pd.Series, column: str, where: str) -> None:
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        raise DataError(f"{where}: {column} must be unique, got {ids.iloc[int(np.argmax(repeated))]!r} twice")


def _warn_unused(table_ids: pd.Series, used_ids: pd.Series, what: str, notes: list[str]) -> None:
    unused = int((~_is_in(table_ids, used_ids)).sum())
    if unused:
        notes.append(f"{unused:,} of {len(table_ids):,} {what} in the side table have no interactions")


def _rating_histogram(ratings: np.ndarray) -> tuple[tuple[str, int], ...]:
    values, counts = np.unique(ratings, return_counts=True)
    if len(values) <= _MAX_HISTOGRAM_VALUES:
        return tuple((f"{value:g}", int(count)) for value, count in zip(values, counts))
    counts, edges = np.histogram(ratings, bins=10)
    return tuple((f"{lo:.3g}..{hi:.3g}", int(count)) for lo, hi, count in zip(edges[:-1], edges[1:], counts))


def _utc_day(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d")
