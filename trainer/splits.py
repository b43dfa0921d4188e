"""Train / validation / test splits of an interaction log: the three evaluation protocols.

Every protocol first keep one interaction per (user, item), the latest (every rating counts as an
implicit positive, and full ranking excludes the items a user saw in train, so a pair must not sit
on both sides). Then, per user with n interactions: n_val = round(n * ratios[1]) and
n_test = round(n * ratios[2]) (rounding half up), the rest is train; users with fewer than 3
interactions go to train whole.

- ``random_split`` (1) "RecBole full ranking": each user's interactions in a random order drawn
  from ``seed``; deterministic for a seed and independent of the input's row order.
- ``temporal_split`` (2): each user's interactions by timestamp (ties by item id), so every
  train interaction is no later than the user's validation ones, which are no later than the test ones.
- ``leave_one_out_split`` (3) (SASRec, BERT4Rec): in the same time order, each user's last
  interaction is the test item and the one before the validation item, whatever n (users with
  fewer than 3 interactions go to train whole, as above).

Each part keeps the input's columns, sorted by (user_id, timestamp, item_id), with a fresh index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
MIN_INTERACTIONS_TO_HOLD_OUT = 3
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 2020
_TRAIN, _VAL, _TEST = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Split:
    """The three parts of an interaction log; ``seed`` is 0 for the temporal protocol, which draws nothing."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    protocol: str
    seed: int


def check_interactions(frame: pd.DataFrame, what: str) -> None:
    """Raises ValueError unless ``frame`` has the interaction log's columns (ARCHITECTURE.md)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} must have columns {list(REQUIRED_COLUMNS)}, missing {missing}")


def random_split(interactions: pd.DataFrame, *, seed: int = DEFAULT_SEED,
                 ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> Split:
    """Protocol (1): per-user random hold-out of the deduplicated interactions."""
    _check_ratios(ratios)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    frame = _latest_per_pair(interactions)  # sorted by (user_id, item_id): a canonical order
    keys = np.random.default_rng(seed).random(len(frame))  # (N,) drawn in the canonical order
    user_codes = pd.factorize(frame["user_id"], sort=True)[0]
    order = np.lexsort((keys, user_codes))  # per user, a random order
    return _split(frame.iloc[order], ratios, "random", seed)


def temporal_split(interactions: pd.DataFrame, *, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> Split:
    """Protocol (2): per user, the earliest interactions train, the latest test."""
    _check_ratios(ratios)
    frame = _latest_per_pair(interactions).sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    return _split(frame, ratios, "temporal", 0)


def leave_one_out_split(interactions: pd.DataFrame) -> Split:
    """Protocol (3): per user, the last interaction is test, the one before it validation."""
    frame = _latest_per_pair(interactions).sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    return _split(frame, None, "leave_one_out", 0)


PROTOCOLS = ("random", "temporal", "leave_one_out")


def split_by_name(name: str, interactions: pd.DataFrame, seed: int = DEFAULT_SEED) -> Split:
    """One of PROTOCOLS with the default ratios; ``seed`` only matters for "random"."""
    if name == "random":
        return random_split(interactions, seed=seed)
    if name == "temporal":
        return temporal_split(interactions)
    if name == "leave_one_out":
        return leave_one_out_split(interactions)
    raise ValueError(f"split name must be one of {PROTOCOLS}, got {name!r}")


def _check_ratios(ratios: tuple[float, float, float]) -> None:
    if (not isinstance(ratios, tuple) or len(ratios) != 3
            or not all(isinstance(r, int | float) and math.isfinite(r) and r >= 0 for r in ratios)
            or ratios[0] <= 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-9)):
        raise ValueError(f"ratios must be 3 finite numbers >= 0 with train > 0 summing to 1, got {ratios!r}")


def _latest_per_pair(interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per (user_id, item_id), the latest (ties by rating), sorted by (user_id, item_id)."""
    check_interactions(interactions, "interactions")
    ordered = interactions.sort_values(["user_id", "item_id", "timestamp", "rating"], kind="stable")
    return ordered.drop_duplicates(["user_id", "item_id"], keep="last")


def _split(frame: pd.DataFrame, ratios: tuple[float, float, float] | None, protocol: str, seed: int) -> Split:
    """``frame`` holds each user's rows contiguously, in hold-out order: train first, test last.
    ``ratios`` None holds out exactly one validation and one test row per eligible user."""
    users = frame["user_id"]
    position = users.groupby(users, sort=False).cumcount().to_numpy()  # (N,) 0-based within the user
    count = users.groupby(users, sort=False).transform("size").to_numpy()  # (N,)
    eligible = count >= MIN_INTERACTIONS_TO_HOLD_OUT
    if ratios is None:
        n_val = n_test = eligible.astype(np.int64)
    else:
        n_val = np.where(eligible, np.floor(count * ratios[1] + 0.5), 0).astype(np.int64)
        n_test = np.where(eligible, np.floor(count * ratios[2] + 0.5), 0).astype(np.int64)
    # Every user keeps at least one train interaction, whatever the ratios.
    n_val = np.minimum(n_val, count - 1)
    n_test = np.minimum(n_test, count - 1 - n_val)
    part = np.where(position < count - n_val - n_test, _TRAIN, np.where(position < count - n_test, _VAL, _TEST))
    parts = [_tidy(frame[part == p]) for p in (_TRAIN, _VAL, _TEST)]
    return Split(train=parts[0], val=parts[1], test=parts[2], protocol=protocol, seed=seed)


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
