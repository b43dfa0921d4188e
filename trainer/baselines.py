"""Reference recommenders (popularity, EASE) and the full-catalog top-k ranking every model shares.

Numpy (torch only for the top-k selection), no scipy. The training matrix is a ``SparseMatrix``:
CSR over users x items, one stored entry per interaction. A ``Recommender`` is fitted on it and then scores every item for a
batch of users; ``rank_topk`` turns such a (B, M) score block into top-k item indices with the
user's already-seen items masked. Dense user x item copies are allowed up to ``MAX_DENSE_CELLS``
cells (ml-100k: 943 x 1682 = 1.6M); ``Popularity`` never needs one and works at any size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from trainer.metrics import check_csr, ndcg_at_k, to_csr

log = logging.getLogger(__name__)

# 50M float32 cells = 200 MB, the most a dense training matrix may take.
MAX_DENSE_CELLS = 50_000_000
# EASE inverts an (M, M) float64 Gram matrix: 20k items = 3.2 GB, the largest we attempt.
MAX_EASE_ITEMS = 20_000
# Users scored per block in tune_ease: a (4096, M) float32 block.
SCORE_BATCH = 4096


@dataclass(frozen=True, eq=False)
class SparseMatrix:
    """A CSR matrix: row r holds ``indices[indptr[r]:indptr[r+1]]`` with ``values`` alongside.

    Columns are unique within a row (``from_coo`` guarantees it by summing repeats).
    """

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64 column of each stored entry
    values: np.ndarray  # (nnz,) float32
    shape: tuple[int, int]  # (n_rows, n_cols)

    def __post_init__(self) -> None:
        n_rows, n_cols = self.shape
        if n_rows < 0 or n_cols < 1:
            raise ValueError(f"shape must be (n_rows >= 0, n_cols >= 1), got {self.shape}")
        indptr, indices = np.asarray(self.indptr), np.asarray(self.indices)
        check_csr(indptr, indices, n_rows, "SparseMatrix")
        values = np.asarray(self.values, dtype=np.float32)
        if values.shape != indices.shape:
            raise ValueError(f"values must have the shape of indices {indices.shape}, got {values.shape}")
        if indices.size and indices.max() >= n_cols:
            raise ValueError(f"indices must be < n_cols={n_cols}, got {indices.max()}")
        # Frozen: normalise dtypes once here so every consumer can rely on them.
        object.__setattr__(self, "indptr", indptr.astype(np.int64, copy=False))
        object.__setattr__(self, "indices", indices.astype(np.int64, copy=False))
        object.__setattr__(self, "values", values)

    @classmethod
    def from_coo(
        cls, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], values: np.ndarray | None = None
    ) -> SparseMatrix:
        """Build from (row, col[, value]) triples; repeated (row, col) pairs are summed. Values default to 1."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        vals = np.ones(rows.shape, np.float32) if values is None else np.asarray(values, dtype=np.float32)
        if rows.ndim != 1 or cols.shape != rows.shape or vals.shape != rows.shape:
            raise ValueError(
                f"rows, cols and values must be 1-D of one length, got {rows.shape}, {cols.shape}, {vals.shape}"
            )
        n_rows, n_cols = shape
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"rows must lie in [0, {n_rows}), got range [{rows.min()}, {rows.max()}]")
        if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
            raise ValueError(f"cols must lie in [0, {n_cols}), got range [{cols.min()}, {cols.max()}]")
        keys, inverse = np.unique(rows * n_cols + cols, return_inverse=True)  # sorted by (row, col)
        summed = np.bincount(inverse, weights=vals, minlength=keys.shape[0]).astype(np.float32)
        counts = np.bincount(keys // n_cols, minlength=n_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, (keys % n_cols).astype(np.int64), summed, (n_rows, n_cols))

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def select_rows(self, rows: np.ndarray) -> SparseMatrix:
        """The rows ``rows`` (in that order) as a new matrix."""
        rows = _check_index("rows", rows, self.shape[0])
        starts, lengths = self.indptr[rows], np.diff(self.indptr)[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Position of every selected entry in the source arrays: its row start + offset within the row.
        offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
        take = np.repeat(starts, lengths) + offsets
        return SparseMatrix(indptr, self.indices[take], self.values[take], (rows.shape[0], self.shape[1]))

    def to_dense(self) -> np.ndarray:
        """The (n_rows, n_cols) float32 matrix; refuses more than MAX_DENSE_CELLS cells."""
        n_rows, n_cols = self.shape
        if n_rows * n_cols > MAX_DENSE_CELLS:
            raise ValueError(
                f"shape must have at most {MAX_DENSE_CELLS} cells for a dense matrix (EASE and other dense "
                f"baselines need a smaller catalog), got {self.shape}"
            )
        dense = np.zeros(self.shape, dtype=np.float32)
        dense[np.repeat(np.arange(n_rows), np.diff(self.indptr)), self.indices] = self.values
        return dense


def _check_index(name: str, idx: np.ndarray, size: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{name} must lie in [0, {size}), got range [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


class Recommender(Protocol):
    """A model that scores the whole catalog for a batch of users."""

    def fit(self, train: SparseMatrix) -> Recommender:
        """Learn from the users x items training matrix; returns self."""
        ...

    def scores(self, user_idx: np.ndarray) -> np.ndarray:
        """(B, M) float32 scores of every item for the users ``user_idx`` (B,), higher is better."""
        ...


class Popularity:
    """Scores every item by its number of training interactions, the same for every user."""

    def __init__(self) -> None:
        self._counts: np.ndarray | None = None  # (M,) float32
        self._n_users = 0

    def fit(self, train: SparseMatrix) -> Popularity:
        stored = train.indices[train.values != 0]  # an explicit zero is not an interaction
        self._counts = np.bincount(stored, minlength=train.shape[1]).astype(np.float32)
        self._n_users = train.shape[0]
        return self

    def scores(self, user_idx: np.ndarray) -> np.ndarray:
        if self._counts is None:
            raise RuntimeError("Popularity.scores called before fit")
        user_idx = _check_index("user_idx", user_idx, self._n_users)
        return np.tile(self._counts, (user_idx.shape[0], 1))  # (B, M)


def _check_l2(l2: float) -> float:
    if isinstance(l2, bool) or not isinstance(l2, (int, float, np.integer, np.floating)) or not (
        math.isfinite(l2) and l2 > 0
    ):
        raise ValueError(f"l2 must be a finite number > 0, got {l2!r}")
    return float(l2)


def _gram(x: np.ndarray) -> np.ndarray:
    """X^T X in float64, (M, M); refuses catalogs too large for a dense inverse."""
    if x.shape[1] > MAX_EASE_ITEMS:
        raise ValueError(f"n_items must be <= {MAX_EASE_ITEMS} for EASE (dense (M, M) inverse), got {x.shape[1]}")
    x64 = x.astype(np.float64)
    return x64.T @ x64  # (M, M)


def ease_fits(n_rows: int, n_items: int, use: str) -> bool:
    """Whether EASE's dense matrices fit the limits above for an (n_rows, n_items) log; when not, logs
    a warning that ``use`` (what needed EASE) is left out."""
    fits = n_items <= MAX_EASE_ITEMS and n_rows * n_items <= MAX_DENSE_CELLS
    if not fits:
        log.warning("%s left out: EASE needs at most %d items and %d user x item cells, got %d items and "
                    "%d cells", use, MAX_EASE_ITEMS, MAX_DENSE_CELLS, n_items, n_rows * n_items)
    return fits


def _ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """B = I - P / diag(P) column-wise with P = (G + l2 I)^-1, so diag(B) = 0; (M, M) float32."""
    p = np.linalg.inv(gram + l2 * np.eye(gram.shape[0]))  # (M, M)
    b = -p / np.diag(p)[None, :]  # B_ij = -P_ij / P_jj
    np.fill_diagonal(b, 0.0)
    return b.astype(np.float32)


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019): scores = X B with the closed-form B."""

    def __init__(self, l2: float = 500.0) -> None:
        self.l2 = _check_l2(l2)
        self._x: np.ndarray | None = None  # (U, M) float32 training matrix
        self.weights: np.ndarray | None = None  # (M, M) float32 item-item weights B

    def fit(self, train: SparseMatrix) -> EASE:
        self._x = train.to_dense()
        self.weights = _ease_weights(_gram(self._x), self.l2)
        return self

    def scores(self, user_idx: np.ndarray) -> np.ndarray:
        if self._x is None or self.weights is None:
            raise RuntimeError("EASE.scores called before fit")
        user_idx = _check_index("user_idx", user_idx, self._x.shape[0])
        return self._x[user_idx] @ self.weights  # (B, M) = (B, M) @ (M, M)


def rank_topk(scores: np.ndarray, exclude: Any, k: int) -> np.ndarray:
    """The k best items per row, best first, as (B, k) int64.

    ``exclude`` (one row per score row: a list of arrays, a CSR ``(indptr, indices)``, a
    ``SparseMatrix``, or None) names items that must not be returned; they are masked with -inf.
    Positions left without a rankable item (all remaining scores -inf) are -1.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"scores must be a 2-D numeric array (B, M), got {scores.dtype} {scores.shape}")
    n_rows, n_items = scores.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an integer in [1, {n_items}], got {k!r}")
    if np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN, got NaN in row {int(np.argwhere(np.isnan(scores))[0, 0])}")
    cost = -scores.astype(np.float64 if scores.dtype == np.float64 else np.float32)  # lower is better; a copy
    if exclude is not None:
        indptr, items = to_csr(exclude, n_rows, name="exclude")
        if items.size and items.max() >= n_items:
            raise ValueError(f"exclude item indices must be < {n_items}, got {items.max()}")
        cost[np.repeat(np.arange(n_rows), np.diff(indptr)), items] = np.inf
    # torch's partial selection is several times faster than np.argpartition on wide rows; ties are
    # then ordered by item index, so the order never depends on the selection algorithm.
    top = torch.topk(torch.from_numpy(cost), k, dim=1, largest=False, sorted=False).indices.numpy()  # (B, k)
    ranked = np.take_along_axis(top, np.lexsort((top, np.take_along_axis(cost, top, axis=1)), axis=1), axis=1)
    ranked[np.isposinf(np.take_along_axis(cost, ranked, axis=1))] = -1
    return ranked.astype(np.int64)


def tune_ease(
    train_X: SparseMatrix,
    val_truth: Any,
    mask_X: Any,
    grid: Sequence[float] = (10, 50, 100, 200, 500, 1000, 2000),
    k: int = 10,
) -> tuple[float, dict[float, float]]:
    """Pick EASE's l2 by NDCG@k on validation; returns ``(best_l2, {l2: ndcg@k})``.

    ``val_truth`` holds each user's validation items and ``mask_X`` the items to exclude when
    ranking for validation (usually the training items); both have one row per row of
    ``train_X``. Test data must never be passed here. Ties go to the earlier grid value.
    """
    grid = [_check_l2(l2) for l2 in grid]
    if not grid:
        raise ValueError(f"grid must hold at least one l2, got {grid!r}")
    n_users = train_X.shape[0]
    val_indptr, val_items = to_csr(val_truth, n_users, name="val_truth")
    mask_indptr, mask_items = to_csr(mask_X, n_users, name="mask_X")
    users = np.flatnonzero(np.diff(val_indptr) > 0)  # only users with validation items count
    if users.size == 0:
        raise ValueError("val_truth must give at least one user a validation item, got none")
    x = train_X.to_dense()
    gram = _gram(x)
    val_rows = [val_items[val_indptr[u] : val_indptr[u + 1]] for u in users]
    mask_rows = [mask_items[mask_indptr[u] : mask_indptr[u + 1]] for u in users]
    table: dict[float, float] = {}
    for l2 in grid:
        weights = _ease_weights(gram, l2)
        ranked = np.concatenate(
            [
                rank_topk(x[users[s : s + SCORE_BATCH]] @ weights, mask_rows[s : s + SCORE_BATCH], k)
                for s in range(0, users.shape[0], SCORE_BATCH)
            ]
        )
        table[l2] = ndcg_at_k(ranked, val_rows, k)
    best = max(table, key=lambda l2: table[l2])  # max keeps the first of equal values
    return best, table
