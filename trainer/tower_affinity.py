"""The user towers validation did not keep, as affinity channels of the ranker.

``retrieval.user_tower = "validated"`` trains two or three user towers and keeps one for retrieval. The
others are good models of the same users too, and they err differently: on ml-100k (random protocol,
EASE help off) a fixed blend of the autoencoder and the pooled tower's scores ranks validation users
at NDCG@10 0.268 against the kept autoencoder's 0.263. With ``ranking.tower_affinity`` each tower not
kept joins the ranker as one more affinity channel beside EASE's (``DCNRanker``'s factor tables): its
user x item scores on the training log as rank-r factors, so the served ranker program needs nothing
new, and the ranker's logistic start and training learn how much to trust it, as they do for EASE.

The factors are the scores' best rank-r approximation, exactly: a tower's scores are U V^T (users' and
items' vectors), so with V = Q R and the SVD of U R^T = A S B^T the item factors are Q B_r and the user
factors U R^T B_r. A user vector computed from another history (a fold's visible one) then maps to its
factor through the same R^T B_r (``TowerChannels.user_factors``), so the fold rows' affinities are
those of the same approximation. Towers whose vectors are at most r wide are kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.features import FeatureTables
from trainer.inputs import user_inputs
from trainer.retrieval_training import item_embeddings, user_embeddings


@dataclass(frozen=True, eq=False)
class TowerChannel:
    """One tower's channel: the model, the (d, r) map from its user vectors to user factors, every user's
    factors from the stored (training) history (n+1, r), and its item factors (m+1, r) (row 0, the
    padding item, zero)."""

    name: str
    model: torch.nn.Module
    projection: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray


@dataclass(frozen=True, eq=False)
class TowerChannels:
    """The channels of the towers not kept, in the order they join the ranker's tables."""

    channels: tuple[TowerChannel, ...]
    rank: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    def __len__(self) -> int:
        return len(self.channels)

    @torch.no_grad()
    def user_factors(self, tables: FeatureTables, users: np.ndarray, timestamps: np.ndarray, device: torch.device,
                     history: np.ndarray | None = None) -> np.ndarray:
        """(B, C * rank) the users' factors, each channel's from its tower's user vector of the users' stored
        history, or of ``history`` (B, H) when given."""
        inputs = user_inputs(tables, users, timestamps, device, history=history)
        return np.concatenate([channel.model.user_tower(**inputs).cpu().numpy().astype(np.float64) @ channel.projection
                               for channel in self.channels], axis=1).astype(np.float32)

    def item_factors(self) -> np.ndarray:
        """(m+1, C * rank) every item's factors, channel blocks side by side."""
        return np.concatenate([c.item_factors for c in self.channels], axis=1)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The ranker's factor tables of these channels: every user's factors from the stored (training)
        history (n+1, C * rank), and the items' (m+1, C * rank)."""
        return (np.concatenate([c.user_factors for c in self.channels], axis=1), self.item_factors())

    @staticmethod
    def raw(user_factors: np.ndarray, item_factors: np.ndarray, rank: int) -> np.ndarray:
        """(R, C) each row's affinity per channel from aligned factor rows (R, C * rank)."""
        product = user_factors * item_factors
        return product.reshape(product.shape[0], -1, rank).sum(axis=2)


# Factor floats gathered at once per table by ``factor_dots`` (32 MB of float32).
FACTOR_CELLS_PER_BATCH = 1 << 23


def factor_dots(user_factors: np.ndarray, item_factors: np.ndarray, users: np.ndarray, items: np.ndarray,
                rank: int, cells_per_batch: int = FACTOR_CELLS_PER_BATCH) -> np.ndarray:
    """(R, C) row r's affinity per channel: ``TowerChannels.raw`` of user ``users[r]``'s and item ``items[r]``'s
    rows of the factor tables (n, C * ``rank``), gathered a batch of at most ``cells_per_batch`` floats at a
    time. Each row's sums are the same as in one batch, but (R, C * rank) floats are never held at once (a fold
    of the ml-1m-shaped log, ~235k rows, at EASE's two channels of rank 256: ~0.5 GB per gathered table and as
    much for their product)."""
    width = user_factors.shape[1]
    out = np.empty((users.size, width // rank), np.result_type(user_factors, item_factors))
    step = max(1, cells_per_batch // max(width, 1))
    for start in range(0, users.size, step):
        sl = slice(start, start + step)
        out[sl] = TowerChannels.raw(user_factors[users[sl]], item_factors[items[sl]], rank)
    return out


def low_rank_map(user_vectors: np.ndarray, item_vectors: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(projection (d, rank), item factors (m, rank)) of the best rank-``rank`` approximation of the scores
    ``user_vectors @ item_vectors.T``; user factors = user vectors @ projection. Columns past the
    scores' own rank are zero."""
    users, items = np.asarray(user_vectors, np.float64), np.asarray(item_vectors, np.float64)
    q, r = np.linalg.qr(items)                                    # items = q r, q (m, d') orthonormal
    _, _, bt = np.linalg.svd(users @ r.T, full_matrices=False)     # users r^T = a s b^T
    keep = bt[:rank].T                                             # (d', k), k <= rank
    projection = np.zeros((users.shape[1], rank))
    item_factors = np.zeros((items.shape[0], rank))
    projection[:, :keep.shape[1]] = r.T @ keep
    item_factors[:, :keep.shape[1]] = q @ keep
    return projection, item_factors


@torch.no_grad()
def tower_channels(towers: Sequence[tuple[str, torch.nn.Module]], tables: FeatureTables, timestamps: np.ndarray,
                   rank: int, device: torch.device, batch_size: int = 4096) -> TowerChannels:
    """A channel per tower of ``towers`` (name, two-tower model): the rank-``rank`` map of its scores on the
    training log's users (stored histories at ``timestamps``, (n+1,) by user index) and items, and every
    user's factors through it."""
    channels = []
    users = np.arange(tables.vocab.n_users + 1)                 # row 0, the unknown user, is not fitted on
    for name, model in towers:
        model.eval()
        vectors = np.concatenate([user_embeddings(model, tables, users[s:s + batch_size],
                                                  timestamps[s:s + batch_size], device).cpu().numpy()
                                  for s in range(0, users.size, batch_size)]).astype(np.float64)
        items = item_embeddings(model, tables, device).cpu().numpy()            # (m+1, D), row 0 padding
        projection, factors = low_rank_map(vectors[1:], items[1:], rank)
        channels.append(TowerChannel(name, model, projection, (vectors @ projection).astype(np.float32),
                                     np.concatenate([np.zeros((1, rank)), factors]).astype(np.float32)))
    return TowerChannels(tuple(channels), rank)


__all__ = ["TowerChannel", "TowerChannels", "low_rank_map", "tower_channels"]
