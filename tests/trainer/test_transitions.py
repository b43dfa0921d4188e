"""The training log's successor lists (trainer/transitions.py) on hand-made sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.transitions import successor_table


def test_successor_weights_sum_decayed_pairs_within_the_window():
    """User 1 takes 1, 2, 3 (in time order, given shuffled); user 2 takes 1, 3. Window 2, decay 0.5: the pair
    (1, 2) counts 1, (1, 3) 0.5 + 1, (2, 3) 1; each list strongest first, weights log(1 + sum)."""
    users = np.array([1, 2, 1, 2, 1])
    items = np.array([3, 3, 1, 1, 2])
    times = np.array([30, 9, 10, 5, 20])
    ids, weights = successor_table(users, items, times, n_items=4, k=3, window=2, decay=0.5)
    assert ids.shape == weights.shape == (5, 3) and ids.dtype == np.int32 and weights.dtype == np.float32
    assert ids[1].tolist() == [3, 2, 0]
    assert weights[1] == pytest.approx([math.log1p(1.5), math.log1p(1.0), 0.0])
    assert ids[2].tolist() == [3, 0, 0] and weights[2] == pytest.approx([math.log1p(1.0), 0, 0])
    assert not ids[[0, 3, 4]].any() and not weights[[0, 3, 4]].any()   # padding, a last item, an unseen one


def test_successor_lists_keep_the_k_strongest_ties_by_item_and_time_ties_by_item():
    """Equal timestamps order by item index, as the splits do; k = 1 keeps the strongest successor, the
    smaller item index among equals; window 1 ignores pairs further apart."""
    users = np.array([1, 1, 1, 2, 2])
    items = np.array([4, 2, 1, 1, 3])
    times = np.array([7, 7, 7, 1, 2])              # user 1: 1, 2, 4 (one second); user 2: 1, 3
    ids, weights = successor_table(users, items, times, n_items=4, k=1, window=1)
    assert ids[:, 0].tolist() == [0, 2, 4, 0, 0]   # item 1: successors 2 and 3 once each, 2 kept
    assert weights[1, 0] == pytest.approx(math.log1p(1.0))


def test_a_log_without_pairs_gives_empty_lists_and_bad_settings_are_refused():
    ids, weights = successor_table(np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), n_items=2, k=2)
    assert not ids.any() and not weights.any()
    for kwargs, message in (({"k": 0}, "k must be an int >= 1, got 0"),
                            ({"window": 0}, "window must be an int >= 1, got 0"),
                            ({"decay": 0.0}, r"decay must be in \(0, 1\], got 0.0")):
        with pytest.raises(ValueError, match=message):
            successor_table(np.array([1]), np.array([1]), np.array([0]), n_items=1, **({"k": 1} | kwargs))


def test_blocks_of_sources_give_the_lists_of_one_pass(monkeypatch):
    """The pairs are ranked in blocks of whole sources (bounded memory on large logs): blocks of a few pairs
    give the same lists as one block."""
    import trainer.transitions as transitions

    rng = np.random.default_rng(0)
    users, items, times = rng.integers(1, 40, 3000), rng.integers(1, 60, 3000), rng.integers(0, 500, 3000)
    whole = successor_table(users, items, times, n_items=59, k=5)
    assert (whole[0] > 0).sum() > 200                        # lists worth comparing
    monkeypatch.setattr(transitions, "PAIRS_PER_BLOCK", 7)
    blocks = successor_table(users, items, times, n_items=59, k=5)
    np.testing.assert_array_equal(blocks[0], whole[0])
    np.testing.assert_array_equal(blocks[1], whole[1])


def test_fold_rows_read_lists_built_without_what_their_fold_hid():
    """``fold_transitions``: user 1 takes 1 then 2 and nobody else takes 2 after 1. A fold hiding user 1's item 2
    asks the ranker to rank 2 after the visible 1: the ranker's lists (the whole log) count that very pair, the
    fold's lists do not (as no served candidate is counted among the successors of the user's own items).
    User 2's 1 -> 3, not hidden, is read the same either way, and each fold uses its own hidden entries."""
    from trainer.config import load_config
    from trainer.models.dcn import DCNConfig, DCNRanker
    from trainer.ranking_training import Folds, Rows, fold_transitions, table_transitions
    import torch

    rc = load_config(None, ["ranking.transitions=4", "ranking.transition_items=2"]).ranking
    users = np.array([1, 1, 2, 2, 3, 3])
    items = np.array([1, 2, 1, 3, 1, 3])
    times = np.array([1, 2, 1, 2, 1, 2])
    ranker = DCNRanker(DCNConfig(n_users=3, n_items=4, user_cat_cardinalities=(), n_user_num=0,
                                 item_cat_cardinalities=(), n_item_num=0, deep_dims=(8,), transition_k=4,
                                 transition_items=2))
    ids, weights = successor_table(users, items, times, 4, 4, rc.transition_window, rc.transition_decay)
    history = np.array([[0, 1], [0, 1], [0, 1]])           # each row's visible history: item 1, latest last
    ranker.set_transitions(*(torch.as_tensor(a) for a in (ids, weights, history, np.array([2, 3, 3]))))
    n = 3
    rows = Rows(np.array([1, 2, 2]), np.array([2, 3, 3]), np.zeros(n, np.int64), np.zeros(n, np.float32),
                np.ones(n, np.float32), np.full(n, np.nan, np.float32), history=history)
    folds = Folds(rows, np.array([0, 0, 1]), ((np.array([1]), np.array([2])), (np.array([2]), np.array([3]))))
    shared = table_transitions(ranker, history, rows.items)
    refit = fold_transitions(ranker, rc, (users, items, times), 4, folds)
    assert shared[0, 0] == pytest.approx(math.log1p(1.0)) and refit[0, 0] == 0.0      # the leak, and without it
    assert refit[1, 0] == pytest.approx(shared[1, 0]) == pytest.approx(math.log1p(2.0))  # users 2 and 3 took 1 -> 3
    assert refit[2, 0] == pytest.approx(math.log1p(1.0))                              # fold 1 hid user 2's 3
    assert not refit[:, 1].any() and not shared[:, 1].any()                            # no second latest item


def test_table_transitions_in_blocks_equal_one_pass():
    from trainer.models.dcn import DCNConfig, DCNRanker
    from trainer.ranking_training import table_transitions
    import torch

    rng = np.random.default_rng(2)
    users, items, times = rng.integers(1, 20, 400), rng.integers(1, 30, 400), rng.integers(0, 1000, 400)
    ids, weights = successor_table(users, items, times, 30, 8)
    ranker = DCNRanker(DCNConfig(n_users=20, n_items=30, user_cat_cardinalities=(), n_user_num=0,
                                 item_cat_cardinalities=(), n_item_num=0, deep_dims=(8,), transition_k=8,
                                 transition_items=3))
    history, candidates = rng.integers(0, 31, (50, 6)), rng.integers(1, 31, 50)
    ranker.set_transitions(*(torch.as_tensor(a) for a in (ids, weights, history, candidates)))
    whole = table_transitions(ranker, history, candidates)
    assert whole.shape == (50, 3) and whole.any()
    np.testing.assert_array_equal(table_transitions(ranker, history, candidates, rows_per_block=7), whole)
    # Other lists of the same shape, read through the same lookup: its own, given, read the same.
    np.testing.assert_array_equal(table_transitions(ranker, history, candidates, (ids, weights)), whole)
    assert not table_transitions(ranker, history, candidates, (ids, np.zeros_like(weights))).any()
