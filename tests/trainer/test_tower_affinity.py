"""The towers validation did not keep, as the ranker's affinity channels (trainer/tower_affinity.py), and the
listwise fit of the ranker's wide start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import prepare
from trainer.config import load_config
from trainer.data.synthetic import generate
from trainer.inputs import user_inputs
from trainer.models import build_two_tower
from trainer.models.dcn import DCNRanker
from trainer.ranking_training import (Rows, affinity_channels, dcn_config, fit_affinity, fit_wide, fold_rows,
                                      list_starts)
from trainer.retrieval_training import UserItems, item_embeddings, tower_config
from trainer.tower_affinity import TowerChannels, low_rank_map, tower_channels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared():
    cfg = load_config(None, ["features.history_length=20", "run.threads=1"])
    return prepare.prepare(cfg, generate(80, 150, 4000, seed=5))


def _tower(prepared, seed: int, *extra):
    cfg = load_config(None, ["retrieval.embedding_dim=8", "retrieval.user_tower_dims=16",
                             "retrieval.item_tower_dims=16", *extra])
    torch.manual_seed(seed)
    return build_two_tower(tower_config(cfg, prepared.spec, prepared.tables)).eval()


def test_low_rank_map_keeps_narrow_scores_whole_and_truncates_wide_ones_to_their_best_approximation():
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    scores = users @ items.T
    projection, factors = low_rank_map(users, items, 8)
    assert projection.shape == (6, 8) and factors.shape == (30, 8)
    np.testing.assert_allclose((users @ projection) @ factors.T, scores, atol=1e-9)
    assert not projection[:, 6:].any() and not factors[:, 6:].any()        # past the scores' own rank: zero
    projection, factors = low_rank_map(users, items, 3)
    u, s, vt = np.linalg.svd(scores)
    np.testing.assert_allclose((users @ projection) @ factors.T, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-9)


def test_channels_hold_each_towers_scores_and_map_any_history_through_the_same_approximation(prepared):
    tables, vocab = prepared.tables, prepared.vocab
    towers = [("a", _tower(prepared, 0)), ("b", _tower(prepared, 1, "retrieval.embedding_dim=12"))]
    channels = tower_channels(towers, tables, prepared.eval_timestamps, 16, CPU, batch_size=7)
    assert channels.names == ("a", "b") and len(channels) == 2
    user_factors, item_factors = channels.tables()
    assert user_factors.shape == (vocab.n_users + 1, 32) and item_factors.shape == (vocab.n_items + 1, 32)
    assert not item_factors[0].any()                                        # the padding item
    users = np.arange(1, vocab.n_users + 1)
    with torch.no_grad():
        for c, (_, model) in enumerate(towers):                             # widths 8 and 12 <= 16: exact
            user = model.user_tower(**user_inputs(tables, users, prepared.eval_timestamps[users], CPU))
            expected = (user @ item_embeddings(model, tables, CPU).T).numpy()[:, 1:]
            block = slice(16 * c, 16 * (c + 1))
            np.testing.assert_allclose(user_factors[users][:, block] @ item_factors[1:, block].T, expected, atol=1e-4)
    # Another history (a fold's visible one) goes through the same map: the scores of that history.
    history = np.zeros((3, tables.history.shape[1]), np.int64)
    history[:, -2:] = [[1, 2], [3, 4], [5, 6]]
    mapped = channels.user_factors(tables, users[:3], prepared.eval_timestamps[users[:3]], CPU, history=history)
    inputs = user_inputs(tables, users[:3], prepared.eval_timestamps[users[:3]], CPU)
    inputs["history"] = torch.as_tensor(history)
    with torch.no_grad():
        expected = (towers[1][1].user_tower(**inputs) @ item_embeddings(towers[1][1], tables, CPU).T).numpy()
    np.testing.assert_allclose(TowerChannels.raw(np.repeat(mapped, 4, axis=0), item_factors[np.tile([1, 2, 7, 9], 3)], 16)[:, 1],
                               expected[np.repeat(np.arange(3), 4), np.tile([1, 2, 7, 9], 3)], atol=1e-4)
    assert not np.allclose(mapped, user_factors[users[:3]])               # the history changed the factors


def test_fold_rows_carry_the_tower_channels_of_their_visible_history(prepared):
    tables, vocab = prepared.tables, prepared.vocab
    cfg = load_config(None, ["features.history_length=20", "ranking.folds=2", "ranking.fold_share=0.3",
                             "ranking.negative_pool=40"])
    kept, other = _tower(prepared, 0), _tower(prepared, 1)
    channels = tower_channels([("other", other)], tables, prepared.eval_timestamps, 8, CPU)
    user_items = UserItems.from_interactions(prepared.train, vocab.n_users)
    folds = fold_rows(kept, tables, user_items, prepared.eval_timestamps, cfg.ranking, 5, np.random.default_rng(0),
                      CPU, channels=channels)
    plain = fold_rows(kept, tables, user_items, prepared.eval_timestamps, cfg.ranking, 5, np.random.default_rng(0), CPU)
    assert plain.tower_raw is None and folds.tower_raw.shape == (folds.rows.users.size, 1)
    np.testing.assert_array_equal(folds.rows.items, plain.rows.items)       # the same rows, channels beside them
    # Each row's affinity is the other tower's score with its fold's visible history: the user's training
    # items but those the fold hid, in order, right-aligned as served.
    length = tables.history.shape[1]
    item_factors = channels.item_factors()
    checked = 0
    for fold, (hidden_users, hidden_items) in enumerate(folds.hidden):
        for r in np.flatnonzero(folds.fold == fold)[:25]:
            user = folds.rows.users[r]
            own = user_items.items[user_items.indptr[user]:user_items.indptr[user + 1]]
            visible = own[~np.isin(own, hidden_items[hidden_users == user])][-length:]
            history = np.zeros((1, length), np.int64)
            history[0, length - visible.size:] = visible
            factor = channels.user_factors(tables, np.array([user]), prepared.eval_timestamps[[user]], CPU,
                                           history=history)
            expected = TowerChannels.raw(factor, item_factors[[folds.rows.items[r]]], 8)[0, 0]
            assert folds.tower_raw[r, 0] == pytest.approx(expected, abs=1e-5)
            checked += 1
    assert checked == 50
    full = TowerChannels.raw(channels.tables()[0][folds.rows.users],
                             item_factors[folds.rows.items], 8)
    assert not np.allclose(folds.tower_raw, full, atol=1e-4)               # not the whole history's


def test_the_ranker_holds_eases_channels_then_the_towers_and_fits_both(prepared):
    tables = prepared.tables
    cfg = load_config(None, ["features.history_length=20", "ranking.affinity_rank=8", "ranking.transition_mode=on"])
    assert affinity_channels(cfg, tables, 2) == (2, 2)
    assert affinity_channels(load_config(None, ["ranking.affinity=none"]), tables, 1) == (0, 1)
    assert affinity_channels(load_config(None, ["multitask.mode=joint"]), tables, 1) == (0, 0)
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, tables, towers=1))
    assert ranker.affinity_channels == 3 and ranker.affinity_rank == 8
    channels = tower_channels([("other", _tower(prepared, 1))], tables, prepared.eval_timestamps, 8, CPU)
    tower_tables = channels.tables()
    train = prepared.train
    rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                np.ones(train.users.size, np.float32), train.ratings)
    assert fit_affinity(ranker, tables, rows, rows, 50.0, np.random.default_rng(0), CPU, towers=tower_tables)
    raw = ranker.raw_affinity(torch.as_tensor(rows.users), torch.as_tensor(rows.items)).numpy()
    np.testing.assert_allclose(raw[:, 2], TowerChannels.raw(tower_tables[0][rows.users], tower_tables[1][rows.items], 8)[:, 0],
                               rtol=1e-4, atol=1e-5)
    standardised = ranker.affinity(torch.as_tensor(rows.users), torch.as_tensor(rows.items)).numpy()
    np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-4)      # every channel, EASE's and the tower's
    assert np.abs(raw[:, :2]).sum() > 0                                       # EASE's channels filled too


def test_the_listwise_wide_start_orders_each_list_as_its_clicks_and_stays_calibrated(prepared):
    """Lists whose click share differs by user: channel 0 is that share (it tells users apart, never a
    list's items), channel 1 favours each list's positives. The pointwise fit leans on channel 0; the
    listwise one gives it no weight (a list's softmax ignores what all its rows share) and orders by
    channel 1, and the scale and bias fitted after it keep the mean click at the rate seen."""
    tables = prepared.tables
    cfg = load_config(None, ["ranking.affinity_rank=1", "ranking.affinity=none"])
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, tables, towers=2))
    users, items, clicks = [], [], []
    for user in range(1, 61):
        n_pos = 1 + user % 4
        users += [user] * (n_pos + 6)
        items += list(range(1, n_pos + 7))
        clicks += [1.0] * n_pos + [0.0] * 6
    users, items, clicks = np.array(users), np.array(items), np.array(clicks, np.float32)
    user_table = np.zeros((tables.vocab.n_users + 1, 2), np.float32)
    item_table = np.zeros((tables.vocab.n_items + 1, 2), np.float32)
    for user in range(1, 61):
        user_table[user] = [clicks[users == user].mean(), 1.0]
    item_table[:, 0] = 1.0
    item_table[1:12, 1] = -0.3 * np.arange(11) + np.random.default_rng(0).normal(0, 0.5, 11)
    ranker.set_affinity(torch.as_tensor(user_table), torch.as_tensor(item_table), torch.as_tensor(users),
                        torch.as_tensor(items))
    zeros = np.zeros(users.size, np.float32)
    rows = Rows(users, items, zeros.astype(np.int64), zeros, clicks, np.full(users.size, np.nan, np.float32))
    assert list_starts(rows).size - 1 == 60                                 # a list per user

    def wide():
        with torch.no_grad():
            logit = ranker.affinity_wide(ranker.affinity(torch.as_tensor(users), torch.as_tensor(items))).squeeze(1)
            logit = logit + ranker.ctr_head.bias
        return float(torch.sigmoid(logit).mean()), ranker.affinity_wide.weight.flatten().tolist()

    fit_wide(ranker, rows, CPU)
    _, pointwise_w = wide()
    fit_wide(ranker, rows, CPU, listwise=True)
    mean_click, listwise_w = wide()
    assert pointwise_w[0] > 0.1 and abs(listwise_w[0]) < 1e-4
    assert listwise_w[1] > 0
    assert mean_click == pytest.approx(float(clicks.mean()), abs=1e-3)


def test_the_starts_wide_order_scores_the_stopping_half_as_the_whole_ranker_does(prepared):
    """``wide_ndcg_per_user``: an untrained ranker (deep CTR head zero) served by its CTR scores each
    user as ``pipeline_ndcg_per_user`` does, from the wide logit alone; None once the head has weights or
    the served score reads the rating head."""
    from trainer.evaluation import retrieve
    from trainer.ranking_training import click_rows, load_transitions, pipeline_ndcg_per_user, wide_ndcg_per_user
    from trainer.prepare import held_out

    tables, target = prepared.tables, prepared.val
    cfg = load_config(None, ["features.history_length=20", "ranking.affinity_rank=8", "ranking.transition_mode=on"])
    tower = _tower(prepared, 0)
    candidates = retrieve(tower, tables, target.users, target, 50, prepared.eval_timestamps, CPU)
    channels = tower_channels([("other", _tower(prepared, 1))], tables, prepared.eval_timestamps, 8, CPU)
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, tables, towers=1)).eval()
    train = prepared.train
    rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                np.ones(train.users.size, np.float32), train.ratings)
    fit_rows = click_rows(held_out(prepared.vocab, prepared.split.val), candidates, 4, np.random.default_rng(0), 50)
    assert fit_affinity(ranker, tables, rows, fit_rows, 50.0, np.random.default_rng(0), CPU,
                        towers=channels.tables())
    # The transition channels join the wide logit too (the wide order reads each user's stored history).
    fit_rows = fit_rows.with_history(tables, ranker.recent_items)
    load_transitions(ranker, cfg.ranking, (train.users, train.items, train.timestamps), tables.vocab.n_items,
                     fit_rows.history, fit_rows.items)
    fit_wide(ranker, fit_rows, CPU, listwise=True)
    assert ranker.affinity_wide.weight.abs().sum() > 0 and ranker.transition_wide.weight.abs().sum() > 0
    whole = pipeline_ndcg_per_user(ranker, tables, candidates, target, prepared.eval_timestamps[candidates.users], cfg,
                                   prepared.spec.rating_max, CPU)
    wide = wide_ndcg_per_user(ranker, tables, candidates, target, "ctr", CPU, cells_per_batch=70 * 128)   # a few users a batch
    np.testing.assert_array_equal(wide, whole)
    assert whole.mean() > 0
    assert wide_ndcg_per_user(ranker, tables, candidates, target, "ctr_x_rating", CPU) is None
    with torch.no_grad():
        ranker.ctr_head.weight.fill_(0.01)
    assert wide_ndcg_per_user(ranker, tables, candidates, target, "ctr", CPU) is None


def test_towers_whose_tables_would_not_fit_are_left_out_with_one_warning(prepared, monkeypatch, caplog):
    """``_tower_channels`` asks ``affinity_channels`` quietly and says itself, once, that the towers not kept
    are left out; where they fit it builds their channels and warns nothing."""
    from trainer import baselines
    from trainer.training import _tower_channels

    tables = prepared.tables
    cfg = load_config(None, ["features.history_length=20", "ranking.affinity_rank=8", "ranking.tower_affinity=on"])
    towers = [("autoencoder", _tower(prepared, 1))]
    with caplog.at_level("WARNING"):
        channels = _tower_channels(cfg, prepared, towers, CPU)
    assert channels is not None and list(channels.names) == ["autoencoder"] and "left out" not in caplog.text
    # The tower's channel alone at rank 8 would hold 8 floats per user and item: one too many. (EASE's channels
    # are left out too; the ranker's shaping says so, not this.)
    monkeypatch.setattr(baselines, "MAX_DENSE_CELLS", (tables.vocab.n_users + 1 + tables.vocab.n_items + 1) * 8 - 1)
    with caplog.at_level("WARNING"):
        assert _tower_channels(cfg, prepared, towers, CPU) is None
    assert caplog.text.count("left out") == 1
    assert "the towers not kept (autoencoder) left out as ranker channels" in caplog.text


def test_factor_dots_gather_in_batches_and_give_each_rows_sums_as_one_batch_does(prepared):
    """``factor_dots`` and the ranker's ``_table_affinity`` hold at most ``cells_per_batch`` gathered floats at a
    time; every row's affinity is the one the whole gather gives, to the bit."""
    from trainer.ranking_training import _table_affinity
    from trainer.tower_affinity import factor_dots

    rng = np.random.default_rng(3)
    user_factors = rng.normal(size=(30, 3 * 8)).astype(np.float32)
    item_factors = rng.normal(size=(40, 3 * 8)).astype(np.float32)
    users, items = rng.integers(0, 30, 101), rng.integers(0, 40, 101)
    whole = TowerChannels.raw(user_factors[users], item_factors[items], 8)
    assert whole.shape == (101, 3)
    for cells in (1, 24, 24 * 7, 10**6):                    # one row, one row, 7 rows, all rows per batch
        np.testing.assert_array_equal(factor_dots(user_factors, item_factors, users, items, 8, cells), whole)
    assert factor_dots(user_factors, item_factors, users[:0], items[:0], 8).shape == (0, 3)

    cfg = load_config(None, ["features.history_length=20", "ranking.affinity_rank=8", "ranking.transition_mode=on"])
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables))
    with torch.no_grad():
        ranker.affinity_user.normal_()
        ranker.affinity_item.normal_()
    train = prepared.train
    rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                np.ones(train.users.size, np.float32), train.ratings)
    tables = ranker.affinity_user.detach().numpy(), ranker.affinity_item.detach().numpy()
    whole = TowerChannels.raw(tables[0][rows.users], tables[1][rows.items], 8)
    for cells in (16 * 13, 16 * 500, 10**9):        # 13 rows, 500 rows, all rows per batch
        np.testing.assert_array_equal(_table_affinity(ranker, rows, cells), whole)
    # the ranker's own forward pass (torch) reads the same affinities from the same tables
    served = ranker.raw_affinity(torch.as_tensor(rows.users), torch.as_tensor(rows.items)).detach().numpy()
    np.testing.assert_allclose(_table_affinity(ranker, rows), served, rtol=1e-5, atol=1e-5)
    assert _table_affinity(ranker, rows.take(np.arange(0))).shape == (0, 2)
