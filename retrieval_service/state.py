"""The serving state of one artifact version, built beside the old one and swapped in whole.

``load_state`` (the ``VersionHolder`` loader) has ``recsys_contracts.bundle.verify_bundle`` load and
self-check the whole version (both programs, index, item embeddings, tables: the same check the
ranking service runs, so both refuse the same versions), keeps the user tower, the index (behind the
chosen search backend) and the tables, checks the backend with a smoke query and returns one
immutable ``ServingState``. Any failure raises, and the holder keeps serving the old version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from recsys_contracts.ann import Index, IndexParams
from recsys_contracts.bundle import VersionTables, check_search, smoke_users, verify_bundle
from recsys_contracts.ids import ItemLookup
from recsys_contracts.programs import Program


@dataclass(frozen=True)
class UserRow:
    """One user's tower inputs: index (0 = unknown), cat (Cu,), num (Nu,), history (H,) item indices."""

    user_idx: int
    cat: np.ndarray
    num: np.ndarray
    history: np.ndarray
    timestamp: int


@dataclass(frozen=True, eq=False)
class ServingState:
    """Everything one version serves with; never mutated after ``load_state`` returns it."""

    version: int
    tables: VersionTables
    tower: Program                       # (B,) user inputs -> (B, D) user vectors (score = inner product)
    index: Index                         # item indices 1..m, inner product
    backend: str                         # which backend ``index`` is (retrieval_service.backends)
    device: str                          # "cpu" or "cuda": where the tower and the index run
    temperature: float                   # retrieval score = dot / temperature
    user_index: Mapping[str, int]        # external user id -> user index
    items: ItemLookup                    # external item ids -> item indices, vectorised (0 = unknown)
    popular_scores: np.ndarray           # (m,) float32 log training count of tables.popular_items
    index_params: IndexParams
    build_recall: float | None           # recall@100 measured at build time (manifest)

    @property
    def dim(self) -> int:
        return self.index.dim


def stack_rows(rows: list[UserRow]) -> dict[str, np.ndarray]:
    """Tower inputs for B rows: user_idx (B,), user_cat (B, Cu), user_num (B, Nu), history (B, H), timestamp (B,)."""
    return {
        "user_idx": np.array([r.user_idx for r in rows], dtype=np.int64),
        "user_cat": np.stack([r.cat for r in rows]).astype(np.int64, copy=False),
        "user_num": np.stack([r.num for r in rows]).astype(np.float32, copy=False),
        "history": np.stack([r.history for r in rows]).astype(np.int64, copy=False),
        "timestamp": np.array([r.timestamp for r in rows], dtype=np.int64),
    }


def embed(state: ServingState, rows: list[UserRow]) -> np.ndarray:
    """(B, D) float32 user embeddings on the host."""
    return state.tower(**stack_rows(rows))[0]


def table_row(tables: VersionTables, user_idx: int, timestamp: int) -> UserRow:
    return UserRow(user_idx, tables.user_cat[user_idx], tables.user_num[user_idx],
                   tables.history[user_idx], timestamp)


def load_state(directory: Path, version: int, device: str = "cpu",
               open_backend=None) -> ServingState:
    """Builds, checks and warms the state of ``version`` stored in ``directory`` (already verified).

    ``open_backend(faiss_index, embeddings, ids, device) -> (name, Index)`` picks the search backend
    (``retrieval_service.backends.open_backend``); None keeps the FAISS CPU index.
    """
    bundle = verify_bundle(directory, version, device=device)
    tables = bundle.tables
    ids = np.arange(1, tables.n_items + 1, dtype=np.int64)
    backend, index = ("faiss-cpu", bundle.index) if open_backend is None else \
        open_backend(bundle.index, bundle.item_embeddings[1:], ids, device)
    counts = tables.item_counts[tables.popular_items].astype(np.float64)
    state = ServingState(
        version=version, tables=tables, tower=bundle.user_tower, index=index, backend=backend, device=device,
        temperature=float(tables.serving.temperature), user_index=MappingProxyType(tables.user_index()),
        items=ItemLookup(tables.item_ids),
        popular_scores=np.log(np.maximum(counts, 1.0)).astype(np.float32), index_params=bundle.index_params,
        build_recall=bundle.build_recall)
    # The bundle's smoke query ran on the FAISS index; the chosen backend must answer as sanely.
    check_search(state.index, state.tower(**smoke_users(tables))[0], tables.n_items)
    return state
