"""Offline evaluation metrics: pure numpy functions over ranked lists, labels and scores.

Top-K metrics take ``ranked``, an (U, K_max) integer array of item indices best first where ``-1``
is padding (no item), and ``truth``, each user's held-out items in one of three forms:

- a ``list`` of U integer arrays;
- a ``tuple`` ``(indptr (U+1,), indices (nnz,))`` in CSR layout;
- any object with ``indptr`` and ``indices`` attributes (e.g. ``trainer.baselines.SparseMatrix``).

A user's truth is a set (duplicates count once). Users with an empty truth are left out of every
average. Each call builds one boolean hit matrix (U, K_max) by binary search over sorted
(user, item) keys, so the cost is O(U K log nnz) whatever the catalog size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TOPK_METRICS = ("recall", "precision", "ndcg", "map", "mrr", "hit")


def to_csr(rows: Any, n_rows: int, *, name: str = "truth") -> tuple[np.ndarray, np.ndarray]:
    """Per-row item sets as CSR ``(indptr (n_rows+1,) int64, indices (nnz,) int64)``.

    ``rows`` is a list of integer arrays, a tuple ``(indptr, indices)`` or an object with
    ``indptr``/``indices`` attributes. Each row comes back sorted with duplicates removed.
    """
    if hasattr(rows, "indptr") and hasattr(rows, "indices"):
        indptr, indices = np.asarray(rows.indptr), np.asarray(rows.indices)
    elif isinstance(rows, tuple):
        if len(rows) != 2:
            raise ValueError(f"{name} as a tuple must be (indptr, indices), got {len(rows)} elements")
        indptr, indices = np.asarray(rows[0]), np.asarray(rows[1])
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        if len(rows) != n_rows:
            raise ValueError(f"{name} must hold one array per row ({n_rows}), got {len(rows)}")
        arrays = [np.asarray(r) for r in rows]
        for i, a in enumerate(arrays):
            if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                raise ValueError(f"{name}[{i}] must be a 1-D integer array, got {a.dtype} {a.shape}")
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    else:
        raise ValueError(f"{name} must be a list of arrays or a CSR (indptr, indices), got {type(rows).__name__}")
    check_csr(indptr, indices, n_rows, name)
    return _dedup_rows(indptr.astype(np.int64), indices.astype(np.int64))


def check_csr(indptr: np.ndarray, indices: np.ndarray, n_rows: int, name: str) -> None:
    """Raise ValueError unless (indptr, indices) is a well-formed CSR of n_rows rows."""
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise ValueError(
            f"{name} indptr must be a 1-D integer array of length {n_rows + 1}, got {indptr.dtype} {indptr.shape}"
        )
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"{name} indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError(
            f"{name} indptr must rise from 0 to len(indices)={indices.shape[0]}, got {indptr[0]}..{indptr[-1]}"
        )
    if indices.size and indices.min() < 0:
        raise ValueError(f"{name} indices must be >= 0, got {indices.min()}")


def _dedup_rows(indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row and drop repeated items, keeping the CSR layout."""
    row = np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))  # (nnz,)
    order = np.lexsort((indices, row))
    row, col = row[order], indices[order]
    keep = np.ones(row.shape[0], dtype=bool)
    keep[1:] = (row[1:] != row[:-1]) | (col[1:] != col[:-1])
    counts = np.bincount(row[keep], minlength=indptr.shape[0] - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), col[keep]


def _check_ranked(ranked: np.ndarray) -> np.ndarray:
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must be a 2-D integer array (U, K), got {ranked.dtype} {ranked.shape}")
    if ranked.size and ranked.min() < -1:
        raise ValueError(f"ranked must hold item indices >= 0 or -1 padding, got {ranked.min()}")
    # A repeated item would be counted as several hits; sorted rows expose repeats as neighbours.
    srt = np.sort(ranked, axis=1)
    repeat = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if repeat.any():
        u = int(np.argwhere(repeat)[0, 0])
        raise ValueError(f"ranked rows must not repeat an item, row {u} is {ranked[u].tolist()}")
    return ranked.astype(np.int64, copy=False)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _hit_matrix(ranked: np.ndarray, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(hits (U', K_max) bool, n_true (U',) int64)`` over the U' users with a non-empty truth."""
    ranked = _check_ranked(ranked)
    indptr, indices = to_csr(truth, ranked.shape[0])
    n_true = np.diff(indptr)
    if not np.any(n_true > 0):
        raise ValueError("truth must give at least one user a test item, got none")
    width = int(max(indices.max(), ranked.max())) + 1
    # key = user * width + item; rows are sorted and deduplicated, so the keys are sorted.
    keys = np.repeat(np.arange(n_true.shape[0], dtype=np.int64), n_true) * width + indices  # (nnz,)
    query = np.arange(ranked.shape[0], dtype=np.int64)[:, None] * width + ranked  # (U, K_max)
    pos = np.minimum(np.searchsorted(keys, query), keys.shape[0] - 1)
    hits = (keys[pos] == query) & (ranked >= 0)  # padding -1 would alias the previous user's last item
    users = n_true > 0
    return hits[users], n_true[users]


def _first_k(hits: np.ndarray, k: int) -> np.ndarray:
    """The first k columns of the hit matrix; a list shorter than k is padded with misses."""
    if k <= hits.shape[1]:
        return hits[:, :k]
    return np.pad(hits, ((0, 0), (0, k - hits.shape[1])))


def _per_user(name: str, hits: np.ndarray, n_true: np.ndarray, k: int) -> np.ndarray:
    """One value per user (U',) of the metric ``name`` at cut-off k."""
    h = _first_k(hits, k).astype(np.float64)  # (U', k)
    n_hits = h.sum(axis=1)
    ideal = np.minimum(n_true, k)
    if name == "recall":
        return n_hits / n_true
    if name == "precision":
        return n_hits / k
    if name == "ndcg":
        discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,) 1/log2(rank+1), rank 1-based
        return (h @ discount) / np.cumsum(discount)[ideal - 1]
    if name == "map":
        precision_at = np.cumsum(h, axis=1) / np.arange(1, k + 1)  # (U', k)
        return (precision_at * h).sum(axis=1) / ideal
    if name == "mrr":
        return np.where(n_hits > 0, 1.0 / (np.argmax(h, axis=1) + 1.0), 0.0)
    assert name == "hit", name
    return (n_hits > 0).astype(np.float64)


def per_user(name: str, ranked: np.ndarray, truth: Any, k: int) -> np.ndarray:
    """One top-k metric (a name of ``TOPK_METRICS``) for each user (U,), float64."""
    k = _check_k(k)
    hits, n_true = _hit_matrix(ranked, truth)
    return _per_user(name, hits, n_true, k)


def _topk_metric(name: str, ranked: np.ndarray, truth: Any, k: int) -> float:
    return float(per_user(name, ranked, truth, k).mean())


def recall_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Mean over users of |top-k ∩ T| / |T|, T the user's test items."""
    return _topk_metric("recall", ranked, truth, k)


def precision_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Mean over users of |top-k ∩ T| / k (missing or padded positions count as misses)."""
    return _topk_metric("precision", ranked, truth, k)


def ndcg_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Mean over users of DCG/IDCG with binary relevance.

    DCG = sum_{r=1..k} rel_r / log2(r + 1); IDCG = sum_{r=1..min(k, |T|)} 1 / log2(r + 1).
    """
    return _topk_metric("ndcg", ranked, truth, k)


def map_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Mean over users of AP@k = sum_{r=1..k} rel_r * precision@r / min(k, |T|)."""
    return _topk_metric("map", ranked, truth, k)


def mrr_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Mean over users of 1 / (rank of the first hit), 0 when no hit in the top k."""
    return _topk_metric("mrr", ranked, truth, k)


def hit_at_k(ranked: np.ndarray, truth: Any, k: int) -> float:
    """Fraction of users with at least one test item in their top k."""
    return _topk_metric("hit", ranked, truth, k)


def topk_report(ranked: np.ndarray, truth: Any, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Every top-K metric at every k, keyed ``"<metric>@<k>"`` (e.g. ``"ndcg@10"``).

    The hit matrix is built once and shared by all metrics and cut-offs.
    """
    ks = [_check_k(k) for k in ks]
    if not ks:
        raise ValueError(f"ks must name at least one cut-off, got {ks!r}")
    hits, n_true = _hit_matrix(ranked, truth)
    return {
        f"{name}@{k}": float(_per_user(name, hits, n_true, k).mean()) for k in ks for name in TOPK_METRICS
    }


def catalog_coverage(ranked: np.ndarray, n_items: int) -> float:
    """Fraction of the catalog recommended to anyone: |distinct items in ranked| / n_items."""
    ranked = _check_ranked(ranked)
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be an integer >= 1, got {n_items!r}")
    items = ranked[ranked >= 0]
    if items.size and items.max() >= n_items:
        raise ValueError(f"ranked item indices must be < n_items={n_items}, got {items.max()}")
    return np.unique(items).shape[0] / n_items


def intra_list_diversity(ranked: np.ndarray, item_vectors: np.ndarray, chunk_size: int = 4096) -> float:
    """Mean over lists of the mean pairwise cosine distance 1 - cos(v_i, v_j), i != j.

    Padding (-1) is ignored; lists with fewer than two items have no pairs and are left out.
    With unit vectors u_i and s = sum_i u_i over a list of n items,
    sum_{i != j} cos(u_i, u_j) = |s|^2 - n, so the cost is O(U K D), not O(U K^2 D).
    """
    ranked = _check_ranked(ranked)
    vectors = np.asarray(item_vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"item_vectors must be a 2-D array (M, D) with M >= 1, got shape {vectors.shape}")
    if ranked.size and ranked.max() >= vectors.shape[0]:
        raise ValueError(f"ranked item indices must be < len(item_vectors)={vectors.shape[0]}, got {ranked.max()}")
    norms = np.linalg.norm(vectors, axis=1)
    used = np.unique(ranked[ranked >= 0])
    zero = used[norms[used] == 0]
    if zero.size:
        raise ValueError(f"item_vectors rows used by ranked must be non-zero (cosine), row {zero[0]} is zero")
    unit = vectors / np.where(norms > 0, norms, 1.0)[:, None]  # (M, D)
    sums, counts = [], []
    for start in range(0, ranked.shape[0], chunk_size):
        block = ranked[start : start + chunk_size]  # (C, K)
        valid = block >= 0
        s = (unit[np.where(valid, block, 0)] * valid[..., None]).sum(axis=1)  # (C, D)
        sums.append((s * s).sum(axis=1))
        counts.append(valid.sum(axis=1))
    sq, n = np.concatenate(sums), np.concatenate(counts).astype(np.float64)
    lists = n >= 2
    if not lists.any():
        raise ValueError("ranked must hold at least one list with two or more items, got none")
    mean_cos = (sq[lists] - n[lists]) / (n[lists] * (n[lists] - 1))
    return float(np.mean(1.0 - mean_cos))


def _check_pair(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{a_name} must be a non-empty 1-D array, got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {a.shape}, got {b.shape}")
    for name, x in ((a_name, a), (b_name, b)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} must be finite, got {x[~np.isfinite(x)][0]}")
    return a, b


def paired_difference(model: np.ndarray, reference: np.ndarray) -> tuple[float, float | None]:
    """(mean, t) of the per-user differences ``model - reference`` on the same users: t is the mean in standard
    errors of that mean; 0 for no difference and None for a difference without spread (or a single user), where
    a t has no value. The report's ``paired_ratio`` and the ranker's keep rule (``ranking_training.paired_t``)
    both read their t here."""
    model, reference = np.asarray(model, np.float64), np.asarray(reference, np.float64)
    if model.shape != reference.shape or model.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d arrays of one length, got {model.shape} and {reference.shape}")
    diff = model - reference
    if diff.size == 0:
        return 0.0, 0.0
    mean = float(diff.mean())
    se = float(diff.std(ddof=1)) / np.sqrt(diff.size) if diff.size > 1 else 0.0
    return mean, (mean / se if se > 0 else (0.0 if mean == 0 else None))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, tied scores sharing their average rank.

    AUC = (sum of positives' ranks - P (P + 1) / 2) / (P N), ranks 1-based over all scores.
    """
    y, s = _check_pair("labels", labels, "scores", scores)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0 or 1, got {y[(y != 0) & (y != 1)][0]}")
    n_pos = float(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels must hold both classes, got {int(n_pos)} positives and {int(n_neg)} negatives")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # A group of c tied values occupying ranks e-c+1..e gets their mean e - (c - 1) / 2.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy -[y log p + (1 - y) log(1 - p)], p clipped to [eps, 1 - eps].

    ``labels`` lie in [0, 1] (soft labels allowed), ``probs`` in [0, 1].
    """
    y, p = _check_pair("labels", labels, "probs", probs)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    if y.min() < 0 or y.max() > 1:
        raise ValueError(f"labels must lie in [0, 1], got range [{y.min()}, {y.max()}]")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rmse(y: np.ndarray, yhat: np.ndarray) -> float:
    """Root mean squared error sqrt(mean((y - yhat)^2))."""
    a, b = _check_pair("y", y, "yhat", yhat)
    return float(np.sqrt(np.mean((a - b) ** 2)))
