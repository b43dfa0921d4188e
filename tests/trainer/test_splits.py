"""Tests of trainer.splits: the protocols' determinism, disjointness, proportions and order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trainer.splits import leave_one_out_split, random_split, split_by_name, temporal_split


def make_log(counts: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """``counts[user]`` distinct items per user, random ratings and timestamps."""
    rng = np.random.default_rng(seed)
    rows = [(user, int(item), float(rng.integers(1, 6)), int(rng.integers(0, 10**9)))
            for user, n in counts.items() for item in rng.choice(10_000, size=n, replace=False)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return frame.astype({"user_id": "str", "item_id": "int64", "rating": "float32", "timestamp": "int64"})


def pairs(frame: pd.DataFrame) -> set[tuple[str, int]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


def per_user(frame: pd.DataFrame) -> dict[str, int]:
    return frame.groupby("user_id").size().to_dict()


@pytest.fixture
def log() -> pd.DataFrame:
    return make_log({"a": 10, "b": 5, "c": 2, "d": 3, "e": 25, "f": 15, "g": 40})


@pytest.mark.parametrize("split", [random_split, temporal_split])
def test_per_user_proportions(log, split):
    parts = split(log)
    # n -> (train, val, test) with round half up: 10 -> 1, 1; 5 -> 0.5 -> 1, 1; 3 -> 0.3 -> 0, 0;
    # 25 -> 2.5 -> 3, 3; 15 -> 1.5 -> 2, 2; 40 -> 4, 4; fewer than 3 -> all train
    expected = {"a": (8, 1, 1), "b": (3, 1, 1), "c": (2, 0, 0), "d": (3, 0, 0),
                "e": (19, 3, 3), "f": (11, 2, 2), "g": (32, 4, 4)}
    train, val, test = per_user(parts.train), per_user(parts.val), per_user(parts.test)
    assert {u: (train.get(u, 0), val.get(u, 0), test.get(u, 0)) for u in expected} == expected


@pytest.mark.parametrize("split", [random_split, temporal_split])
def test_parts_are_disjoint_and_cover_the_log(log, split):
    parts = split(log)
    train, val, test = pairs(parts.train), pairs(parts.val), pairs(parts.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == pairs(log)
    assert len(parts.train) + len(parts.val) + len(parts.test) == len(log)
    assert list(parts.train.columns) == list(log.columns)
    assert list(parts.test.index) == list(range(len(parts.test)))


def test_random_split_is_deterministic_and_independent_of_row_order(log):
    first = random_split(log, seed=7)
    shuffled = log.sample(frac=1.0, random_state=3)
    again = random_split(shuffled, seed=7)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name))
    assert (first.protocol, first.seed) == ("random", 7)


def test_random_split_depends_on_the_seed(log):
    assert pairs(random_split(log, seed=1).test) != pairs(random_split(log, seed=2).test)


def test_random_split_is_not_temporal():
    # With 40 users x 20 interactions a random hold-out puts some test rows before train rows.
    parts = random_split(make_log({f"u{i}": 20 for i in range(40)}))
    last_train = parts.train.groupby("user_id")["timestamp"].max()
    first_test = parts.test.groupby("user_id")["timestamp"].min()
    assert (first_test < last_train.loc[first_test.index]).any()


def test_temporal_split_respects_time_per_user(log):
    parts = temporal_split(log)
    last_train = parts.train.groupby("user_id")["timestamp"].max()
    val = parts.val.groupby("user_id")["timestamp"]
    test = parts.test.groupby("user_id")["timestamp"]
    assert (last_train.loc[val.min().index] <= val.min()).all()
    assert (val.max() <= test.min().loc[val.max().index]).all()
    assert (parts.protocol, parts.seed) == ("temporal", 0)


def test_temporal_split_breaks_timestamp_ties_by_item_id():
    log = pd.DataFrame({"user_id": ["u"] * 10, "item_id": np.arange(10, 0, -1, dtype=np.int64),
                        "rating": np.float32(3.0), "timestamp": np.int64(5)})
    parts = temporal_split(log)
    assert parts.val["item_id"].tolist() == [9] and parts.test["item_id"].tolist() == [10]
    pd.testing.assert_frame_equal(temporal_split(log.iloc[::-1]).test, parts.test)


@pytest.mark.parametrize("split", [random_split, temporal_split])
def test_duplicates_keep_the_latest_interaction(split):
    log = make_log({"u": 10})
    first = log.iloc[0]
    earlier = first.to_dict() | {"timestamp": int(first["timestamp"]) - 1, "rating": 1.0}
    later = first.to_dict() | {"timestamp": int(first["timestamp"]) + 1, "rating": 5.0}
    doubled = pd.concat([log, pd.DataFrame([earlier, later]).astype(log.dtypes.to_dict())], ignore_index=True)
    parts = split(doubled)
    everything = pd.concat([parts.train, parts.val, parts.test])
    kept = everything[everything["item_id"] == first["item_id"]]
    assert len(everything) == 10 and kept["timestamp"].tolist() == [int(first["timestamp"]) + 1]
    assert kept["rating"].tolist() == [5.0]


def test_custom_ratios_keep_one_train_interaction_per_user():
    parts = random_split(make_log({"a": 4, "b": 100}), ratios=(0.2, 0.4, 0.4))
    # a: 1.6 -> 2 val, then test capped at 4 - 1 - 2 = 1; b: 40 / 40
    assert per_user(parts.train) == {"a": 1, "b": 20}
    assert per_user(parts.val) == {"a": 2, "b": 40} and per_user(parts.test) == {"a": 1, "b": 40}


def test_split_by_name(log):
    assert split_by_name("random", log, 5).seed == 5
    pd.testing.assert_frame_equal(split_by_name("temporal", log, 5).test, temporal_split(log).test)
    pd.testing.assert_frame_equal(split_by_name("leave_one_out", log).val, leave_one_out_split(log).val)
    with pytest.raises(ValueError, match=r"split name must be one of \('random', 'temporal', 'leave_one_out'\), "
                                         r"got 'loo'"):
        split_by_name("loo", log, 5)


def test_leave_one_out_holds_out_each_users_last_two_interactions(log):
    parts = leave_one_out_split(log)
    # Users with >= 3 interactions give exactly one validation and one test row; c (2) trains whole.
    assert per_user(parts.val) == per_user(parts.test) == {u: 1 for u in "abdefg"}
    assert per_user(parts.train) == {"a": 8, "b": 3, "c": 2, "d": 1, "e": 23, "f": 13, "g": 38}
    for user, rows in log.groupby("user_id"):
        ordered = rows.sort_values(["timestamp", "item_id"])["item_id"].tolist()
        if user != "c":
            assert parts.test[parts.test["user_id"] == user]["item_id"].tolist() == ordered[-1:]
            assert parts.val[parts.val["user_id"] == user]["item_id"].tolist() == ordered[-2:-1]
    assert (parts.protocol, parts.seed) == ("leave_one_out", 0)


@pytest.mark.parametrize("ratios", [(0.8, 0.1), (0.8, 0.1, 0.2), (0.0, 0.5, 0.5), (1.1, -0.05, -0.05),
                                    [0.8, 0.1, 0.1], (0.8, float("nan"), 0.1)])
@pytest.mark.parametrize("split", [random_split, temporal_split])
def test_bad_ratios_are_rejected(log, split, ratios):
    with pytest.raises(ValueError, match=r"ratios must be 3 finite numbers >= 0 with train > 0 summing to 1, got"):
        split(log, ratios=ratios)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_rejected(log, seed):
    with pytest.raises(ValueError, match=f"seed must be an int >= 0, got {seed!r}"):
        random_split(log, seed=seed)


@pytest.mark.parametrize("split", [random_split, temporal_split])
def test_missing_columns_are_rejected(log, split):
    with pytest.raises(ValueError, match=r"interactions must have columns .*, missing \['timestamp'\]"):
        split(log.drop(columns="timestamp"))


def test_ml100k_random_split(ml100k_dir):
    log = pd.read_csv(ml100k_dir / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    log = log.astype({"user_id": "str", "item_id": "int64", "rating": "float32", "timestamp": "int64"})
    parts = random_split(log)
    counts = log.groupby("user_id").size()
    expected = np.floor(counts * 0.1 + 0.5).astype(int)
    pd.testing.assert_series_equal(parts.test.groupby("user_id").size(), expected, check_names=False)
    pd.testing.assert_series_equal(parts.val.groupby("user_id").size(), expected, check_names=False)
    assert len(parts.train) + len(parts.val) + len(parts.test) == 100_000
    temporal = temporal_split(log)
    assert (temporal.train.groupby("user_id")["timestamp"].max()
            <= temporal.test.groupby("user_id")["timestamp"].min()).all()
