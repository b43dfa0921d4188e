"""The serving state of one artifact version, built beside the old one and swapped in whole.

``load_state`` (the ``VersionHolder`` loader) reads the version's tables, user tower and index,
checks that they belong together (user tower dimension == index dimension == item_embeddings
dimension, ids and shapes aligned), warms them up with a smoke query (no NaN, unit-norm
embeddings, valid ids) and returns one immutable ``ServingState``. Any failure raises, and the
holder keeps serving the old version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from recsys_contracts import artifacts
from recsys_contracts.ann import Index, IndexParams, read_index
from recsys_contracts.programs import USER_TOWER, Program, load_program
from recsys_contracts.ids import ItemLookup
from recsys_contracts.version_files import VersionTables, load_item_embeddings, load_tables

# Fields of the manifest's extra["index"] that are measurements, not IndexParams.
_INDEX_MEASUREMENTS = ("recall@100", "n_items")


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
    tower: Program                       # (B,) user inputs -> (B, D) L2-normalised embeddings
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


def _index_params(extra: Mapping) -> tuple[IndexParams, float | None]:
    raw = dict(extra.get("index", {}))
    recall = raw.get("recall@100")
    fields = {k: v for k, v in raw.items() if k not in _INDEX_MEASUREMENTS}
    return IndexParams(**fields), (None if recall is None else float(recall))


def load_state(directory: Path, version: int, device: str = "cpu",
               open_backend=None) -> ServingState:
    """Builds, checks and warms the state of ``version`` stored in ``directory`` (already verified).

    ``open_backend(faiss_index, embeddings, ids, device) -> (name, Index)`` picks the search backend
    (``retrieval_service.backends.open_backend``); None keeps the FAISS CPU index.
    """
    directory = Path(directory)
    manifest = artifacts.read_manifest(directory.parent.parent, version)
    params, recall = _index_params(manifest.extra)
    tables = load_tables(directory)
    embeddings = load_item_embeddings(directory, tables.n_items)        # (m+1, D)
    faiss_index = read_index(directory / "index.faiss", params)
    tower = load_program(directory / "user_tower.onnx", USER_TOWER, device=device)
    ids = np.arange(1, tables.n_items + 1, dtype=np.int64)
    backend, index = ("faiss-cpu", faiss_index) if open_backend is None else \
        open_backend(faiss_index, embeddings[1:], ids, device)
    temperature = float(json.loads((directory / "serving.json").read_text())["temperature"])
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"serving.json temperature must be a finite number > 0, got {temperature!r}")
    counts = tables.item_counts[tables.popular_items].astype(np.float64)
    state = ServingState(
        version=version, tables=tables, tower=tower, index=index, backend=backend, device=device,
        temperature=temperature, user_index=MappingProxyType(tables.user_index()),
        items=ItemLookup(tables.item_ids),
        popular_scores=np.log(np.maximum(counts, 1.0)).astype(np.float32), index_params=params,
        build_recall=recall)
    check_state(state, embeddings)
    return state


def check_state(state: ServingState, embeddings: np.ndarray) -> None:
    """Raises ValueError unless the parts belong together and a smoke query gives sane answers."""
    tables = state.tables
    if embeddings.shape[1] != state.index.dim:
        raise ValueError(f"item_embeddings.npy dimension must equal the index dimension {state.index.dim}, "
                         f"got {embeddings.shape[1]}")
    if state.index.size != tables.n_items:
        raise ValueError(f"index.faiss must hold {tables.n_items} items (item_ids.npy), got {state.index.size}")
    if not np.isfinite(embeddings).all():
        raise ValueError("item_embeddings.npy must be finite, got NaN or infinity")
    # Smoke query: an unknown user and the first known one, twice (the first call also warms up).
    rows = [table_row(tables, 0, 0), table_row(tables, min(1, tables.n_users), 0)]
    for _ in range(2):
        users = embed(state, rows)                                                 # (2, D)
    if users.shape != (2, state.index.dim):
        raise ValueError(f"user_tower.onnx must output (B, {state.index.dim}) like the index, got {users.shape}")
    if not np.isfinite(users).all():
        raise ValueError("user_tower.onnx smoke query gave NaN or infinity")
    scores, ids = state.index.search(users, min(10, tables.n_items))
    valid = ids[ids >= 0]
    if not np.isfinite(scores[ids >= 0]).all() or ((valid < 1) | (valid > tables.n_items)).any():
        raise ValueError(f"index.faiss smoke query must give finite scores and item indices in "
                         f"[1, {tables.n_items}], got ids {ids.tolist()}")
