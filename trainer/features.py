"""Fitting the feature spec on training interactions and building the index-aligned feature tables.

- ``fit_id_vocab(train) -> IdVocab``: the dense user/item re-indexing of a version (sorted ids;
  row 0 is the out-of-vocabulary row).
- ``fit_feature_spec(train, users, items)``: vocabularies and scalers, from TRAIN only.
  Categorical columns are the string columns of ``users``/``items`` (not ids, ``title``, ``genres``);
  numeric columns are their number columns plus statistics of the interactions:
  users ``mean_rating``, ``rating_std``, ``log_count``; items ``log_popularity``, ``mean_rating``.
  ``log_count``/``log_popularity`` are named for what the model sees: their raw value is the
  interaction count and the spec applies ``log1p``, so whoever holds a count encodes it the same way.
- ``build_tables(spec, vocab, state, users, items) -> FeatureTables``: the numpy tables a version
  ships (ARCHITECTURE.md, "Files of a trainer version"), describing the interactions in ``state``.
- ``with_known(tables, state)``: the same tables with the histories and seen items of other interactions.
- ``temporal_features(timestamp)``: hour, day of week, weekend in numpy (the models do the same in torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_contracts import bundle
from recsys_contracts.feature_spec import CategoricalColumn, FeatureSpec, NumericColumn, Transform
from trainer.splits import check_interactions

USER_STATS: dict[str, Transform] = {"mean_rating": "identity", "rating_std": "identity", "log_count": "log1p"}
ITEM_STATS: dict[str, Transform] = {"log_popularity": "log1p", "mean_rating": "identity"}
USER_NOT_FEATURES = frozenset({"user_id"})
ITEM_NOT_FEATURES = frozenset({"item_id", "title", "genres"})
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


@dataclass(frozen=True, eq=False)
class IdVocab:
    """External ids by dense index.

    ``user_ids`` str (n+1,) with row 0 = ""; ``item_ids`` int64 (m+1,) with row 0 = -1.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray

    def __post_init__(self) -> None:
        users, items = self.user_ids, self.item_ids
        if users.ndim != 1 or users.dtype.kind != "U" or users.size == 0 or users[0] != "":
            raise ValueError(f"user_ids must be a 1-d str array with row 0 = '', got {users!r}")
        if (users[1:] == "").any() or np.unique(users).size != users.size:
            raise ValueError(f"user_ids must be unique and non-empty after row 0, got {users!r}")
        if items.ndim != 1 or items.dtype != np.int64 or items.size == 0 or items[0] != -1:
            raise ValueError(f"item_ids must be a 1-d int64 array with row 0 = -1, got {items!r}")
        if (items[1:] < 0).any() or np.unique(items).size != items.size:
            raise ValueError(f"item_ids must be unique and >= 0 after row 0, got {items!r}")

    @property
    def n_users(self) -> int:
        return self.user_ids.size - 1

    @property
    def n_items(self) -> int:
        return self.item_ids.size - 1

    @cached_property
    def _user_index(self) -> pd.Index:
        return pd.Index(self.user_ids[1:])

    @cached_property
    def _item_index(self) -> pd.Index:
        return pd.Index(self.item_ids[1:])

    def users_to_idx(self, values: object) -> np.ndarray:
        """External user ids (n,) -> int64 indices (n,), 0 for unknown or missing ids."""
        return (self._user_index.get_indexer(pd.Index(np.asarray(values, dtype=object))) + 1).astype(np.int64)

    def items_to_idx(self, values: object) -> np.ndarray:
        """External item ids (n,) -> int64 indices (n,), 0 for unknown ids."""
        return (self._item_index.get_indexer(pd.Index(np.asarray(values))) + 1).astype(np.int64)


def fit_id_vocab(train: pd.DataFrame) -> IdVocab:
    """The users and items seen in ``train``, sorted, behind the out-of-vocabulary row 0."""
    check_interactions(train, "train")
    if not pd.api.types.is_string_dtype(train["user_id"]) or train["user_id"].isna().any():
        raise ValueError(f"train.user_id must hold str values, got dtype {train['user_id'].dtype}")
    if not pd.api.types.is_integer_dtype(train["item_id"]) or (train["item_id"] < 0).any():
        item_ids = train["item_id"]
        raise ValueError(f"train.item_id must hold int64 values >= 0, got dtype {item_ids.dtype}, min {item_ids.min()}")
    users = np.unique(train["user_id"].to_numpy(dtype=str))
    items = np.unique(train["item_id"].to_numpy(dtype=np.int64))
    return IdVocab(user_ids=np.concatenate([np.array([""]), users]),
                   item_ids=np.concatenate([np.array([-1], dtype=np.int64), items]))


def fit_feature_spec(train: pd.DataFrame, users: pd.DataFrame | None, items: pd.DataFrame | None,
                     *, history_length: int = 50) -> FeatureSpec:
    """Vocabularies and scalers fitted on the train interactions and the users/items they touch."""
    vocab = fit_id_vocab(train)
    if vocab.n_users == 0:
        raise ValueError(f"train must hold at least one interaction, got {len(train)} rows")
    uidx, iidx, ratings = _indexed(vocab, train)
    user_frame = _user_frame(vocab, uidx, ratings, users)
    item_frame = _item_frame(vocab, iidx, ratings, items)
    user_cat, user_raw = _feature_columns(users, USER_NOT_FEATURES, "users", USER_STATS)
    item_cat, item_raw = _feature_columns(items, ITEM_NOT_FEATURES, "items", ITEM_STATS)
    user_numeric = {**USER_STATS, **dict.fromkeys(user_raw, "identity")}
    item_numeric = {**ITEM_STATS, **dict.fromkeys(item_raw, "identity")}
    return FeatureSpec(
        user_categorical=tuple(_fit_categorical(n, user_frame[n]) for n in user_cat),
        user_numeric=tuple(_fit_numeric(n, user_frame[n], t) for n, t in user_numeric.items()),
        item_categorical=tuple(_fit_categorical(n, item_frame[n]) for n in item_cat),
        item_genres=_genre_vocabulary(item_frame),
        item_numeric=tuple(_fit_numeric(n, item_frame[n], t) for n, t in item_numeric.items()),
        history_length=history_length,
        n_users=vocab.n_users,
        n_items=vocab.n_items,
        rating_min=float(ratings.min()),
        rating_max=float(ratings.max()),
    )


@dataclass(frozen=True, eq=False)
class FeatureTables:
    """The feature tables of a version, index-aligned with ``vocab``; row 0 holds the defaults.

    Shapes (n users, m items): user_cat (n+1, Cu) int64, user_num (n+1, Nu) float32,
    history (n+1, H) int64, item_cat (m+1, Ci) int64, item_num (m+1, Ni) float32,
    seen_indptr (n+2,) int64 and seen_items (nnz,) int64 (CSR: user u's items are
    seen_items[seen_indptr[u]:seen_indptr[u+1]], sorted), popular_items (m,) int64,
    item_counts (m+1,) int64.
    """

    vocab: IdVocab
    user_cat: np.ndarray
    user_num: np.ndarray
    history: np.ndarray
    item_cat: np.ndarray
    item_num: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    popular_items: np.ndarray
    item_counts: np.ndarray

    def __post_init__(self) -> None:
        n, m = self.vocab.n_users, self.vocab.n_items
        expected = {"user_cat": (np.int64, 2, n + 1), "user_num": (np.float32, 2, n + 1),
                    "history": (np.int64, 2, n + 1), "item_cat": (np.int64, 2, m + 1),
                    "item_num": (np.float32, 2, m + 1), "seen_indptr": (np.int64, 1, n + 2),
                    "seen_items": (np.int64, 1, None), "popular_items": (np.int64, 1, m),
                    "item_counts": (np.int64, 1, m + 1)}
        for name, (dtype, ndim, rows) in expected.items():
            array = getattr(self, name)
            if array.dtype != dtype or array.ndim != ndim or (rows is not None and array.shape[0] != rows):
                raise ValueError(f"{name} must be {np.dtype(dtype).name} with {ndim} dims and "
                                 f"{rows if rows is not None else 'any'} rows, got {array.dtype} {array.shape}")
        if self.seen_indptr[-1] != self.seen_items.size or (np.diff(self.seen_indptr) < 0).any():
            raise ValueError(f"seen_indptr must be non-decreasing and end at {self.seen_items.size}, "
                             f"got {self.seen_indptr!r}")

    def save(self, directory: Path) -> None:
        """Writes ``<field>.npy`` per array, ``item_ids.npy`` and ``user_ids.parquet`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAY_FIELDS:
            np.save(directory / f"{name}.npy", getattr(self, name), allow_pickle=False)
        np.save(directory / bundle.ITEM_IDS_FILE, self.vocab.item_ids, allow_pickle=False)
        pq.write_table(pa.table({"user_id": pa.array(self.vocab.user_ids.tolist(), pa.string())}),
                       directory / bundle.USER_IDS_FILE)

    @classmethod
    def load(cls, directory: Path) -> FeatureTables:
        directory = Path(directory)
        user_ids = pq.read_table(directory / bundle.USER_IDS_FILE).column("user_id").to_pylist()
        vocab = IdVocab(user_ids=np.array(user_ids, dtype=str),
                        item_ids=np.load(directory / bundle.ITEM_IDS_FILE, allow_pickle=False))
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in _ARRAY_FIELDS}
        return cls(vocab=vocab, **arrays)


_ARRAY_FIELDS = tuple(f.name for f in fields(FeatureTables) if f.name != "vocab")
# The tables a version holds are the ones the services read (``recsys_contracts.bundle.TABLE_FILES``).
assert set(_ARRAY_FIELDS) == set(bundle.TABLE_FILES), _ARRAY_FIELDS


def build_tables(spec: FeatureSpec, vocab: IdVocab, state: pd.DataFrame,
                 users: pd.DataFrame | None, items: pd.DataFrame | None) -> FeatureTables:
    """Feature tables of the interactions in ``state`` (train, for evaluation), encoded with ``spec``.

    Interactions of users or items outside ``vocab`` are ignored: they have no row to land in.
    """
    if (spec.n_users, spec.n_items) != (vocab.n_users, vocab.n_items):
        raise ValueError(f"vocab must match the spec's {spec.n_users} users and {spec.n_items} items, "
                         f"got {vocab.n_users} users and {vocab.n_items} items")
    check_interactions(state, "state")
    uidx, iidx, ratings = _indexed(vocab, state)
    known = (uidx > 0) & (iidx > 0)
    uidx, iidx, ratings = uidx[known], iidx[known], ratings[known]
    timestamps = state["timestamp"].to_numpy(dtype=np.int64)[known]
    user_cat, user_num = spec.encode_users_frame(_user_frame(vocab, uidx, ratings, users))
    item_cat, item_num = spec.encode_items_frame(_item_frame(vocab, iidx, ratings, items))
    user_cat_0, user_num_0 = spec.default_user_row()
    item_cat_0, item_num_0 = spec.default_item_row()
    seen_indptr, seen_items = _seen_csr(uidx, iidx, vocab.n_users, vocab.n_items)
    item_counts = np.bincount(iidx, minlength=vocab.n_items + 1).astype(np.int64)
    # Most interactions first; ties by index so the order never depends on row order.
    popular = np.lexsort((np.arange(vocab.n_items), -item_counts[1:])).astype(np.int64) + 1
    return FeatureTables(
        vocab=vocab,
        user_cat=np.vstack([user_cat_0, user_cat]), user_num=np.vstack([user_num_0, user_num]),
        history=_history(uidx, iidx, timestamps, vocab.n_users, spec.history_length),
        item_cat=np.vstack([item_cat_0, item_cat]), item_num=np.vstack([item_num_0, item_num]),
        seen_indptr=seen_indptr, seen_items=seen_items, popular_items=popular, item_counts=item_counts,
    )


def with_known(tables: FeatureTables, state: pd.DataFrame) -> FeatureTables:
    """The same tables with each user's history and seen items rebuilt from the interactions in ``state``: what
    the models know of the users when judged on test (train + validation) or when served (the whole log). Every
    other table, fitted on train, is kept, as the models were trained on it. Interactions of users or items
    outside the vocabulary are ignored."""
    return with_known_rows(tables, state)[0]


def with_known_rows(tables: FeatureTables, state: pd.DataFrame) -> tuple[FeatureTables, pd.DataFrame]:
    """``with_known`` and the rows of ``state`` it used (users and items both in the vocabulary), from one
    lookup of the ids."""
    check_interactions(state, "state")
    vocab = tables.vocab
    uidx, iidx, _ratings = _indexed(vocab, state)
    known = (uidx > 0) & (iidx > 0)
    uidx, iidx = uidx[known], iidx[known]
    timestamps = state["timestamp"].to_numpy(dtype=np.int64)[known]
    seen_indptr, seen_items = _seen_csr(uidx, iidx, vocab.n_users, vocab.n_items)
    rebuilt = dataclasses.replace(tables, history=_history(uidx, iidx, timestamps, vocab.n_users,
                                                           tables.history.shape[1]),
                                  seen_indptr=seen_indptr, seen_items=seen_items)
    return rebuilt, (state if known.all() else state[known])


def temporal_features(timestamp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds since the epoch (N,) int -> (hour [0, 24), day of week [0, 7) with Monday = 0,
    weekend 0/1), each int64 (N,), in UTC. Floor division keeps pre-1970 times right."""
    ts = np.asarray(timestamp)
    if ts.dtype.kind not in "iu":
        raise ValueError(f"timestamp must be an integer array of seconds, got dtype {ts.dtype}")
    ts = ts.astype(np.int64)
    hour = (ts // SECONDS_PER_HOUR) % 24
    dow = (ts // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7
    return hour, dow, (dow >= 5).astype(np.int64)


def _indexed(vocab: IdVocab, interactions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user idx (N,), item idx (N,), rating float64 (N,)) of an interaction log."""
    return (vocab.users_to_idx(interactions["user_id"].to_numpy()),
            vocab.items_to_idx(interactions["item_id"].to_numpy()),
            interactions["rating"].to_numpy(dtype=np.float64))


def _rating_stats(idx: np.ndarray, ratings: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per index 1..size-1: (count, mean, population std), NaN mean/std where count is 0."""
    count = np.bincount(idx, minlength=size).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(idx, weights=ratings, minlength=size) / count
        mean_sq = np.bincount(idx, weights=ratings * ratings, minlength=size) / count
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))  # clip float round-off below 0
    return count[1:], mean[1:], std[1:]


def _side_rows(table: pd.DataFrame | None, key: str, ids: np.ndarray) -> pd.DataFrame:
    """``table``'s rows for ``ids`` in order (all-missing rows for ids it lacks)."""
    if table is None:
        return pd.DataFrame(index=range(ids.size))
    if key not in table.columns:
        raise ValueError(f"side table must have a {key!r} column, got {list(table.columns)}")
    if table[key].duplicated().any():
        raise ValueError(f"side table must have one row per {key}, got duplicates "
                         f"{table.loc[table[key].duplicated(), key].head(5).tolist()}")
    return table.set_index(key).reindex(pd.Index(ids)).reset_index(drop=True)


def _user_frame(vocab: IdVocab, uidx: np.ndarray, ratings: np.ndarray, users: pd.DataFrame | None) -> pd.DataFrame:
    """Raw features of users 1..n: their side-table columns plus rating statistics."""
    frame = _side_rows(users, "user_id", vocab.user_ids[1:])
    count, mean, std = _rating_stats(uidx, ratings, vocab.n_users + 1)
    return frame.assign(mean_rating=mean, rating_std=std, log_count=count)


def _item_frame(vocab: IdVocab, iidx: np.ndarray, ratings: np.ndarray, items: pd.DataFrame | None) -> pd.DataFrame:
    """Raw features of items 1..m: their side-table columns plus popularity and mean rating."""
    frame = _side_rows(items, "item_id", vocab.item_ids[1:])
    count, mean, _ = _rating_stats(iidx, ratings, vocab.n_items + 1)
    return frame.assign(log_popularity=count, mean_rating=mean)


def _feature_columns(table: pd.DataFrame | None, excluded: frozenset[str], what: str,
                     stats: dict[str, Transform]) -> tuple[list[str], list[str]]:
    """(categorical, numeric) column names of a side table, sorted so column order never matters."""
    if table is None:
        return [], []
    categorical, numeric = [], []
    for name in sorted(set(table.columns) - excluded):
        if name in stats:
            raise ValueError(f"{what} column {name!r} clashes with a derived statistic {sorted(stats)}")
        column = table[name]
        if pd.api.types.is_numeric_dtype(column):
            numeric.append(name)
        elif pd.api.types.is_string_dtype(column) or pd.api.types.is_object_dtype(column):
            categorical.append(name)
        else:
            raise ValueError(f"{what} column {name!r} must be numeric or string, got dtype {column.dtype}")
    return categorical, numeric


def _fit_categorical(name: str, values: pd.Series) -> CategoricalColumn:
    strings = sorted({v for v in values if isinstance(v, str)})
    return CategoricalColumn(name=name, vocabulary=tuple(strings))


def _fit_numeric(name: str, values: pd.Series, transform: Transform) -> NumericColumn:
    """Mean and population std of the transformed, present values (0 and 0 when none is present),
    and the raw range of the present values (serving clips request-time values into it)."""
    unscaled = NumericColumn(name=name, mean=0.0, std=1.0, transform=transform)
    raw = values.to_numpy(dtype=np.float64)
    x = unscaled.apply_transform(raw)
    present = x[~np.isnan(x)]
    if present.size == 0:
        return NumericColumn(name=name, mean=0.0, std=0.0, transform=transform)
    kept = raw[~np.isnan(x)]
    return NumericColumn(name=name, mean=float(present.mean()), std=float(present.std()), transform=transform,
                         low=float(kept.min()), high=float(kept.max()))


def _genre_vocabulary(item_frame: pd.DataFrame) -> tuple[str, ...]:
    if "genres" not in item_frame.columns:
        return ()
    genres = {g for v in item_frame["genres"] if isinstance(v, str) for g in v.split("|") if g}
    return tuple(sorted(genres))


def _seen_csr(uidx: np.ndarray, iidx: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr (n+2,), items (nnz,)): each user's distinct items, sorted, rows 0..n."""
    pairs = np.unique(uidx * (n_items + 1) + iidx)  # sorted by user, then item
    users, items = pairs // (n_items + 1), pairs % (n_items + 1)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users + 1))])
    return indptr.astype(np.int64), items.astype(np.int64)


def _history(uidx: np.ndarray, iidx: np.ndarray, timestamps: np.ndarray, n_users: int, length: int) -> np.ndarray:
    """(n+1, H) int64: each user's last H items by time (ties by item index), oldest first, left-padded with 0."""
    order = np.lexsort((iidx, timestamps, uidx))
    users, items = uidx[order], iidx[order]
    ends = np.cumsum(np.bincount(users, minlength=n_users + 1))  # (n+1,) one past each user's last row
    from_end = ends[users] - 1 - np.arange(users.size)  # 0 for a user's most recent interaction
    keep = from_end < length
    history = np.zeros((n_users + 1, length), dtype=np.int64)
    history[users[keep], length - 1 - from_end[keep]] = items[keep]
    return history
