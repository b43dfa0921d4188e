"""Synthetic MovieLens-shaped data with planted preferences, and a writer of MovieLens-like files.

``planted_world`` draws users (age, gender, occupation, zip_region), items (title, genres, year)
and the hidden truth: unit latent vectors built from genre centroids (a user's favourite genres
depend on gender and age group, so user features carry signal), Zipf item popularity, user
activity, rating biases and each user's active period within one year.
``generate`` samples unique (user, item) interactions: a user (by activity) picks item i with
probability ~ popularity_i * exp(u . v_i / TEMPERATURE), by sampling-importance-resampling over
N_CANDIDATES popularity-drawn candidates (Gumbel-max, one candidate column at a time), chunk by
chunk: sampling takes O(chunk_size * latent_dim) memory and deduplication O(n_interactions), never
users x items (1M items and 10M interactions peak near 1.3 GB). Ratings 1..5 rise with u . v.
``order`` > 0 plants a time order in each user's history: the user's timestamps (drawn as above) are
handed out along a hidden direction w_u, the items most aligned with it last (sorted by
order * v_i . w_u + N(0, 1) noise), so a user's recent items say where the next ones lie. The pairs and
ratings stay those of ``order`` 0, which leaves the items in no order within a user's active period
(nothing for a sequential model to find there).
``write_movielens_like`` writes a Dataset in the 1M (``::``) or latest (CSV) layout for loader tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trainer.data.dataset import Dataset, make_dataset
from trainer.data.movielens import ML1M_OCCUPATIONS

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")
START_TIME = 1_577_836_800  # 2020-01-01T00:00:00Z, Unix seconds
YEAR_S = 365 * 86_400
N_CANDIDATES = 32
TEMPERATURE = 0.25  # u . v lies in [-1, 1]; 0.25 makes the best of 32 candidates ~e^8 likelier than the worst
# Rounds of preference sampling before the last missing pairs are drawn uniformly (dense, tiny worlds).
_PREFERENCE_ROUNDS = 8
_AGE_GROUP_EDGES = (25, 45)  # years: under 25, 25-44, 45+
FORMATS = ("1m", "latest")


@dataclass(frozen=True)
class PlantedWorld:
    """Everything ``generate`` draws before sampling interactions: side tables and the hidden truth."""

    users: pd.DataFrame  # row k: user_id str(k + 1)
    items: pd.DataFrame  # row k: item_id k + 1
    user_vectors: np.ndarray  # (U, D) float32, unit rows
    item_vectors: np.ndarray  # (I, D) float32, unit rows
    item_popularity: np.ndarray  # (I,) float64, sums to 1
    items_by_popularity: np.ndarray  # (I,) int64 item rows, most popular first
    user_activity: np.ndarray  # (U,) float64, sums to 1
    user_bias: np.ndarray  # (U,) float32, rating stars
    item_bias: np.ndarray  # (I,) float32, rating stars
    user_start: np.ndarray  # (U,) int64, seconds after START_TIME when the user turns up
    user_span: np.ndarray  # (U,) int64, seconds the user stays active


def planted_world(n_users: int, n_items: int, *, seed: int, n_genres: int = 18,
                  latent_dim: int = 16) -> PlantedWorld:
    """The side tables and planted truth behind ``generate`` with the same arguments."""
    _require_positive(n_users=n_users, n_items=n_items, n_genres=n_genres, latent_dim=latent_dim)
    genre_rng, user_rng, item_rng, truth_rng = _streams(seed)[:4]
    centroids = _unit(genre_rng.standard_normal((n_genres, latent_dim), dtype=np.float32))  # (G, D)
    genre_names = pa.array(list(GENRES[:n_genres]) + [f"Genre{k + 1}" for k in range(len(GENRES), n_genres)])
    users, user_vectors = _users(user_rng, n_users, centroids)
    items, item_vectors = _items(item_rng, n_items, centroids, genre_names)
    by_popularity = truth_rng.permutation(n_items)  # independent of taste
    rank = np.argsort(by_popularity)
    # Zipf with exponent 1: rank r gets the mass of 1/(x + 1) on [r, r + 1], so p(r) ~ 1/(r + 1.5)
    # and the ranks sum to exactly 1; _zipf_ranks samples it by inverting the CDF in closed form.
    popularity = np.log((rank + 2.0) / (rank + 1.0)) / np.log(n_items + 1.0)
    activity = truth_rng.lognormal(0.0, 1.0, n_users)
    start = (truth_rng.random(n_users) * 0.9 * YEAR_S).astype(np.int64)
    span = ((YEAR_S - start) * truth_rng.uniform(0.05, 1.0, n_users)).astype(np.int64) + 1
    return PlantedWorld(
        users=users, items=items, user_vectors=user_vectors, item_vectors=item_vectors,
        item_popularity=popularity, items_by_popularity=by_popularity.astype(np.int64),
        user_activity=activity / activity.sum(),
        user_bias=truth_rng.normal(0.0, 0.35, n_users).astype(np.float32),
        item_bias=truth_rng.normal(0.0, 0.3, n_items).astype(np.float32),
        user_start=start, user_span=span)


def _require_positive(**fields: int) -> None:
    for field, value in fields.items():
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value!r}")


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators: genres, users, items, hidden truth, interactions, the planted time order (a
    SeedSequence's k-th child does not depend on how many are spawned, so adding one moved none)."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(6)]


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place; (N, D) float32."""
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _users(rng: np.random.Generator, n_users: int, centroids: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    n_genres, latent_dim = centroids.shape
    female = rng.random(n_users) >= 0.71
    age = np.clip(np.round(rng.normal(33.0, 12.0, n_users)), 7, 73)
    occupation = rng.choice(len(ML1M_OCCUPATIONS), n_users, p=rng.dirichlet(np.full(len(ML1M_OCCUPATIONS), 2.0)))
    region = rng.integers(0, 10, n_users)
    region[rng.random(n_users) < 0.02] = 10  # "?": foreign postcodes, as in MovieLens
    # Favourite genres follow the (gender, age group), so the user features predict taste.
    group = female * (len(_AGE_GROUP_EDGES) + 1) + np.digitize(age, _AGE_GROUP_EDGES)
    group_taste = rng.dirichlet(np.full(n_genres, 0.5), size=2 * (len(_AGE_GROUP_EDGES) + 1))  # (6, G)
    favourites = np.empty((n_users, 2), dtype=np.int64)
    for g, taste in enumerate(group_taste):
        members = np.flatnonzero(group == g)
        favourites[members] = rng.choice(n_genres, (len(members), 2), p=taste)
    vectors = rng.standard_normal((n_users, latent_dim), dtype=np.float32)  # (U, D)
    vectors *= 0.7 / latent_dim**0.5  # noise of norm ~0.7 around the taste
    vectors += centroids[favourites[:, 0]]
    vectors += 0.5 * centroids[favourites[:, 1]]
    users = pd.DataFrame({
        "user_id": _text(_decimal(np.arange(1, n_users + 1))),
        "age": age.astype(np.float64),
        "gender": _text(pa.array(["M", "F"]).take(female.astype(np.int64))),
        "occupation": _text(pa.array(ML1M_OCCUPATIONS).take(occupation)),
        "zip_region": _text(pa.array([*"0123456789", "?"]).take(region)),
    })
    return users, _unit(vectors)


def _items(rng: np.random.Generator, n_items: int, centroids: np.ndarray,
           genre_names: pa.Array) -> tuple[pd.DataFrame, np.ndarray]:
    n_genres, latent_dim = centroids.shape
    genre_share = rng.dirichlet(np.full(n_genres, 2.0))
    first = rng.choice(n_genres, n_items, p=genre_share)
    second = rng.choice(n_genres, n_items, p=genre_share)
    has_second = (rng.random(n_items) < 0.5) & (second != first)
    vectors = rng.standard_normal((n_items, latent_dim), dtype=np.float32)  # (I, D)
    vectors *= 0.7 / latent_dim**0.5  # noise of norm ~0.7 around the genres
    vectors += centroids[first]
    vectors[has_second] += 0.5 * centroids[second[has_second]]
    pair = pc.binary_join_element_wise(genre_names.take(np.minimum(first, second)),
                                       genre_names.take(np.maximum(first, second)), "|")
    genres = pc.if_else(has_second, pair, genre_names.take(first))  # names in genre order, like MovieLens
    year = 2023.0 - np.minimum(np.floor(rng.exponential(12.0, n_items)), 100.0)
    unknown_year = rng.random(n_items) < 0.005  # a few unknown release years
    year[unknown_year] = np.nan
    item_ids = np.arange(1, n_items + 1)
    base = pc.binary_join_element_wise("Synthetic Movie", _decimal(item_ids), " ")
    dated = pc.binary_join_element_wise(base, " (", _decimal(np.nan_to_num(year).astype(np.int64)), ")", "")
    items = pd.DataFrame({"item_id": item_ids.astype(np.int64), "title": _text(pc.if_else(unknown_year, base, dated)),
                          "genres": _text(genres), "year": year})
    return items, _unit(vectors)


def _decimal(numbers: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(numbers), pa.string())


def _text(strings: pa.Array) -> pd.Series:
    """A pandas "str" column over an Arrow string array (numpy unicode arrays cost ~4 bytes a char)."""
    return pd.Series(strings, dtype="str")


def generate(n_users: int, n_items: int, n_interactions: int, *, seed: int, n_genres: int = 18,
             latent_dim: int = 16, chunk_size: int = 1_000_000, order: float = 0.0) -> Dataset:
    """A MovieLens-shaped Dataset of ``n_interactions`` unique (user, item) pairs; deterministic for a seed.
    ``order``: how strictly each user's items follow a hidden direction in time (the module's docstring);
    0 = not at all."""
    _require_positive(n_users=n_users, n_items=n_items, chunk_size=chunk_size)
    if not (isinstance(order, (int, float)) and np.isfinite(order) and order >= 0):
        raise ValueError(f"order must be a finite number >= 0, got {order!r}")
    if not 1 <= n_interactions <= n_users * n_items // 2:
        raise ValueError(f"n_interactions must be in [1, n_users * n_items // 2 = {n_users * n_items // 2}] "
                         f"so that pairs stay unique, got {n_interactions!r}")
    world = planted_world(n_users, n_items, seed=seed, n_genres=n_genres, latent_dim=latent_dim)
    interactions = _interactions(world, n_interactions, chunk_size, *_streams(seed)[4:], order)
    name = f"synthetic-{n_users}u-{n_items}i-{n_interactions}r-seed{seed}" + (f"-order{order:g}" if order else "")
    return make_dataset(name, interactions, source=name, rows_read=n_interactions,
                        users=world.users, items=world.items)


def _interactions(world: PlantedWorld, n: int, chunk_size: int, rng: np.random.Generator,
                  order_rng: np.random.Generator, strength: float = 0.0) -> pd.DataFrame:
    """n unique interactions with ratings and timestamps, sorted by (timestamp, user_id, item_id)."""
    users, items = _unique_pairs(world, n, chunk_size, rng)
    ratings = np.empty(n, dtype=np.float32)
    times = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        ratings[part], times[part] = _rate(world, users[part], items[part], rng)
    if strength:                     # generate's order: a planted time order in each user's history
        times = _ordered_times(world, users, items, times, strength, order_rng, chunk_size)
    # Sort here, on integers, so make_dataset finds the log in order and copies nothing.
    user_rank = pd.factorize(world.users["user_id"], sort=True)[0]  # (U,) position in string order
    order = np.lexsort((items, user_rank[users], times))
    return pd.DataFrame({
        "user_id": pd.Series(world.users["user_id"].array.take(users[order])),
        "item_id": items[order] + 1,
        "rating": ratings[order],
        "timestamp": times[order],
    })


def _unique_pairs(world: PlantedWorld, n: int, chunk_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item row) of n distinct pairs, in the order they were first drawn."""
    n_items = len(world.item_vectors)
    user_cdf = np.cumsum(world.user_activity)
    user_parts: list[np.ndarray] = []
    item_parts: list[np.ndarray] = []
    first = np.empty(0, dtype=np.int64)
    rounds = 0
    while len(first) < n:
        missing = n - len(first)
        draw = missing + missing // 4 + 16  # extra draws absorb repeated pairs
        for start in range(0, draw, chunk_size):
            size = min(chunk_size, draw - start)
            if rounds < _PREFERENCE_ROUNDS:
                pair = _prefer(world, size, user_cdf, rng)
            else:
                pair = rng.integers(0, len(user_cdf), size), rng.integers(0, n_items, size)
            user_parts.append(pair[0].astype(np.int32))
            item_parts.append(pair[1].astype(np.int32))
        users, items = np.concatenate(user_parts), np.concatenate(item_parts)
        user_parts, item_parts = [users], [items]
        first = np.unique(users.astype(np.int64) * n_items + items, return_index=True)[1]
        rounds += 1
    keep = np.sort(first)[:n]
    return users[keep].astype(np.int64), items[keep].astype(np.int64)


def _prefer(world: PlantedWorld, size: int, user_cdf: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``size`` (user, item) draws: users by activity, items ~ popularity * exp(u . v / TEMPERATURE)."""
    users = np.minimum(np.searchsorted(user_cdf, rng.random(size), side="right"), len(user_cdf) - 1)
    user_vectors = np.take(world.user_vectors, users, axis=0)  # (B, D); take gathers faster than []
    best_score = np.full(size, -np.inf, dtype=np.float32)
    best_item = np.zeros(size, dtype=np.int64)
    for _ in range(N_CANDIDATES):  # Gumbel-max over candidates drawn by popularity
        candidate = world.items_by_popularity[_zipf_ranks(rng, size, len(world.item_vectors))]
        affinity = np.einsum("bd,bd->b", user_vectors, np.take(world.item_vectors, candidate, axis=0))  # (B,)
        with np.errstate(divide="ignore"):  # a uniform draw of exactly 0 gives score -inf: never picked
            gumbel = -np.log(-np.log(rng.random(size, dtype=np.float32)))
        score = affinity / TEMPERATURE + gumbel
        np.copyto(best_item, candidate, where=score > best_score)
        np.maximum(best_score, score, out=best_score)
    return users, best_item


def _ordered_times(world: PlantedWorld, users: np.ndarray, items: np.ndarray, times: np.ndarray, order: float,
                   rng: np.random.Generator, chunk_size: int) -> np.ndarray:
    """``times`` handed out again within each user: the user's earliest time to the item with the lowest
    ``order * v_i . w_u + N(0, 1)``, and so on (w_u: a unit direction per user, from ``rng``)."""
    n_users, latent_dim = world.user_vectors.shape
    direction = _unit(rng.standard_normal((n_users, latent_dim), dtype=np.float32))     # (U, D)
    key = np.empty(users.size, dtype=np.float64)
    for start in range(0, users.size, chunk_size):
        part = slice(start, start + chunk_size)
        key[part] = order * np.einsum("bd,bd->b", world.item_vectors[items[part]], direction[users[part]])
    key += rng.standard_normal(users.size)
    by_key, by_time = np.lexsort((key, users)), np.lexsort((times, users))   # both grouped by user alike
    out = np.empty_like(times)
    out[by_key] = times[by_time]
    return out


def _zipf_ranks(rng: np.random.Generator, size: int, n_items: int) -> np.ndarray:
    """Popularity ranks with P(r) = log((r + 2) / (r + 1)) / log(n_items + 1): inverse CDF of 1/(x + 1)."""
    ranks = np.floor(np.exp(rng.random(size) * np.log(n_items + 1.0))).astype(np.int64) - 1
    return np.clip(ranks, 0, n_items - 1)  # float rounding at the ends


def _rate(world: PlantedWorld, users: np.ndarray, items: np.ndarray,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ratings (1..5 stars, rising with u . v) and timestamps (s) within each user's active period."""
    affinity = np.einsum("bd,bd->b", world.user_vectors[users], world.item_vectors[items])  # (B,)
    stars = (2.6 + 3.0 * affinity + world.user_bias[users] + world.item_bias[items]
             + rng.normal(0.0, 0.6, len(users)))
    ratings = np.clip(np.round(stars), 1, 5).astype(np.float32)
    offset = (rng.random(len(users)) * world.user_span[users]).astype(np.int64)
    return ratings, START_TIME + world.user_start[users] + offset


def write_movielens_like(dataset: Dataset, path: Path, fmt: str) -> Path:
    """Write ``dataset`` into folder ``path`` as MovieLens 1M (``fmt="1m"``) or latest (``"latest"``) files."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ratings = dataset.interactions
    if fmt == "latest":
        ratings.rename(columns={"user_id": "userId", "item_id": "movieId"}).to_csv(path / "ratings.csv", index=False)
        if dataset.items is not None:
            movies = dataset.items[["item_id", "title", "genres"]].rename(columns={"item_id": "movieId"})
            movies["genres"] = movies["genres"].where(movies["genres"] != "", "(no genres listed)")
            movies.to_csv(path / "movies.csv", index=False)
        return path
    _write_dat(path / "ratings.dat", [ratings["user_id"], ratings["item_id"],
                                      ratings["rating"].map("{:g}".format), ratings["timestamp"]])
    if dataset.items is not None:
        items = dataset.items
        _write_dat(path / "movies.dat", [items["item_id"], items["title"], items["genres"]])
    if dataset.users is not None:
        _write_dat(path / "users.dat", _users_1m(dataset.users))
    return path


def _users_1m(users: pd.DataFrame) -> list[pd.Series]:
    """users.dat fields: UserID, Gender, Age, Occupation code, Zip-code (region + "0000")."""
    for column in ("gender", "age", "occupation", "zip_region"):
        if column not in users.columns:
            raise ValueError(f"users must have column {column!r} for the 1m format, got {list(users.columns)}")
    codes = {name: code for code, name in enumerate(ML1M_OCCUPATIONS)}
    unknown = ~users["occupation"].isin(list(codes))
    if unknown.any():
        raise ValueError(f"users.occupation must be one of ML1M_OCCUPATIONS, "
                         f"got {users['occupation'][unknown].iloc[0]!r}")
    age = users["age"].map(lambda years: "" if np.isnan(years) else f"{years:g}")
    return [users["user_id"], users["gender"], age, users["occupation"].map(codes), users["zip_region"] + "0000"]


def _write_dat(path: Path, fields: list[pd.Series]) -> None:
    lines = fields[0].astype(str)
    for field in fields[1:]:
        lines = lines + "::" + field.astype(str).to_numpy()
    path.write_text("".join(line + "\n" for line in lines), encoding="latin-1")
