"""The feature spec: which columns feed the models, their vocabularies and scalers, and the encoder.

Owner of the "Model inputs" contract in docs/ARCHITECTURE.md. The trainer fits a ``FeatureSpec``
(``trainer.features``), stores it as ``feature_spec.json`` in every version, and both the trainer
and the services encode raw rows with it, so training and serving cannot disagree.

Encoding rules:

- ``CategoricalColumn``: a value's index is its position in ``vocabulary`` + 1; 0 is the
  out-of-vocabulary / missing bucket. Only ``str`` values are looked up; anything else
  (None, NaN) is missing.
- ``NumericColumn``: ``(transform(clip(x, low, high)) - mean) / std`` as float32, with ``std == 0``
  treated as 1; ``low`` / ``high`` are the raw range seen in training (null: unbounded), so a
  request-time value far outside it (age 1e30) cannot push the model into NaN or saturation.
  Missing or non-finite values encode to 0.0, i.e. the training mean.
- Item numerics are the multi-hot genre flags (0/1, unscaled, in ``item_genres`` order) followed
  by the scaled ``item_numeric`` columns. ``genres`` in a raw item row is a "|"-separated string.

JSON format (``to_json``): one object with exactly the keys of ``FeatureSpec``; each column is an
object with exactly the keys of its dataclass; keys sorted, two-space indent, trailing newline.
``from_json`` rejects unknown or missing keys by name. Bump ``SCHEMA_VERSION`` on any change.

Depends on numpy only: frames (pandas DataFrames in practice) are read through ``column in frame``,
``frame[column]`` and ``len(frame)``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

SCHEMA_VERSION = 2
GENRE_SEPARATOR = "|"
TRANSFORMS = ("identity", "log1p")

Transform = Literal["identity", "log1p"]


def _str_values(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(strings (n,) str, present (n,) bool): non-str entries (None, NaN) are missing."""
    raw = np.asarray(values, dtype=object).reshape(-1)
    present = np.fromiter((isinstance(v, str) for v in raw), dtype=bool, count=raw.size)
    strings = np.where(present, raw, "").astype(str)
    return strings, present


@dataclass(frozen=True)
class CategoricalColumn:
    """A string feature; index = position in ``vocabulary`` + 1, 0 = out-of-vocabulary/missing."""

    name: str
    vocabulary: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"CategoricalColumn.name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.vocabulary, tuple) or not all(isinstance(v, str) for v in self.vocabulary):
            raise ValueError(f"{self.name}.vocabulary must be a tuple of str, got {self.vocabulary!r}")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"{self.name}.vocabulary must not repeat values, got {self.vocabulary!r}")

    def encode(self, value: str) -> int:
        """The index of one value (0 when outside the vocabulary)."""
        return int(self.encode_array([value])[0])

    def encode_array(self, values: Any) -> np.ndarray:
        """(n,) values -> (n,) int64 indices; non-str values count as missing (0)."""
        strings, present = _str_values(values)
        vocab = np.asarray(self.vocabulary, dtype=str)
        if vocab.size == 0:
            return np.zeros(strings.size, dtype=np.int64)
        order = np.argsort(vocab, kind="stable")
        sorted_vocab = vocab[order]
        pos = np.minimum(np.searchsorted(sorted_vocab, strings), vocab.size - 1)  # (n,)
        found = present & (sorted_vocab[pos] == strings)
        return np.where(found, order[pos] + 1, 0).astype(np.int64)


@dataclass(frozen=True)
class NumericColumn:
    """A real feature, encoded as ``(transform(x) - mean) / std`` (std 0 -> 1; missing -> 0.0)."""

    name: str
    mean: float
    std: float
    transform: Transform = "identity"
    low: float | None = None     # raw values are clipped to [low, high] before the transform
    high: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NumericColumn.name must be a non-empty str, got {self.name!r}")
        for bound in ("low", "high"):
            value = getattr(self, bound)
            if value is not None and (not isinstance(value, float) or not math.isfinite(value)):
                raise ValueError(f"{self.name}.{bound} must be null or a finite float, got {value!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"{self.name}.low must be <= high ({self.high!r}), got {self.low!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"{self.name}.transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if not isinstance(self.mean, float) or not math.isfinite(self.mean):
            raise ValueError(f"{self.name}.mean must be a finite float, got {self.mean!r}")
        if not isinstance(self.std, float) or not math.isfinite(self.std) or self.std < 0:
            raise ValueError(f"{self.name}.std must be a finite float >= 0, got {self.std!r}")

    def apply_transform(self, values: Any) -> np.ndarray:
        """(n,) raw values -> (n,) float64 transformed values, NaN where missing or out of domain."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.low is not None or self.high is not None:
            x = np.clip(x, self.low, self.high)          # NaN (missing) stays NaN
        if self.transform == "log1p":
            # log1p is undefined below -1; such values count as missing rather than -inf/NaN noise.
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.where(x > -1.0, np.log1p(np.where(x > -1.0, x, 0.0)), np.nan)
        return np.where(np.isfinite(x), x, np.nan)

    def encode_array(self, values: Any) -> np.ndarray:
        """(n,) raw values -> (n,) float32 standardised values, 0.0 where missing."""
        x = self.apply_transform(values)
        scale = self.std if self.std > 0 else 1.0
        encoded = (x - self.mean) / scale
        return np.where(np.isnan(encoded), 0.0, encoded).astype(np.float32)


def _check_unique(field_name: str, names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{field_name} must have unique names, got duplicates {duplicates}")


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """Columns behind Cu, Nu, Ci, Ni with their vocabularies and scalers; encodes raw rows."""

    schema_version: int = SCHEMA_VERSION
    user_categorical: tuple[CategoricalColumn, ...]
    user_numeric: tuple[NumericColumn, ...]
    item_categorical: tuple[CategoricalColumn, ...]
    item_genres: tuple[str, ...]
    item_numeric: tuple[NumericColumn, ...]
    history_length: int
    n_users: int
    n_items: int
    rating_min: float
    rating_max: float

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {self.schema_version!r}")
        for name, cls in (("user_categorical", CategoricalColumn), ("user_numeric", NumericColumn),
                          ("item_categorical", CategoricalColumn), ("item_numeric", NumericColumn)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(c, cls) for c in value):
                raise ValueError(f"{name} must be a tuple of {cls.__name__}, got {value!r}")
        if not isinstance(self.item_genres, tuple) or not all(isinstance(g, str) and g for g in self.item_genres):
            raise ValueError(f"item_genres must be a tuple of non-empty str, got {self.item_genres!r}")
        _check_unique("user features", [c.name for c in self.user_categorical + self.user_numeric])
        _check_unique("item features", [c.name for c in self.item_categorical + self.item_numeric])
        _check_unique("item_genres", list(self.item_genres))
        for name in ("history_length", "n_users", "n_items"):
            value = getattr(self, name)
            low = 1 if name == "history_length" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("rating_min", "rating_max"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if self.rating_min > self.rating_max:
            raise ValueError(f"rating_min must be <= rating_max ({self.rating_max!r}), got {self.rating_min!r}")

    @property
    def user_cat_dim(self) -> int:
        return len(self.user_categorical)

    @property
    def user_num_dim(self) -> int:
        return len(self.user_numeric)

    @property
    def item_cat_dim(self) -> int:
        return len(self.item_categorical)

    @property
    def item_num_dim(self) -> int:
        return len(self.item_genres) + len(self.item_numeric)

    def encode_user(self, categorical: Mapping[str, str],
                    numeric: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Request-time features -> (cat int64 (Cu,), num float32 (Nu,)); absent names get defaults.

        Raises ValueError for a name the spec does not know, a non-str categorical value, a
        non-finite numeric value or one outside its transform's domain (the services turn it into
        INVALID_ARGUMENT).
        """
        cat_columns = {c.name: c for c in self.user_categorical}
        num_columns = {c.name: c for c in self.user_numeric}
        unknown = sorted(set(categorical) - set(cat_columns))
        if unknown:
            raise ValueError(f"categorical user feature names must be in {sorted(cat_columns)}, got {unknown}")
        unknown = sorted(set(numeric) - set(num_columns))
        if unknown:
            raise ValueError(f"numeric user feature names must be in {sorted(num_columns)}, got {unknown}")
        for name, value in categorical.items():
            if not isinstance(value, str):
                raise ValueError(f"categorical user feature {name!r} must be a str, got {value!r}")
        for name, value in numeric.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"numeric user feature {name!r} must be a finite number, got {value!r}")
            if np.isnan(num_columns[name].apply_transform([value])[0]):
                raise ValueError(f"numeric user feature {name!r} must be > -1 for log1p, got {value!r}")
        cat, num = self.default_user_row()
        for i, column in enumerate(self.user_categorical):
            if column.name in categorical:
                cat[i] = column.encode(categorical[column.name])
        for i, column in enumerate(self.user_numeric):
            if column.name in numeric:
                num[i] = column.encode_array([numeric[column.name]])[0]
        return cat, num

    def encode_users_frame(self, frame: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw user rows -> (cat int64 (n, Cu), num float32 (n, Nu)); every spec column must be present."""
        n = _frame_length(frame, [c.name for c in self.user_categorical + self.user_numeric])
        cat = _stack([c.encode_array(frame[c.name]) for c in self.user_categorical], n, np.int64)
        num = _stack([c.encode_array(frame[c.name]) for c in self.user_numeric], n, np.float32)
        return cat, num

    def encode_items_frame(self, frame: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw item rows -> (cat int64 (n, Ci), num float32 (n, Ni)): genre flags, then scaled numerics."""
        needed = [c.name for c in self.item_categorical + self.item_numeric]
        n = _frame_length(frame, needed + (["genres"] if self.item_genres else []))
        cat = _stack([c.encode_array(frame[c.name]) for c in self.item_categorical], n, np.int64)
        flags = self._genre_flags(frame["genres"]) if self.item_genres else np.zeros((n, 0), np.float32)
        scaled = _stack([c.encode_array(frame[c.name]) for c in self.item_numeric], n, np.float32)
        return cat, np.concatenate([flags, scaled], axis=1)  # (n, G + Nn)

    def _genre_flags(self, genres: Any) -> np.ndarray:
        strings, present = _str_values(genres)
        position = {g: i for i, g in enumerate(self.item_genres)}
        flags = np.zeros((strings.size, len(self.item_genres)), dtype=np.float32)  # (n, G)
        for row in np.flatnonzero(present):
            for genre in strings[row].split(GENRE_SEPARATOR):
                if genre in position:
                    flags[row, position[genre]] = 1.0
        return flags

    def default_user_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(cat zeros int64 (Cu,), num zeros float32 (Nu,)): out-of-vocabulary and training means."""
        return np.zeros(self.user_cat_dim, dtype=np.int64), np.zeros(self.user_num_dim, dtype=np.float32)

    def default_item_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(cat zeros int64 (Ci,), num zeros float32 (Ni,)): no genre, training means."""
        return np.zeros(self.item_cat_dim, dtype=np.int64), np.zeros(self.item_num_dim, dtype=np.float32)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("user_categorical", "user_numeric", "item_categorical", "item_numeric"):
            data[key] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in data[key]]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        data = _exact_keys("feature spec", json.loads(text), {f.name for f in fields(cls)})
        columns: dict[str, tuple[Any, ...]] = {}
        for key, column_cls in (("user_categorical", CategoricalColumn), ("user_numeric", NumericColumn),
                                ("item_categorical", CategoricalColumn), ("item_numeric", NumericColumn)):
            if not isinstance(data[key], list):
                raise ValueError(f"{key} must be a JSON list, got {data[key]!r}")
            columns[key] = tuple(_column_from_json(key, column_cls, item) for item in data[key])
        if not isinstance(data["item_genres"], list):
            raise ValueError(f"item_genres must be a JSON list, got {data['item_genres']!r}")
        return cls(**{**data, **columns, "item_genres": tuple(data["item_genres"]),
                      "rating_min": _as_float(data["rating_min"]), "rating_max": _as_float(data["rating_max"])})


def _exact_keys(what: str, data: Any, expected: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {data!r}")
    unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    if missing:
        raise ValueError(f"{what} is missing keys {missing}")
    return data


def _as_float(value: Any) -> Any:
    """JSON writes 3.0 as 3.0 but a hand-edited file may hold 3; anything else is left to validation."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _column_from_json(key: str, column_cls: type, data: Any) -> CategoricalColumn | NumericColumn:
    data = _exact_keys(f"{key} column", data, {f.name for f in fields(column_cls)})
    if column_cls is CategoricalColumn:
        if not isinstance(data["vocabulary"], list):
            raise ValueError(f"{key}.vocabulary must be a JSON list, got {data['vocabulary']!r}")
        return CategoricalColumn(name=data["name"], vocabulary=tuple(data["vocabulary"]))
    return NumericColumn(name=data["name"], mean=_as_float(data["mean"]), std=_as_float(data["std"]),
                         transform=data["transform"], low=_as_float(data["low"]), high=_as_float(data["high"]))


def _frame_length(frame: Any, columns: list[str]) -> int:
    missing = [name for name in columns if name not in frame]
    if missing:
        raise ValueError(f"frame must have the spec's columns, missing {missing}")
    return len(frame)


def _stack(columns: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    """(n,) columns -> (n, C); C may be 0."""
    if not columns:
        return np.zeros((n, 0), dtype=dtype)
    return np.stack(columns, axis=1).astype(dtype)
