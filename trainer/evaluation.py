"""Offline evaluation of a trained run on the test split: the evaluation report's numbers.

``retrieve`` gives each user's exact top-n two-tower candidates (what the flat index serves; the
ranker's training and the sample recommendations use it too); ``evaluate`` measures, in the test's context (``Prepared.test_tables``: by default
each user's validation interactions join the history every model reads, EASE's rows too), retrieval
alone, the full pipeline (retrieve N -> rank -> top K; and with the ranker's start where a trained epoch
replaced it), the ranking heads, the MMR diversity
trade-off, the reference baselines and the recommendations' popularity profile; ``data_report`` is
the report's ``data`` section. The protocol itself (targets, masks, list metrics) is
``trainer.full_ranking``. Nothing here trains, gates or publishes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recsys_contracts.rerank import mmr_order
from trainer import metrics
from trainer.baselines import rank_topk
from trainer.config import TrainConfig
from trainer.features import FeatureTables
from trainer.full_ranking import (PAIRS, EvalTarget, baseline_reports, diversity_vectors, interaction_matrix,
                                  list_report, paired_ratio, users_per_batch)
from trainer.prepare import HEADLINE_K, Prepared, held_out
from trainer.progress import Timings
from trainer.publish import TrainedRun, all_item_embeddings
from trainer.ranking_training import Candidates, click_rows, rerank, row_scores, score_candidates
from trainer.retrieval_training import item_embeddings, user_embeddings


@torch.no_grad()
def retrieve(two_tower, tables: FeatureTables, users: np.ndarray, exclude: EvalTarget, n: int,
             timestamps: np.ndarray, device: torch.device, batch_size: int | None = None) -> Candidates:
    """Top-n candidates per user by exact search (what the flat index serves), masked items removed."""
    items = item_embeddings(two_tower, tables, device)                 # (m+1, D)
    temperature = float(two_tower.temperature.detach())
    n = min(n, tables.vocab.n_items)
    batch_size = batch_size or users_per_batch(tables.vocab.n_items)
    all_items, all_scores = [], []
    for start in range(0, users.size, batch_size):
        batch = users[start:start + batch_size]
        sims = (user_embeddings(two_tower, tables, batch, timestamps[batch], device) @ items.T).cpu().numpy()
        sims[:, 0] = -np.inf
        top = rank_topk(sims, exclude.exclude_rows(batch), n)            # (B, n), -1 padded
        scores = np.take_along_axis(sims, np.maximum(top, 0), axis=1) / temperature
        all_items.append(np.where(top > 0, top, 0))
        all_scores.append(np.where(top > 0, scores, -np.inf).astype(np.float32))
    return Candidates(users, np.concatenate(all_items), np.concatenate(all_scores))


def evaluate(cfg: TrainConfig, prep: Prepared, run: TrainedRun, device: torch.device,
             timings: Timings) -> dict[str, Any]:
    """The evaluation report's numbers on the test split (protocol from the config)."""
    ks, vectors = cfg.eval.ks, diversity_vectors(prep.tables, len(prep.spec.item_genres))
    report: dict[str, Any] = {}
    with timings.stage("evaluation"):
        n = max(cfg.ranking.candidates, max(cfg.eval.retrieval_ks))
        tables, timestamps = prep.test_tables, prep.test_timestamps       # train + validation histories (by default)
        cands = retrieve(run.two_tower, tables, prep.test.users, prep.test, n, timestamps, device)
        truth = prep.test.truth_rows()
        retrieved = np.where(cands.items > 0, cands.items, -1)   # -1: padding, where fewer items are left
        report["retrieval"] = {f"recall@{k}": metrics.recall_at_k(retrieved[:, :k], truth, k)
                               for k in cfg.eval.retrieval_ks if k <= cands.items.shape[1]}
        report["two_tower"] = list_report(retrieved[:, :max(ks)], prep.test, ks, vectors)
        top_n = Candidates(cands.users, cands.items[:, :cfg.ranking.candidates],
                           cands.scores[:, :cfg.ranking.candidates])
        scores, ctr, rating = score_candidates(run.ranker, tables, top_n, timestamps[top_n.users],
                                               run.score_mode, run.rating_weight, prep.spec.rating_max, device)
        ranked = rerank(top_n, scores, max(ks))
        report["pipeline"] = list_report(ranked, prep.test, ks, vectors)
        lists = {"pipeline": ranked, "two_tower": retrieved[:, :max(ks)]}
        if run.ranker_start is not None:
            # Where a trained epoch replaced the ranker's fitted start: the start on the same candidates, so that
            # the report shows what the DCN's epochs did on test (a side-by-side baseline of the same run).
            start_scores = score_candidates(run.ranker_start, tables, top_n, timestamps[top_n.users],
                                            run.score_mode, run.rating_weight, prep.spec.rating_max, device)[0]
            lists["pipeline_start"] = rerank(top_n, start_scores, max(ks))
            report["pipeline_start"] = list_report(lists["pipeline_start"], prep.test, ks, vectors)
        report["ranking_heads"] = _head_metrics(cfg, prep, run, top_n, device)
        report["diversity_tradeoff"] = _diversity_tradeoff(cfg, prep, run, top_n, scores, vectors)
    with timings.stage("baselines"):
        report["baselines"] = baseline_reports(interaction_matrix(prep.vocab, [prep.split.train]), prep.val,
                                               prep.test, ks, cfg.eval.ease_grid, vectors,
                                               cfg.eval.ease_search, ranked_lists=lists,
                                               test_context=context_rows_for_test(prep))
    report["paired"] = paired_report(lists, truth, cfg.run.seed)
    report["recommended_popularity"] = _popularity_profile(ranked, prep.tables)
    return report


def context_rows_for_test(prep: Prepared):
    """EASE's rows on test: the interactions the models know of each user then (``Prepared.test_known``), or
    None where that is the training split alone."""
    return interaction_matrix(prep.vocab, list(prep.test_known)) if prep.test_context != "train" else None


def paired_report(lists: dict[str, np.ndarray], truth: list[np.ndarray], seed: int,
                  k: int = HEADLINE_K) -> dict[str, dict[str, float]]:
    """The report's ``paired`` section: for each (model, reference) of ``PAIRS`` whose lists are there (EASE
    is not run on the largest catalogs; the ranker's start is there only where a trained epoch replaced it),
    the NDCG@k ratio with its bootstrap interval and t over the test
    users (``paired_ratio``), keyed "model / reference"."""
    paired = {name for pair in PAIRS for name in pair}
    per_user = {name: metrics.per_user("ndcg", ranked, truth, k) for name, ranked in lists.items() if name in paired}
    return {f"{model} / {reference}": paired_ratio(per_user[model], per_user[reference], seed=seed)
            for model, reference in PAIRS if model in per_user and reference in per_user}


def data_report(prep: Prepared, protocol: str, seed: int | None = None) -> dict[str, Any]:
    """The report's ``data`` section: dataset, protocol (and split seed), sizes, the test's context (the
    interactions every model knew of the test users), time range, and what the
    loader read, kept, dropped (by reason) and assumed (its warnings: column spellings, implicit feedback,
    time units, ...)."""
    interactions, loaded = prep.dataset.interactions, prep.dataset.report
    return {"dataset": prep.dataset.name, "protocol": protocol, **({"seed": seed} if seed is not None else {}),
            "n_users": prep.vocab.n_users, "n_items": prep.vocab.n_items,
            "train": len(prep.split.train), "val": len(prep.split.val), "test": len(prep.split.test),
            "test_users": int(prep.test.users.size),
            "test_context": prep.test_context,
            "time_range": [int(interactions["timestamp"].min()), int(interactions["timestamp"].max())],
            "load": {"source": loaded.source, "rows_read": loaded.rows_read, "rows_kept": loaded.rows_kept,
                     "dropped": dict(loaded.dropped), "warnings": list(loaded.warnings)}}


def _head_metrics(cfg, prep: Prepared, run: TrainedRun, cands: Candidates, device) -> dict[str, float]:
    """CTR AUC / log loss on test positives vs retrieved-not-taken negatives; rating RMSE on test ratings."""
    rows = click_rows(held_out(prep.vocab, prep.split.test), cands, cfg.ranking.negatives_per_positive,
                      np.random.default_rng(cfg.run.seed + 7), cfg.ranking.negative_pool)
    ctr_logit, rating = row_scores(run.ranker, prep.test_tables, rows, device)
    probs = torch.sigmoid(torch.as_tensor(ctr_logit)).numpy()
    rated = rows.clicks == 1
    return {"ctr_auc": metrics.auc(rows.clicks, probs), "ctr_logloss": metrics.log_loss(rows.clicks, probs),
            "rating_rmse": metrics.rmse(rows.ratings[rated], rating[rated])}


def _diversity_tradeoff(cfg: TrainConfig, prep: Prepared, run: TrainedRun, cands: Candidates,
                        scores: np.ndarray, vectors: np.ndarray, pool: int = 50) -> dict[str, dict[str, float]]:
    """NDCG@10 and intra-list diversity@10 after the service's MMR re-rank at each strength."""
    embeddings = all_item_embeddings(run.two_tower, prep.tables)
    top = rerank(cands, scores, pool)                                          # (U, pool) best first
    row_scores = np.take_along_axis(scores, np.argsort(-np.where(cands.items > 0, scores, -np.inf), axis=1,
                                                       kind="stable")[:, :pool], axis=1)
    out = {}
    for strength in cfg.eval.diversity_strengths:
        lists = np.full((top.shape[0], 10), -1, dtype=np.int64)
        for u in range(top.shape[0]):
            valid = top[u] > 0
            order = mmr_order(row_scores[u][valid], embeddings[top[u][valid]], 10, float(strength))
            lists[u, :order.size] = top[u][valid][order]
        out[f"{strength:g}"] = {"ndcg@10": metrics.ndcg_at_k(lists, prep.test.truth_rows(), 10),
                                "diversity@10": metrics.intra_list_diversity(lists, vectors)}
    return out


def _popularity_profile(ranked: np.ndarray, tables: FeatureTables) -> dict[str, list[float]]:
    """Share of recommendations and of the catalog in each popularity decile (0 = most popular)."""
    order = tables.popular_items
    decile = np.zeros(tables.vocab.n_items + 1, dtype=np.int64)
    decile[order] = np.arange(order.size) * 10 // max(order.size, 1)
    recs = ranked[ranked > 0]
    rec_share = np.bincount(decile[recs], minlength=10) / max(recs.size, 1)
    catalog_share = np.bincount(decile[order], minlength=10) / max(order.size, 1)
    return {"recommended": rec_share.round(4).tolist(), "catalog": catalog_share.round(4).tolist()}
