"""Choosing the final list: a running top-k over scored chunks; the MMR diversity re-rank is
``recsys_contracts.rerank.mmr_order`` (shared with the trainer, which reports its trade-off).

``RunningTopK`` keeps the best ``capacity`` candidates seen so far, ordered by score, ties broken
by arrival (earlier = better retrieval rank); it never holds more than ``capacity`` rows plus one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys_contracts.rerank import mmr_order

__all__ = ["Scored", "RunningTopK", "best_first", "mmr_order"]


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
