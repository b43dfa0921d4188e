"""Baselines on hand-checkable matrices, rank_topk masking, and the ml-100k reference numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.baselines import (
    EASE,
    FLOAT64_SIDE,
    MAX_DENSE_CELLS,
    MAX_EASE_ITEMS,
    Popularity,
    SparseMatrix,
    climb_order,
    rank_topk,
    tune_ease,
)
from trainer.metrics import ndcg_at_k, recall_at_k, topk_report


def _dense_ease_table(dense: np.ndarray, val: list[np.ndarray], grid: tuple[float, ...], k: int) -> dict[float, float]:
    """Validation NDCG@k of EASE per l2 straight from the definition, in float64 numpy: B = I - P / diag(P),
    P = (X^T X + l2 I)^-1, scores X B, training items masked. The reference the fast grid must match."""
    users = np.array([u for u in range(dense.shape[0]) if val[u].size])
    seen = [np.flatnonzero(dense[u]) for u in users]
    table = {}
    for l2 in grid:
        p = np.linalg.inv(dense.T @ dense + l2 * np.eye(dense.shape[1]))
        weights = -p / np.diag(p)[None, :]
        np.fill_diagonal(weights, 0.0)
        table[l2] = ndcg_at_k(rank_topk(dense[users] @ weights, seen, k), [val[u] for u in users], k)
    return table


def _matrix(rows: list[list[int]], n_items: int) -> SparseMatrix:
    """A binary users x items matrix from each user's item list."""
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    items = np.concatenate([np.array(r, dtype=np.int64) for r in rows])
    return SparseMatrix.from_coo(users, items, (len(rows), n_items))


# --- SparseMatrix ---------------------------------------------------------------------------------


def test_from_coo_sums_repeats_and_sorts_rows():
    m = SparseMatrix.from_coo(np.array([1, 0, 1, 1]), np.array([2, 1, 0, 2]), (3, 4), values=np.array([1, 2, 3, 4]))
    assert m.indptr.tolist() == [0, 1, 3, 3]
    assert m.indices.tolist() == [1, 0, 2]
    # (1, 2) appears twice with values 1 and 4 -> 5.
    assert m.values.tolist() == [2.0, 3.0, 5.0]
    assert m.nnz == 3
    np.testing.assert_array_equal(m.to_dense(), [[0, 2, 0, 0], [3, 0, 5, 0], [0, 0, 0, 0]])


def test_select_rows_keeps_the_requested_order():
    m = _matrix([[0], [1, 2], [3]], 4)
    picked = m.select_rows(np.array([2, 1, 1]))
    np.testing.assert_array_equal(picked.to_dense(), m.to_dense()[[2, 1, 1]])


@pytest.mark.parametrize(
    ("indptr", "indices", "values", "shape", "match"),
    [
        ([0], [], [], (0, 0), r"shape must be \(n_rows >= 0, n_cols >= 1\), got \(0, 0\)"),
        ([0, 1], [0], [0.0, 0.0], (1, 2), r"values must have the shape of indices \(1,\), got \(2,\)"),
        ([0, 1], [2], [1.0], (1, 2), "indices must be < n_cols=2, got 2"),
        ([0, 2], [1], [1.0], (1, 2), "SparseMatrix indptr must rise"),
    ],
)
def test_sparse_matrix_rejects_inconsistent_parts(indptr, indices, values, shape, match):
    with pytest.raises(ValueError, match=match):
        SparseMatrix(np.array(indptr), np.array(indices, dtype=np.int64), np.array(values), shape)


@pytest.mark.parametrize(
    ("rows", "cols", "values", "match"),
    [
        (np.array([0, 1]), np.array([0]), None, "must be 1-D of one length"),
        (np.array([0, 2]), np.array([0, 0]), None, r"rows must lie in \[0, 2\), got range \[0, 2\]"),
        (np.array([0, 1]), np.array([-1, 0]), None, r"cols must lie in \[0, 3\), got range \[-1, 0\]"),
    ],
)
def test_from_coo_rejects_bad_triples(rows, cols, values, match):
    with pytest.raises(ValueError, match=match):
        SparseMatrix.from_coo(rows, cols, (2, 3), values=values)


def test_select_rows_rejects_out_of_range_rows():
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 1\), got range \[0, 1\]"):
        _matrix([[0]], 2).select_rows(np.array([0, 1]))


def test_to_dense_refuses_more_than_the_cell_budget():
    # 10 users x 6M items = 60M cells > 50M: no dense copy (nothing is allocated before the check).
    big = SparseMatrix(np.zeros(11, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), (10, 6_000_000))
    assert 10 * 6_000_000 > MAX_DENSE_CELLS
    with pytest.raises(ValueError, match=r"at most 50000000 cells .* got \(10, 6000000\)"):
        big.to_dense()


# --- Popularity -----------------------------------------------------------------------------------


def test_popularity_ranks_by_count_with_seen_items_masked():
    # Item counts: item 0 -> 1, item 1 -> 3, item 2 -> 2, item 3 -> 0.
    train = _matrix([[1, 2], [1], [0, 1, 2]], 4)
    model = Popularity().fit(train)
    scores = model.scores(np.array([0, 2]))
    np.testing.assert_array_equal(scores, [[1, 3, 2, 0], [1, 3, 2, 0]])
    ranked = rank_topk(model.scores(np.arange(3)), train, 2)
    # User 0 saw {1, 2}: next best 0 (count 1), then 3 (count 0).
    # User 1 saw {1}: 2 (count 2), then 0. User 2 saw {0, 1, 2}: only 3 is left, then padding.
    np.testing.assert_array_equal(ranked, [[0, 3], [2, 0], [3, -1]])


def test_popularity_ignores_explicit_zero_entries():
    train = SparseMatrix(np.array([0, 2]), np.array([0, 1]), np.array([0.0, 1.0]), (1, 2))
    np.testing.assert_array_equal(Popularity().fit(train).scores(np.array([0])), [[0, 1]])


def test_popularity_works_beyond_the_dense_budget():
    n_items = 6_000_000
    train = SparseMatrix.from_coo(np.array([0, 1, 9]), np.array([5, 5, 4_000_000]), (10, n_items))
    scores = Popularity().fit(train).scores(np.array([3]))
    assert scores.shape == (1, n_items)
    assert rank_topk(scores, None, 2).tolist() == [[5, 4_000_000]]


def test_popularity_requires_fit_and_valid_users():
    with pytest.raises(RuntimeError, match="before fit"):
        Popularity().scores(np.array([0]))
    model = Popularity().fit(_matrix([[0]], 2))
    with pytest.raises(ValueError, match=r"user_idx must lie in \[0, 1\), got range \[1, 1\]"):
        model.scores(np.array([1]))
    with pytest.raises(ValueError, match="user_idx must be a 1-D integer array"):
        model.scores(np.array([[0]]))


# --- EASE -----------------------------------------------------------------------------------------


def test_ease_hand_computed_co_occurring_items_recommend_each_other():
    # Users {0,1}, {0,1}, {2}, {0}. G = X^T X over items 0..2 = [[3,2,0],[2,2,0],[0,0,1]].
    # With l2 = 1: G + I = [[4,2,0],[2,3,0],[0,0,2]]; its 2x2 block has det 4*3 - 2*2 = 8, so
    # P = [[3/8, -2/8, 0], [-2/8, 4/8, 0], [0, 0, 1/2]].
    # B_ij = -P_ij / P_jj: B_01 = (2/8) / (4/8) = 0.5, B_10 = (2/8) / (3/8) = 2/3, all else 0.
    train = _matrix([[0, 1], [0, 1], [2], [0]], 3)
    model = EASE(l2=1.0).fit(train)
    np.testing.assert_allclose(model.weights, [[0, 0.5, 0], [2 / 3, 0, 0], [0, 0, 0]], atol=1e-6)
    # User 3 holds item 0 only: scores = row 0 of B = [0, 0.5, 0]; with item 0 masked it gets item 1.
    np.testing.assert_allclose(model.scores(np.array([3])), [[0, 0.5, 0]], atol=1e-6)
    assert rank_topk(model.scores(np.array([3])), [np.array([0])], 1).tolist() == [[1]]


@pytest.mark.parametrize(("n_users", "n_items"), [(40, 25), (25, 40)])
def test_ease_items_and_users_sides_match_the_dense_inverse(n_users, n_items):
    # 40 x 25 inverts G = X^T X (items side), 25 x 40 inverts K = X X^T (users side, push-through
    # and Woodbury); both must give B = I - P / diag(P) with P = (X^T X + l2 I)^-1 computed densely.
    rng = np.random.default_rng(3)
    dense = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    train = _matrix([np.flatnonzero(row).tolist() for row in dense], n_items)
    p = np.linalg.inv(dense.T @ dense + 7.0 * np.eye(n_items))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    model = EASE(l2=7.0).fit(train)
    assert model._solution.solver.items_side == (n_items <= n_users)
    np.testing.assert_allclose(model.weights, expected, atol=1e-5)
    users = np.array([3, 0, 7])
    np.testing.assert_allclose(model.scores(users), dense[users] @ expected, atol=1e-5)


@pytest.mark.parametrize(("n_users", "n_items"), [(40, 25), (25, 40)])
def test_ease_scores_rows_of_another_matrix_with_the_training_weights(n_users, n_items):
    """The test split's context: B fitted on X, scores of rows with more items (train + validation) are
    those rows times B, on the items side and on the users side (where no (M, M) B is formed)."""
    rng = np.random.default_rng(4)
    dense = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    more = np.maximum(dense, rng.random((n_users, n_items)) < 0.1)
    more[5] = dense[5]                                   # a user with nothing new scores as before
    train = _matrix([np.flatnonzero(row).tolist() for row in dense], n_items)
    context = _matrix([np.flatnonzero(row).tolist() for row in more], n_items)
    model = EASE(l2=7.0).fit(train)
    users = np.array([3, 0, 5, 7])
    expected = more[users] @ model.weights
    assert np.abs(expected - dense[users] @ model.weights).max() > 0.1    # the added items change the scores
    np.testing.assert_allclose(model.scores(users, context), expected, atol=1e-5)
    np.testing.assert_allclose(model.scores(users[2:3], context), model.scores(users[2:3]), atol=1e-6)
    with pytest.raises(ValueError, match=r"context must have the training matrix's shape \(40, 25\)|"
                                         r"context must have the training matrix's shape \(25, 40\)"):
        model.scores(users, _matrix([[0]] * 3, n_items))


@pytest.mark.parametrize(("n_users", "n_items"), [(40, 25), (25, 40), (2100, 2200)])
def test_ease_all_scores_are_every_rows_scores_on_both_sides(n_users, n_items):
    """Items side, users side in float64, users side past FLOAT64_SIDE (float32, the teacher's usual case):
    the dense definition X B with B from the dense inverse, and the same as ``EASE.scores`` of every row."""
    from trainer.baselines import ease_all_scores

    rng = np.random.default_rng(5)
    dense = (rng.random((n_users, n_items)) < (0.3 if n_items < 100 else 0.01)).astype(np.float64)
    train = _matrix([np.flatnonzero(row).tolist() for row in dense], n_items)
    scores = ease_all_scores(train, 7.0)
    assert scores.shape == (n_users, n_items) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, EASE(l2=7.0).fit(train).scores(np.arange(n_users)), atol=1e-5)
    if n_items < 100:
        p = np.linalg.inv(dense.T @ dense + 7.0 * np.eye(n_items))
        expected = -p / np.diag(p)[None, :]
        np.fill_diagonal(expected, 0.0)
        np.testing.assert_allclose(scores, dense @ expected, atol=1e-5)


@pytest.mark.parametrize("l2", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_ease_rejects_bad_l2(l2):
    with pytest.raises(ValueError, match="l2 must be a finite number > 0"):
        EASE(l2=l2)


def test_ease_requires_fit_and_refuses_huge_catalogs():
    with pytest.raises(RuntimeError, match="before fit"):
        EASE().scores(np.array([0]))
    wide = SparseMatrix.from_coo(np.array([0]), np.array([0]), (1, MAX_EASE_ITEMS + 1))
    with pytest.raises(ValueError, match=rf"n_items must be <= {MAX_EASE_ITEMS} for EASE .*, got {MAX_EASE_ITEMS + 1}"):
        EASE().fit(wide)


# --- rank_topk ------------------------------------------------------------------------------------


def test_rank_topk_orders_best_first_and_masks_every_exclude_form():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    original = scores.copy()
    np.testing.assert_array_equal(rank_topk(scores, None, 3), [[1, 3, 2], [0, 1, 2]])
    exclude_list = [np.array([1]), np.array([0, 2])]
    exclude_csr = (np.array([0, 1, 3]), np.array([1, 0, 2]))
    exclude_matrix = _matrix([[1], [0, 2]], 4)
    for exclude in (exclude_list, exclude_csr, exclude_matrix):
        np.testing.assert_array_equal(rank_topk(scores, exclude, 3), [[3, 2, 0], [1, 3, -1]])
    np.testing.assert_array_equal(scores, original)  # the caller's scores are not touched
    assert rank_topk(scores, None, 1).dtype == np.int64


def test_rank_topk_accepts_integer_scores_and_k_equal_to_the_catalog():
    np.testing.assert_array_equal(rank_topk(np.array([[1, 3, 2]]), None, 3), [[1, 2, 0]])


@pytest.mark.parametrize(
    ("scores", "exclude", "k", "match"),
    [
        (np.array([0.1, 0.2]), None, 1, r"scores must be a 2-D numeric array \(B, M\)"),
        (np.array([["a", "b"]]), None, 1, r"scores must be a 2-D numeric array \(B, M\)"),
        (np.array([[0.1, 0.2]]), None, 0, r"k must be an integer in \[1, 2\], got 0"),
        (np.array([[0.1, 0.2]]), None, 3, r"k must be an integer in \[1, 2\], got 3"),
        (np.array([[0.1, 0.2]]), None, 1.0, r"k must be an integer in \[1, 2\], got 1.0"),
        (np.array([[0.1, np.nan]]), None, 1, "scores must not be NaN, got NaN in row 0"),
        (np.array([[0.1, 0.2]]), [np.array([2])], 1, "exclude item indices must be < 2, got 2"),
        (np.array([[0.1, 0.2]]), [np.array([0]), np.array([1])], 1, r"exclude must hold one array per row \(1\)"),
    ],
)
def test_rank_topk_rejects_bad_input(scores, exclude, k, match):
    with pytest.raises(ValueError, match=match):
        rank_topk(scores, exclude, k)


# --- tune_ease ------------------------------------------------------------------------------------


def test_tune_ease_table_is_validation_ndcg_of_each_grid_value():
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 25
    dense = rng.random((n_users, n_items)) < 0.25
    val = [np.flatnonzero(row)[:2] for row in dense]  # each user's first two items are held out
    train = _matrix([np.setdiff1d(np.flatnonzero(row), v).tolist() for row, v in zip(dense, val)], n_items)
    grid = (1.0, 20.0, 300.0)
    best, table = tune_ease(train, val, train, grid=grid, k=5)
    assert list(table) == list(grid)
    assert best == max(grid, key=lambda l2: table[l2])
    users = np.array([u for u in range(n_users) if val[u].size])
    for l2 in grid:
        model = EASE(l2).fit(train)
        ranked = rank_topk(model.scores(users), train.select_rows(users), 5)
        assert table[l2] == pytest.approx(ndcg_at_k(ranked, [val[u] for u in users], 5))


@pytest.mark.parametrize(("n_users", "n_items"),
                         [(80, 30), (30, 80), (FLOAT64_SIDE + 60, FLOAT64_SIDE + 160),
                          (FLOAT64_SIDE + 160, FLOAT64_SIDE + 60)])
def test_tune_ease_matches_the_dense_definition_on_both_sides_and_precisions(n_users, n_items):
    # Items side (users >= items) and users side, each in float64 and (beyond FLOAT64_SIDE) float32:
    # the grid's NDCG per l2 and its choice are those of EASE computed densely from its definition.
    # Planted clusters of ~10 items (user u and item i share one when u % c == i % c) give EASE real
    # signal: a user takes most of their cluster and ~3 random items.
    rng = np.random.default_rng(5)
    n_clusters = n_items // 10
    same = (np.arange(n_users)[:, None] % n_clusters) == (np.arange(n_items)[None, :] % n_clusters)
    dense = rng.random((n_users, n_items)) < np.where(same, 0.6, 3 / n_items)
    val = [np.flatnonzero(row)[:1] for row in dense]              # each user's first item held out
    train = _matrix([np.setdiff1d(np.flatnonzero(row), v).tolist() for row, v in zip(dense, val)], n_items)
    grid = (3.0, 30.0, 300.0)
    best, table = tune_ease(train, val, train, grid=grid, k=10)
    expected = _dense_ease_table(train.to_dense().astype(np.float64), val, grid, 10)
    assert min(expected.values()) > 0.05                          # a real signal, not a floor of zeros
    assert table == pytest.approx(expected, abs=5e-4)
    assert best == max(grid, key=lambda l2: expected[l2])


def test_tune_ease_breaks_ties_towards_the_earlier_grid_value():
    # From the hand-computed EASE case: user 3 (item 0) gets item 1 first for every l2
    # (B_01 > 0, all other weights of item 0 are 0), so validation NDCG@1 = 1 for the whole grid.
    train = _matrix([[0, 1], [0, 1], [2], [0]], 3)
    val = [np.array([], np.int64)] * 3 + [np.array([1])]
    best, table = tune_ease(train, val, train, grid=(5, 1, 50), k=1)
    assert table == {5.0: 1.0, 1.0: 1.0, 50.0: 1.0}
    assert best == 5.0


@pytest.mark.parametrize(
    ("curve", "visits"),
    [
        ({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}, [3, 4, 5]),       # rising: up from the middle to the end
        ({1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1}, [3, 4, 2, 1]),    # falling: one step up fails, then down
        ({1: 0.1, 2: 0.3, 3: 0.5, 4: 0.3, 5: 0.1}, [3, 4, 2]),       # peak in the middle: both sides once
        ({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.2}, [3, 4, 5]),       # peak one above the middle
        ({1: 0.1, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1}, [3, 4, 2, 1]),    # peak one below: down until it falls
        ({1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3, 5: 0.3}, [3, 4, 2]),       # flat: ties never move it
        ({7: 0.2}, [7]),
        ({2: 0.1, 1: 0.2}, [2, 1]),                                   # unsorted grid: climbs the sorted values
    ],
)
def test_climb_order_walks_up_or_down_from_the_middle_while_validation_improves(curve, visits):
    calls = []
    order = climb_order(list(curve), lambda l2: calls.append(l2) or curve[l2])
    assert order == calls == visits
    assert max(curve, key=curve.get) in order or len(set(curve.values())) == 1


@pytest.mark.parametrize(("n_users", "n_items"), [(80, 30), (FLOAT64_SIDE + 160, FLOAT64_SIDE + 60)])
def test_the_climb_picks_the_grids_l2_and_scores_when_validation_has_one_peak(n_users, n_items):
    # The planted-cluster data of the test above: every value the climb visits has the grid's NDCG, and it
    # ends on the grid's choice. Ties (equal NDCG at two l2) go to the earlier grid value under both.
    rng = np.random.default_rng(6)
    n_clusters = n_items // 10
    same = (np.arange(n_users)[:, None] % n_clusters) == (np.arange(n_items)[None, :] % n_clusters)
    dense = rng.random((n_users, n_items)) < np.where(same, 0.6, 3 / n_items)
    val = [np.flatnonzero(row)[:1] for row in dense]
    train = _matrix([np.setdiff1d(np.flatnonzero(row), v).tolist() for row, v in zip(dense, val)], n_items)
    grid = (1000.0, 1.0, 10.0, 100.0, 3000.0)
    best, table = tune_ease(train, val, train, grid=grid, k=10, search="grid")
    climbed, visited = tune_ease(train, val, train, grid=grid, k=10, search="climb")
    ordered = [table[l2] for l2 in sorted(grid)]
    peak = int(np.argmax(ordered))
    assert all(a <= b for a, b in zip(ordered[:peak], ordered[1:peak + 1]))       # one peak on this data
    assert all(a >= b for a, b in zip(ordered[peak:], ordered[peak + 1:]))
    assert 3 <= len(visited) < len(grid)
    assert list(visited) == [l2 for l2 in grid if l2 in visited]                   # reported in the grid's order
    assert visited == {l2: table[l2] for l2 in visited}
    assert climbed == best


def test_tune_ease_rejects_an_unknown_search():
    train = _matrix([[0, 1], [0, 1], [2], [0]], 3)
    with pytest.raises(ValueError, match=r"search must be one of \('grid', 'climb'\), got 'golden'"):
        tune_ease(train, [np.array([1])] * 4, train, grid=(10,), k=1, search="golden")


@pytest.mark.parametrize(
    ("val", "grid", "match"),
    [
        ([np.array([1])] * 4, (), "grid must hold at least one l2"),
        ([np.array([1])] * 4, (10, -1), "l2 must be a finite number > 0, got -1"),
        ([np.array([], np.int64)] * 4, (10,), "val_truth must give at least one user a validation item"),
        ([np.array([1])] * 3, (10,), r"val_truth must hold one array per row \(4\), got 3"),
    ],
)
def test_tune_ease_rejects_bad_input(val, grid, match):
    train = _matrix([[0, 1], [0, 1], [2], [0]], 3)
    with pytest.raises(ValueError, match=match):
        tune_ease(train, val, train, grid=grid, k=1)


# --- ml-100k reference numbers --------------------------------------------------------------------


def _random_split(users: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per user, a random 80/10/10 split of their interactions: 0 = train, 1 = val, 2 = test."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(users.shape[0]), users))  # users grouped, shuffled within each
    per_user = np.bincount(users)
    n = np.repeat(per_user, per_user)  # (R,) size of the row's user, in `order` layout
    position = np.arange(users.shape[0]) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    part = np.empty(users.shape[0], dtype=np.int64)
    part[order] = np.where(position < np.round(0.8 * n), 0, np.where(position < np.round(0.9 * n), 1, 2))
    return part


@pytest.mark.slow
def test_ml100k_popularity_and_tuned_ease_reach_the_reference_ndcg(ml100k_dir: Path):
    log = pd.read_csv(ml100k_dir / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = log["user"].to_numpy() - 1  # ids 1..943 -> 0..942
    items = log["item"].to_numpy() - 1  # ids 1..1682 -> 0..1681
    shape = (int(users.max()) + 1, int(items.max()) + 1)
    part = _random_split(users)
    train = SparseMatrix.from_coo(users[part == 0], items[part == 0], shape)
    val = SparseMatrix.from_coo(users[part == 1], items[part == 1], shape)
    train_val = SparseMatrix.from_coo(users[part <= 1], items[part <= 1], shape)
    test = SparseMatrix.from_coo(users[part == 2], items[part == 2], shape)
    every_user = np.arange(shape[0])

    popular = rank_topk(Popularity().fit(train_val).scores(every_user), train_val, 10)
    pop = topk_report(popular, test, ks=(10,))
    assert 0.12 <= pop["ndcg@10"] <= 0.17, pop
    assert 0.10 <= pop["recall@10"] <= 0.15, pop

    # l2 is chosen on validation (train -> val), then refitted on train + val and scored on test.
    best_l2, table = tune_ease(train, val, train)
    assert table[best_l2] == max(table.values())
    assert tune_ease(train, val, train, search="climb")[0] == best_l2           # the trainer's default search
    # The fast grid (one Cholesky + potri per l2, scores read from C X) is EASE's definition: the same
    # validation NDCG to float tolerance and the same l2 as the dense float64 computation.
    val_rows = [val.indices[val.indptr[u]:val.indptr[u + 1]] for u in range(shape[0])]
    expected = _dense_ease_table(train.to_dense().astype(np.float64), val_rows, tuple(table), 10)
    assert table == pytest.approx(expected, abs=1e-4)
    assert best_l2 == max(expected, key=expected.get)
    ease = rank_topk(EASE(best_l2).fit(train_val).scores(every_user), train_val, 10)
    ndcg = ndcg_at_k(ease, test, 10)
    assert 0.31 <= ndcg <= 0.37, (best_l2, table, ndcg)
    assert 0.25 <= recall_at_k(ease, test, 10) <= 0.31
