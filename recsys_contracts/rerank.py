"""The diversity re-rank the ranking service applies and the trainer evaluates: one definition.

``mmr_order`` is maximal marginal relevance: pick i maximising
``(1 - strength) * relevance_i - strength * max_{j chosen} cos(e_i, e_j)``; with nothing chosen the
penalty is 0, so the first pick is always the most relevant item; ties go to the earlier (more
relevant) candidate. strength 0 = the relevance order, 1 = each next item as far as possible from
the chosen ones. Embeddings are the version's item embeddings; cos is taken on them here (the pooled
and sequential towers' are unit vectors already, the autoencoder's [w_i, b_i] are not), and a zero
row is as far from every item as an orthogonal one.
It lives here because the trainer's report of its effect on NDCG and diversity is only true if
the service runs the very same function.
"""

from __future__ import annotations

import numpy as np


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
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = embeddings / np.where(norms > 0.0, norms, 1.0)     # rows of unit length (or zero)
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
