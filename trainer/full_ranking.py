"""The full-ranking evaluation protocol, shared by validation, the test evaluation and the baselines.

Protocol: for every user with at least one target item, rank all catalog items except the ones
the protocol masks (train items for validation; train + validation items for test), and compare
the top K with the targets. What the models know of a user when judged on test (train, or train +
validation under the ordered protocols) is the test's context, built in ``trainer.prepare``; EASE
scores its rows (``baseline_reports``' ``test_context``). Lives here: the targets (``EvalTarget``, ``make_target``,
``sample_users``), ranking a score function over the catalog (``rank_users``), a ranked list's
report (``list_report``) and the baselines' reports. Metrics come from ``trainer.metrics``;
baselines from ``trainer.baselines``. May not import the training loops or models: they import
this module for early stopping (the run's test evaluation is ``trainer.evaluation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from trainer import metrics
from trainer.baselines import EASE, MAX_EASE_ITEMS, Popularity, SparseMatrix, rank_topk, tune_ease_solution
from trainer.features import FeatureTables, IdVocab

ScoreFn = Callable[[np.ndarray], np.ndarray]   # user idx (B,) -> scores (B, m+1) over item idx


@dataclass(frozen=True, eq=False)
class EvalTarget:
    """What to predict for one evaluation: targets and masked items per user index (CSR, n+1 rows)."""

    users: np.ndarray            # (U,) user indices with at least one target
    truth: tuple[np.ndarray, np.ndarray]
    exclude: tuple[np.ndarray, np.ndarray]
    n_items: int                 # m (item indices 1..m)

    def truth_rows(self) -> list[np.ndarray]:
        indptr, indices = self.truth
        return [indices[indptr[u]:indptr[u + 1]] for u in self.users]

    def exclude_rows(self, users: np.ndarray) -> list[np.ndarray]:
        indptr, indices = self.exclude
        return [indices[indptr[u]:indptr[u + 1]] for u in users]


def interaction_matrix(vocab: IdVocab, frames: list[pd.DataFrame]) -> SparseMatrix:
    """Binary (n+1, m+1) user x item matrix of the known pairs in ``frames`` (unknown ids dropped)."""
    frame = pd.concat(frames, ignore_index=True)
    users = vocab.users_to_idx(frame["user_id"].to_numpy())
    items = vocab.items_to_idx(frame["item_id"].to_numpy())
    keep = (users > 0) & (items > 0)
    matrix = SparseMatrix.from_coo(users[keep], items[keep], (vocab.n_users + 1, vocab.n_items + 1))
    ones = np.ones_like(matrix.values)  # repeated pairs count once: implicit feedback
    return SparseMatrix(matrix.indptr, matrix.indices, ones, matrix.shape)


def make_target(vocab: IdVocab, targets: pd.DataFrame, masked: list[pd.DataFrame]) -> EvalTarget:
    truth = interaction_matrix(vocab, [targets])
    exclude = interaction_matrix(vocab, masked)
    users = np.flatnonzero(np.diff(truth.indptr) > 0).astype(np.int64)
    return EvalTarget(users=users, truth=(truth.indptr, truth.indices),
                      exclude=(exclude.indptr, exclude.indices), n_items=vocab.n_items)


def sample_users(target: EvalTarget, max_users: int, seed: int) -> EvalTarget:
    """The same target restricted to at most ``max_users`` users (seeded); 0 keeps everyone."""
    if not max_users or target.users.size <= max_users:
        return target
    users = np.sort(np.random.default_rng(seed).choice(target.users, size=max_users, replace=False))
    return EvalTarget(users=users, truth=target.truth, exclude=target.exclude, n_items=target.n_items)


def users_per_batch(n_items: int, cells: int = 20_000_000) -> int:
    """Users scored at once so that a (users, items) float32 score matrix stays near 80 MB."""
    return max(1, min(512, cells // max(n_items, 1)))


def rank_users(score_fn: ScoreFn, target: EvalTarget, k: int, batch_size: int | None = None) -> np.ndarray:
    """Top-k item indices (U, k) for ``target.users``, masked items and the padding item 0 removed."""
    batch_size = batch_size or users_per_batch(target.n_items)
    ranked = []
    for start in range(0, target.users.size, batch_size):
        users = target.users[start:start + batch_size]
        scores = np.asarray(score_fn(users), dtype=np.float32)     # (B, m+1)
        scores[:, 0] = -np.inf                                      # item index 0 is padding/OOV
        ranked.append(rank_topk(scores, target.exclude_rows(users), min(k, target.n_items)))
    return np.concatenate(ranked) if ranked else np.zeros((0, k), dtype=np.int64)


def diversity_vectors(tables: FeatureTables, n_genres: int) -> np.ndarray:
    """Item vectors for intra-list diversity: genre flags plus a 'no genre' flag, (m+1, G+1)."""
    genres = tables.item_num[:, :n_genres].astype(np.float32)
    none = (genres.sum(axis=1, keepdims=True) == 0).astype(np.float32)
    return np.concatenate([genres, none], axis=1)


def list_report(ranked: np.ndarray, target: EvalTarget, ks: tuple[int, ...],
                item_vectors: np.ndarray) -> dict[str, float]:
    """Top-K accuracy metrics plus catalog coverage and intra-list diversity at the largest K."""
    report = metrics.topk_report(ranked, target.truth_rows(), ks)
    top = ranked[:, :max(ks)]
    report[f"coverage@{max(ks)}"] = metrics.catalog_coverage(np.where(top > 0, top - 1, -1), target.n_items)
    report[f"diversity@{max(ks)}"] = metrics.intra_list_diversity(top, item_vectors)
    return report


def baseline_reports(train_matrix: SparseMatrix, val: EvalTarget, test: EvalTarget,
                     ks: tuple[int, ...], grid: tuple[float, ...],
                     item_vectors: np.ndarray, search: str = "climb",
                     ranked_lists: dict[str, np.ndarray] | None = None,
                     test_context: SparseMatrix | None = None) -> dict[str, dict[str, float]]:
    """Popularity and EASE (l2 tuned on validation NDCG@10, ``search`` as in ``tune_ease``) evaluated on the
    test target; ``ranked_lists``, when given, receives each baseline's ranked test lists (U, max(ks)).
    ``test_context`` (the shape of ``train_matrix``): the users' rows EASE scores on test (train +
    validation, as the other models' histories); None scores the training rows."""
    reports = {}
    lists = {} if ranked_lists is None else ranked_lists
    popularity = Popularity().fit(train_matrix)
    lists["popularity"] = rank_users(popularity.scores, test, max(ks))
    reports["popularity"] = list_report(lists["popularity"], test, ks, item_vectors)
    if train_matrix.shape[1] <= MAX_EASE_ITEMS:
        best, _table = tune_ease_solution(train_matrix, val.truth, val.exclude, grid, search=search)
        ease = EASE.from_solution(best)
        lists["ease"] = rank_users(lambda users: ease.scores(users, test_context), test, max(ks))
        reports["ease"] = list_report(lists["ease"], test, ks, item_vectors)
        reports["ease"]["l2"] = float(best.l2)
    return reports


# Paired test comparisons of the report (model, reference): the ratios the project's aims are stated in, and
# the kept ranker against its fitted start (what the ranker's epochs did on test, where one was kept).
PAIRS = (("pipeline", "ease"), ("pipeline", "two_tower"), ("two_tower", "ease"), ("pipeline", "pipeline_start"))


def paired_ratio(model: np.ndarray, reference: np.ndarray, resamples: int = 1000,
                 seed: int = 0) -> dict[str, float | int | list[float] | None]:
    """How two models' per-user scores on the same users compare: the ratio of their means, its 95 % interval
    by a paired bootstrap over users (``resamples`` draws of the users with replacement, seeded), and the mean
    per-user difference in standard errors of that mean (t). A ratio whose interval holds 1 is within the
    noise of the test users. None where a figure has no value (a reference that scores nothing: no ratio; a
    difference without spread: no t); no interval for fewer than two users."""
    mean_diff, t = metrics.paired_difference(model, reference)
    model, reference = np.asarray(model, np.float64), np.asarray(reference, np.float64)
    n = model.size
    out: dict[str, float | int | list[float] | None] = {
        "users": int(n), "ratio": float(model.sum() / reference.sum()) if reference.sum() > 0 else None,
        "difference": mean_diff, "t": t}
    if n > 1:
        rng = np.random.default_rng(seed)
        ratios = np.empty(resamples)
        for start in range(0, resamples, 100):     # 100 draws of the users at a time: (100, n) indices
            draw = rng.integers(0, n, size=(min(100, resamples - start), n))
            with np.errstate(divide="ignore", invalid="ignore"):   # a draw where the reference scores nothing
                ratios[start:start + draw.shape[0]] = model[draw].sum(axis=1) / reference[draw].sum(axis=1)
        finite = ratios[np.isfinite(ratios)]
        if finite.size:
            low, high = np.percentile(finite, [2.5, 97.5])
            out["ratio_95"] = [float(low), float(high)]
    return out
