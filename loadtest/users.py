"""Who the load asks about: the dataset's user and item ids, and Zipf-skewed user sampling.

Users are ranked by activity (interactions in ``u.data``, most active first, ties by id) and user
of rank r (1-based) is drawn with probability proportional to ``r ** -skew``: skew 0 is uniform,
skew 1 the classic Zipf law, so the hot users the feature store and caches see most are the heavy
raters, as in production. A share of requests asks about users the model has never seen (unique
ids with the ``UNKNOWN_PREFIX``), which takes the cold-start path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

UNKNOWN_PREFIX = "loadtest-unknown-"
# MovieLens 100K's item ids are 1..1682; a population given as a count of users uses this catalog.
DEFAULT_ITEM_COUNT = 1682


@dataclass(frozen=True, eq=False)
class Population:
    user_ids: tuple[str, ...]   # most active first
    item_ids: np.ndarray        # (M,) int64 catalog ids to put into Rank requests


def ratings_file(source: Path) -> Path:
    """``<source>/ml-100k/u.data`` or ``<source>/u.data``, whichever exists."""
    for candidate in (source / "ml-100k" / "u.data", source / "u.data"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"users_from must be a count or a directory holding ml-100k/u.data or u.data, "
                     f"got {str(source)!r}")


def load_population(users_from: str) -> Population:
    """From a count N: users '1'..'N' and items 1..1682; from a data directory: its users and items."""
    if users_from.isdigit():
        count = int(users_from)
        if count < 1:
            raise ValueError(f"users_from must be a count >= 1 or a data directory, got {users_from!r}")
        return Population(tuple(str(i) for i in range(1, count + 1)),
                          np.arange(1, DEFAULT_ITEM_COUNT + 1, dtype=np.int64))
    frame = pd.read_csv(ratings_file(Path(users_from)), sep="\t", header=None, usecols=[0, 1],
                        names=["user_id", "item_id"], dtype={"user_id": str, "item_id": np.int64})
    counts = frame["user_id"].value_counts()
    # Most active first; ties by id in numeric order for digit ids ("2" before "10").
    ranked = sorted(counts.items(), key=lambda pair: (-pair[1], len(pair[0]), pair[0]))
    return Population(tuple(user for user, _ in ranked), np.unique(frame["item_id"].to_numpy()))


def zipf_probabilities(n: int, skew: float) -> np.ndarray:
    """(n,) probabilities p_r proportional to r ** -skew for ranks r = 1..n."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (users to sample from), got {n!r}")
    if not (math.isfinite(skew) and skew >= 0):
        raise ValueError(f"skew must be a finite number >= 0, got {skew!r}")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -skew
    return weights / weights.sum()


class UserSampler:
    """Draws user ids: known users by Zipf rank, and a share of never-seen ids; seeded, reproducible."""

    def __init__(self, user_ids: tuple[str, ...], skew: float, unknown_share: float, seed: int) -> None:
        if not 0 <= unknown_share <= 1:
            raise ValueError(f"unknown_share must be in [0, 1], got {unknown_share!r}")
        self.user_ids = user_ids
        self.cdf = np.cumsum(zipf_probabilities(len(user_ids), skew))
        self.cdf[-1] = 1.0   # rounding could leave the last bucket just short of 1
        self.unknown_share = unknown_share
        self.rng = np.random.default_rng(seed)
        self._unknown = 0

    def rank_of(self, uniform: np.ndarray) -> np.ndarray:
        """0-based ranks for uniform draws in [0, 1): the first rank whose cumulative probability exceeds u."""
        return np.searchsorted(self.cdf, uniform, side="right")

    def sample(self, n: int) -> list[str]:
        ranks = self.rank_of(self.rng.random(n))
        unknown = self.rng.random(n) < self.unknown_share
        users = []
        for rank, is_unknown in zip(ranks.tolist(), unknown.tolist()):
            if is_unknown:
                self._unknown += 1
                users.append(f"{UNKNOWN_PREFIX}{self._unknown}")
            else:
                users.append(self.user_ids[rank])
        return users
