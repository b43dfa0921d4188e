"""The item index of a version: built by the trainer, searched by the retrieval service.

Format: ``index.faiss`` in FAISS's own binary format (``faiss.write_index``; read back with
``faiss.read_index``, which parses a binary layout and runs no code from the file). The index holds
the item embeddings of item indices 1..m under their item index as the FAISS id, and scores by
inner product (= cosine similarity for the pooled and sequential towers' unit vectors; the autoencoder
tower's [w_i, b_i] give its decoder's logit). Index parameters (kind, nlist/nprobe, M/efSearch) and
the recall@100 measured against exact search at build time go into the manifest.

Every index sits behind one small interface, ``search(queries (B, D), k) -> (scores (B, k), ids (B, k))``
with ids int64 and ``-1`` where fewer than k items exist, and has an exact twin (``ExactIndex``) that
tests and the build-time recall check compare it with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")


class Index(Protocol):
    dim: int
    size: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched; stored in the manifest beside the measured recall."""

    kind: str = "flat"
    nlist: int = 0            # IVF: number of clusters (0 = 4 * sqrt(n))
    nprobe: int = 16          # IVF: clusters visited per query
    hnsw_m: int = 32          # HNSW: neighbours per node
    ef_construction: int = 200
    ef_search: int = 128      # HNSW: candidate list size per query

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.nlist < 0:
            raise ValueError(f"nlist must be >= 0, got {self.nlist!r}")


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {queries.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return queries


class ExactIndex:
    """Brute-force inner-product search in numpy: the exact twin every ANN index is held against."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)   # (n, D)
        self.ids = np.asarray(ids, dtype=np.int64)                               # (n,)
        if self.embeddings.ndim != 2 or self.ids.shape != (self.embeddings.shape[0],):
            raise ValueError(f"embeddings must be (n, D) and ids (n,), got {self.embeddings.shape} "
                             f"and {self.ids.shape}")
        self.dim, self.size = self.embeddings.shape[1], self.embeddings.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        scores = queries @ self.embeddings.T                                  # (B, D) @ (D, n) -> (B, n)
        take = min(k, self.size)
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < self.size else \
            np.tile(np.arange(self.size), (len(queries), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores[:, :take] = np.take_along_axis(top_scores, order, axis=1)
        out_ids[:, :take] = self.ids[np.take_along_axis(top, order, axis=1)]
        return out_scores, out_ids


class FaissIndex:
    """A FAISS index (flat, IVF or HNSW, inner product) with its search-time parameters applied."""

    def __init__(self, index: faiss.Index, params: IndexParams) -> None:
        self.index, self.params = index, params
        self.dim, self.size = index.d, index.ntotal
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = params.nprobe
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = params.ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim, k)
        scores, ids = self.index.search(queries, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def build_index(embeddings: np.ndarray, ids: np.ndarray, params: IndexParams, seed: int = 0) -> FaissIndex:
    """Builds the index over ``embeddings`` (n, D) float32 with FAISS ids ``ids`` (n,) int64."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = embeddings.shape
    if params.kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif params.kind == "ivf":
        nlist = params.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))  # FAISS wants >= 39 points per list
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.cp.seed = seed
        base.train(embeddings)
    else:
        base = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = params.ef_construction
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(embeddings, ids)
    return FaissIndex(index, params)


def recall_against_exact(index: Index, exact: ExactIndex, queries: np.ndarray, k: int = 100) -> float:
    """Mean |ANN top-k ∩ exact top-k| / |exact top-k| over the queries."""
    _, ann_ids = index.search(queries, k)
    _, exact_ids = exact.search(queries, k)
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum()))
            for a, e in zip(ann_ids, exact_ids)]
    return float(np.mean(hits)) if hits else 1.0


def write_index(index: FaissIndex, path: str | Path) -> None:
    faiss.write_index(index.index, str(path))


def read_index(path: str | Path, params: IndexParams) -> FaissIndex:
    """Reads ``index.faiss`` (FAISS binary format; no code runs from the file)."""
    return FaissIndex(faiss.read_index(str(path)), params)
