"""What a Recommend returns for people to read, when asked: item titles and genres, the user's history.

``RecommendOptions.include_item_metadata`` fills each item's title and genres from the served
version's metadata table (``recsys_contracts.item_metadata``); ``RecommendOptions.history_size``
adds the user's most recent interactions, newest first: the version's recent training
interactions merged with those recorded since (Redis, else the in-process store). Neither changes
which items are recommended; a history read that fails leaves only the training part.
"""

from __future__ import annotations

import numpy as np

from ranking_service.features import FeatureStore
from ranking_service.state import ServingState
from recsys_contracts.item_metadata import RECENT_PER_USER
from recsys_contracts.v1 import ranking_pb2


def history_size(options: ranking_pb2.RecommendOptions) -> int:
    if not 0 <= options.history_size <= RECENT_PER_USER:
        raise ValueError(f"options.history_size must be in [0, {RECENT_PER_USER}], got {options.history_size}")
    return options.history_size


def describe(state: ServingState, items) -> None:
    """Fills ``title`` and ``genres`` of each ``ScoredItem`` / ``HistoryItem`` in place."""
    idx = state.items.indices(np.fromiter((item.item_id for item in items), np.int64, len(items)))
    for item, (title, genres) in zip(items, state.metadata.describe(idx)):
        item.title = title
        item.genres.extend(genres)


async def history(features: FeatureStore, state: ServingState, user_id: str,
                  size: int) -> list[ranking_pb2.HistoryItem]:
    """The user's last ``size`` interactions (training log + recorded since), newest first, described."""
    past = state.metadata.recent(user_id, size)
    entries = [(int(t), int(i), False) for i, t in zip(past.item_ids.tolist(), past.timestamps.tolist())]
    read = await features.read_user(state.version, user_id)
    if read.record is not None:
        entries += [(f.timestamp, f.item_id, True) for f in read.record.fresh]
    # newest first; at equal times a recorded interaction (later in the log) comes first
    entries.sort(key=lambda entry: (entry[0], entry[2]), reverse=True)
    items = [ranking_pb2.HistoryItem(item_id=item_id, timestamp_s=timestamp, fresh=fresh)
             for timestamp, item_id, fresh in entries[:size]]
    describe(state, items)
    return items
