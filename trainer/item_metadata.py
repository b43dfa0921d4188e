"""The display side of a version: item titles and genres, and each user's recent training interactions.

``write_item_metadata`` lays out the two files of ``recsys_contracts.item_metadata`` (their format's
owner) from the log's items table and the training interactions, aligned with the version's item
vocabulary. Items the table lacks, and every item of a log without one, get empty strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_contracts import item_metadata
from trainer.features import IdVocab


@dataclass(frozen=True, eq=False)
class DisplaySource:
    """What the metadata files are made from: the log's items table and the interactions the version knows
    (the whole log's, of its users and items)."""

    items: pd.DataFrame | None      # item_id, title, genres ("|"-separated); None = the log has none
    interactions: pd.DataFrame      # user_id, item_id, timestamp


def write_item_metadata(directory: Path, vocab: IdVocab, source: DisplaySource | None) -> None:
    """Writes ``item_metadata.parquet`` and ``recent_interactions.parquet`` into the version directory."""
    catalog = pd.DataFrame({"item_id": vocab.item_ids[1:]})
    if source is not None and source.items is not None:
        table = source.items[["item_id", "title", "genres"]].drop_duplicates("item_id")
        catalog = catalog.merge(table, on="item_id", how="left")   # keeps the vocabulary's order
    titles = catalog["title"].fillna("").astype(str).tolist() if "title" in catalog else [""] * len(catalog)
    genres = catalog["genres"].fillna("").astype(str).tolist() if "genres" in catalog else [""] * len(catalog)
    if source is None:
        recent = pd.DataFrame({"user_id": [], "item_id": np.zeros(0, np.int64), "timestamp": np.zeros(0, np.int64)})
    else:
        ordered = source.interactions[["user_id", "item_id", "timestamp"]].sort_values("timestamp", kind="stable")
        recent = ordered.groupby("user_id", sort=False).tail(item_metadata.RECENT_PER_USER)
    item_metadata.write_files(directory, item_ids=vocab.item_ids[1:], titles=titles, genres=genres,
                              recent_user_ids=recent["user_id"].astype(str).tolist(),
                              recent_item_ids=recent["item_id"].to_numpy(np.int64),
                              recent_timestamps=recent["timestamp"].to_numpy(np.int64))
