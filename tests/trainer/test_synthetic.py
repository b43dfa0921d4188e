"""Synthetic MovieLens-shaped data: determinism, shapes, popularity skew, planted signal, writers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trainer.data import generate, write_movielens_like
from trainer.data.synthetic import GENRES, START_TIME, YEAR_S, planted_world

N_USERS, N_ITEMS, N_INTERACTIONS, SEED = 5_000, 20_000, 200_000, 11


@pytest.fixture(scope="module")
def large():
    """The 200k-interaction run (a few seconds); shared by the tests that need volume."""
    return generate(N_USERS, N_ITEMS, N_INTERACTIONS, seed=SEED)


@pytest.fixture(scope="module")
def world():
    return planted_world(N_USERS, N_ITEMS, seed=SEED)


def _rows(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item row) of each interaction in the planted world's order."""
    frame = dataset.interactions
    return frame["user_id"].astype(np.int64).to_numpy() - 1, frame["item_id"].to_numpy() - 1


def test_same_seed_same_data_other_seed_other_data():
    first, second = generate(50, 120, 900, seed=3), generate(50, 120, 900, seed=3)
    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    pd.testing.assert_frame_equal(first.users, second.users)
    pd.testing.assert_frame_equal(first.items, second.items)
    other = generate(50, 120, 900, seed=4)
    assert not first.interactions.equals(other.interactions)


def test_shapes_dtypes_and_movielens_like_tables(large):
    frame, users, items = large.interactions, large.users, large.items
    assert len(frame) == N_INTERACTIONS and large.report.rows_kept == N_INTERACTIONS
    assert [str(t) for t in frame.dtypes] == ["str", "int64", "float32", "int64"]
    assert not frame.duplicated(["user_id", "item_id"]).any()  # one rating per pair, like MovieLens
    assert set(frame["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.0 < frame["rating"].mean() < 4.0
    assert frame["timestamp"].between(START_TIME, START_TIME + YEAR_S - 1).all()
    keys = list(zip(frame["timestamp"], frame["user_id"], frame["item_id"]))
    assert keys == sorted(keys)
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", "zip_region"]
    assert len(users) == N_USERS and users["user_id"].iloc[0] == "1"
    assert set(users["gender"]) == {"M", "F"} and users["age"].between(7, 73).all()
    assert set(users["zip_region"]) <= set("0123456789?")
    assert list(items.columns) == ["item_id", "title", "genres", "year"]
    assert [str(t) for t in items.dtypes] == ["int64", "str", "str", "float64"]
    assert items["item_id"].tolist() == list(range(1, N_ITEMS + 1))
    genres = {g for value in items["genres"] for g in value.split("|")}
    assert genres <= set(GENRES) and len(genres) == len(GENRES)
    dated = items.dropna(subset=["year"]).iloc[0]
    assert dated["title"].endswith(f"({int(dated['year'])})")
    assert items["year"].isna().any()
    assert frame["user_id"].isin(users["user_id"]).all() and frame["item_id"].isin(items["item_id"]).all()


def test_item_popularity_is_skewed(large):
    counts = np.sort(large.interactions["item_id"].value_counts().to_numpy())[::-1]
    top_share = counts[: N_ITEMS // 100].sum() / N_INTERACTIONS
    assert top_share > 0.15  # uniform popularity would give 0.01


def test_held_out_interactions_carry_the_planted_preferences(large, world):
    users, items = _rows(large)
    held_out = slice(int(0.9 * len(users)), None)  # the latest 10%, as a temporal split holds out
    affinity = np.einsum("bd,bd->b", world.user_vectors[users[held_out]], world.item_vectors[items[held_out]])
    random_items = np.random.default_rng(0).integers(0, N_ITEMS, len(affinity))
    baseline = np.einsum("bd,bd->b", world.user_vectors[users[held_out]], world.item_vectors[random_items])
    assert affinity.mean() > baseline.mean() + 0.15
    ratings = large.interactions["rating"].to_numpy()
    all_affinity = np.einsum("bd,bd->b", world.user_vectors[users], world.item_vectors[items])
    assert np.corrcoef(all_affinity, ratings)[0, 1] > 0.4


def test_user_features_predict_taste(large, world):
    users, items = _rows(large)
    taste_by_gender = {}
    for gender in ("M", "F"):
        rows = np.flatnonzero(large.users["gender"].to_numpy() == gender)
        taste_by_gender[gender] = world.user_vectors[rows].mean(axis=0)
    # Users of one gender share favourite genres: their mean taste vectors differ clearly.
    assert np.linalg.norm(taste_by_gender["M"] - taste_by_gender["F"]) > 0.1


def test_small_chunks_and_dense_tiny_worlds_still_give_unique_pairs():
    chunked = generate(40, 60, 700, seed=1, chunk_size=64)
    assert len(chunked.interactions) == 700
    dense = generate(10, 20, 100, seed=2)  # density 0.5: the last pairs are drawn uniformly
    assert not dense.interactions.duplicated(["user_id", "item_id"]).any() and len(dense.interactions) == 100


def test_more_genres_than_movielens_get_generated_names():
    world = planted_world(20, 400, seed=0, n_genres=25, latent_dim=4)
    names = {g for value in world.items["genres"] for g in value.split("|")}
    assert "Genre25" in names and world.item_vectors.shape == (400, 4)
    assert np.allclose(np.linalg.norm(world.item_vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_users": 0}, "n_users must be >= 1, got 0"),
    ({"n_items": -1}, "n_items must be >= 1, got -1"),
    ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    ({"n_interactions": 0}, r"n_interactions must be in \[1, n_users \* n_items // 2 = 50\]"),
    ({"n_interactions": 51}, r"so that pairs stay unique, got 51"),
    ({"n_genres": 0}, "n_genres must be >= 1, got 0"),
    ({"latent_dim": 0}, "latent_dim must be >= 1, got 0"),
])
def test_generate_refuses_bad_arguments(kwargs, message):
    arguments = {"n_users": 10, "n_items": 10, "n_interactions": 20, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(**arguments)


def test_a_planted_order_hands_each_users_times_out_along_a_hidden_direction(world):
    plain = generate(N_USERS, N_ITEMS, N_INTERACTIONS, seed=SEED)
    assert generate(N_USERS, N_ITEMS, N_INTERACTIONS, seed=SEED, order=0).interactions.equals(plain.interactions)

    def by_user_and_time(dataset) -> pd.DataFrame:
        return dataset.interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable",
                                                ignore_index=True)

    def neighbours_cosine(frame: pd.DataFrame) -> float:
        """Mean cosine of the planted vectors of each user's consecutive items in time."""
        vectors = world.item_vectors[frame["item_id"].to_numpy() - 1]
        same_user = (frame["user_id"].to_numpy()[1:] == frame["user_id"].to_numpy()[:-1])
        return float(np.einsum("bd,bd->b", vectors[1:], vectors[:-1])[same_user].mean())

    before = by_user_and_time(plain)
    cosines = [neighbours_cosine(before)]
    for order in (4.0, 8.0):
        ordered = generate(N_USERS, N_ITEMS, N_INTERACTIONS, seed=SEED, order=order)
        assert ordered.name.endswith(f"-order{order:g}")
        frame = ordered.interactions
        assert frame["timestamp"].is_monotonic_increasing                 # still sorted by time
        # The same pairs with the same ratings, and each user keeps the same set of times.
        pairs = frame.sort_values(["user_id", "item_id"], ignore_index=True)
        expected = plain.interactions.sort_values(["user_id", "item_id"], ignore_index=True)
        pd.testing.assert_frame_equal(pairs[["user_id", "item_id", "rating"]],
                                      expected[["user_id", "item_id", "rating"]])
        times = frame.sort_values(["user_id", "timestamp"], ignore_index=True)
        pd.testing.assert_series_equal(times["timestamp"], before["timestamp"])
        assert not np.array_equal(pairs["timestamp"].to_numpy(), expected["timestamp"].to_numpy())
        cosines.append(neighbours_cosine(by_user_and_time(ordered)))
    # Neighbours in time lie closer in the planted space the stricter the order (0.15 -> 0.18 -> 0.21 here).
    assert cosines[0] + 0.02 < cosines[1] < cosines[2] - 0.02, cosines


@pytest.mark.parametrize("order", [-1.0, float("nan"), float("inf"), "8"])
def test_generate_refuses_a_bad_order(order):
    with pytest.raises(ValueError, match=f"order must be a finite number >= 0, got {order!r}"):
        generate(10, 10, 20, seed=0, order=order)


def test_writers_use_the_movielens_formats(tmp_path):
    data = generate(5, 8, 12, seed=0)
    write_movielens_like(data, tmp_path / "1m", "1m")
    first = data.interactions.iloc[0]
    line = f"{first['user_id']}::{first['item_id']}::{first['rating']:g}::{first['timestamp']}"
    assert (tmp_path / "1m" / "ratings.dat").read_text().splitlines()[0] == line
    user = data.users.iloc[0]
    assert (tmp_path / "1m" / "users.dat").read_text().splitlines()[0].startswith(
        f"1::{user['gender']}::{int(user['age'])}::")
    write_movielens_like(data, tmp_path / "latest", "latest")
    assert (tmp_path / "latest" / "ratings.csv").read_text().splitlines()[0] == "userId,movieId,rating,timestamp"
    assert (tmp_path / "latest" / "movies.csv").read_text().splitlines()[0] == "movieId,title,genres"


def test_writer_refuses_unknown_format_and_users_it_cannot_encode(tmp_path):
    data = generate(5, 8, 12, seed=0)
    with pytest.raises(ValueError, match=r"fmt must be one of \('1m', 'latest'\), got '100k'"):
        write_movielens_like(data, tmp_path, "100k")
    no_zip = data.users.drop(columns="zip_region")
    with pytest.raises(ValueError, match=r"users must have column 'zip_region' for the 1m format"):
        write_movielens_like(type(data)(data.name, data.interactions, no_zip, data.items, data.report), tmp_path, "1m")
    odd = data.users.assign(occupation="astronaut")
    with pytest.raises(ValueError, match=r"users.occupation must be one of ML1M_OCCUPATIONS, got 'astronaut'"):
        write_movielens_like(type(data)(data.name, data.interactions, odd, data.items, data.report), tmp_path, "1m")
