"""The serving state of one artifact version: everything a request needs, built once, never mutated.

``load_state`` is the ``VersionHolder`` loader: it reads the version's tables and id maps, loads the
ranker program through ``recsys_contracts.programs`` (the only safe loader), keeps the item
embeddings for the diversity re-rank, and warms the program with a smoke request that must return
finite CTRs and ratings in the version's rating range; any failure raises and the version is refused.

Item rows live here for the whole catalog of the version: this is the in-process item cache that
sits in front of Redis (Redis holds a copy of the same artifact rows, so a hit here is always
exact and the per-request Redis round trip carries only the user's keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_contracts import item_metadata
from recsys_contracts.programs import RANKER, USER_TOWER, Program, load_program
from recsys_contracts.ids import ItemLookup
from recsys_contracts.version_files import VersionTables, load_item_embeddings, load_tables

SCORE_MODES = ("ctr", "ctr_x_rating")
_SMOKE_ITEMS = 8


@dataclass(frozen=True)
class ScoreRule:
    """How the served score combines the heads: ``ctr``, or ``ctr * (rating / rating_max) ** rating_weight``."""

    mode: str
    rating_weight: float
    rating_max: float

    def __post_init__(self) -> None:
        if self.mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.mode!r}")
        if not math.isfinite(self.rating_weight) or self.rating_weight < 0:
            raise ValueError(f"rating_weight must be a finite number >= 0, got {self.rating_weight!r}")
        if not math.isfinite(self.rating_max) or self.rating_max <= 0:
            raise ValueError(f"rating_max must be a finite number > 0, got {self.rating_max!r}")

    def apply(self, ctr: np.ndarray, rating: np.ndarray) -> np.ndarray:
        """(N,) CTRs and predicted ratings -> (N,) float32 final scores."""
        if self.mode == "ctr":
            return ctr.astype(np.float32, copy=False)
        ratio = np.clip(rating / np.float32(self.rating_max), 0.0, None)
        return (ctr * ratio ** np.float32(self.rating_weight)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ServingState:
    """One version, ready to serve; requests read ``holder.current`` once and keep this object."""

    version: int
    ranker: Program                         # exported DCN: aligned rows -> (ctr_logit (N,), rating (N,))
    user_tower: Program                     # exported user tower: Rank computes retrieval scores itself
    tables: VersionTables
    user_index: dict[str, int]              # external user id -> user index (absent = unknown)
    items: ItemLookup
    item_embeddings: np.ndarray             # (m+1, D) float32, L2-normalised, row 0 zero (for MMR)
    popular_scores: np.ndarray              # (m+1,) float32 log(1 + training count): fallback retrieval score
    score_rule: ScoreRule
    ranker_history: int                     # the ranker's history input holds the last this-many items
    metadata: item_metadata.ItemMetadata    # titles, genres, recent interactions: display only

    @property
    def spec(self):
        return self.tables.spec


def run_ranker(ranker: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over aligned rows: (ctr (N,) float32 in [0, 1], rating (N,) float32)."""
    # the broadcast user rows of ``ranker_inputs`` are copied into place here (contiguous)
    logit, rating = ranker(**{name: np.ascontiguousarray(value) for name, value in inputs.items()})
    with np.errstate(over="ignore", invalid="ignore"):   # exp(-logit) = inf for logit << 0: ctr 0
        ctr = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32, copy=False)                  # (N,)
    return ctr, rating


def ranker_inputs(state: ServingState, *, user_idx: int, user_cat: np.ndarray, user_num: np.ndarray,
                  history: np.ndarray, timestamp: int, item_idx: np.ndarray,
                  retrieval_score: np.ndarray) -> dict[str, np.ndarray]:
    """The program's keyword inputs for one user against N items: the user row repeated N times
    (the history cut to the ranker's most recent ``state.ranker_history`` items). The repeated rows
    are read-only broadcast views: ``run_ranker`` (or the batcher's concatenation) copies them into
    place in the DCN thread, so the event loop never does."""
    n = item_idx.size
    tables = state.tables
    history = history[-state.ranker_history:]
    return {
        "user_idx": np.full(n, user_idx, dtype=np.int64),                               # (N,)
        "user_cat": np.broadcast_to(user_cat.astype(np.int64), (n, user_cat.size)),     # (N, Cu) view
        "user_num": np.broadcast_to(user_num.astype(np.float32), (n, user_num.size)),   # (N, Nu) view
        "history": np.broadcast_to(history.astype(np.int64), (n, history.size)),        # (N, H) view
        "timestamp": np.full(n, timestamp, dtype=np.int64),                             # (N,)
        "item_idx": item_idx.astype(np.int64, copy=False),                              # (N,)
        "item_cat": tables.item_cat[item_idx],                                          # (N, Ci)
        "item_num": tables.item_num[item_idx],                                          # (N, Ni)
        "retrieval_score": retrieval_score.astype(np.float32, copy=False),              # (N,)
    }


def retrieval_scores(state: ServingState, *, user_idx: int, user_cat: np.ndarray, user_num: np.ndarray,
                     history: np.ndarray, timestamp: int, item_idx: np.ndarray) -> np.ndarray:
    """The score retrieval would give these items (N,): user embedding . item embedding / temperature.

    Rank receives bare item ids, but the DCN was trained with this score as an input (and a
    wide skip on it), so it is computed here exactly as retrieval computes it; unknown items
    (index 0, zero embedding) get 0.
    """
    inputs = {"user_idx": np.array([user_idx], dtype=np.int64), "user_cat": user_cat.astype(np.int64)[None],
              "user_num": user_num.astype(np.float32)[None], "history": history.astype(np.int64)[None],
              "timestamp": np.array([timestamp], dtype=np.int64)}
    user = state.user_tower(**inputs)[0][0]                                                       # (D,)
    temperature = float(state.tables.serving.get("temperature", 1.0))
    return (state.item_embeddings[item_idx] @ user / temperature).astype(np.float32)             # (N, D) @ (D,)


def ranker_history_for(serving: dict, history_length: int) -> int:
    """How many of the most recent history items the version's ranker takes (older versions: all)."""
    width = serving.get("ranker_history_length", history_length)
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= history_length:
        raise ValueError(f"serving.json ranker_history_length must be an integer in [1, {history_length}], "
                         f"got {width!r}")
    return width


def score_rule_for(serving: dict, default_mode: str) -> ScoreRule:
    """The version's serving.json decides (it is what offline evaluation used); ``default_mode``
    applies only to a version that does not say."""
    return ScoreRule(mode=serving.get("score_mode", default_mode),
                     rating_weight=float(serving.get("rating_weight", 0.0)),
                     rating_max=float(serving["rating_max"]))


def _smoke(state: ServingState) -> None:
    """Scores the first items for the first known user and the unknown user; refuses NaN or out-of-range."""
    tables = state.tables
    items = np.arange(1, min(_SMOKE_ITEMS, tables.n_items) + 1, dtype=np.int64)
    for user in sorted({0, min(1, tables.n_users)}):
        inputs = ranker_inputs(state, user_idx=user, user_cat=tables.user_cat[user], user_num=tables.user_num[user],
                               history=tables.history[user], timestamp=0, item_idx=items,
                               retrieval_score=np.zeros(items.size, dtype=np.float32))
        ctr, rating = run_ranker(state.ranker, inputs)
        if ctr.shape != items.shape or rating.shape != items.shape:
            raise ValueError(f"ranker must return ({items.size},) ctr and rating, got {ctr.shape} and {rating.shape}")
        low, high = tables.spec.rating_min, tables.spec.rating_max
        if not (np.isfinite(ctr).all() and np.isfinite(rating).all()):
            raise ValueError(f"ranker smoke request must be finite, got ctr {ctr} rating {rating}")
        if rating.min() < low - 1e-3 or rating.max() > high + 1e-3:
            raise ValueError(f"ranker ratings must lie in [{low}, {high}], got [{rating.min()}, {rating.max()}]")


def load_state(directory: Path, version: int, *, default_score_mode: str = "ctr") -> ServingState:
    """Builds, warms and checks the state of the version in ``directory``; raises ValueError if unusable."""
    directory = Path(directory)
    tables = load_tables(directory)
    embeddings = load_item_embeddings(directory, tables.n_items).astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise ValueError("item_embeddings.npy must be finite, got NaN or infinity")
    state = ServingState(
        version=version, ranker=load_program(directory / "ranker.onnx", RANKER),
        user_tower=load_program(directory / "user_tower.onnx", USER_TOWER), tables=tables,
        user_index=tables.user_index(), items=ItemLookup(tables.item_ids), item_embeddings=embeddings,
        popular_scores=np.log1p(tables.item_counts.astype(np.float32)),
        score_rule=score_rule_for(tables.serving, default_score_mode),
        ranker_history=ranker_history_for(tables.serving, tables.spec.history_length),
        metadata=item_metadata.load(directory, tables.item_ids))
    _smoke(state)
    return state
