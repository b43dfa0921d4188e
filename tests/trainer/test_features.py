"""Tests of trainer.features: id vocabularies, spec fitting, feature tables, temporal features."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest

from recsys_contracts.feature_spec import FeatureSpec
from trainer.features import (
    FeatureTables,
    IdVocab,
    build_tables,
    fit_feature_spec,
    fit_id_vocab,
    temporal_features,
    with_known,
    with_known_rows,
)
from trainer.splits import Split, random_split


def interactions(rows: list[tuple[str, int, float, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return frame.astype({"user_id": "str", "item_id": "int64", "rating": "float32", "timestamp": "int64"})


@pytest.fixture
def train() -> pd.DataFrame:
    return interactions([
        ("u2", 10, 4.0, 100), ("u2", 30, 2.0, 300), ("u2", 20, 3.0, 200), ("u2", 40, 5.0, 300),
        ("u1", 10, 5.0, 50), ("u1", 20, 1.0, 60),
    ])


@pytest.fixture
def users() -> pd.DataFrame:
    # u9 never appears in train: its occupation and age must not leak into the spec.
    return pd.DataFrame({"user_id": ["u1", "u2", "u9"], "age": [20.0, 40.0, 99.0],
                         "occupation": ["writer", None, "astronaut"]}).astype({"user_id": "str"})


@pytest.fixture
def items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [10, 20, 30, 40, 99], "title": ["a", "b", "c", "d", "z"],
                         "genres": ["Drama|Comedy", "Comedy", None, "Action", "Space"],
                         "year": [1990.0, 2000.0, np.nan, 2010.0, 3000.0]})


def assert_tables_equal(a: FeatureTables, b: FeatureTables) -> None:
    np.testing.assert_array_equal(a.vocab.user_ids, b.vocab.user_ids)
    np.testing.assert_array_equal(a.vocab.item_ids, b.vocab.item_ids)
    for f in fields(FeatureTables):
        if f.name != "vocab":
            np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name)
            assert getattr(a, f.name).dtype == getattr(b, f.name).dtype


# --- IdVocab -------------------------------------------------------------------------------------

def test_fit_id_vocab_sorted_behind_the_oov_row(train):
    vocab = fit_id_vocab(train)
    np.testing.assert_array_equal(vocab.user_ids, ["", "u1", "u2"])
    np.testing.assert_array_equal(vocab.item_ids, [-1, 10, 20, 30, 40])
    assert vocab.item_ids.dtype == np.int64 and (vocab.n_users, vocab.n_items) == (2, 4)


def test_ids_to_idx_maps_unknown_and_missing_to_zero(train):
    vocab = fit_id_vocab(train)
    idx = vocab.users_to_idx(np.array(["u2", "nobody", None, "", "u1"], dtype=object))
    np.testing.assert_array_equal(idx, [2, 0, 0, 0, 1])
    np.testing.assert_array_equal(vocab.users_to_idx(pd.Series(["u1"])), [1])
    np.testing.assert_array_equal(vocab.items_to_idx(np.array([40, 11, -1, 10])), [4, 0, 0, 1])
    assert idx.dtype == np.int64 and vocab.items_to_idx([10]).dtype == np.int64


@pytest.mark.parametrize(("user_ids", "item_ids", "message"), [
    (np.array(["u1"]), np.array([-1], dtype=np.int64), "user_ids must be a 1-d str array with row 0 = ''"),
    (np.array([0, 1]), np.array([-1], dtype=np.int64), "user_ids must be a 1-d str array with row 0 = ''"),
    (np.array(["", "a", "a"]), np.array([-1], dtype=np.int64), "user_ids must be unique and non-empty after row 0"),
    (np.array(["", ""]), np.array([-1], dtype=np.int64), "user_ids must be unique and non-empty after row 0"),
    (np.array([""]), np.array([0, 1], dtype=np.int64), "item_ids must be a 1-d int64 array with row 0 = -1"),
    (np.array([""]), np.array([-1, 1], dtype=np.int32), "item_ids must be a 1-d int64 array with row 0 = -1"),
    (np.array([""]), np.array([-1, 3, 3], dtype=np.int64), "item_ids must be unique and >= 0 after row 0"),
    (np.array([""]), np.array([-1, -2], dtype=np.int64), "item_ids must be unique and >= 0 after row 0"),
])
def test_id_vocab_validation(user_ids, item_ids, message):
    with pytest.raises(ValueError, match=message):
        IdVocab(user_ids=user_ids, item_ids=item_ids)


def test_fit_id_vocab_rejects_bad_interactions(train):
    with pytest.raises(ValueError, match=r"train must have columns .*, missing \['rating'\]"):
        fit_id_vocab(train.drop(columns="rating"))
    with pytest.raises(ValueError, match="train.user_id must hold str values, got dtype int64"):
        fit_id_vocab(train.assign(user_id=7))
    with pytest.raises(ValueError, match="train.user_id must hold str values"):
        fit_id_vocab(train.assign(user_id=["u1", None, "u2", "u2", "u1", "u1"]))
    with pytest.raises(ValueError, match="train.item_id must hold int64 values >= 0, got dtype int64, min -5"):
        fit_id_vocab(train.assign(item_id=[-5, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="train.item_id must hold int64 values >= 0"):
        fit_id_vocab(train.assign(item_id=1.5))


# --- fit_feature_spec ----------------------------------------------------------------------------

def test_fit_feature_spec_uses_train_users_and_items_only(train, users, items):
    spec = fit_feature_spec(train, users, items, history_length=3)
    assert [c.name for c in spec.user_categorical] == ["occupation"]
    assert spec.user_categorical[0].vocabulary == ("writer",)  # u9's "astronaut" is not in train
    assert [c.name for c in spec.user_numeric] == ["mean_rating", "rating_std", "log_count", "age"]
    assert [c.transform for c in spec.user_numeric] == ["identity", "identity", "log1p", "identity"]
    assert spec.item_categorical == ()
    assert spec.item_genres == ("Action", "Comedy", "Drama")  # item 99's "Space" is not in train
    assert [c.name for c in spec.item_numeric] == ["log_popularity", "mean_rating", "year"]
    assert (spec.n_users, spec.n_items, spec.history_length) == (2, 4, 3)
    assert (spec.rating_min, spec.rating_max) == (1.0, 5.0)


def test_fit_feature_spec_scalers_are_hand_computed(train, users, items):
    spec = fit_feature_spec(train, users, items)
    by_name = {c.name: c for c in spec.user_numeric}
    # u1 ratings (5, 1): mean 3, std 2; u2 ratings (4, 2, 3, 5): mean 3.5, std sqrt(1.25)
    assert by_name["mean_rating"].mean == pytest.approx(3.25)
    assert by_name["mean_rating"].std == pytest.approx(0.25)
    assert by_name["rating_std"].mean == pytest.approx((2 + np.sqrt(1.25)) / 2)
    # counts 2 and 4 -> log1p: log 3 and log 5
    assert by_name["log_count"].mean == pytest.approx((np.log(3) + np.log(5)) / 2)
    assert by_name["age"].mean == pytest.approx(30.0) and by_name["age"].std == pytest.approx(10.0)
    item = {c.name: c for c in spec.item_numeric}
    # item counts 10: 2, 20: 2, 30: 1, 40: 1; years 1990, 2000, (missing), 2010
    assert item["log_popularity"].mean == pytest.approx((2 * np.log(3) + 2 * np.log(2)) / 4)
    assert item["year"].mean == pytest.approx(2000.0)
    assert item["year"].std == pytest.approx(np.sqrt(200 / 3))


def test_fit_feature_spec_without_side_tables(train):
    spec = fit_feature_spec(train, None, None)
    assert spec.user_cat_dim == 0 and spec.item_cat_dim == 0 and spec.item_genres == ()
    assert [c.name for c in spec.user_numeric] == ["mean_rating", "rating_std", "log_count"]
    assert [c.name for c in spec.item_numeric] == ["log_popularity", "mean_rating"]


def test_fit_feature_spec_all_missing_column_gets_zero_scaler(train, users):
    spec = fit_feature_spec(train, users.assign(age=np.nan), None)
    age = next(c for c in spec.user_numeric if c.name == "age")
    assert (age.mean, age.std) == (0.0, 0.0)


def test_fit_feature_spec_rejects_empty_train(train):
    with pytest.raises(ValueError, match="train must hold at least one interaction, got 0 rows"):
        fit_feature_spec(train.iloc[:0], None, None)


def test_fit_feature_spec_rejects_bad_side_tables(train, users, items):
    with pytest.raises(ValueError, match=r"users column 'mean_rating' clashes with a derived statistic"):
        fit_feature_spec(train, users.assign(mean_rating=1.0), items)
    with pytest.raises(ValueError, match="items column 'released' must be numeric or string, got dtype datetime64"):
        fit_feature_spec(train, users, items.assign(released=pd.Timestamp("1995-01-01")))
    with pytest.raises(ValueError, match=r"side table must have one row per user_id, got duplicates \['u1'\]"):
        fit_feature_spec(train, pd.concat([users, users.iloc[:1]]), items)
    with pytest.raises(ValueError, match="side table must have a 'item_id' column"):
        fit_feature_spec(train, users, items.rename(columns={"item_id": "movie_id"}))


# --- build_tables --------------------------------------------------------------------------------

def test_build_tables_hand_computed(train, users, items):
    spec = fit_feature_spec(train, users, items, history_length=3)
    vocab = fit_id_vocab(train)
    tables = build_tables(spec, vocab, train, users, items)
    # users: 1 = u1, 2 = u2; items: 1 = 10, 2 = 20, 3 = 30, 4 = 40
    # u2 by time: 10@100, 20@200, 30@300, 40@300 (tie broken by item): last 3, oldest first
    np.testing.assert_array_equal(tables.history, [[0, 0, 0], [0, 1, 2], [2, 3, 4]])
    np.testing.assert_array_equal(tables.seen_indptr, [0, 0, 2, 6])
    np.testing.assert_array_equal(tables.seen_items, [1, 2, 1, 2, 3, 4])
    np.testing.assert_array_equal(tables.item_counts, [0, 2, 2, 1, 1])
    np.testing.assert_array_equal(tables.popular_items, [1, 2, 3, 4])
    np.testing.assert_array_equal(tables.user_cat, [[0], [1], [0]])  # u2's occupation is missing
    np.testing.assert_array_equal(tables.user_cat[0], spec.default_user_row()[0])
    np.testing.assert_array_equal(tables.user_num[0], spec.default_user_row()[1])
    np.testing.assert_array_equal(tables.item_num[0], spec.default_item_row()[1])
    # user_num columns: mean_rating, rating_std, log_count, age; mean_rating (3 - 3.25) / 0.25 = -1
    assert tables.user_num[1, 0] == pytest.approx(-1.0) and tables.user_num[2, 0] == pytest.approx(1.0)
    assert tables.user_num[1, 3] == pytest.approx(-1.0)  # age (20 - 30) / 10
    # item_num: flags (Action, Comedy, Drama), log_popularity, mean_rating, year (missing for item 30)
    np.testing.assert_array_equal(tables.item_num[1:, :3], [[0, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert tables.item_num[3, 5] == 0.0
    assert tables.user_num.shape == (3, spec.user_num_dim) and tables.item_num.shape == (5, spec.item_num_dim)
    assert tables.item_cat.shape == (5, 0)


def test_build_tables_ignores_unknown_users_and_items(train, users, items):
    spec = fit_feature_spec(train, users, items, history_length=3)
    vocab = fit_id_vocab(train)
    state = pd.concat([train, interactions([("u9", 10, 1.0, 999), ("u1", 99, 1.0, 999)])], ignore_index=True)
    assert_tables_equal(build_tables(spec, vocab, state, users, items), build_tables(spec, vocab, train, users, items))


def test_build_tables_popularity_order_and_users_without_state(train, users, items):
    spec = fit_feature_spec(train, users, items, history_length=2)
    vocab = fit_id_vocab(train)
    state = interactions([("u2", 40, 1.0, 5), ("u2", 30, 1.0, 6), ("u2", 40, 2.0, 7)])  # 40 twice
    tables = build_tables(spec, vocab, state, users, items)
    np.testing.assert_array_equal(tables.popular_items, [4, 3, 1, 2])
    np.testing.assert_array_equal(tables.item_counts, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(tables.history, [[0, 0], [0, 0], [3, 4]])
    np.testing.assert_array_equal(tables.seen_indptr, [0, 0, 0, 2])
    np.testing.assert_array_equal(tables.seen_items, [3, 4])
    # u1 has no interactions in state: mean rating and std missing -> 0 (the training mean)
    assert tables.user_num[1, 0] == 0.0 and tables.user_num[1, 1] == 0.0


def test_build_tables_rejects_a_vocab_of_another_spec(train, users, items):
    spec = fit_feature_spec(train, users, items)
    vocab = fit_id_vocab(train.iloc[:4])
    with pytest.raises(ValueError, match="vocab must match the spec's 2 users and 4 items, got 1 users and 4 items"):
        build_tables(spec, vocab, train, users, items)
    with pytest.raises(ValueError, match=r"state must have columns .*, missing \['timestamp'\]"):
        build_tables(spec, fit_id_vocab(train), train.drop(columns="timestamp"), users, items)


def test_tables_save_load_round_trip(tmp_path, train, users, items):
    spec = fit_feature_spec(train, users, items)
    tables = build_tables(spec, fit_id_vocab(train), train, users, items)
    tables.save(tmp_path / "v1")
    assert (tmp_path / "v1" / "user_ids.parquet").exists() and (tmp_path / "v1" / "item_ids.npy").exists()
    assert_tables_equal(FeatureTables.load(tmp_path / "v1"), tables)


@pytest.mark.parametrize(("field", "bad", "message"), [
    ("user_cat", np.zeros((3, 1), dtype=np.int32),
     r"user_cat must be int64 with 2 dims and 3 rows, got int32 \(3, 1\)"),
    ("history", np.zeros((2, 3), dtype=np.int64), r"history must be int64 with 2 dims and 3 rows, got int64 \(2, 3\)"),
    ("item_num", np.zeros(5, dtype=np.float32), r"item_num must be float32 with 2 dims and 5 rows, got float32 \(5,\)"),
    ("popular_items", np.arange(5, dtype=np.int64), r"popular_items must be int64 with 1 dims and 4 rows"),
    ("seen_items", np.zeros((6, 1), dtype=np.int64), r"seen_items must be int64 with 1 dims and any rows"),
    ("seen_indptr", np.array([0, 0, 2, 5], dtype=np.int64), "seen_indptr must be non-decreasing and end at 6"),
    ("seen_indptr", np.array([0, 3, 2, 6], dtype=np.int64), "seen_indptr must be non-decreasing and end at 6"),
])
def test_tables_validation(train, users, items, field, bad, message):
    tables = build_tables(fit_feature_spec(train, users, items, history_length=3), fit_id_vocab(train),
                          train, users, items)
    with pytest.raises(ValueError, match=message):
        replace(tables, **{field: bad})


# --- leakage -------------------------------------------------------------------------------------

def test_val_and_test_do_not_leak_into_spec_or_tables(users, items):
    rng = np.random.default_rng(0)
    # 10 interactions per user: 8 train, 1 val, 1 test
    rows = [(f"u{u}", int(i), float(rng.integers(1, 6)), int(rng.integers(0, 10**6)))
            for u in (1, 2, 3) for i in rng.choice(np.arange(10, 200, 10), size=10, replace=False)]
    split = random_split(interactions(rows), seed=1)
    assert len(split.val) > 0 and len(split.test) > 0
    spec = fit_feature_spec(split.train, users, items)
    tables = build_tables(spec, fit_id_vocab(split.train), split.train, users, items)

    # Same train; held-out ratings changed; new users and items (with new feature values) in val/test
    # and in the side tables.
    new = interactions([("u7", 77, 1.0, 10**7), ("u1", 77, 5.0, 10**7)])
    val = pd.concat([split.val.assign(rating=1.0), new], ignore_index=True)
    test = pd.concat([split.test.assign(rating=5.0), new], ignore_index=True)
    changed = Split(train=split.train, val=val, test=test, protocol=split.protocol, seed=split.seed)
    more_users = pd.concat([users, pd.DataFrame({"user_id": ["u7"], "age": [70.0], "occupation": ["pilot"]})])
    more_items = pd.concat([items, pd.DataFrame({"item_id": [77], "title": ["n"], "genres": ["Noir"], "year": [1.0]})])
    spec2 = fit_feature_spec(changed.train, more_users, more_items)
    tables2 = build_tables(spec2, fit_id_vocab(changed.train), changed.train, more_users, more_items)
    assert spec2 == spec and spec2.to_json() == spec.to_json()
    assert_tables_equal(tables2, tables)


def test_with_known_rebuilds_the_histories_and_seen_items_only(train, users, items):
    spec = fit_feature_spec(train, users, items, history_length=3)
    tables = build_tables(spec, fit_id_vocab(train), train, users, items)
    # u1's validation item (30, at 70) joins its history as the latest and its seen items; an unknown user and an
    # unknown item are ignored.
    val = interactions([("u1", 30, 4.0, 70), ("u9", 10, 1.0, 1), ("u1", 99, 1.0, 80)])
    both = with_known(tables, pd.concat([train, val], ignore_index=True))
    u1, u2 = tables.vocab.users_to_idx(["u1", "u2"])
    i10, i20, i30, i40 = tables.vocab.items_to_idx([10, 20, 30, 40])
    assert tables.history[u1].tolist() == [0, i10, i20]
    assert both.history[u1].tolist() == [i10, i20, i30]
    seen = lambda t, u: t.seen_items[t.seen_indptr[u]:t.seen_indptr[u + 1]].tolist()  # noqa: E731
    assert seen(tables, u1) == [i10, i20] and seen(both, u1) == [i10, i20, i30]
    np.testing.assert_array_equal(both.history[u2], tables.history[u2])
    assert seen(both, u2) == seen(tables, u2)
    unchanged = replace(both, history=tables.history, seen_indptr=tables.seen_indptr, seen_items=tables.seen_items)
    assert_tables_equal(unchanged, tables)                                   # nothing else moves
    assert_tables_equal(with_known(tables, train), tables)
    # with_known_rows: the same tables, and the rows it kept (the unknown user's and the unknown item's dropped).
    rebuilt, kept = with_known_rows(tables, pd.concat([train, val], ignore_index=True))
    assert_tables_equal(rebuilt, both)
    assert kept.equals(pd.concat([train, val.iloc[:1]], ignore_index=True))
    assert with_known_rows(tables, train)[1] is train                        # nothing to drop: no copy


# --- temporal features ---------------------------------------------------------------------------

def test_temporal_features_match_pandas():
    ts = np.array([0, 3599, 3600, 86399, 4 * 86400, 881250949, 1_700_000_000, -1, -86400 * 3 - 1], dtype=np.int64)
    hour, dow, weekend = temporal_features(ts)
    expected = pd.to_datetime(ts, unit="s", utc=True)
    np.testing.assert_array_equal(hour, expected.hour)
    np.testing.assert_array_equal(dow, expected.day_of_week)  # Monday = 0
    np.testing.assert_array_equal(weekend, (expected.day_of_week >= 5).astype(np.int64))
    # 1970-01-01 was a Thursday (3); 1970-01-03 a Saturday
    assert dow[0] == 3 and temporal_features(np.array([2 * 86400]))[2][0] == 1
    assert hour.dtype == dow.dtype == weekend.dtype == np.int64


def test_temporal_features_reject_non_integer_timestamps():
    with pytest.raises(ValueError, match="timestamp must be an integer array of seconds, got dtype float64"):
        temporal_features(np.array([1.5]))


# --- real data -----------------------------------------------------------------------------------

def load_ml100k(path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    log = pd.read_csv(path / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    log = log.astype({"user_id": "str", "item_id": "int64", "rating": "float32", "timestamp": "int64"})
    users = pd.read_csv(path / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"],
                        dtype={"user_id": "str", "zip": "str"})
    users = users.assign(age=users["age"].astype(float), zip_region=users["zip"].str[:1]).drop(columns="zip")
    genres = [line.split("|")[0] for line in (path / "u.genre").read_text().splitlines() if line]
    raw = pd.read_csv(path / "u.item", sep="|", encoding="latin-1",
                      names=["item_id", "title", "released", "video", "url", *genres])
    flags = raw[genres].to_numpy().astype(bool)  # (M, 19)
    items = pd.DataFrame({
        "item_id": raw["item_id"].astype("int64"), "title": raw["title"],
        "genres": ["|".join(np.array(genres)[row]) for row in flags],
        "year": pd.to_datetime(raw["released"], format="%d-%b-%Y").dt.year.astype(float),
    })
    return log, users, items


def test_ml100k_end_to_end(ml100k_dir, tmp_path):
    log, users, items = load_ml100k(ml100k_dir)
    split = random_split(log)
    spec = fit_feature_spec(split.train, users, items, history_length=50)
    vocab = fit_id_vocab(split.train)
    tables = build_tables(spec, vocab, split.train, users, items)
    assert spec.n_users == 943 and spec.n_items == split.train["item_id"].nunique()
    assert [c.name for c in spec.user_categorical] == ["gender", "occupation", "zip_region"]
    assert len(spec.item_genres) == 19 and (spec.rating_min, spec.rating_max) == (1.0, 5.0)
    assert FeatureSpec.from_json(spec.to_json()) == spec
    # every ML-100K user rated >= 20 movies, so >= 16 land in train: no history row is all padding
    assert (tables.history[1:] > 0).sum(axis=1).min() >= 16
    assert np.diff(tables.seen_indptr).sum() == len(split.train) and tables.item_counts.sum() == len(split.train)
    assert sorted(tables.popular_items) == list(range(1, spec.n_items + 1))
    # standardised columns over the train users: mean 0, std 1
    np.testing.assert_allclose(tables.user_num[1:].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(tables.user_num[1:].std(axis=0), 1.0, atol=1e-4)
    tables.save(tmp_path)
    assert_tables_equal(FeatureTables.load(tmp_path), tables)
