"""The item metadata files of a version (recsys_contracts.item_metadata): written by the trainer's
module, read back aligned with the version's item index; absent files read as empty; misaligned refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_contracts import item_metadata
from trainer.features import IdVocab
from trainer.item_metadata import DisplaySource, write_item_metadata

VOCAB = IdVocab(user_ids=np.array(["", "a", "b"]), item_ids=np.array([-1, 30, 10, 20], dtype=np.int64))


def _source(items: pd.DataFrame | None) -> DisplaySource:
    train = pd.DataFrame({"user_id": ["a", "b", "a", "a"], "item_id": [10, 20, 30, 20],
                          "timestamp": [300, 100, 100, 200]})
    return DisplaySource(items=items, interactions=train)


def test_round_trip_in_index_order_with_empty_strings_for_missing_items(tmp_path):
    items = pd.DataFrame({"item_id": [10, 30, 99], "title": ["Ten", "Thirty", "Not in the version"],
                          "genres": ["Drama|War", "", "Comedy"]})
    write_item_metadata(tmp_path, VOCAB, _source(items))
    metadata = item_metadata.load(tmp_path, VOCAB.item_ids)
    # index 1 = item 30, 2 = item 10, 3 = item 20 (not in the items table), 0 = unknown
    assert metadata.describe(np.array([1, 2, 3, 0])) == [("Thirty", []), ("Ten", ["Drama", "War"]), ("", []), ("", [])]
    recent = metadata.recent("a", 2)                       # newest first, the last 2 of a's 3
    assert recent.item_ids.tolist() == [10, 20] and recent.timestamps.tolist() == [300, 200]
    assert metadata.recent("b", 5).item_ids.tolist() == [20]
    assert metadata.recent("nobody", 5).item_ids.size == 0 and metadata.recent("a", 0).item_ids.size == 0


def test_a_log_without_items_gets_empty_titles(tmp_path):
    write_item_metadata(tmp_path, VOCAB, _source(None))
    assert item_metadata.load(tmp_path, VOCAB.item_ids).describe(np.array([1, 2, 3])) == [("", [])] * 3


def test_a_version_without_the_files_loads_empty(tmp_path):
    metadata = item_metadata.load(tmp_path, VOCAB.item_ids)
    assert metadata.describe(np.array([1])) == [("", [])] and metadata.recent("a", 5).item_ids.size == 0


def test_recent_keeps_at_most_recent_per_user(tmp_path):
    n = item_metadata.RECENT_PER_USER + 7
    train = pd.DataFrame({"user_id": ["a"] * n, "item_id": np.full(n, 10), "timestamp": np.arange(n)})
    write_item_metadata(tmp_path, VOCAB, DisplaySource(None, train))
    recent = item_metadata.load(tmp_path, VOCAB.item_ids).recent("a", 10_000)
    assert recent.timestamps.tolist() == list(range(n - 1, 6, -1))


def test_misaligned_items_are_refused(tmp_path):
    write_item_metadata(tmp_path, VOCAB, _source(None))
    with pytest.raises(ValueError, match="item_metadata.parquet must list the version's 2 items in index order"):
        item_metadata.load(tmp_path, np.array([-1, 30, 10], dtype=np.int64))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": ["b", "a"], "item_id": [10, 20], "timestamp": [1, 2]}),
                   tmp_path / item_metadata.RECENT_FILE)
    with pytest.raises(ValueError, match="recent_interactions.parquet must be sorted by user_id"):
        item_metadata.load(tmp_path, VOCAB.item_ids)
    with pytest.raises(ValueError, match="titles and genres must hold one entry per item"):
        item_metadata.write_files(tmp_path, item_ids=np.array([1, 2]), titles=["x"], genres=["y"],
                                  recent_user_ids=[], recent_item_ids=np.zeros(0), recent_timestamps=np.zeros(0))
