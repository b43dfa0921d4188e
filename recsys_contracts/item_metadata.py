"""Item metadata and recent interactions of a version: what a person reads (titles, genres, when).

Two Parquet files in a version, written by the trainer (``trainer/item_metadata.py`` through
``write_files``) and read by the ranking service (``load``) to answer Recommend calls that ask for
titles (``RecommendOptions.include_item_metadata``) or history (``RecommendOptions.history_size``):

``item_metadata.parquet``, one row per catalog item, in index order (row i = item index i + 1):
    item_id int64, title string, genres string ("|"-separated names in the log's order; "" = none).
    A log without an items table gets empty titles and genres.
``recent_interactions.parquet``, each user's last ``RECENT_PER_USER`` interactions the version knows (the whole log's):
    user_id string, item_id int64, timestamp int64 (seconds since the Unix epoch, UTC),
    sorted by (user_id, timestamp).

Neither file is needed to serve: a version without them (published before they existed) loads
with empty titles and no history. Both are metadata for display; no model reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEMS_FILE = "item_metadata.parquet"
RECENT_FILE = "recent_interactions.parquet"
RECENT_PER_USER = 50          # the most a Recommend's history may show (RecommendOptions.history_size)
GENRE_SEPARATOR = "|"


@dataclass(frozen=True, eq=False)
class Recent:
    """One user's past interactions, newest first: (r,) int64 item ids and (r,) int64 timestamps."""

    item_ids: np.ndarray
    timestamps: np.ndarray


@dataclass(frozen=True, eq=False)
class ItemMetadata:
    """A version's item titles and genres, index-aligned with ``item_ids.npy``, and its users' recent items."""

    titles: np.ndarray          # (m+1,) object str, row 0 = ""
    genres: np.ndarray          # (m+1,) object str, "|"-separated; split per request (k items, not m)
    recent_users: np.ndarray    # (u,) object str, sorted
    recent_indptr: np.ndarray   # (u+1,) int64 CSR over recent_users
    recent_items: np.ndarray    # (r,) int64 external item ids, oldest first within a user
    recent_times: np.ndarray    # (r,) int64 seconds

    def describe(self, item_idx: np.ndarray) -> list[tuple[str, list[str]]]:
        """(title, genres) of each item index (0 = unknown item: "", [])."""
        return [(str(self.titles[i]), _split(self.genres[i])) for i in np.asarray(item_idx, dtype=np.int64).tolist()]

    def recent(self, user_id: str, limit: int) -> Recent:
        """The user's last ``limit`` training interactions, newest first (empty for an unknown user)."""
        at = int(np.searchsorted(self.recent_users, user_id))
        if at == self.recent_users.size or self.recent_users[at] != user_id or limit <= 0:
            return Recent(np.zeros(0, np.int64), np.zeros(0, np.int64))
        lo, hi = int(self.recent_indptr[at]), int(self.recent_indptr[at + 1])
        lo = max(lo, hi - limit)
        return Recent(self.recent_items[lo:hi][::-1].copy(), self.recent_times[lo:hi][::-1].copy())


def _split(genres: str) -> list[str]:
    return [g for g in str(genres).split(GENRE_SEPARATOR) if g]


def write_files(directory: str | Path, *, item_ids: np.ndarray, titles: list[str], genres: list[str],
                recent_user_ids: list[str], recent_item_ids: np.ndarray, recent_timestamps: np.ndarray) -> None:
    """Writes both files; ``item_ids`` (m,) in index order (index 1..m), the recent rows in any order."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if not len(titles) == len(genres) == item_ids.size:
        raise ValueError(f"titles and genres must hold one entry per item ({item_ids.size}), "
                         f"got {len(titles)} and {len(genres)}")
    pq.write_table(pa.table({"item_id": item_ids, "title": pa.array(titles, pa.string()),
                             "genres": pa.array(genres, pa.string())}), Path(directory) / ITEMS_FILE)
    recent = pa.table({"user_id": pa.array(recent_user_ids, pa.string()),
                       "item_id": np.asarray(recent_item_ids, dtype=np.int64),
                       "timestamp": np.asarray(recent_timestamps, dtype=np.int64)})
    recent = recent.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    pq.write_table(recent, Path(directory) / RECENT_FILE)


def load(directory: str | Path, item_ids: np.ndarray) -> ItemMetadata:
    """Reads the version's metadata, checked against its ``item_ids`` (m+1,); absent files = empty."""
    directory, m = Path(directory), np.asarray(item_ids).size - 1
    titles, genres = np.full(m + 1, "", dtype=object), np.full(m + 1, "", dtype=object)
    if (directory / ITEMS_FILE).exists():
        table = pq.read_table(directory / ITEMS_FILE)
        stored = table.column("item_id").to_numpy()
        if not np.array_equal(stored, np.asarray(item_ids)[1:]):
            raise ValueError(f"{ITEMS_FILE} must list the version's {m} items in index order, "
                             f"got {stored.size} ids starting {stored[:5].tolist()}")
        titles[1:] = table.column("title").to_pylist()
        genres[1:] = table.column("genres").to_pylist()
    users, indptr = np.zeros(0, dtype=object), np.zeros(1, np.int64)
    items, times = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if (directory / RECENT_FILE).exists():
        table = pq.read_table(directory / RECENT_FILE)
        user_column = np.array(table.column("user_id").to_pylist(), dtype=object)
        items = table.column("item_id").to_numpy().astype(np.int64)
        times = table.column("timestamp").to_numpy().astype(np.int64)
        starts = np.flatnonzero(np.r_[True, user_column[1:] != user_column[:-1]]) if user_column.size else \
            np.zeros(0, np.int64)
        users = user_column[starts]
        if users.size > 1 and not all(a < b for a, b in zip(users[:-1], users[1:])):
            raise ValueError(f"{RECENT_FILE} must be sorted by user_id, got {users[:3].tolist()}...")
        indptr = np.r_[starts, user_column.size].astype(np.int64)
    return ItemMetadata(titles=titles, genres=genres, recent_users=users, recent_indptr=indptr,
                        recent_items=items, recent_times=times)
