"""Loading any interaction log: ``load_interactions(path, columns=..., sep=...)`` for CSV, Parquet or JSON.

``columns`` maps the contract names (user_id, item_id, rating, timestamp) to the file's column
names, e.g. ``{"user_id": "uid", "item_id": "sku"}``; unmapped names are looked up as is. Values that are all
0-based field numbers (``{"user_id": "0", "item_id": "2"}``) name fields by position in a delimited file
without a header line (``positional``).
Timestamps may be Unix seconds or ISO 8601 date-times (naive ones are taken as UTC; Goodreads' "Mon Jul 24
02:48:17 -0700 2017" too, ``OTHER_TIME_FORMATS``); without a
rating column every interaction is implicit feedback with rating 1.0; without a timestamp column the
file's order is the time order (row i at i seconds after the epoch: the temporal and leave-one-out
protocols follow the file, and the calendar features carry nothing). Item ids that are not all plain
non-negative integers (SKUs, ASINs, ids with leading zeros) are served as integer codes 1..n in the
ids' sorted order, and the original id becomes the item's title, the one side table such a log
gets. Epoch numbers of 1e11 and more are milli-, micro- or nanoseconds and are scaled to seconds.
``sep="auto"`` takes a tab for .tsv/.tab files, else the most frequent of , ; tab | in the header
line (.gz, .bz2, .xz and one-file .zip logs are read through their decompressor). Every such step is a warning in the load report.
A row with a missing or unreadable value stops the load (``bad_rows="error"``) or is dropped and counted
(``bad_rows="drop"``, the trainer's ``data.bad_rows``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from trainer.data.dataset import (
    INTERACTION_COLUMNS, MAX_USER_ID_BYTES, DataError, Dataset, location, make_dataset, read_table,
    require_columns, validate_interactions,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
# ".json": JSON Lines under another name (Amazon's review dumps, Yelp's reviews) or one array of objects.
JSON_SUFFIX = ".json"
TAB_SUFFIXES = (".tsv", ".tab")


def _open_zip(path: Path, mode: str, encoding: str, errors: str) -> io.StringIO:
    """The start (64 KiB) of the one file of a zip archive as text, enough to sniff its header (pandas
    reads such an archive as that file)."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) != 1:
            raise DataError(f"{path}: a zipped log must hold exactly one file, found {len(members)}: "
                            f"{[m.filename for m in members][:5]}")
        with archive.open(members[0]) as member:
            return io.StringIO(member.read(1 << 16).decode(encoding, errors=errors))


COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zip": _open_zip}
SEPARATORS = (",", "\t", ";", "|")
IMPLICIT_RATING = 1.0
# Other spellings of the four columns in public logs (MovieLens' userId / movieId, Amazon's reviewerID /
# asin / overall / unixReviewTime, retail exports' customer_id / product_id, ...), compared in lower case
# with everything but letters and digits dropped ("User ID" -> "userid"). A contract name missing from
# the header and not in ``columns`` takes the first alias found among the columns not taken yet.
# Also the logs of other domains: Food.com's recipe_id, KuaiRec's video_id, H&M's t_dat, the UCI Online Retail
# export's StockCode / InvoiceDate, Ta-Feng's TRANSACTION_DT, Diginetica's eventdate, Foursquare's venueId.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("userid", "user", "uid", "customerid", "customer", "reviewerid", "visitorid", "memberid",
                "clientid", "accountid", "buyerid", "shopperid", "profileid", "viewerid", "readerid",
                "listenerid", "playerid"),
    "item_id": ("itemid", "item", "iid", "movieid", "movie", "productid", "product", "sku", "asin", "articleid",
                "trackid", "songid", "bookid", "isbn", "businessid", "animeid", "contentid", "artistid", "artist",
                "recipeid", "videoid", "stockcode", "gameid", "appid", "newsid", "courseid", "venueid", "placeid",
                "poiid", "jokeid", "beerid", "restaurantid", "hotelid", "listingid", "showid", "episodeid",
                "podcastid", "albumid"),
    "rating": ("rating", "ratings", "score", "stars", "overall", "rate", "preference"),
    "timestamp": ("timestamp", "unixreviewtime", "time", "ts", "datetime", "date", "eventtime", "createdat",
                  "dateadded", "ratedat", "tdat", "eventdate", "invoicedate", "orderdate", "purchasedate",
                  "transactiondate", "transactiondt"),
}
# Date-times in public logs that are not ISO 8601, tried after it: Goodreads' and Twitter's exports write
# "Mon Jul 24 02:48:17 -0700 2017".
OTHER_TIME_FORMATS = ("%a %b %d %H:%M:%S %z %Y",)
# Second pass, for a name still missing: a column whose normalised name ends with one of these (Book-Crossing's
# "Book-Rating", "event_timestamp", "customer_user_id"). Only spellings of six letters or more, so that
# "time" or "item" inside longer words decide nothing.
ALIAS_ENDINGS: dict[str, tuple[str, ...]] = {
    name: tuple(alias for alias in aliases if len(alias) >= 6) for name, aliases in COLUMN_ALIASES.items()}
# Epoch numbers from 1e11 on are not seconds (that is the year 5138): milliseconds from there.
SECONDS_LIMIT = 10**11
# A plain non-negative integer as text: no sign, no leading zero (so "007" and "7" stay two items).
_PLAIN_INTEGER = r"(?:0|[1-9][0-9]*)(?:\.0*)?"


BAD_ROWS = ("error", "drop")


def load_interactions(path: Path | str, *, columns: Mapping[str, str] | None = None, sep: str = "auto",
                      bad_rows: str = "error", notes: Sequence[str] = ()) -> Dataset:
    """Load a CSV (with a header line, or none for a user,item,rating[,timestamp] dump) or Parquet
    interaction log into a Dataset named after the file.

    ``bad_rows="error"`` stops at the first row with a missing or unreadable value (its line and column
    in the DataError); ``"drop"`` drops every such row instead, each counted by reason in the load report
    with the first one's line (``_unreadable``). ``notes`` open the load report's warnings."""
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    path = Path(path)
    mapping = dict(columns or {})
    for name in mapping:
        if name not in INTERACTION_COLUMNS:
            raise ValueError(f"columns keys must be among {list(INTERACTION_COLUMNS)}, got {name!r}")
    source_names = {name: mapping.get(name, name) for name in INTERACTION_COLUMNS}
    notes = list(notes)
    raw, blank = _read(path, sep, source_names, mapping, notes=notes)
    where = f"{path}, line 1" if raw.index.name == "line" else str(path)
    if source_names["user_id"] not in raw.columns or source_names["item_id"] not in raw.columns:
        missing = "user_id" if source_names["user_id"] not in raw.columns else "item_id"
        found = [str(c) for c in raw.columns]
        if missing in mapping:
            raise DataError(f"{where}: missing column {mapping[missing]!r} (data.column_map's {missing}); the "
                            f"file's columns are {found}")
        raise DataError(f"{where}: no {missing} column (looked for {missing!r} and the usual spellings "
                        f"{list(COLUMN_ALIASES[missing][:4])}...); the file's columns are {found}: name yours "
                        f"with --set data.column_map=user_id:COLUMN,item_id:COLUMN[,rating:COLUMN,timestamp:COLUMN]")
    raw = _drop_unreadable_aliases(raw, source_names, mapping, str(path), notes)
    if source_names["rating"] not in raw.columns and "rating" not in mapping:
        notes.append(f"no 'rating' column: implicit feedback, every rating is {IMPLICIT_RATING}")
        raw = raw.assign(rating=np.float32(IMPLICIT_RATING))
        source_names["rating"] = "rating"
    if source_names["timestamp"] not in raw.columns and "timestamp" not in mapping:
        notes.append("no 'timestamp' column: the file's order is the time order (row i at i seconds after "
                     "the epoch); the calendar features carry no information")
        raw = raw.assign(timestamp=np.arange(len(raw), dtype=np.int64))
        source_names["timestamp"] = "timestamp"
    require_columns(raw, list(source_names.values()), where)
    ignored = [str(c) for c in raw.columns if c not in source_names.values()]
    if ignored:
        notes.append(f"ignored columns {ignored}")
    frame = pd.DataFrame({name: raw[column] for name, column in source_names.items()}, index=raw.index)
    dropped = {"blank line": blank}
    if bad_rows == "drop":
        frame = _drop_unreadable(frame, str(path), dropped, notes)
    try:
        frame["timestamp"] = _unix_seconds(frame["timestamp"], str(path), notes)
        frame["item_id"], items = _item_codes(frame["item_id"], str(path), notes)
        interactions = validate_interactions(frame, str(path))
    except DataError as error:
        if bad_rows == "error" and any(mask.any() for _, mask in _unreadable(frame).values()):
            raise DataError(f"{error}; or drop every such row (counted in the load report) with "
                            "--set data.bad_rows=drop") from None
        raise
    name = _uncompressed(path).stem                                      # ratings.csv.gz: ratings
    return make_dataset(name, interactions, source=str(path), rows_read=len(raw) + blank,
                        items=items, dropped=dropped, warnings=notes)


LOG_SUFFIXES = (".csv", ".txt", ".dat", *TAB_SUFFIXES, *PARQUET_SUFFIXES, *JSON_LINES_SUFFIXES)


def logs_in(folder: Path) -> list[Path]:
    """The files of ``folder`` (not its subfolders) that could be an interaction log: CSV-like or Parquet,
    possibly compressed (``COMPRESSED``), hidden files and READMEs left out; sorted by name."""
    found = []
    for path in sorted(folder.iterdir()):
        base = _uncompressed(path)
        if (path.is_file() and not path.name.startswith(".") and not base.stem.lower().startswith("readme")
                and base.suffix.lower() in LOG_SUFFIXES):
            found.append(path)
    return found


def _unreadable(frame: pd.DataFrame) -> dict[str, tuple[str, np.ndarray]]:
    """Per reason, (column, rows) of the contract-named raw ``frame`` that the conversions after it would
    refuse: a missing (or blank) value in any column, a rating that is not a finite number, an item id
    that is a negative or fractional number, a user id longer than ``MAX_USER_ID_BYTES``, a timestamp that
    is neither an epoch number nor an ISO 8601 date-time. Timestamps are read the way most of the column's
    values read (numbers or date-times), so a few stray words in a numeric column are the unreadable ones."""
    reasons: dict[str, tuple[str, np.ndarray]] = {}
    for column in INTERACTION_COLUMNS:
        values = frame[column]
        text = values.astype("str").str.strip() if values.dtype.kind in "OSUT" else None
        missing = (values.isna() | (text == "")).to_numpy() if text is not None else values.isna().to_numpy()
        reasons[f"missing {column}"] = (column, missing)
        reasons[f"unreadable {column}"] = (column, ~missing & ~_readable(column, values, text))
    return reasons


def _readable(column: str, values: pd.Series, text: pd.Series | None) -> np.ndarray:
    """Whether each present value of ``column`` converts (``_unreadable``); missing values may say either."""
    if column == "user_id":
        return (values.astype("str").str.encode("utf-8").str.len() <= MAX_USER_ID_BYTES).to_numpy()
    if column == "item_id" and text is not None:
        return np.ones(len(values), dtype=bool)           # text ids: plain integers, or coded as items
    numbers = pd.to_numeric(text if text is not None else values, errors="coerce").to_numpy(dtype=np.float64)
    if column == "item_id":
        return np.isfinite(numbers) & (numbers >= 0) & (numbers == np.floor(numbers))
    if column == "rating" or values.dtype.kind in "iufb":
        return np.isfinite(numbers)
    if values.dtype.kind == "M":
        return values.notna().to_numpy()
    dates = _parse_times(values).notna().to_numpy()
    as_numbers = np.isfinite(numbers)
    return as_numbers if as_numbers.sum() >= dates.sum() else dates


def _drop_unreadable(frame: pd.DataFrame, source: str, dropped: dict[str, int], notes: list[str]) -> pd.DataFrame:
    """``frame`` without its unreadable rows (``_unreadable``); each row is counted once, under its first
    reason, in ``dropped``, and each reason gets a note naming the first such row and its value."""
    keep = np.ones(len(frame), dtype=bool)
    for reason, (column, rows) in _unreadable(frame).items():
        rows = rows & keep
        if rows.any():
            keep &= ~rows
            dropped[reason] = int(rows.sum())
            pos = int(np.argmax(rows))
            value = frame[column].iloc[pos]
            value = value.item() if isinstance(value, np.generic) else value
            notes.append(f"dropped {dropped[reason]:,} row(s): {reason} (data.bad_rows=drop); the first at "
                         f"{location(frame[column], pos, source, column)}: {value!r}")
    if not keep.any():
        raise DataError(f"{source}: no interactions left after dropping {dropped}")
    return frame if keep.all() else frame[keep]


def _normalised(name: object) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _resolve_aliases(raw: pd.DataFrame, source_names: dict[str, str], mapping: Mapping[str, str],
                     notes: list[str]) -> None:
    """Points each contract name that is neither mapped nor in the header at its first alias among the
    header's free columns (``COLUMN_ALIASES``), noting each choice; names without one are left as they are."""
    taken = {source_names[name] for name in INTERACTION_COLUMNS if source_names[name] in raw.columns}
    for name in INTERACTION_COLUMNS:
        if name in mapping or source_names[name] in raw.columns:
            continue
        free = {_normalised(c): c for c in raw.columns if c not in taken}
        found = next((free[alias] for alias in COLUMN_ALIASES[name] if alias in free), None)
        how = "a usual spelling"
        if found is None:
            found = next((column for normalised, column in free.items()
                          if any(normalised.endswith(ending) for ending in ALIAS_ENDINGS[name])), None)
            how = "its name ends with a usual spelling"
        if found is not None:
            source_names[name] = found
            taken.add(found)
            notes.append(f"column {str(found)!r} read as {name} ({how}; set data.column_map to choose)")


def _drop_unreadable_aliases(raw: pd.DataFrame, source_names: dict[str, str], mapping: Mapping[str, str],
                             source: str, notes: list[str]) -> pd.DataFrame:
    """A rating or timestamp column found by its spelling alone is dropped again, with a note, when its
    values are not ratings (numbers) or times: the log then loads as it did without that column
    (implicit feedback; the file's order), where a column named in ``columns`` would be an error.
    Returns ``raw``, with such a timestamp column already in Unix seconds (parsed once)."""
    rating, timestamp = source_names["rating"], source_names["timestamp"]
    if "rating" not in mapping and rating != "rating" and rating in raw.columns:
        values = raw[rating]
        if (pd.to_numeric(values, errors="coerce").isna() & values.notna()).any():
            notes.append(f"column {str(rating)!r} not read as rating: it holds values that are not numbers")
            source_names["rating"] = "rating"
    if "timestamp" not in mapping and timestamp != "timestamp" and timestamp in raw.columns:
        try:
            return raw.assign(**{timestamp: _unix_seconds(raw[timestamp], source, notes)})
        except DataError as error:
            notes.append(f"column {str(timestamp)!r} not read as timestamp: {error}")
            source_names["timestamp"] = "timestamp"
    return raw


def detect_separator(path: Path, sep: str = "auto") -> str:
    """``sep`` itself, or for "auto": a tab for .tsv/.tab files, else the most frequent of ``SEPARATORS``
    in the first non-blank line, else a space when the line has one between fields (``1 31 2.5``:
    FilmTrust, Epinions and other research dumps; runs of spaces count as one), else a comma."""
    if sep != "auto":
        return sep
    if _uncompressed(path).suffix.lower() in TAB_SUFFIXES:
        return "\t"
    header = _sniff(path, lambda lines: next((line for line in lines if line.strip()), ""))
    counts = [header.count(candidate) for candidate in SEPARATORS]
    if max(counts):
        return SEPARATORS[int(np.argmax(counts))]
    return " " if " " in header.strip() else ","


def _sniff(path: Path, read: Callable[[TextIO], str]) -> str:
    """``read`` applied to the start of the log as text; a compressed log (.gz, .bz2, .xz, a one-file .zip:
    pandas reads them as such) is sniffed through its decompressor. DataError when it cannot be opened."""
    try:
        with (COMPRESSED.get(path.suffix.lower()) or open)(path, "rt", encoding="utf-8", errors="replace") as text:
            return read(text)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: cannot be read as a {path.suffix} file: {error}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _scaled_to_seconds(numbers: pd.Series, notes: list[str]) -> pd.Series:
    """Epoch numbers in seconds: a column whose largest magnitude is past the year 5138 in seconds
    (1e11) is read as milliseconds, past 1e14 as microseconds, past 1e17 as nanoseconds."""
    largest = float(numbers.abs().max()) if numbers.notna().any() else 0.0
    for unit, per_second in (("nanoseconds", 10**9), ("microseconds", 10**6), ("milliseconds", 10**3)):
        if largest >= SECONDS_LIMIT * per_second / 1000:
            notes.append(f"timestamps read as {unit} since the epoch (the largest is {largest:.0f}), "
                         f"divided by {per_second:,} and floored to seconds")
            return numbers // per_second
    if numbers.dtype.kind == "f":
        array = numbers.to_numpy()
        fractional = np.isfinite(array) & (array != np.floor(array))
        if fractional.any():
            notes.append(f"{int(fractional.sum()):,} timestamps have fractions of a second (e.g. "
                         f"{float(array[np.argmax(fractional)])!r}): floored to whole seconds")
            return np.floor(numbers)
    return numbers


def _item_codes(values: pd.Series, source: str, notes: list[str]) -> tuple[pd.Series, pd.DataFrame | None]:
    """The item ids as the contract's non-negative integers, and the items table when they had to be coded.

    Plain non-negative integers (numbers, or text such as "42") pass through for ``validate_interactions``
    to check. Any other id makes every distinct text an item, numbered 1..n in sorted order; the items
    table (item_id, title = the original id, genres = "") keeps the original for display."""
    if values.dtype.kind in "iuf":
        return values, None
    text = values.astype("str").str.strip()
    missing = (values.isna() | (text == "")).to_numpy()
    if missing.any():
        pos = int(np.argmax(missing))
        raise DataError(f"{location(values, pos, source, 'item_id')}: item_id is missing "
                        "(too few fields? check the separator)")
    plain = text.str.fullmatch(_PLAIN_INTEGER).to_numpy()
    if plain.all():
        return values, None
    pos = int(np.argmax(~plain))
    codes, originals = pd.factorize(text, sort=True)
    notes.append(f"item ids are not all plain non-negative integers (e.g. {values.iloc[pos]!r} at "
                 f"{location(values, pos, source, 'item_id')}): each of the {originals.size:,} distinct ids "
                 f"is served as an integer code 1..{originals.size} in sorted order, and the original id "
                 "is the item's title")
    items = pd.DataFrame({"item_id": np.arange(1, originals.size + 1, dtype=np.int64),
                          "title": np.asarray(originals, dtype=object), "genres": ""}).astype({"title": "str", "genres": "str"})
    return pd.Series(codes.astype(np.int64) + 1, index=values.index), items


def _read(path: Path, sep: str, source_names: dict[str, str], mapping: Mapping[str, str], *,
          notes: list[str]) -> tuple[pd.DataFrame, int]:
    """The raw table indexed by line (CSV) or row (Parquet), and the number of blank lines; points
    ``source_names`` at the header's usual spellings of missing names (``_resolve_aliases``, before the
    CSV is read, so that alias id columns are read as text too).

    Without a ``mapping``, a CSV whose first line is data (3 or 4 fields, the third and fourth numbers, no
    ``user_id`` / ``item_id`` among them, e.g. the Amazon review dumps' ``user,item,rating,timestamp``)
    is read as user_id, item_id, rating[, timestamp]; with 3 fields the third is a timestamp when every
    value is past 1e8 (epoch seconds after 1973), else a rating. ``notes`` gets what was assumed.

    A CSV that is not valid UTF-8 (a Windows or older export) is read as Latin-1, with a note: Latin-1 maps
    every byte to one character, so each id stays itself and distinct whatever the file's real encoding;
    only the spelling of non-ASCII titles may differ."""
    suffix = _uncompressed(path).suffix.lower()
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    if positional(mapping) and (parquet or suffix in (*JSON_LINES_SUFFIXES, JSON_SUFFIX)):
        raise DataError(f"{path}: data.column_map names fields by position ({dict(mapping)}), which only a "
                        "delimited text log without a header has; name this file's columns instead")
    if suffix in JSON_LINES_SUFFIXES:
        return _read_json_lines(path, source_names, mapping, notes)
    if suffix == JSON_SUFFIX:
        return _read_json(path, source_names, mapping, notes)
    if not parquet:
        sep = detect_separator(path, sep)
        names_before, notes_before = dict(source_names), len(notes)
        try:
            return _read_csv(path, sep, source_names, mapping, notes, "utf-8")
        except DataError as error:
            if not isinstance(error.__cause__, UnicodeDecodeError):
                raise
            source_names.update(names_before)
            del notes[notes_before:]
            notes.append(f"not valid UTF-8 text ({error.__cause__.reason}): read as Latin-1, which keeps every id "
                         "distinct; non-ASCII titles may show other letters")
            return _read_csv(path, sep, source_names, mapping, notes, "latin-1")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _by_row(pd.read_parquet(path), source_names, mapping, notes)


def _by_row(raw: pd.DataFrame, source_names: dict[str, str], mapping: Mapping[str, str],
            notes: list[str]) -> tuple[pd.DataFrame, int]:
    """A table read whole (Parquet, JSON Lines) indexed by row from 1, its aliases resolved; no blank lines."""
    raw.index = pd.RangeIndex(1, len(raw) + 1, name="row")
    _resolve_aliases(raw, source_names, mapping, notes)
    return raw, 0


def _uncompressed(path: Path) -> Path:
    """The name under any compression suffix: ``events.jsonl.gz`` -> ``events.jsonl``."""
    return path.with_suffix("") if path.suffix.lower() in COMPRESSED else path


def _read_json_lines(path: Path, source_names: dict[str, str], mapping: Mapping[str, str],
                     notes: list[str]) -> tuple[pd.DataFrame, int]:
    """``_read`` for JSON Lines (one object per line, e.g. an event export; compressed too): indexed by
    object, ids kept as written (numbers or strings); blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = pd.read_json(path, lines=True, dtype=False)
    except ValueError as error:
        raise DataError(f"{path}: not JSON Lines (one object per line): {error}") from None
    if raw.empty:
        raise DataError(f"{path}: no interactions (the file is empty)")
    return _by_row(raw, source_names, mapping, notes)                  # row n: the n-th object


def positional(mapping: Mapping[str, str]) -> bool:
    """Whether ``data.column_map`` names fields by position (every value a 0-based field number, as in
    ``user_id:0,item_id:2,rating:3``): the log then has no header line and is read by those positions."""
    return bool(mapping) and all(str(value).isdigit() for value in mapping.values())


def _read_json(path: Path, source_names: dict[str, str], mapping: Mapping[str, str],
               notes: list[str]) -> tuple[pd.DataFrame, int]:
    """``_read`` for a ``.json`` log (compressed too): an array of objects when its first character is ``[``,
    else JSON Lines, as Amazon's review dumps and Yelp's reviews are written under that name."""
    if _sniff(path, lambda text: text.read(1 << 12).lstrip()[:1]) != "[":
        notes.append("a .json file of one object per line: read as JSON Lines")
        return _read_json_lines(path, source_names, mapping, notes)
    try:
        raw = pd.read_json(path, orient="records", dtype=False)
    except ValueError as error:
        raise DataError(f"{path}: not a JSON array of objects: {error}") from None
    if raw.empty:
        raise DataError(f"{path}: no interactions (the array is empty)")
    notes.append("a JSON array: one interaction per object")
    return _by_row(raw, source_names, mapping, notes)                  # row n: the n-th object


def _read_csv(path: Path, sep: str, source_names: dict[str, str], mapping: Mapping[str, str],
              notes: list[str], encoding: str) -> tuple[pd.DataFrame, int]:
    """``_read`` for a CSV in ``encoding``."""
    # The first line alone decides between a header and data, so the file is read once either way.
    header = read_table(path, sep=sep, quoted=True, nrows=0, encoding=encoding)[0]
    first = [str(c) for c in header.columns]
    if positional(mapping):
        width = len(first)
        for name, value in mapping.items():
            if int(value) >= width:
                raise DataError(f"{path}, line 1: data.column_map's {name} is field {value}, but the line has "
                                f"{width} field(s) separated by {sep!r} (0 to {width - 1})")
        fields = [str(i) for i in range(width)]
        source_names.update({name: str(int(value)) for name, value in mapping.items()})
        raw, blank = read_table(path, sep=sep, names=fields,
                                str_columns=(source_names["user_id"], source_names["item_id"]), quoted=True,
                                encoding=encoding)
        notes.append("no header line (data.column_map names fields by position): "
                     + ", ".join(f"{name} = field {source_names[name]}" for name in mapping))
        return raw, blank
    if not (not mapping and 3 <= len(first) <= 4 and not {"user_id", "item_id"} & set(first)
            and all(_is_number(c) for c in first[2:])):
        _resolve_aliases(header, source_names, mapping, notes)
        return read_table(path, sep=sep, str_columns=(source_names["user_id"], source_names["item_id"]),
                          quoted=True, encoding=encoding)
    names = list(INTERACTION_COLUMNS[:len(first)])
    raw, blank = read_table(path, sep=sep, names=names, str_columns=("user_id", "item_id"), quoted=True,
                            encoding=encoding)
    if len(first) == 3 and (pd.to_numeric(raw["rating"], errors="coerce").abs() >= 1e8).all():
        raw = raw.rename(columns={"rating": "timestamp"})
    shown = [str(v) for v in raw.iloc[0]] if len(raw) and raw.index[0] == 1 else first   # pandas renames repeats
    notes.append(f"no header line (the first line is data: {shown}): the columns are read as "
                 f"{list(raw.columns)}")
    return raw, blank


def _parse_times(values: pd.Series) -> pd.Series:
    """Date-times as UTC timestamps: ISO 8601 (naive ones taken as UTC), else one of ``OTHER_TIME_FORMATS``;
    NaT where none reads."""
    parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    for time_format in OTHER_TIME_FORMATS:
        rest = (parsed.isna() & values.notna()).to_numpy()
        if not rest.any():
            break
        parsed[rest] = pd.to_datetime(values[rest], utc=True, format=time_format, errors="coerce")
    return parsed


def _unix_seconds(values: pd.Series, source: str, notes: list[str]) -> pd.Series:
    """Timestamps as Unix seconds: numbers pass through (milli-, micro- or nanoseconds, told apart by their
    size, are scaled down), date-times and ISO strings are converted."""
    kind = values.dtype.kind
    if kind in "iuf":
        return _scaled_to_seconds(values, notes)
    if kind != "M":
        numbers = pd.to_numeric(values, errors="coerce")
        if (numbers.notna() | values.isna()).all():  # numbers as text; gaps are reported later
            return _scaled_to_seconds(numbers, notes)
    parsed = _parse_times(values)
    bad = (parsed.isna() & values.notna()).to_numpy()
    # numbers, with a few stray words; a tie reads numbers, as ``_readable`` does (the row an error names is
    # then the row data.bad_rows=drop drops)
    if kind != "M" and numbers.notna().sum() >= parsed.notna().sum():
        bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataError(f"{location(values, pos, source, 'timestamp')}: timestamp must be Unix seconds "
                        f"or an ISO 8601 date-time, got {values.iloc[pos]!r}")
    # Missing values stay NaN so validate_interactions reports them with their line.
    return (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
