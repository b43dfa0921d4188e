"""Loading any interaction log: ``load_interactions(path, columns=..., sep=...)`` for CSV or Parquet.

``columns`` maps the contract names (user_id, item_id, rating, timestamp) to the file's column
names, e.g. ``{"user_id": "uid", "item_id": "sku"}``; unmapped names are looked up as is.
Timestamps may be Unix seconds or ISO 8601 date-times (naive ones are taken as UTC); without a
rating column every interaction is implicit feedback with rating 1.0. No side tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.data.dataset import (
    INTERACTION_COLUMNS, DataError, Dataset, location, make_dataset, read_table, require_columns,
    validate_interactions,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
IMPLICIT_RATING = 1.0


def load_interactions(path: Path | str, *, columns: Mapping[str, str] | None = None, sep: str = ",") -> Dataset:
    """Load a CSV (with a header line) or Parquet interaction log into a Dataset named after the file."""
    path = Path(path)
    mapping = dict(columns or {})
    for name in mapping:
        if name not in INTERACTION_COLUMNS:
            raise ValueError(f"columns keys must be among {list(INTERACTION_COLUMNS)}, got {name!r}")
    source_names = {name: mapping.get(name, name) for name in INTERACTION_COLUMNS}
    raw, blank = _read(path, sep, source_names["user_id"])
    notes = []
    if source_names["rating"] not in raw.columns and "rating" not in mapping:
        notes.append(f"no 'rating' column: implicit feedback, every rating is {IMPLICIT_RATING}")
        raw = raw.assign(rating=np.float32(IMPLICIT_RATING))
        source_names["rating"] = "rating"
    where = f"{path}, line 1" if raw.index.name == "line" else str(path)
    require_columns(raw, list(source_names.values()), where)
    ignored = [str(c) for c in raw.columns if c not in source_names.values()]
    if ignored:
        notes.append(f"ignored columns {ignored}")
    frame = pd.DataFrame({name: raw[column] for name, column in source_names.items()}, index=raw.index)
    frame["timestamp"] = _unix_seconds(frame["timestamp"], str(path))
    interactions = validate_interactions(frame, str(path))
    return make_dataset(path.stem, interactions, source=str(path), rows_read=len(raw) + blank,
                        dropped={"blank line": blank}, warnings=notes)


def _read(path: Path, sep: str, user_column: str) -> tuple[pd.DataFrame, int]:
    """The raw table indexed by line (CSV) or row (Parquet), and the number of blank lines."""
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        return read_table(path, sep=sep, str_columns=(user_column,), quoted=True)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = pd.read_parquet(path)
    raw.index = pd.RangeIndex(1, len(raw) + 1, name="row")
    return raw, 0


def _unix_seconds(values: pd.Series, source: str) -> pd.Series:
    """Timestamps as Unix seconds: numbers pass through, date-times and ISO strings are converted."""
    kind = values.dtype.kind
    if kind in "iuf":
        return values
    if kind != "M":
        numbers = pd.to_numeric(values, errors="coerce")
        if (numbers.notna() | values.isna()).all():  # numbers as text; gaps are reported later
            return numbers
    parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    bad = (parsed.isna() & values.notna()).to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataError(f"{location(values, pos, source, 'timestamp')}: timestamp must be Unix seconds "
                        f"or an ISO 8601 date-time, got {values.iloc[pos]!r}")
    # Missing values stay NaN so validate_interactions reports them with their line.
    return (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
