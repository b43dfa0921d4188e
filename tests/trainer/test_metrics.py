"""Metrics on hand-computed cases (arithmetic in the comments), edge cases and brute-force twins."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from trainer.metrics import (
    TOPK_METRICS,
    auc,
    catalog_coverage,
    hit_at_k,
    intra_list_diversity,
    log_loss,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    rmse,
    to_csr,
    topk_report,
)

LOG2_3 = math.log2(3)  # 1 / log2(3) = 0.63093 is the rank-2 discount; rank 3 gets 1 / log2(4) = 0.5


def test_one_user_hits_at_ranks_1_and_3_of_4_test_items():
    ranked = np.array([[3, 7, 5, 9]])
    truth = [np.array([3, 5, 11, 12])]
    # Hits at ranks 1 (item 3) and 3 (item 5); |T| = 4.
    # recall@3 = 2 / |T| = 2/4; precision@3 = 2/3.
    assert recall_at_k(ranked, truth, 3) == pytest.approx(0.5)
    assert precision_at_k(ranked, truth, 3) == pytest.approx(2 / 3)
    # DCG = 1/log2(2) + 1/log2(4) = 1 + 0.5 = 1.5;
    # IDCG over min(3, 4) = 3 ranks = 1 + 1/log2(3) + 0.5 = 2.13093; NDCG = 1.5 / 2.13093 = 0.70392.
    assert ndcg_at_k(ranked, truth, 3) == pytest.approx(1.5 / (1 + 1 / LOG2_3 + 0.5))
    assert ndcg_at_k(ranked, truth, 3) == pytest.approx(0.70392, abs=1e-5)
    # AP@3 = (precision@1 + precision@3) / min(3, 4) = (1 + 2/3) / 3 = 0.5556.
    assert map_at_k(ranked, truth, 3) == pytest.approx((1 + 2 / 3) / 3)
    # First hit at rank 1: reciprocal rank 1; a hit exists: hit = 1.
    assert mrr_at_k(ranked, truth, 3) == pytest.approx(1.0)
    assert hit_at_k(ranked, truth, 3) == pytest.approx(1.0)
    # At k=1 only item 3: recall 1/4, precision 1/1, NDCG 1/1 (IDCG over min(1, 4) = 1 rank).
    assert recall_at_k(ranked, truth, 1) == pytest.approx(0.25)
    assert precision_at_k(ranked, truth, 1) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, truth, 1) == pytest.approx(1.0)


def test_empty_truth_users_are_excluded_and_no_hit_users_count_zero():
    ranked = np.array([[0, 1, 2], [4, -1, -1], [2, 0, 1]])
    truth = [np.array([1]), np.array([], dtype=np.int64), np.array([5, 6])]
    # User 1 has no test items: averages run over users 0 and 2 only.
    # User 0: one hit at rank 2, |T| = 1. User 2: no hit.
    # recall@3 = (1/1 + 0) / 2 = 0.5; precision@3 = (1/3 + 0) / 2 = 1/6.
    assert recall_at_k(ranked, truth, 3) == pytest.approx(0.5)
    assert precision_at_k(ranked, truth, 3) == pytest.approx(1 / 6)
    # User 0: DCG = 1/log2(3) = 0.63093, IDCG over min(3, 1) = 1 rank = 1; mean (0.63093 + 0) / 2.
    assert ndcg_at_k(ranked, truth, 3) == pytest.approx(0.5 / LOG2_3)
    # User 0: AP = precision@2 / min(3, 1) = (1/2) / 1; mean (0.5 + 0) / 2 = 0.25.
    assert map_at_k(ranked, truth, 3) == pytest.approx(0.25)
    # User 0: first hit at rank 2 -> 1/2; mean (0.5 + 0) / 2 = 0.25. Hit rate 1 of 2 users.
    assert mrr_at_k(ranked, truth, 3) == pytest.approx(0.25)
    assert hit_at_k(ranked, truth, 3) == pytest.approx(0.5)


def test_no_hits_at_all_gives_zero():
    ranked = np.array([[0, 1], [2, 3]])
    truth = [np.array([7]), np.array([8, 9])]
    report = topk_report(ranked, truth, ks=(1, 2))
    assert set(report.values()) == {0.0}


def test_k_larger_than_the_list_counts_missing_positions_as_misses():
    ranked = np.array([[5, 6]])
    truth = [np.array([6, 7, 8])]
    # One hit at rank 2 of a 2-item list, k = 5, |T| = 3.
    # precision@5 = 1/5 (positions 3..5 are misses); recall@5 = 1/3.
    assert precision_at_k(ranked, truth, 5) == pytest.approx(0.2)
    assert recall_at_k(ranked, truth, 5) == pytest.approx(1 / 3)
    # DCG = 1/log2(3) = 0.63093; IDCG over min(5, 3) = 3 ranks = 2.13093; NDCG = 0.29608.
    assert ndcg_at_k(ranked, truth, 5) == pytest.approx(0.29608, abs=1e-5)
    # AP = precision@2 / min(5, 3) = (1/2) / 3 = 1/6.
    assert map_at_k(ranked, truth, 5) == pytest.approx(1 / 6)


def test_padding_never_hits_even_where_its_key_would_alias_the_previous_user():
    # Keys are user * width + item with width = 5 here; user 1's padding -1 gives 1*5 - 1 = 4,
    # which is user 0's key for item 4 (in user 0's truth). It must not count as a hit.
    ranked = np.array([[0, 1], [-1, 0]])
    truth = [np.array([4]), np.array([0])]
    # User 0: no hit. User 1: hit at rank 2 -> hit@1 = 0, mrr@2 = (0 + 1/2) / 2 = 0.25.
    assert hit_at_k(ranked, truth, 1) == 0.0
    assert mrr_at_k(ranked, truth, 2) == pytest.approx(0.25)


def test_truth_forms_agree_and_duplicates_count_once():
    ranked = np.array([[1, 2, 3], [4, 5, 6]])
    as_list = [np.array([3, 1, 1]), np.array([9])]
    as_tuple = (np.array([0, 3, 4]), np.array([3, 1, 1, 9]))
    as_object = SimpleNamespace(indptr=as_tuple[0], indices=as_tuple[1])
    deduped = [np.array([1, 3]), np.array([9])]
    expected = topk_report(ranked, deduped, ks=(2, 3))
    # User 0: {1, 3} at ranks 1 and 3 -> recall@3 = 2/2; user 1 none -> mean 0.5.
    assert expected["recall@3"] == pytest.approx(0.5)
    for truth in (as_list, as_tuple, as_object):
        assert topk_report(ranked, truth, ks=(2, 3)) == expected


def test_topk_report_keys_and_values_match_the_single_metrics():
    rng = np.random.default_rng(3)
    ranked = np.stack([rng.permutation(50)[:20] for _ in range(30)])
    truth = [rng.choice(50, size=rng.integers(0, 8), replace=False) for _ in range(30)]
    report = topk_report(ranked, truth)
    assert list(report) == [f"{m}@{k}" for k in (10, 20) for m in TOPK_METRICS]
    singles = {
        "recall": recall_at_k, "precision": precision_at_k, "ndcg": ndcg_at_k,
        "map": map_at_k, "mrr": mrr_at_k, "hit": hit_at_k,
    }
    for name, fn in singles.items():
        for k in (10, 20):
            assert report[f"{name}@{k}"] == pytest.approx(fn(ranked, truth, k))


def test_hit_matrix_matches_a_per_user_loop_on_a_million_item_catalog():
    rng = np.random.default_rng(0)
    n_users, k, n_items = 200, 50, 1_000_000
    ranked = np.stack([rng.choice(n_items, size=k, replace=False) for _ in range(n_users)])
    ranked[::7, -5:] = -1
    # Plant some hits so the comparison is not trivially all-zero.
    truth = [np.concatenate([rng.choice(n_items, 5), ranked[u, rng.integers(0, k, 2)]]) for u in range(n_users)]
    truth = [t[t >= 0] for t in truth]
    ideal_disc = 1 / np.log2(np.arange(2, k + 2))
    expected_recall, expected_ndcg = [], []
    for u in range(n_users):
        t = set(truth[u].tolist())
        rel = np.array([int(i) in t for i in ranked[u]], dtype=float)
        expected_recall.append(rel.sum() / len(t))
        expected_ndcg.append((rel * ideal_disc).sum() / ideal_disc[: min(k, len(t))].sum())
    assert recall_at_k(ranked, truth, k) == pytest.approx(np.mean(expected_recall))
    assert ndcg_at_k(ranked, truth, k) == pytest.approx(np.mean(expected_ndcg))


def test_to_csr_sorts_and_deduplicates_rows():
    indptr, indices = to_csr([np.array([5, 2, 5]), np.array([], dtype=np.int64), np.array([1])], 3)
    assert indptr.tolist() == [0, 2, 2, 3]
    assert indices.tolist() == [2, 5, 1]


@pytest.mark.parametrize(
    ("truth", "match"),
    [
        ((np.array([0, 1]), np.array([1]), np.array([1.0])), "as a tuple must be"),
        ([np.array([1])], "one array per row"),
        ([np.array([1.5]), np.array([1])], r"truth\[0\] must be a 1-D integer"),
        ([np.array([[1]]), np.array([1])], r"truth\[0\] must be a 1-D integer"),
        ({"a": 1}, "must be a list of arrays or a CSR"),
        ((np.array([0, 1]), np.array([1])), "indptr must be a 1-D integer array of length 3"),
        ((np.array([0.0, 1.0, 1.0]), np.array([1])), "indptr must be a 1-D integer array"),
        ((np.array([0, 1, 1]), np.array([1.0])), "indices must be a 1-D integer array"),
        ((np.array([0, 2, 1]), np.array([1])), "indptr must rise from 0"),
        ((np.array([0, 1, 2]), np.array([1])), "indptr must rise from 0"),
        ((np.array([0, 1, 1]), np.array([-3])), "indices must be >= 0, got -3"),
    ],
)
def test_bad_truth_is_rejected_with_its_value(truth, match):
    ranked = np.array([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=match):
        recall_at_k(ranked, truth, 2)


@pytest.mark.parametrize(
    ("ranked", "match"),
    [
        (np.array([1, 2]), "ranked must be a 2-D integer array"),
        (np.array([[1.0, 2.0]]), "ranked must be a 2-D integer array"),
        (np.array([[1, -2]]), "-1 padding, got -2"),
        (np.array([[1, 2, 1]]), r"must not repeat an item, row 0 is \[1, 2, 1\]"),
    ],
)
def test_bad_ranked_is_rejected_with_its_value(ranked, match):
    with pytest.raises(ValueError, match=match):
        hit_at_k(ranked, [np.array([1])], 1)


def test_repeated_padding_is_allowed():
    assert hit_at_k(np.array([[2, -1, -1]]), [np.array([2])], 3) == 1.0


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match=f"k must be an integer >= 1, got {k!r}"):
        ndcg_at_k(np.array([[1]]), [np.array([1])], k)


def test_truth_without_any_test_item_is_rejected():
    with pytest.raises(ValueError, match="at least one user a test item"):
        ndcg_at_k(np.array([[1]]), [np.array([], dtype=np.int64)], 1)


def test_topk_report_needs_a_cutoff():
    with pytest.raises(ValueError, match="ks must name at least one cut-off"):
        topk_report(np.array([[1]]), [np.array([1])], ks=())


def test_catalog_coverage_counts_distinct_items_ignoring_padding():
    ranked = np.array([[0, 1, -1], [1, 2, 3]])
    # Distinct items {0, 1, 2, 3} of 10: coverage = 4 / 10.
    assert catalog_coverage(ranked, 10) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("n_items", "match"), [(0, "n_items must be an integer >= 1, got 0"), (3, "< n_items=3, got 3")]
)
def test_catalog_coverage_rejects_bad_n_items(n_items, match):
    with pytest.raises(ValueError, match=match):
        catalog_coverage(np.array([[0, 3]]), n_items)


def test_intra_list_diversity_hand_computed():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ranked = np.array([[0, 1, 2], [0, 2, -1], [2, -1, -1]])
    # List 0: cos(0,1) = 0, cos(0,2) = cos(1,2) = 1/sqrt(2) = 0.70711;
    #   distances 1, 0.29289, 0.29289 -> mean 1.58579 / 3 = 0.52860.
    # List 1: one pair (0, 2): distance 1 - 0.70711 = 0.29289.
    # List 2: one item, no pair -> left out. ILD = (0.52860 + 0.29289) / 2 = 0.41074.
    d = 1 - 1 / math.sqrt(2)
    assert intra_list_diversity(ranked, vectors) == pytest.approx(((1 + 2 * d) / 3 + d) / 2)
    assert intra_list_diversity(ranked, vectors) == pytest.approx(0.41074, abs=1e-5)


def test_intra_list_diversity_matches_pairwise_brute_force_across_chunks():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(40, 6))
    ranked = np.stack([rng.permutation(40)[:7] for _ in range(11)])
    ranked[2, 3:] = -1
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    per_list = []
    for row in ranked:
        items = row[row >= 0]
        d = [1 - unit[a] @ unit[b] for i, a in enumerate(items) for b in items[i + 1 :]]
        per_list.append(np.mean(d))
    # chunk_size=3 splits the 11 lists into 4 blocks.
    assert intra_list_diversity(ranked, vectors, chunk_size=3) == pytest.approx(np.mean(per_list))


@pytest.mark.parametrize(
    ("ranked", "vectors", "match"),
    [
        (np.array([[0, 1]]), np.ones(3), r"item_vectors must be a 2-D array \(M, D\)"),
        (np.array([[0, 1]]), np.ones((0, 2)), r"item_vectors must be a 2-D array \(M, D\)"),
        (np.array([[0, 3]]), np.ones((3, 2)), r"< len\(item_vectors\)=3, got 3"),
        (np.array([[0, 2]]), np.array([[1.0, 0], [1, 1], [0, 0]]), "row 2 is zero"),
        (np.array([[0, -1], [1, -1]]), np.ones((3, 2)), "two or more items"),
    ],
)
def test_intra_list_diversity_rejects_bad_input(ranked, vectors, match):
    with pytest.raises(ValueError, match=match):
        intra_list_diversity(ranked, vectors)


def test_auc_hand_computed_with_a_tie():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.9, 0.4, 0.1])
    # Positive-negative pairs: (0.9 vs 0.9) tie = 0.5, (0.9 vs 0.1) = 1, (0.4 vs 0.9) = 0, (0.4 vs 0.1) = 1
    # -> 2.5 / 4 = 0.625. Rank-sum: ranks 0.1->1, 0.4->2, 0.9->3.5 (tied 3 and 4);
    # positives 3.5 + 2 = 5.5, minus P(P+1)/2 = 3 -> 2.5, over P*N = 4 -> 0.625.
    assert auc(labels, scores) == pytest.approx(0.625)


def test_auc_matches_a_brute_force_pairwise_count():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(labels, scores) == pytest.approx(expected)
    assert auc(labels.astype(bool), scores) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        (np.array([1, 2, 0]), np.array([0.1, 0.2, 0.3]), "labels must be 0 or 1, got 2"),
        (np.array([1, 1]), np.array([0.1, 0.2]), "both classes, got 2 positives and 0 negatives"),
        (np.array([[1, 0]]), np.array([[0.1, 0.2]]), "labels must be a non-empty 1-D array"),
        (np.array([]), np.array([]), "labels must be a non-empty 1-D array"),
        (np.array([1, 0]), np.array([0.1, 0.2, 0.3]), r"scores must have the shape of labels \(2,\), got \(3,\)"),
        (np.array([1, 0]), np.array([0.1, np.nan]), "scores must be finite, got nan"),
    ],
)
def test_auc_rejects_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auc(labels, scores)


def test_log_loss_hand_computed_and_clipped():
    # -(ln 0.8 + ln(1 - 0.4)) / 2 = (0.22314 + 0.51083) / 2 = 0.36698.
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(0.36698, abs=1e-5)
    # p = 0 for a positive is clipped to eps: -ln(1e-7) = 16.11810.
    assert log_loss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    # p = 1 for a negative: -ln(1 - (1 - eps)) = -ln(eps), with eps = 1e-3: 6.90776.
    assert log_loss(np.array([0.0]), np.array([1.0]), eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-6)


@pytest.mark.parametrize(
    ("labels", "probs", "eps", "match"),
    [
        (np.array([1.0]), np.array([0.5]), 0.0, "eps must be in \\(0, 0.5\\), got 0.0"),
        (np.array([1.0]), np.array([0.5]), 0.5, "eps must be in \\(0, 0.5\\), got 0.5"),
        (np.array([1.5]), np.array([0.5]), 1e-7, r"labels must lie in \[0, 1\], got range \[1.5, 1.5\]"),
        (np.array([1.0]), np.array([-0.1]), 1e-7, r"probs must lie in \[0, 1\], got range \[-0.1, -0.1\]"),
        (np.array([1.0]), np.array([np.inf]), 1e-7, "probs must be finite, got inf"),
    ],
)
def test_log_loss_rejects_bad_input(labels, probs, eps, match):
    with pytest.raises(ValueError, match=match):
        log_loss(labels, probs, eps=eps)


def test_rmse_hand_computed():
    # Errors 0, 0, 2 -> sqrt((0 + 0 + 4) / 3) = sqrt(1.3333) = 1.15470.
    assert rmse(np.array([1, 2, 3]), np.array([1, 2, 5])) == pytest.approx(1.15470, abs=1e-5)


@pytest.mark.parametrize(
    ("y", "yhat", "match"),
    [
        (np.array([1.0, 2.0]), np.array([1.0]), r"yhat must have the shape of y \(2,\), got \(1,\)"),
        (np.array([np.nan]), np.array([1.0]), "y must be finite, got nan"),
    ],
)
def test_rmse_rejects_bad_input(y, yhat, match):
    with pytest.raises(ValueError, match=match):
        rmse(y, yhat)


def test_per_user_metric_is_the_mean_metric_user_by_user():
    from trainer import metrics

    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    truth = [[2], [9], [7, 8]]
    values = metrics.per_user("ndcg", ranked, truth, 3)
    assert values.shape == (3,) and values[1] == 0.0 and values[2] == pytest.approx(1.0)
    assert values.mean() == pytest.approx(metrics.ndcg_at_k(ranked, truth, 3))


def test_paired_t_is_the_mean_gain_in_standard_errors():
    from trainer.ranking_training import paired_t

    start = np.array([0.0, 0.5, 1.0, 0.0])
    gain = np.array([0.1, 0.3, 0.2, 0.2])
    assert paired_t(start + gain, start) == pytest.approx(gain.mean() / (gain.std(ddof=1) / 2))
    assert paired_t(start + 0.25, start) == np.inf                      # a gain with no spread
    assert paired_t(start, start) == 0.0 and paired_t(np.ones(1), np.zeros(1)) == 0.0
    assert paired_t(start - gain, start) < 0


def test_paired_difference_gives_the_mean_and_its_t_or_none_where_a_t_has_no_value():
    from trainer import metrics

    start = np.array([0.0, 0.5, 1.0, 0.0])
    gain = np.array([0.1, 0.3, 0.2, 0.2])
    mean, t = metrics.paired_difference(start + gain, start)
    assert mean == pytest.approx(0.2) and t == pytest.approx(gain.mean() / (gain.std(ddof=1) / 2))
    assert metrics.paired_difference(start - gain, start)[1] == pytest.approx(-t)
    assert metrics.paired_difference(start + 0.25, start) == (pytest.approx(0.25), None)   # no spread
    assert metrics.paired_difference(start, start) == (0.0, 0.0)
    assert metrics.paired_difference(np.ones(1), np.zeros(1)) == (1.0, None)              # one user
    with pytest.raises(ValueError, match="two 1-d arrays of one length"):
        metrics.paired_difference(start, start[:3])
