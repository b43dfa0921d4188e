"""The serving state of one artifact version: everything a request needs, built once, never mutated.

``load_state`` is the ``VersionHolder`` loader: ``recsys_contracts.bundle.verify_bundle`` loads and
self-checks the whole version (the same check the retrieval service runs, so both services refuse the
same versions); this service keeps the ranker, the user tower, the tables and the item embeddings (for
the diversity re-rank and Rank's retrieval scores) and lets the index go.

Item rows live here for the whole catalog of the version: this is the in-process item cache that
sits in front of Redis (Redis holds a copy of the same artifact rows, so a hit here is always
exact and the per-request Redis round trip carries only the user's keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_contracts import item_metadata
from recsys_contracts.bundle import ScoreRule, VersionTables, verify_bundle
from recsys_contracts.ids import ItemLookup
from recsys_contracts.programs import Program, run_ranker_program


@dataclass(frozen=True, eq=False)
class ServingState:
    """One version, ready to serve; requests read ``holder.current`` once and keep this object."""

    version: int
    ranker: Program                         # exported DCN: user rows + candidate rows -> (ctr_logit (N,), rating (N,))
    user_tower: Program                     # exported user tower: Rank computes retrieval scores itself
    tables: VersionTables
    user_index: dict[str, int]              # external user id -> user index (absent = unknown)
    items: ItemLookup
    item_embeddings: np.ndarray             # (m+1, D) float32, row 0 zero (retrieval scores, MMR)
    popular_scores: np.ndarray              # (m+1,) float32 log(1 + training count): fallback retrieval score
    score_rule: ScoreRule
    ranker_history: int                     # the ranker's history input holds the last this-many items
    metadata: item_metadata.ItemMetadata    # titles, genres, recent interactions: display only

    @property
    def spec(self):
        return self.tables.spec


def run_ranker(ranker: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over grouped inputs (``ranker_inputs``, or several concatenated by
    ``concat_inputs``): (ctr (N,) float32 in [0, 1], rating (N,) float32), one per candidate row. A
    version published before the grouped ranker (``RANKER_ROWS``) gets its user rows repeated per
    candidate here, in the DCN thread."""
    logit, rating = run_ranker_program(ranker, inputs)
    with np.errstate(over="ignore", invalid="ignore"):   # exp(-logit) = inf for logit << 0: ctr 0
        ctr = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32, copy=False)                  # (N,)
    return ctr, rating


def ranker_inputs(state: ServingState, *, user_idx: int, user_cat: np.ndarray, user_num: np.ndarray,
                  history: np.ndarray, timestamp: int, item_idx: np.ndarray,
                  retrieval_score: np.ndarray) -> dict[str, np.ndarray]:
    """The program's keyword inputs for one user against N items, grouped (``recsys_contracts.programs.RANKER``):
    one user row (the history cut to the ranker's most recent ``state.ranker_history`` items) and N
    candidate rows that all name it (``row_user`` 0), so the DCN computes the user's side once."""
    n = item_idx.size
    tables = state.tables
    history = history[-state.ranker_history:]
    return {
        "user_idx": np.array([user_idx], dtype=np.int64),                               # (1,)
        "user_cat": user_cat.astype(np.int64).reshape(1, -1),                           # (1, Cu)
        "user_num": user_num.astype(np.float32).reshape(1, -1),                         # (1, Nu)
        "history": history.astype(np.int64).reshape(1, -1),                             # (1, H)
        "timestamp": np.array([timestamp], dtype=np.int64),                             # (1,)
        "row_user": np.zeros(n, dtype=np.int64),                                        # (N,)
        "item_idx": item_idx.astype(np.int64, copy=False),                              # (N,)
        "item_cat": tables.item_cat[item_idx],                                          # (N, Ci)
        "item_num": tables.item_num[item_idx],                                          # (N, Ni)
        "retrieval_score": retrieval_score.astype(np.float32, copy=False),              # (N,)
    }


def concat_inputs(jobs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' grouped inputs as one: user rows and candidate rows stacked, each job's
    ``row_user`` shifted past the user rows of the jobs before it."""
    offsets = np.cumsum([0] + [job["user_idx"].shape[0] for job in jobs[:-1]])
    merged = {name: np.concatenate([job[name] for job in jobs]) for name in jobs[0] if name != "row_user"}
    merged["row_user"] = np.concatenate([job["row_user"] + offset for job, offset in zip(jobs, offsets)])
    return merged


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
    temperature = float(state.tables.serving.temperature)
    return (state.item_embeddings[item_idx] @ user / temperature).astype(np.float32)             # (N, D) @ (D,)


def load_state(directory: Path, version: int, *, default_score_mode: str = "ctr") -> ServingState:
    """The state of the version in ``directory`` once its whole bundle passed ``verify_bundle``;
    raises ValueError if unusable. ``default_score_mode`` applies only to a version whose
    serving.json names no score mode."""
    bundle = verify_bundle(directory, version)
    tables = bundle.tables
    return ServingState(
        version=version, ranker=bundle.ranker, user_tower=bundle.user_tower, tables=tables,
        user_index=tables.user_index(), items=ItemLookup(tables.item_ids), item_embeddings=bundle.item_embeddings,
        popular_scores=np.log1p(tables.item_counts.astype(np.float32)),
        score_rule=tables.serving.score_rule(default_score_mode),
        ranker_history=tables.serving.ranker_history_length,
        metadata=bundle.metadata)
