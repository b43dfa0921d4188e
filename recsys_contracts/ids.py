"""Item-id arithmetic both services apply per request, vectorised with numpy.

``ItemLookup`` maps external item ids to one version's item indices (0 = not in the catalog);
``sorted_unique`` and ``in_sorted`` are ``np.unique`` and ``np.isin`` for the few hundred ids a
request holds, kept sorted: one sort or one binary search each, ~2-3x cheaper than numpy's own
(hash or table based) at that size.
"""

from __future__ import annotations

import numpy as np

# Error messages and logs quote at most this many characters of a bad value (plus its length):
# a 1 MB user id must not become a 1 MB log line, or a gRPC status over the metadata limit.
QUOTE_CHARS = 64


def excerpt(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters, with the full length when it was cut."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class ItemLookup:
    """External item ids -> item indices of one version, vectorised (0 for ids outside the catalog)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        known = np.asarray(item_ids[1:], dtype=np.int64)          # (m,) row 0 is the OOV row
        self._order = np.argsort(known, kind="stable")            # (m,)
        self._sorted = known[self._order]                        # (m,)

    def indices(self, ids: np.ndarray) -> np.ndarray:
        """(N,) int64 external ids -> (N,) int64 indices, 0 where unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorted.size == 0 or ids.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ids), self._sorted.size - 1)  # (N,)
        found = self._sorted[pos] == ids
        return np.where(found, self._order[pos] + 1, 0).astype(np.int64, copy=False)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D array, ascending (what ``np.unique`` returns), by one sort."""
    ordered = np.sort(values)                                     # (n,)
    if ordered.size < 2:
        return ordered
    distinct = np.empty(ordered.size, dtype=bool)
    distinct[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=distinct[1:])     # first of each run
    return ordered[distinct]


def in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """(N,) bool: which ``values`` occur in ``sorted_values`` (ascending), as ``np.isin`` answers."""
    if sorted_values.size == 0:
        return np.zeros(np.shape(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)   # (N,)
    return sorted_values[pos] == values
