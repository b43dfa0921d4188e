"""Choosing the final list: a running top-k over scored chunks and the MMR diversity re-rank.

``RunningTopK`` keeps the best ``capacity`` candidates seen so far, ordered by score, ties broken
by arrival (earlier = better retrieval rank); it never holds more than ``capacity`` rows plus one chunk.

``mmr_order`` is maximal marginal relevance: pick i maximising
``(1 - strength) * relevance_i - strength * max_{j chosen} cos(e_i, e_j)``; with nothing chosen the
penalty is 0, so the first pick is always the most relevant item; ties go to the earlier (more
relevant) candidate. strength 0 = the relevance order, 1 = each next item as far as possible from
the chosen ones. Embeddings are the version's L2-normalised item embeddings (cosine = dot product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Scored:
    """Scored candidates, row-aligned (N,) arrays."""

    item_ids: np.ndarray          # int64 external ids
    item_idx: np.ndarray          # int64 indices in the ranking version (0 = unknown)
    arrival: np.ndarray           # int64 position in the candidate stream
    score: np.ndarray             # float32 final score
    ctr: np.ndarray               # float32
    rating: np.ndarray            # float32 predicted rating
    retrieval_score: np.ndarray   # float32

    def __len__(self) -> int:
        return int(self.item_ids.size)

    def take(self, rows: np.ndarray) -> Scored:
        return Scored(*(getattr(self, name)[rows] for name in _FIELDS))

    @staticmethod
    def concat(parts: list[Scored]) -> Scored:
        return Scored(*(np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS))


_FIELDS = ("item_ids", "item_idx", "arrival", "score", "ctr", "rating", "retrieval_score")


def best_first(scored: Scored) -> np.ndarray:
    """Row order by score descending, ties by arrival ascending."""
    return np.lexsort((scored.arrival, -scored.score.astype(np.float64)))


class RunningTopK:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._kept: Scored | None = None

    def add(self, chunk: Scored) -> None:
        merged = chunk if self._kept is None else Scored.concat([self._kept, chunk])
        self._kept = merged.take(best_first(merged)[:self.capacity])

    def ranked(self) -> Scored | None:
        """The kept candidates best first, or None when nothing was added."""
        return self._kept

    def __len__(self) -> int:
        return 0 if self._kept is None else len(self._kept)


def mmr_order(relevance: np.ndarray, embeddings: np.ndarray, k: int, strength: float) -> np.ndarray:
    """Indices of ``k`` rows of relevance (N,) / embeddings (N, D) in MMR order (see module docstring)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    n = relevance.size
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings must have {n} rows (one per candidate), got {embeddings.shape}")
    k = min(k, n)
    relevance = relevance.astype(np.float64)
    embeddings = embeddings.astype(np.float64)
    max_sim = np.zeros(n)                      # (N,) penalty of each row; 0 while nothing is chosen
    available = np.ones(n, dtype=bool)
    chosen: list[int] = []
    for _ in range(k):
        value = np.where(available, (1.0 - strength) * relevance - strength * max_sim, -np.inf)
        pick = int(np.argmax(value))           # first maximum = the more relevant of tied rows
        chosen.append(pick)
        available[pick] = False
        sims = embeddings @ embeddings[pick]   # (N, D) @ (D,) -> (N,)
        max_sim = sims if len(chosen) == 1 else np.maximum(max_sim, sims)
    return np.asarray(chosen, dtype=np.int64)
