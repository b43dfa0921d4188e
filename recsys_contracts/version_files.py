"""Reads the files of a trainer version into memory, for the services (docs/ARCHITECTURE.md table).

The trainer writes these files (``trainer/features.py`` ``FeatureTables.save`` and
``trainer/publish.py``); this module is the one reader. Arrays load with ``allow_pickle=False``,
ids from Parquet, JSON as JSON; the exported programs via ``recsys_contracts.programs``. Shapes
are checked against each other, so a truncated or mismatched table is refused at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recsys_contracts.feature_spec import FeatureSpec

TABLE_FILES = ("user_cat", "user_num", "history", "item_cat", "item_num", "seen_indptr",
               "seen_items", "popular_items", "item_counts")


@dataclass(frozen=True, eq=False)
class VersionTables:
    """The index-aligned tables of a version (row 0 = defaults / OOV) and the id maps."""

    spec: FeatureSpec
    serving: dict[str, Any]
    user_ids: np.ndarray        # (n+1,) str, row 0 = ""
    item_ids: np.ndarray        # (m+1,) int64, row 0 = -1
    user_cat: np.ndarray        # (n+1, Cu) int64
    user_num: np.ndarray        # (n+1, Nu) float32
    history: np.ndarray         # (n+1, H) int64 item indices, oldest first, 0-padded on the left
    item_cat: np.ndarray        # (m+1, Ci) int64
    item_num: np.ndarray        # (m+1, Ni) float32
    seen_indptr: np.ndarray     # (n+2,) int64 CSR over user index
    seen_items: np.ndarray      # (nnz,) int64 item indices
    popular_items: np.ndarray   # (m,) int64 item indices, most popular first
    item_counts: np.ndarray     # (m+1,) int64 training interactions per item

    @property
    def n_users(self) -> int:
        return self.user_ids.size - 1

    @property
    def n_items(self) -> int:
        return self.item_ids.size - 1

    def user_index(self) -> dict[str, int]:
        """External user id -> user index (built once per version by the caller)."""
        return {uid: i for i, uid in enumerate(self.user_ids.tolist()) if i > 0}

    def seen(self, user_idx: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[user_idx]:self.seen_indptr[user_idx + 1]]


def load_tables(directory: str | Path) -> VersionTables:
    """Loads and cross-checks the tables of the version in ``directory``; ValueError names the bad file."""
    directory = Path(directory)
    spec = FeatureSpec.from_json((directory / "feature_spec.json").read_text())
    serving = json.loads((directory / "serving.json").read_text())
    user_ids = np.array(pq.read_table(directory / "user_ids.parquet").column("user_id").to_pylist(), dtype=object)
    item_ids = np.load(directory / "item_ids.npy", allow_pickle=False)
    arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in TABLE_FILES}
    n, m = user_ids.size, item_ids.size
    expected = {"user_cat": (n, spec.user_cat_dim), "user_num": (n, spec.user_num_dim),
                "history": (n, spec.history_length), "item_cat": (m, spec.item_cat_dim),
                "item_num": (m, spec.item_num_dim), "seen_indptr": (n + 1,),
                "popular_items": (m - 1,), "item_counts": (m,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{name}.npy must have shape {shape}, got {arrays[name].shape}")
    if arrays["seen_indptr"][-1] != arrays["seen_items"].size:
        raise ValueError(f"seen_indptr.npy must end at {arrays['seen_items'].size}, "
                         f"got {arrays['seen_indptr'][-1]}")
    return VersionTables(spec=spec, serving=serving, user_ids=user_ids, item_ids=item_ids, **arrays)


def load_item_embeddings(directory: str | Path, n_items: int) -> np.ndarray:
    embeddings = np.load(Path(directory) / "item_embeddings.npy", allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != n_items + 1:
        raise ValueError(f"item_embeddings.npy must have shape ({n_items + 1}, D), got {embeddings.shape}")
    return embeddings
