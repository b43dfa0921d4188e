"""benchmarks/item_copies.py: MovieLens 100K with each item split into copies, read back by the trainer's
own loader (the real ml-100k from the data folder; the copy lives in the test's temporary folder)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.item_copies import write_item_copies
from trainer.config import load_config
from trainer.data import data_dir_from_env
from trainer.prepare import load_dataset


@pytest.fixture(scope="module")
def ml100k():
    path = data_dir_from_env() / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip("MovieLens 100K is not in the data folder (RECSYS_DATA_DIR)")
    return path


def _load(path):
    return load_dataset(load_config(None, [f"data.dataset={path}"]))


def test_each_rating_moves_to_one_copy_of_its_item_and_each_copy_keeps_the_items_side_data(tmp_path, ml100k):
    original = _load(ml100k)
    copied = _load(write_item_copies(ml100k, tmp_path / "five", 5, seed=0))
    before, after = (d.interactions.sort_values(["timestamp", "user_id", "rating"]).reset_index(drop=True)
                     for d in (original, copied))
    assert len(after) == len(before) == 100_000
    # The same users, ratings and timestamps; each item now one of its five copies.
    assert (after["user_id"] == before["user_id"]).all() and (after["timestamp"] == before["timestamp"]).all()
    # Every user keeps exactly their items, each as one of its copies.
    def items_by_user(frame, item):
        return frame.assign(item=item).groupby("user_id")["item"].apply(lambda s: sorted(s.tolist())).to_dict()
    assert items_by_user(after, (after["item_id"] - 1) // 5 + 1) == items_by_user(before, before["item_id"])
    counts = copied.interactions["item_id"].value_counts()
    assert counts.index.nunique() > 4 * original.interactions["item_id"].nunique()   # the ratings spread
    # Five items per original one, each with its title marked and its genres.
    assert len(copied.items) == 5 * len(original.items)
    first = copied.items.set_index("item_id").loc[[1, 2, 3, 4, 5]]
    toy_story = original.items.set_index("item_id").loc[1]
    assert first["title"].tolist() == [f"{toy_story['title']} [copy {k}]" for k in range(1, 6)]
    assert (first["genres"] == toy_story["genres"]).all()
    assert copied.users is not None and len(copied.users) == len(original.users)


def test_the_split_is_seeded_and_one_copy_is_the_log_itself(tmp_path, ml100k):
    one = _load(write_item_copies(ml100k, tmp_path / "one", 1))
    assert np.array_equal(one.interactions["item_id"].to_numpy(), _load(ml100k).interactions["item_id"].to_numpy())
    a, b, c = (_load(write_item_copies(ml100k, tmp_path / name, 3, seed=seed)).interactions["item_id"].to_numpy()
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        write_item_copies(ml100k, tmp_path / "none", 0)
    with pytest.raises(FileNotFoundError, match="not a MovieLens 100K folder"):
        write_item_copies(tmp_path, tmp_path / "x", 2)
