"""Reference recommenders (popularity, EASE) and the full-catalog top-k ranking every model shares.

Numpy, with torch for the linear algebra (sparse products, Cholesky) and the top-k selection; no
scipy. The training matrix is a ``SparseMatrix``:
CSR over users x items, one stored entry per interaction. A ``Recommender`` is fitted on it and then scores every item for a
batch of users; ``rank_topk`` turns such a (B, M) score block into top-k item indices with the
user's already-seen items masked. Dense user x item copies are allowed up to ``MAX_DENSE_CELLS``
cells (ml-100k: 943 x 1682 = 1.6M); ``Popularity`` never needs one and works at any size. EASE keeps
the training matrix sparse, builds the Gram matrix of its smaller side once and inverts it shifted by
each l2 (Cholesky + LAPACK potri); ``tune_ease`` ranks the validation users of every l2 straight from
that inverse (``EaseSolver._solve`` / ``_costs``), without a product per user block.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from trainer.metrics import check_csr, ndcg_at_k, to_csr

log = logging.getLogger(__name__)

# 50M float32 cells = 200 MB, the most a dense training matrix may take.
MAX_DENSE_CELLS = 50_000_000
# EASE inverts an (M, M) Gram matrix: 20k items = 1.6 GB in float32, the largest we attempt.
MAX_EASE_ITEMS = 20_000
# EASE inverts an (S, S) Gram matrix, S = min(users, items) (EaseSolver). Up to this S in float64
# (ml-100k: 943, exact to the digits that rank items); larger in float32, about 3x faster here and
# half the memory: G + l2 I with l2 >= 10 has its smallest eigenvalue >= l2, well conditioned.
FLOAT64_SIDE = 2048
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

    def entry_rows(self) -> np.ndarray:
        """(nnz,) the row of every stored entry, in storage order (the COO row index)."""
        return np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))

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
        dense[self.entry_rows(), self.indices] = self.values
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


def _torch_sparse(matrix: SparseMatrix, dtype: torch.dtype, layout: str = "coo") -> torch.Tensor:
    """The matrix as a torch sparse tensor, COO or CSR (never a dense copy)."""
    values = torch.as_tensor(matrix.values, dtype=dtype)
    if layout == "csr":
        return torch.sparse_csr_tensor(torch.as_tensor(matrix.indptr), torch.as_tensor(matrix.indices), values,
                                       matrix.shape, check_invariants=True)
    index = torch.as_tensor(np.stack([matrix.entry_rows(), matrix.indices]))
    return torch.sparse_coo_tensor(index, values, matrix.shape, is_coalesced=True, check_invariants=True)


def _sparse_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """sparse @ sparse or sparse @ dense, without torch's warning that its CSR kernels are beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return left @ right


def _shifted_inverse(gram: torch.Tensor, l2: float) -> torch.Tensor:
    """(gram + l2 I)^-1 for a symmetric positive semi-definite ``gram``, through the Cholesky factor L of
    the shifted matrix (LAPACK potrf) and potri, which forms L^-T L^-1 exploiting triangularity and
    symmetry (about S^3 flops in all for S x S). Measured at S = 4,937, float32, two threads: 0.26 s +
    0.48 s, against 2.6 s for ``solve_triangular(L, I)`` followed by the full product L^-T L^-1.
    Peak: ``gram`` plus two S x S matrices (the shifted copy is freed once factorised)."""
    shifted = gram.clone()
    shifted.diagonal().add_(l2)
    factor = torch.linalg.cholesky(shifted)
    del shifted
    return torch.cholesky_inverse(factor)


def _add_entries(dense: torch.Tensor, matrix: SparseMatrix, sign: float) -> torch.Tensor:
    """``dense`` (n, M) plus ``sign`` times ``matrix``'s stored entries (n rows of M columns), in place."""
    values = torch.as_tensor(matrix.values, dtype=dense.dtype)
    return dense.index_put_((torch.as_tensor(matrix.entry_rows()), torch.as_tensor(matrix.indices)),
                            -values if sign < 0 else values, accumulate=True)


class EaseSolver:
    """EASE's weights for any l2 from one training matrix X (n users x M items), kept sparse.

    With G = X^T X and P = (G + l2 I)^-1, EASE's weights are B = I - P diag(P)^-1 and a user's scores
    x_u B = x_u - (x_u P) / diag(P). The solver inverts whichever Gram matrix is smaller:

    - items side (M <= n): G, (M, M); B is formed explicitly and a user's scores are a sparse row of X
      times B (cost: the user's items x M).
    - users side (n < M): K = X X^T, (n, n). By the push-through identity X P = (K + l2 I)^-1 X, and
      P_jj = (1 - x_j^T (K + l2 I)^-1 x_j) / l2 (Woodbury), x_j the item's column; with
      C = (K + l2 I)^-1, user u's scores are x_u - l2 (C_u X) / (1 - diag(X^T C X)).

    Either way one l2 costs one Cholesky factorisation and inverse of an (S, S) matrix, S = min(n, M)
    (``_shifted_inverse``), and the Gram matrix is computed once (sparse products). One ``eigh`` of the
    Gram matrix would serve every l2, but at S = 4,937 (float32, two threads) it took 19.6 s against
    0.75 s for a Cholesky + inverse, and each l2 would still need an (S, S) product to form C. For the
    l2 grid the users side forms l2 (C X) / (1 - diag(X^T C X)), dense (n, M), once per l2 (``_solve``;
    4,937 x 8,518 float32: 168 MB) and ranks every validation user from its rows; ``scores`` keeps X
    sparse and multiplies only the requested users' rows.
    """

    def __init__(self, train: SparseMatrix) -> None:
        n_rows, n_items = train.shape
        if n_items > MAX_EASE_ITEMS:
            raise ValueError(f"n_items must be <= {MAX_EASE_ITEMS} for EASE (dense (M, M) inverse), got {n_items}")
        self.train = train
        self.items_side = n_items <= n_rows
        side = n_items if self.items_side else n_rows
        self.dtype = torch.float64 if side <= FLOAT64_SIDE else torch.float32
        x = _torch_sparse(train, self.dtype)
        pair = (x.t().coalesce(), x) if self.items_side else (x, x.t().coalesce())
        self.gram = _sparse_product(*pair).to_dense()        # G (M, M) or K (n, n)
        self._x_csr = _torch_sparse(train, self.dtype, "csr")
        self._xt_csr = self._x_csr.t().to_sparse_csr() if not self.items_side else None

    def solve(self, l2: float) -> EaseSolution:
        return self._solve(l2)[0]

    def _solve(self, l2: float) -> tuple[EaseSolution, torch.Tensor | None]:
        """The solution and, on the users side, l2 (C X) / normaliser (n, M): a user's row of it less the
        user's own items is minus their scores, so ``_costs`` needs no product per row; None on the
        items side."""
        l2 = _check_l2(l2)
        inverse = _shifted_inverse(self.gram, l2)              # P (M, M) or C (n, n)
        if self.items_side:
            inverse.div_(inverse.diagonal().clone().unsqueeze(0)).neg_()      # B_ij = -P_ij / P_jj, in place
            inverse.diagonal().zero_()
            return EaseSolution(self, l2, inverse, None), None
        # diag(X^T C X)_j = sum_u X_uj (C X)_uj over the stored entries of X: (X^T (C X)) without the M x M.
        cx = _sparse_product(inverse, self._x_csr)             # (n, M) = C X
        rows = torch.as_tensor(self.train.entry_rows())
        values = torch.as_tensor(self.train.values, dtype=self.dtype)
        items = torch.as_tensor(self.train.indices)
        quad = torch.zeros(self.train.shape[1], dtype=self.dtype)
        quad.index_add_(0, items, values * cx[rows, items])
        normaliser = 1.0 - quad
        cx.mul_((l2 / normaliser).unsqueeze(0))
        return EaseSolution(self, l2, inverse, normaliser), cx

    def _costs(self, solution: EaseSolution, scaled_cx: torch.Tensor | None, rows: np.ndarray) -> np.ndarray:
        """(B, M) float32 minus the EASE scores of ``rows`` (``rank_topk``'s costs), from what ``_solve``
        returned: on the users side rows of ``scaled_cx`` less the rows' own entries, no product."""
        x_rows = self.train.select_rows(rows)
        if scaled_cx is None:
            cost = _sparse_product(_torch_sparse(x_rows, self.dtype, "csr"), solution.inverse)  # (B, M) = X_rows B
            return np.negative(cost.numpy(), dtype=np.float32)
        cost = scaled_cx.index_select(0, torch.as_tensor(rows))                                 # (B, M)
        return _add_entries(cost, x_rows, -1.0).to(torch.float32).numpy()

    def scores(self, solution: EaseSolution, rows: np.ndarray, context: SparseMatrix | None = None) -> np.ndarray:
        """(B, M) float32 EASE scores of the rows ``rows`` (B,) of the training matrix, or of ``context`` (a
        matrix of the same shape: the users' rows with more items, e.g. train + validation for the test split)."""
        if context is not None and context.shape != self.train.shape:
            raise ValueError(f"context must have the training matrix's shape {self.train.shape}, got {context.shape}")
        x_rows = (self.train if context is None else context).select_rows(rows)
        x_part = _torch_sparse(x_rows, self.dtype, "csr")
        if self.items_side:
            return _sparse_product(x_part, solution.inverse).to(torch.float32).numpy()  # (B, M) @ (M, M)
        if context is None:
            c_rows = solution.inverse[torch.as_tensor(rows)]                        # (B, n)
            cx = _sparse_product(self._xt_csr, c_rows.T.contiguous()).T             # (B, M) = C_rows X
            scores = x_part.to_dense() - solution.l2 * cx / solution.normaliser.unsqueeze(0)
            return scores.to(torch.float32).numpy()
        # Any row x: x B = x - x P / diag(P), with P = (I - X^T C X) / l2 and diag(P) = normaliser / l2, so
        # x B = x - (x - (x X^T) C X) / normaliser (for a training row this is the branch above).
        dense = x_part.to_dense()                                                   # (B, M)
        xxt = _sparse_product(self._x_csr, dense.T.contiguous()).T                  # (B, n) = x X^T
        t = xxt @ solution.inverse                                                  # (B, n) = x X^T C
        tx = _sparse_product(self._xt_csr, t.T.contiguous()).T                      # (B, M) = x X^T C X
        scores = dense - (dense - tx) / solution.normaliser.unsqueeze(0)
        return scores.to(torch.float32).numpy()

    def weights(self, solution: EaseSolution) -> np.ndarray:
        """(M, M) float32 B (formed on demand on the users side: M x M dense)."""
        if self.items_side:
            return solution.inverse.to(torch.float32).numpy()
        x_dense = self._x_csr.to_dense()                                             # (n, M)
        p = -(x_dense.T @ (solution.inverse @ x_dense))                              # l2 P - I, (M, M)
        p.diagonal().add_(1.0)                                                       # l2 P
        b = -(p / p.diagonal().unsqueeze(0))
        b.diagonal().zero_()
        return b.to(torch.float32).numpy()


@dataclass(frozen=True, eq=False)
class EaseSolution:
    """One l2's solution: B (M, M) on the items side; C = (K + l2 I)^-1 (n, n) and l2 diag(P) (M,) on the users side."""

    solver: EaseSolver
    l2: float
    inverse: torch.Tensor
    normaliser: torch.Tensor | None


def ease_all_scores(train: SparseMatrix, l2: float) -> np.ndarray:
    """(n, M) float32 EASE scores of every row of ``train`` with ``l2``, each formed once. On the users side
    they are X - l2 (C X) / normaliser, and ``_solve`` forms the scaled product anyway: it is negated and X
    added in place, where ``EASE.fit`` followed by ``scores`` of every row formed C X twice and held about
    five (n, M) matrices at once (4,936 x 8,962 float32: 177 MB each). Items side: X B."""
    solver = EaseSolver(train)
    solution, scaled_cx = solver._solve(l2)
    if scaled_cx is None:
        return solver.scores(solution, np.arange(train.shape[0]))
    del solution
    return _add_entries(scaled_cx.neg_(), train, 1.0).to(torch.float32).numpy()


def ease_fits(n_items: int, use: str, warn: bool = True) -> bool:
    """Whether EASE's help (``use``) is available for a log of ``n_items`` items; when not, and with ``warn``,
    logs a warning that it is left out. It is when the catalog fits EASE's dense algebra (``MAX_EASE_ITEMS``:
    the solver inverts the smaller of the item x item and user x user Gram matrices). A ``use`` that needs every
    user's scores at once checks ``ease_scores_fit`` instead; the ranker's affinity does not
    (``ease_score_factors``)."""
    fits = n_items <= MAX_EASE_ITEMS
    if not fits and warn:
        log.warning("%s left out: EASE needs at most %d items, got %d", use, MAX_EASE_ITEMS, n_items)
    return fits


def ease_scores_fit(n_rows: int, n_items: int, use: str) -> bool:
    """``ease_fits`` for a ``use`` that needs every user's EASE scores at once, as one dense (n_rows, n_items)
    matrix (``dense_scores_fit``); when not, logs a warning that it is left out."""
    if not ease_fits(n_items, use):
        return False
    if not dense_scores_fit(n_rows, n_items):
        log.warning("%s left out: it needs every user's EASE scores at once, %d users x %d items, more than %d "
                    "cells", use, n_rows, n_items, MAX_DENSE_CELLS)
        return False
    return True


def dense_scores_fit(n_rows: int, n_items: int) -> bool:
    """Whether every user's scores fit in one dense (n_rows, n_items) float32 matrix (``MAX_DENSE_CELLS``)."""
    return n_rows * n_items <= MAX_DENSE_CELLS


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019): scores = X B with the closed-form B."""

    def __init__(self, l2: float = 500.0) -> None:
        self.l2 = _check_l2(l2)
        self._solution: EaseSolution | None = None

    @property
    def weights(self) -> np.ndarray | None:
        """(M, M) float32 item-item weights B, None before fit."""
        return None if self._solution is None else self._solution.solver.weights(self._solution)

    def fit(self, train: SparseMatrix) -> EASE:
        self._solution = EaseSolver(train).solve(self.l2)
        return self

    @classmethod
    def from_solution(cls, solution: EaseSolution) -> EASE:
        """A fitted EASE from a solver's solution (tune_ease's best) without factorising again."""
        model = cls(solution.l2)
        model._solution = solution
        return model

    def scores(self, user_idx: np.ndarray, context: SparseMatrix | None = None) -> np.ndarray:
        """(B, M) scores of the users' training rows, or of their rows of ``context`` (same shape)."""
        if self._solution is None:
            raise RuntimeError("EASE.scores called before fit")
        user_idx = _check_index("user_idx", user_idx, self._solution.solver.train.shape[0])
        return self._solution.solver.scores(self._solution, user_idx, context)  # (B, M)


def subspace_factors(times: Callable[[torch.Tensor], torch.Tensor],
                     transposed_times: Callable[[torch.Tensor], torch.Tensor], m: int, rank: int,
                     rng: np.random.Generator, dtype: torch.dtype = torch.float32,
                     iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors (left (n, r) scaled by the singular values, right (m, r)) of a matrix S (n, m)
    known only through its products ``times(V)`` = S @ V and ``transposed_times(U)`` = S.T @ U: subspace
    iteration from a seeded random start, then the SVD of S @ basis. S ~ left @ right.T. ``rank`` is
    capped by the caller at min(n, m).

    The algebra runs in torch, which keeps to the trainer's thread count: numpy's multi-threaded
    OpenBLAS QR spun against torch's threads (~0.1-0.3 s per QR instead of ~1 ms on ml-100k)."""
    basis = torch.as_tensor(rng.standard_normal((m, rank + 8))).to(dtype)           # (m, k)
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(times(basis))                                    # (n, k)
        basis, _ = torch.linalg.qr(transposed_times(basis))                         # (m, k)
    u, sigma, vt = torch.linalg.svd(times(basis), full_matrices=False)              # (n, k), (k,), (k, k)
    left, right = u[:, :rank] * sigma[:rank], basis @ vt[:rank].T
    return left.to(torch.float32).numpy(), right.to(torch.float32).numpy()


def ease_score_factors(ease: EASE, rank: int, rng: np.random.Generator,
                       iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors (left (n, r) scaled by the singular values, right (m, r)) of a fitted EASE's
    scores S on its training matrix X, without forming S (n, m): ``subspace_factors`` with S @ V and S.T @ U
    as products with the sparse X and the solver's inverse, in the solver's precision. Items side: S = X B,
    so S V = X (B V) and S.T U = B.T (X.T U). Users side (``EaseSolver``): S = X - l2 C X D with
    D = diag(1 / normaliser), so S V = X V - l2 C (X (D V)) and S.T U = X.T U - l2 D (X.T (C U)), C symmetric.

    Cheaper than forming S and factorising it at every size: on a 4,936-user x 8,962-item log (users side,
    float32, two threads) 0.2-0.3 s against 2.7-3.2 s for the dense scores and their factors, the same
    factors to 1e-5. At full rank (``rank`` >= min(n, m)), where S fits ``MAX_DENSE_CELLS``, the other way round:
    the SVD of S formed densely, exact, and no random draws."""
    if ease._solution is None:
        raise RuntimeError("ease_score_factors called before EASE.fit")
    solution = ease._solution
    solver = solution.solver
    n, m = solver.train.shape
    if rank >= min(n, m) and n * m <= MAX_DENSE_CELLS:
        # Full rank: the SVD of the dense scores, exact and far cheaper than a subspace iteration as wide as the
        # matrix (the five-copies catalog of docs/RESULTS.md: 944 x 7,054).
        dense = torch.as_tensor(solver.scores(solution, np.arange(n)), dtype=torch.float64)
        u, sigma, vt = torch.linalg.svd(dense, full_matrices=False)
        return (u * sigma).to(torch.float32).numpy(), vt.T.to(torch.float32).numpy()
    inverse = solution.inverse                                                        # B (m, m) or C (n, n)
    xs = _torch_sparse(solver.train, inverse.dtype, "csr")
    xt = xs.t().to_sparse_csr()
    if solver.items_side:
        def times(v: torch.Tensor) -> torch.Tensor:                                   # S @ v, (n, k)
            return _sparse_product(xs, inverse @ v)

        def transposed_times(u: torch.Tensor) -> torch.Tensor:                        # S.T @ u, (m, k)
            return inverse.T @ _sparse_product(xt, u)
    else:
        scale = (solution.l2 / solution.normaliser).unsqueeze(1)                      # l2 D, (m, 1)

        def times(v: torch.Tensor) -> torch.Tensor:
            return _sparse_product(xs, v) - inverse @ _sparse_product(xs, scale * v)

        def transposed_times(u: torch.Tensor) -> torch.Tensor:
            return _sparse_product(xt, u) - scale * _sparse_product(xt, inverse @ u)

    return subspace_factors(times, transposed_times, m, min(rank, n, m), rng, inverse.dtype, iterations)


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
    _check_k(k, n_items)
    if np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN, got NaN in row {int(np.argwhere(np.isnan(scores))[0, 0])}")
    # lower is better; a fresh array the masking below may write into (the caller's scores stay untouched)
    cost = np.negative(scores, dtype=np.float64 if scores.dtype == np.float64 else np.float32)
    return _rank_costs(cost, exclude, k)


def _check_k(k: int, n_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an integer in [1, {n_items}], got {k!r}")


def _rank_costs(cost: np.ndarray, exclude: Any, k: int) -> np.ndarray:
    """``rank_topk`` of the scores ``-cost`` (B, M), ``k`` already checked; masks ``exclude`` in ``cost`` itself."""
    n_rows, n_items = cost.shape
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


EASE_SEARCHES = ("grid", "climb")


def tune_ease(
    train_X: SparseMatrix,
    val_truth: Any,
    mask_X: Any,
    grid: Sequence[float] = (10, 50, 100, 200, 500, 1000, 2000),
    k: int = 10,
    search: str = "grid",
) -> tuple[float, dict[float, float]]:
    """Pick EASE's l2 by NDCG@k on validation; returns ``(best_l2, {l2: ndcg@k})``.

    ``val_truth`` holds each user's validation items and ``mask_X`` the items to exclude when
    ranking for validation (usually the training items); both have one row per row of
    ``train_X``. Test data must never be passed here. Ties go to the earlier grid value.
    ``search="grid"`` tries every value; ``"climb"`` only those ``climb_order`` visits (the table then
    holds just those).
    """
    best, table = tune_ease_solution(train_X, val_truth, mask_X, grid, k, search)
    return best.l2, table


def climb_order(grid: Sequence[float], score) -> list[float]:
    """The l2 values a hill climb over the sorted grid visits, ``score(l2)`` called once each, in order.

    It starts at the middle value and steps up while validation improves strictly; if the first step up
    does not improve, it steps down instead, again while strictly improving. On a curve with one peak
    (EASE's validation NDCG against l2: too little shrinkage overfits, too much forgets) it ends on the
    grid's best value after 3 of 5 evaluations in the usual case, where a full grid pays for all 5 (each
    one a Cholesky factorisation and inverse of an S x S matrix: ~2 s at S = 4,937)."""
    values = sorted(set(grid))
    seen: dict[float, float] = {}

    def visit(i: int) -> float:
        seen[values[i]] = score(values[i])
        return seen[values[i]]

    here = len(values) // 2
    current = visit(here)
    for step in (1, -1):
        moved = False
        i = here + step
        while 0 <= i < len(values):
            value = visit(i)
            if not value > current:
                break
            current, here, moved = value, i, True
            i += step
        if moved:
            break
    return list(seen)


def tune_ease_solution(train_X: SparseMatrix, val_truth: Any, mask_X: Any, grid: Sequence[float],
                       k: int = 10, search: str = "grid") -> tuple[EaseSolution, dict[float, float]]:
    """``tune_ease`` that returns the best l2's solution itself (``EASE.from_solution`` scores with it),
    so the chosen model needs no second factorisation. One Gram matrix serves the whole grid."""
    if search not in EASE_SEARCHES:
        raise ValueError(f"search must be one of {EASE_SEARCHES}, got {search!r}")
    grid = [_check_l2(l2) for l2 in grid]
    if not grid:
        raise ValueError(f"grid must hold at least one l2, got {grid!r}")
    n_users = train_X.shape[0]
    val_indptr, val_items = to_csr(val_truth, n_users, name="val_truth")
    mask_indptr, mask_items = to_csr(mask_X, n_users, name="mask_X")
    users = np.flatnonzero(np.diff(val_indptr) > 0)  # only users with validation items count
    if users.size == 0:
        raise ValueError("val_truth must give at least one user a validation item, got none")
    _check_k(k, train_X.shape[1])
    solver = EaseSolver(train_X)
    val_rows = [val_items[val_indptr[u] : val_indptr[u + 1]] for u in users]
    mask_rows = [mask_items[mask_indptr[u] : mask_indptr[u + 1]] for u in users]
    table: dict[float, float] = {}
    solutions: dict[float, EaseSolution] = {}
    position = {l2: i for i, l2 in enumerate(dict.fromkeys(grid))}

    def rank(l2: float) -> tuple[float, int]:                            # ties go to the earlier grid value
        return table[l2], -position[l2]

    def score(l2: float) -> float:
        solution, scaled_cx = solver._solve(l2)
        ranked = np.concatenate(
            [
                _rank_costs(solver._costs(solution, scaled_cx, users[s : s + SCORE_BATCH]),
                            mask_rows[s : s + SCORE_BATCH], k)
                for s in range(0, users.shape[0], SCORE_BATCH)
            ]
        )
        table[l2] = ndcg_at_k(ranked, val_rows, k)
        solutions[l2] = solution
        best = max(solutions, key=rank)                  # keep only the best solution so far alive
        for other in [other for other in solutions if other != best]:
            del solutions[other]
        return table[l2]

    if search == "grid":
        for l2 in grid:
            score(l2)
    else:
        climb_order(grid, score)
    (best,) = solutions.values()
    return best, {l2: table[l2] for l2 in position if l2 in table}      # in the grid's order
