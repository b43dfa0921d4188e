"""The vectorised training paths against their direct definitions: the grouped retrieval loss, the
seen-item lookup, positive sampling, the ranker's click rows and the lazily scored rating rows."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from trainer import prepare, training
from trainer.progress import Timings
from trainer.config import load_config
from trainer.data.synthetic import generate
from trainer.losses import grouped_sampled_softmax_loss, sampled_softmax_loss
from trainer.ranking_training import Candidates, Rows, click_rows, epoch_batches
from trainer.retrieval_training import SeenItems, UserItems, user_embeddings


def _grouped_case(seed: int, n_users: int = 5, per_user: int = 3, n_neg: int = 6, n_items: int = 12):
    torch.manual_seed(seed)
    row_user = torch.arange(n_users).repeat_interleave(per_user)
    pos_idx = torch.randint(1, n_items + 1, (row_user.numel(),))
    neg_idx = torch.randint(1, n_items + 1, (n_neg,))
    table = torch.randn(n_items + 1, 4)
    seen = torch.rand(n_users, n_items + 1) < 0.3
    seen[row_user, pos_idx] = True                        # a row's positive is one of its user's items
    return dict(user_emb=torch.randn(n_users, 4, requires_grad=True), row_user=row_user,
                pos_emb=table[pos_idx].clone().requires_grad_(True), neg_emb=table[neg_idx].clone().requires_grad_(True),
                pos_log_q=torch.randn(row_user.numel()), neg_log_q=torch.randn(n_neg), pos_idx=pos_idx,
                neg_idx=neg_idx, seen=seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_loss_equals_the_per_row_loss_and_its_gradients(seed):
    case = _grouped_case(seed)
    candidates = torch.cat([case["pos_idx"], case["neg_idx"]])
    row_user, seen = case["row_user"], case["seen"]
    per_row = sampled_softmax_loss(case["user_emb"][row_user], case["pos_emb"], case["neg_emb"], 0.2,
                                   case["pos_log_q"], case["neg_log_q"], case["pos_idx"], case["neg_idx"],
                                   user_seen_mask_fn=lambda c: seen[row_user.unsqueeze(1), c])
    leaves = [case["user_emb"], case["pos_emb"], case["neg_emb"]]
    per_row_grads = torch.autograd.grad(per_row, leaves)
    grouped = grouped_sampled_softmax_loss(case["user_emb"], row_user, case["pos_emb"], case["neg_emb"], 0.2,
                                           case["pos_log_q"], case["neg_log_q"], case["pos_idx"], case["neg_idx"],
                                           seen[:, candidates])
    grouped_grads = torch.autograd.grad(grouped, leaves)
    assert grouped.item() == pytest.approx(per_row.item(), abs=1e-5)
    for a, b in zip(per_row_grads, grouped_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_loss_by_hand_masks_the_users_own_positives():
    # One user, D = 1, user vector 1: each candidate scores its own embedding value. Rows hold items
    # 5 and 6; the sampler drew 6 (the user's own item: masked) and 9 (a negative).
    user_emb = torch.ones(1, 1)
    pos_emb, neg_emb = torch.tensor([[0.5], [0.2]]), torch.tensor([[0.9], [0.1]])
    loss = grouped_sampled_softmax_loss(user_emb, torch.tensor([0, 0]), pos_emb, neg_emb, 1.0, torch.zeros(2),
                                        torch.zeros(2), torch.tensor([5, 6]), torch.tensor([6, 9]))
    e = math.exp
    row0 = math.log(e(0.5) + e(0.1)) - 0.5                # the other row's item 6 is the user's too
    row1 = math.log(e(0.2) + e(0.1)) - 0.2
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # Everything seen: only each row's own positive is left, -log(1) = 0.
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert grouped_sampled_softmax_loss(user_emb, torch.tensor([0, 0]), pos_emb, neg_emb, 1.0, torch.zeros(2),
                                        torch.zeros(2), torch.tensor([5, 6]), torch.tensor([6, 9]),
                                        everything).item() == 0.0


@pytest.mark.parametrize(("change", "message"), [
    (dict(row_user=torch.tensor([0, 2])), r"row_user must index user_emb's 2 rows"),
    (dict(neg_emb=torch.zeros(2, 2, 3)), r"neg_emb must have shape \(S, 3\)"),
    (dict(neg_emb=None), "must be all given or all None"),
    (dict(user_seen=torch.zeros(2, 3, dtype=torch.bool)), r"user_seen must have shape \(2, 4\)"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_grouped_loss_rejects(change, message):
    args = dict(user_emb=torch.zeros(2, 3), row_user=torch.tensor([0, 1]), pos_emb=torch.zeros(2, 3),
                neg_emb=torch.zeros(2, 3), temperature=0.1, pos_log_q=torch.zeros(2), neg_log_q=torch.zeros(2),
                pos_idx=torch.tensor([1, 2]), neg_idx=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=message):
        grouped_sampled_softmax_loss(**(args | change))


@pytest.fixture(scope="module")
def prepared():
    cfg = load_config(None, ["features.history_length=20", "run.threads=1"])
    return prepare.prepare(cfg, generate(80, 150, 4000, seed=5))


def test_seen_lookup_is_the_same_dense_or_by_search(prepared):
    tables = prepared.tables
    dense = SeenItems.from_tables(tables, torch.device("cpu"))
    searched = SeenItems.from_tables(tables, torch.device("cpu"), max_cells=0)
    assert dense.dense is not None and searched.dense is None
    rng = np.random.default_rng(0)
    users = rng.integers(0, tables.vocab.n_users + 1, size=17)
    items = torch.as_tensor(rng.integers(0, tables.vocab.n_items + 1, size=40))
    expected = np.array([[item in set(tables.seen_items[tables.seen_indptr[u]:tables.seen_indptr[u + 1]].tolist())
                          for item in items.tolist()] for u in users])
    assert expected.any()
    assert np.array_equal(dense.lookup(users, items).numpy(), expected)
    assert np.array_equal(searched.lookup(users, items).numpy(), expected)


def test_sample_draws_distinct_items_of_each_user_and_repeats_with_the_seed(prepared):
    user_items = UserItems.from_interactions(prepared.train, prepared.vocab.n_users)
    users = user_items.users_with_items()[:30]
    positives, timestamps = user_items.sample(users, 4, np.random.default_rng(1))
    for row, user in enumerate(users):
        lo, hi = user_items.indptr[user], user_items.indptr[user + 1]
        picked = positives[row][positives[row] > 0]
        assert picked.size == min(4, hi - lo) == np.unique(picked).size
        assert set(picked.tolist()) <= set(user_items.items[lo:hi].tolist())
        own = user_items.timestamps[lo:hi][user_items.items[lo:hi] == picked[0]]
        assert timestamps[row] in own                     # the first pick's timestamp
    again = user_items.sample(users, 4, np.random.default_rng(1))
    assert np.array_equal(again[0], positives) and np.array_equal(again[1], timestamps)
    # Over many draws every item of a user comes up (a uniform subset, not a fixed one).
    user = users[0]
    lo, hi = user_items.indptr[user], user_items.indptr[user + 1]
    rng = np.random.default_rng(2)
    drawn = {int(i) for _ in range(200) for i in user_items.sample(np.array([user]), 2, rng)[0][0]}
    assert drawn == set(user_items.items[lo:hi].tolist())


def test_sample_keeps_the_order_of_a_random_key_sorted_within_each_user(prepared):
    """The one-sort draw picks exactly what sorting by (user row, uniform key) picks from the same keys."""
    user_items = UserItems.from_interactions(prepared.train, prepared.vocab.n_users)
    users = user_items.users_with_items()[:40]
    positives, timestamps = user_items.sample(users, 3, np.random.default_rng(7))
    counts = user_items.indptr[users + 1] - user_items.indptr[users]
    keys = np.random.default_rng(7).random(counts.sum())                    # the same draws, row after row
    offsets = np.cumsum(counts) - counts
    for row, user in enumerate(users):
        lo = user_items.indptr[user]
        order = np.lexsort((keys[offsets[row]:offsets[row] + counts[row]],))[:3]
        expected = user_items.items[lo + order]
        assert np.array_equal(positives[row][:expected.size], expected)
        assert timestamps[row] == user_items.timestamps[lo + order[0]]


def test_score_candidates_reads_only_the_history_the_ranker_pools(prepared):
    from trainer.ranking_training import dcn_config, ranker_inputs, score_candidates, Rows
    from trainer.models.dcn import DCNRanker

    cfg = load_config(None, ["features.history_length=20", "ranking.affinity=none"])
    tables = prepared.tables
    torch.manual_seed(0)
    ranker = DCNRanker(dataclasses.replace(dcn_config(cfg, prepared.spec, tables), recent_items=5)).eval()
    rng = np.random.default_rng(0)
    users = np.arange(1, 9)
    items = rng.integers(1, tables.vocab.n_items + 1, size=(users.size, 6))
    candidates = Candidates(users, items, rng.standard_normal(items.shape).astype(np.float32))
    timestamps = np.full(users.size, 10**9)
    score, ctr, rating = score_candidates(ranker, tables, candidates, timestamps, "ctr", 0.0, 5.0,
                                          torch.device("cpu"), rows_per_batch=12)
    # The rows with the users' whole stored history, as served rows are built.
    rows = Rows(np.repeat(users, 6), items.reshape(-1), np.repeat(timestamps, 6), candidates.scores.reshape(-1),
                np.zeros(48, np.float32), np.zeros(48, np.float32))
    with torch.no_grad():
        full = ranker_inputs(tables, rows, torch.device("cpu"))
        assert full["history"].shape[1] == tables.history.shape[1] > 5
        ctr_logit, full_rating = ranker(**full)
    assert torch.equal(torch.as_tensor(ctr), torch.sigmoid(ctr_logit).reshape(8, 6))
    assert torch.equal(torch.as_tensor(rating), full_rating.reshape(8, 6))


def test_user_inputs_take_a_given_history_instead_of_the_stored_one(prepared):
    from trainer.inputs import user_inputs

    users = np.array([1, 2, 3])
    given = np.arange(12).reshape(3, 4)
    inputs = user_inputs(prepared.tables, users, np.zeros(3), history=given)
    assert np.array_equal(inputs["history"].numpy(), given)
    assert np.array_equal(user_inputs(prepared.tables, users, np.zeros(3))["history"].numpy(),
                          prepared.tables.history[users])


def _click_rows_by_loop(positives, candidates, per_positive, depth):
    """Which rows click_rows must return, by the definition: (positives by user, negative count by user)."""
    users, items, timestamps, ratings = positives
    taken = {}
    for u, i, ts, r in zip(users.tolist(), items.tolist(), timestamps.tolist(), ratings.tolist()):
        taken.setdefault(u, {})[i] = (ts, r)
    hits, n_neg = {}, {}
    for row, u in enumerate(candidates.users.tolist()):
        held = taken.get(u, {})
        cand = candidates.items[row, :depth]
        found = [(int(c), held[int(c)]) for c in cand if int(c) in held]
        misses = [int(c) for c in cand if int(c) not in held and c > 0]
        if found and misses:
            hits[u] = found
            n_neg[u] = min(per_positive * len(found), len(misses))
    return hits, n_neg


def test_click_rows_match_their_definition():
    rng = np.random.default_rng(4)
    n_users, n_cand, n_items = 30, 25, 60
    items = np.stack([rng.permutation(np.arange(1, n_items + 1))[:n_cand] for _ in range(n_users)])
    items[3, 10:] = 0                                     # a short list, padded
    candidates = Candidates(np.arange(1, n_users + 1), items, rng.random((n_users, n_cand)).astype(np.float32))
    pos_users = rng.integers(1, n_users + 3, size=120)    # some users without candidates
    pos_items = rng.integers(1, n_items + 1, size=120)
    positives = (pos_users, pos_items, rng.integers(0, 10**6, size=120), rng.integers(1, 6, size=120).astype(np.float32))
    rows = click_rows(positives, candidates, 2, np.random.default_rng(0), depth=20)
    hits, n_neg = _click_rows_by_loop(positives, candidates, 2, 20)
    score_of = {(int(u), int(i)): s for u, row_items, row_scores in
                zip(candidates.users, candidates.items, candidates.scores) for i, s in zip(row_items, row_scores)}
    assert set(rows.users.tolist()) == set(hits)
    for u in hits:
        mine = rows.users == u
        clicked = mine & (rows.clicks == 1)
        assert [(int(i), (int(t), float(r))) for i, t, r in zip(rows.items[clicked], rows.timestamps[clicked],
                                                                 rows.ratings[clicked])] == hits[u]
        negatives = mine & (rows.clicks == 0)
        assert negatives.sum() == n_neg[u]
        assert not set(rows.items[negatives].tolist()) & {i for i, _ in hits[u]}
        assert np.unique(rows.items[negatives]).size == n_neg[u]
        assert np.isnan(rows.ratings[negatives]).all()
        assert (rows.timestamps[negatives] == hits[u][0][1][0]).all()   # the first positive's time
        assert all(rows.scores[k] == score_of[(u, int(rows.items[k]))] for k in np.flatnonzero(mine))
        first = np.flatnonzero(mine)
        assert (rows.clicks[first[:len(hits[u])]] == 1).all()          # positives first
    again = click_rows(positives, candidates, 2, np.random.default_rng(0), depth=20)
    assert np.array_equal(again.items, rows.items)
    empty = click_rows(tuple(a[:0] for a in positives), candidates, 2, np.random.default_rng(0))
    assert empty.users.size == 0


def test_rating_scores_equal_the_user_tower_on_every_row(prepared):
    cfg = load_config(None, ["retrieval.epochs=1", "retrieval.embedding_dim=8", "retrieval.user_tower_dims=16",
                             "retrieval.item_tower_dims=16", "retrieval.num_negatives=8", "run.progress=false",
                             "run.threads=1"])
    from trainer.distributed import init_distributed
    from trainer.retrieval_training import fit_retrieval, item_embeddings

    device = torch.device("cpu")
    two_tower, _ = fit_retrieval(cfg, prepared.spec, prepared.tables, prepared.train, prepared.val,
                                 prepared.eval_timestamps, device, init_distributed(device))
    index = np.random.default_rng(3).choice(prepared.train.users.size, size=300, replace=False)
    scores = training._retrieval_scorer(two_tower, prepared, device, batch_size=7)(index)
    train = prepared.train
    with torch.no_grad():
        users = user_embeddings(two_tower, prepared.tables, train.users[index], train.timestamps[index], device)
        items = item_embeddings(two_tower, prepared.tables, device)[torch.as_tensor(train.items[index])]
        expected = ((users * items).sum(1) / two_tower.temperature).numpy()
    assert np.allclose(scores, expected, atol=1e-5)
    assert training._retrieval_scorer(two_tower, prepared, device)(np.zeros(0, np.int64)).size == 0


def _tiny_cfg(*extra):
    return load_config(None, ["retrieval.epochs=2", "retrieval.embedding_dim=8", "retrieval.user_tower_dims=16",
                              "retrieval.item_tower_dims=16", "retrieval.num_negatives=8", "run.progress=false",
                              "run.threads=1", *extra])


def test_lazy_adam_updates_only_the_id_rows_a_step_used(prepared):
    from trainer.distributed import Distributed
    from trainer.models.two_tower import build_two_tower
    from trainer.retrieval_training import LazyAdam, make_optimizer, tower_config

    cfg = _tiny_cfg("retrieval.lazy_adam_above=0")
    torch.manual_seed(0)
    model = build_two_tower(tower_config(cfg, prepared.spec, prepared.tables))
    optimizer = make_optimizer(model, cfg.retrieval, Distributed())
    assert isinstance(optimizer, LazyAdam) and model.user_tower.user_embedding.sparse
    table = model.user_tower.user_embedding.weight

    def step(users):
        optimizer.zero_grad(set_to_none=True)
        model.user_tower.user_embedding(torch.as_tensor(users)).sum().backward()
        optimizer.step()

    step([1, 2])
    before = table.detach().clone()
    step([3])                                             # dense Adam would move rows 1 and 2 again (momentum)
    changed = torch.nonzero((table.detach() != before).any(dim=1)).flatten().tolist()
    assert changed == [3]
    # Small tables, weight decay or several processes keep plain Adam.
    assert isinstance(make_optimizer(model, _tiny_cfg().retrieval, Distributed()), torch.optim.Adam)
    assert isinstance(make_optimizer(model, _tiny_cfg("retrieval.lazy_adam_above=0",
                                                      "retrieval.weight_decay=0.01").retrieval, Distributed()),
                      torch.optim.Adam)
    assert isinstance(make_optimizer(model, cfg.retrieval, Distributed(world_size=2)), torch.optim.Adam)


def test_lazy_adam_training_repeats_and_leaves_plain_tables(prepared):
    from trainer.distributed import init_distributed
    from trainer.retrieval_training import fit_retrieval

    cfg = _tiny_cfg("retrieval.lazy_adam_above=0")
    device = torch.device("cpu")
    runs = [fit_retrieval(cfg, prepared.spec, prepared.tables, prepared.train, prepared.val,
                          prepared.eval_timestamps, device, init_distributed(device)) for _ in range(2)]
    (first, history), (second, _) = runs
    assert all(np.isfinite(r["loss"]) for r in history.epochs)
    assert not first.user_tower.user_embedding.sparse and not first.item_tower.item_embedding.sparse
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_index_recall_in_chunks_equals_one_pass():
    from recsys_contracts.ann import ExactIndex, IndexParams, build_index, recall_against_exact
    from trainer.publish import index_recall

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((600, 8)).astype(np.float32)
    ids = np.arange(1, 601)
    index = build_index(embeddings, ids, IndexParams(kind="ivf", nlist=8, nprobe=2))
    exact = ExactIndex(embeddings, ids)
    queries = embeddings[rng.choice(600, size=50, replace=False)]
    whole = recall_against_exact(index, exact, queries, k=20)
    assert whole < 1.0
    assert index_recall(index, exact, queries, k=20, cells=7 * 600) == pytest.approx(whole, abs=1e-12)


def test_lazy_adam_state_survives_a_checkpoint_and_resume(prepared, tmp_path):
    from trainer.checkpoint import Checkpointer
    from trainer.distributed import init_distributed
    from trainer.retrieval_training import fit_retrieval

    device = torch.device("cpu")

    def fit(*extra):
        cfg = _tiny_cfg("retrieval.lazy_adam_above=0", f"run.checkpoint_dir={tmp_path}", *extra)
        return fit_retrieval(cfg, prepared.spec, prepared.tables, prepared.train, prepared.val,
                             prepared.eval_timestamps, device, init_distributed(device), Checkpointer(tmp_path))

    fit("retrieval.epochs=1")
    saved = torch.load(tmp_path / "retrieval.pt", weights_only=True)["optimizer"]
    assert set(saved) == {"sparse", "dense"} and saved["sparse"]["state"]
    _, history = fit("retrieval.epochs=2", "run.resume=true")
    assert [r["epoch"] for r in history.epochs] == [0, 1]     # epoch 0 restored, epoch 1 trained


def test_training_with_two_threads_repeats_bit_for_bit_and_restores_the_torch_setting(prepared):
    from trainer.distributed import init_distributed

    cfg = _tiny_cfg("ranking.epochs=1", "ranking.deep_dims=16", "ranking.candidates=30", "run.threads=2")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [training.train_models(cfg, prepared, torch.device("cpu"), init_distributed(torch.device("cpu")),
                                      Timings())[0] for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
    for model in ("two_tower", "ranker"):
        first, second = (getattr(run, model).state_dict() for run in runs)
        assert all(torch.equal(value, second[name]) for name, value in first.items()), model


def dense_factors(matrix: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``subspace_factors`` of a dense matrix, through its products."""
    from trainer.baselines import subspace_factors

    dense = torch.as_tensor(matrix)
    return subspace_factors(lambda v: dense @ v, lambda u: dense.T @ u, matrix.shape[1], min(rank, *matrix.shape),
                            np.random.default_rng(seed), dense.dtype)


def test_subspace_factors_recover_a_low_rank_matrix_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((40, 4)) @ rng.standard_normal((4, 70))).astype(np.float32)
    left, right = dense_factors(matrix, 4, 1)
    assert left.shape == (40, 4) and right.shape == (70, 4) and left.dtype == right.dtype == np.float32
    assert np.allclose(left @ right.T, matrix, atol=1e-3)
    again = dense_factors(matrix, 4, 1)
    assert np.array_equal(again[0], left) and np.array_equal(again[1], right)
    wide, _ = dense_factors(matrix, 100, 1)   # capped at min(n, m)
    assert wide.shape == (40, 40)
    noisy = matrix + 0.1 * rng.standard_normal(matrix.shape).astype(np.float32)
    rank2, _ = dense_factors(noisy, 2, 1)      # the two leading singular values, in order
    assert np.allclose(np.linalg.norm(rank2, axis=0), np.linalg.svd(noisy, compute_uv=False)[:2], rtol=1e-3)


def test_ranker_config_takes_the_affinity_only_in_separate_mode(prepared):
    from trainer.ranking_training import dcn_config

    def rank(*overrides):
        return dcn_config(load_config(None, list(overrides)), prepared.spec, prepared.tables).affinity_rank

    assert rank() == 64
    assert rank("ranking.affinity_rank=8") == 8
    assert rank("ranking.affinity=none") == 0
    assert rank("multitask.mode=joint") == 0 and rank("multitask.mode=retrieval_only") == 0


def test_a_catalog_too_large_for_ease_gets_no_affinity_tables(caplog):
    """Decided before the ranker is built: zero factor tables would otherwise ship in its program
    (1M items x 64 floats = 256 MB of zeros)."""
    from trainer.baselines import MAX_EASE_ITEMS, ease_fits

    assert ease_fits(1683, "ranker affinity")
    assert ease_fits(MAX_EASE_ITEMS, "ranker affinity")
    with caplog.at_level("WARNING", logger="trainer.baselines"):
        assert not ease_fits(MAX_EASE_ITEMS + 1, "ranker affinity")
        assert not ease_fits(MAX_EASE_ITEMS + 1, "ranker affinity", warn=False)
    assert caplog.text.count("ranker affinity left out: EASE needs at most") == 1


def test_distillation_teacher_is_eases_scores_over_each_users_unseen_items(prepared):
    from trainer.baselines import EASE, SparseMatrix
    from trainer.retrieval_training import distillation_teacher

    tables, train = prepared.tables, prepared.train
    shape = (tables.vocab.n_users + 1, tables.vocab.n_items + 1)
    teacher = distillation_teacher(train, tables.vocab.n_users, tables.vocab.n_items, 50.0, 0.1,
                                   torch.device("cpu")).numpy()
    assert teacher.shape == shape
    matrix = SparseMatrix.from_coo(train.users, train.items, shape)
    seen = matrix.to_dense() > 0
    seen[:, 0] = True
    assert np.isneginf(teacher[seen]).all() and np.isfinite(teacher[~seen]).all()
    assert (~seen[1:]).any(axis=1).all()                       # every user has unseen items here
    scores = EASE(50.0).fit(matrix).scores(np.arange(shape[0])) / 0.1
    assert np.allclose(teacher[~seen], scores[~seen], atol=1e-4)


@pytest.mark.parametrize("items", ["all", "candidates"])
def test_distillation_moves_the_tower_toward_the_teacher_and_repeats(prepared, items):
    from trainer.distributed import Distributed
    from trainer.losses import distillation_loss
    from trainer.retrieval_training import distillation_teacher, fit_retrieval, item_embeddings
    from trainer.training import deterministic_kernels

    def train(*overrides):
        cfg = load_config(None, ["features.history_length=20", "run.threads=1", "run.progress=false",
                                 "retrieval.epochs=3", "retrieval.patience=3", *overrides])
        # as the job trains: deterministic kernels, so the repeat below is bit-identical under any load
        with deterministic_kernels(torch.device("cpu")):
            model, history = fit_retrieval(cfg, prepared.spec, prepared.tables, prepared.train, prepared.val,
                                           prepared.eval_timestamps, torch.device("cpu"), Distributed())
        users = np.arange(1, prepared.tables.vocab.n_users + 1)
        logits = user_embeddings(model, prepared.tables, users, prepared.eval_timestamps[users],
                                 torch.device("cpu")) @ item_embeddings(model, prepared.tables,
                                                                        torch.device("cpu")).T / model.temperature
        return model, distillation_loss(logits.detach(), teacher[users]).item()

    teacher = distillation_teacher(prepared.train, prepared.tables.vocab.n_users, prepared.tables.vocab.n_items,
                                   50.0, 0.05, torch.device("cpu"))
    plain, plain_gap = train("retrieval.distill_weight=0")
    distilled, distilled_gap = train("retrieval.distill_weight=5", "retrieval.distill_l2=50",
                                     f"retrieval.distill_items={items}")
    again, _ = train("retrieval.distill_weight=5", "retrieval.distill_l2=50", f"retrieval.distill_items={items}")
    assert distilled_gap < plain_gap - 0.1
    for a, b in zip(distilled.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_distillation_teacher_counts_a_repeated_pair_once(prepared):
    """The teacher's EASE sees the binary matrix, as the EASE baseline does: repeating a training
    interaction changes nothing."""
    import dataclasses

    from trainer.retrieval_training import distillation_teacher

    train, vocab = prepared.train, prepared.tables.vocab
    repeated = dataclasses.replace(train, **{name: np.concatenate([getattr(train, name), getattr(train, name)[:50]])
                                             for name in ("users", "items", "timestamps", "ratings")})
    once = distillation_teacher(train, vocab.n_users, vocab.n_items, 50.0, 0.1, torch.device("cpu"))
    twice = distillation_teacher(repeated, vocab.n_users, vocab.n_items, 50.0, 0.1, torch.device("cpu"))
    assert torch.equal(once, twice)


def test_distillation_is_left_out_with_a_warning_where_ease_does_not_fit(prepared, caplog):
    """A catalog past EASE's dense limits trains without a teacher instead of failing."""
    from trainer.baselines import MAX_DENSE_CELLS, MAX_EASE_ITEMS
    from trainer.retrieval_training import distillation_teacher

    with caplog.at_level("WARNING", logger="trainer.baselines"):
        assert distillation_teacher(prepared.train, 10, MAX_EASE_ITEMS, 50.0, 0.05, torch.device("cpu")) is None
        assert distillation_teacher(prepared.train, MAX_DENSE_CELLS // MAX_EASE_ITEMS + 10, MAX_EASE_ITEMS - 1, 50.0, 0.05,
                                    torch.device("cpu")) is None       # fewer users than items, too many cells
        assert distillation_teacher(prepared.train, MAX_DENSE_CELLS // 1000, 999, 50.0, 0.05,
                                    torch.device("cpu")) is None       # many users: every user's scores at once
    assert caplog.text.count("retrieval distillation left out: EASE needs at most") == 1
    assert caplog.text.count("retrieval distillation left out: it needs every user's EASE scores at once") == 2


def test_past_a_dense_user_x_item_matrix_the_teacher_and_the_affinity_are_computed_without_one(monkeypatch):
    """A log with many users and a moderate catalog (a shop's) used to lose the ranker's EASE affinity: it
    formed every user's scores densely. Past ``MAX_DENSE_CELLS`` (lowered here so that this log is past it)
    the affinity's factors come from products with X and B: the same numbers as the dense path."""
    from trainer import baselines
    from trainer.models.dcn import DCNRanker
    from trainer.ranking_training import Rows, dcn_config, fit_affinity

    prepared = prepare.prepare(load_config(None, ["features.history_length=20", "run.threads=1"]),
                               generate(300, 100, 6000, seed=5))         # more users than items
    vocab, train = prepared.vocab, prepared.train
    cfg = load_config(None, ["ranking.affinity_rank=16"])
    train_rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                      np.ones(train.users.size, np.float32), train.ratings)
    rng = np.random.default_rng(0)
    fit = Rows(rng.integers(1, vocab.n_users + 1, 300), rng.integers(1, vocab.n_items + 1, 300),
               np.zeros(300, np.int64), np.zeros(300, np.float32), np.zeros(300, np.float32),
               np.full(300, np.nan, np.float32))

    def affinity() -> np.ndarray:
        ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables))
        assert fit_affinity(ranker, prepared.tables, train_rows, fit, 50.0, np.random.default_rng(0),
                            torch.device("cpu"))
        return ranker.affinity(torch.as_tensor(fit.users), torch.as_tensor(fit.items)).detach().numpy()

    dense_affinity = affinity()
    assert vocab.n_items <= vocab.n_users                    # the items side (the users side: the test below)
    monkeypatch.setattr(baselines, "MAX_DENSE_CELLS", (vocab.n_users + 1) * (vocab.n_items + 1) - 1)
    assert np.allclose(affinity(), dense_affinity, atol=1e-3)
    # The program carries (users + items) x width factor floats: past MAX_DENSE_CELLS of them, no affinity.
    from trainer.ranking_training import affinity_fits
    width = (vocab.n_users + 1 + vocab.n_items + 1) * 32
    assert affinity_fits(prepared.tables, 32)
    monkeypatch.setattr(baselines, "MAX_DENSE_CELLS", width - 1)
    assert not affinity_fits(prepared.tables, 32)
    assert DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables)).affinity_rank == 0


def test_affinity_factors_reproduce_ease_scores_and_are_standardised(prepared):
    from trainer.baselines import EASE, SparseMatrix
    from trainer.models.dcn import DCNRanker
    from trainer.ranking_training import Rows, dcn_config, fit_affinity

    vocab, train = prepared.vocab, prepared.train
    n_users, n_items = vocab.n_users, vocab.n_items
    cfg = load_config(None, [f"ranking.affinity_rank={n_users + 1}"])   # full rank: exact
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables))
    assert ranker.affinity_channels == 2
    train_rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                      np.ones(train.users.size, np.float32), train.ratings)
    rng = np.random.default_rng(0)
    fit = Rows(rng.integers(1, n_users + 1, 300), rng.integers(1, n_items + 1, 300), np.zeros(300, np.int64),
               np.zeros(300, np.float32), np.zeros(300, np.float32), np.full(300, np.nan, np.float32))
    assert fit_affinity(ranker, prepared.tables, train_rows, fit, 50.0, np.random.default_rng(0), torch.device("cpu"))
    shape = (n_users + 1, n_items + 1)
    binary = SparseMatrix.from_coo(train.users, train.items, shape)
    binary = SparseMatrix(binary.indptr, binary.indices, np.ones_like(binary.values), binary.shape)
    # Channel 1: EASE on the ratings (each pair once, its last rating), l2 scaled by the mean squared rating.
    keys = train.users.astype(np.int64) * (n_items + 1) + train.items
    last = keys.size - 1 - np.unique(keys[::-1], return_index=True)[1]
    ratings = train.ratings[last].astype(np.float64)
    rated = SparseMatrix.from_coo(train.users[last], train.items[last], shape, ratings.astype(np.float32))
    assert not np.allclose(ratings, ratings[0])          # the two channels differ on this log
    rank = ranker.affinity_rank
    for channel, ease in enumerate((EASE(50.0).fit(binary), EASE(50.0 * np.mean(ratings ** 2)).fit(rated))):
        expected = ease.scores(fit.users)[np.arange(300), fit.items]
        block = slice(channel * rank, (channel + 1) * rank)
        raw = (ranker.affinity_user[fit.users, block] * ranker.affinity_item[fit.items, block]).sum(1).numpy()
        assert np.allclose(raw, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))
    standardised = ranker.affinity(torch.as_tensor(fit.users), torch.as_tensor(fit.items)).numpy()
    assert np.abs(standardised.mean(0)).max() < 1e-4 and np.abs(standardised.std(0, ddof=1) - 1.0).max() < 1e-3
    one = DCNRanker(dcn_config(load_config(None, [f"ranking.affinity_rank={n_users + 1}",
                                                  "ranking.affinity_ratings=false"]), prepared.spec, prepared.tables))
    assert one.affinity_channels == 1 and one.affinity_user.shape[1] == rank


def test_fold_rows_affinity_is_ease_refitted_without_the_entries_the_fold_hid(prepared):
    """A fold's hidden positive is a training item, so EASE fitted on every training interaction has learnt
    to reproduce it: its affinity is higher than an unseen pair's. ``fold_affinities`` refits EASE per fold
    without the hidden entries; at full rank the fold rows carry exactly those scores."""
    from trainer.baselines import EASE, SparseMatrix
    from trainer.models import build_two_tower
    from trainer.models.dcn import DCNRanker
    from trainer.ranking_training import dcn_config, fit_affinity, fold_affinities, fold_rows
    from trainer.retrieval_training import tower_config

    vocab, train = prepared.vocab, prepared.train
    cfg = load_config(None, ["features.history_length=20", "ranking.folds=2", "ranking.fold_share=0.3",
                             "ranking.negative_pool=40", f"ranking.affinity_rank={vocab.n_users + 1}",
                             "ranking.affinity_ratings=false"])
    torch.manual_seed(0)
    tower = build_two_tower(tower_config(cfg, prepared.spec, prepared.tables)).eval()
    user_items = UserItems.from_interactions(train, vocab.n_users)
    folds = fold_rows(tower, prepared.tables, user_items, prepared.eval_timestamps, cfg.ranking, 5,
                      np.random.default_rng(0), torch.device("cpu"))
    assert len(folds.hidden) == 2 and folds.fold.size == folds.rows.users.size
    assert set(np.unique(folds.fold).tolist()) == {0, 1}
    train_rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                      np.ones(train.users.size, np.float32), train.ratings)
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables))
    assert fit_affinity(ranker, prepared.tables, train_rows, folds.rows, 50.0, np.random.default_rng(0),
                        torch.device("cpu"))
    raw = fold_affinities(ranker, prepared.tables, train_rows, folds, 50.0, seed=0)
    shared = ranker.raw_affinity(torch.as_tensor(folds.rows.users), torch.as_tensor(folds.rows.items)).numpy()
    shape = (vocab.n_users + 1, vocab.n_items + 1)
    for fold, (users, items) in enumerate(folds.hidden):
        # The hidden entries are training entries of the fold's users, and its positives are among them.
        hidden_keys = set((users.astype(np.int64) * shape[1] + items).tolist())
        rows = np.flatnonzero(folds.fold == fold)
        positives = rows[folds.rows.clicks[rows] == 1]
        assert positives.size and {int(u) * shape[1] + int(i) for u, i in
                                   zip(folds.rows.users[positives], folds.rows.items[positives])} <= hidden_keys
        kept = ~np.isin(train.users.astype(np.int64) * shape[1] + train.items, list(hidden_keys))
        matrix = SparseMatrix.from_coo(train.users[kept], train.items[kept], shape)
        matrix = SparseMatrix(matrix.indptr, matrix.indices, np.ones_like(matrix.values), matrix.shape)
        expected = EASE(50.0).fit(matrix).scores(folds.rows.users[rows])[np.arange(rows.size), folds.rows.items[rows]]
        assert np.allclose(raw[rows, 0], expected, atol=1e-3 * max(1.0, np.abs(expected).max()))
        # The tables' affinity overstates the hidden positives against the refit; not the negatives as much.
        assert (shared[positives, 0] - raw[positives, 0]).mean() > 0.05
    negatives = folds.rows.clicks == 0
    assert (shared[negatives, 0] - raw[negatives, 0]).mean() < (shared[~negatives, 0] - raw[~negatives, 0]).mean()
    # The ranker scores the rows with the refitted affinities when they are given, the tables' otherwise.
    from trainer.ranking_training import ranker_inputs
    inputs = ranker_inputs(prepared.tables, folds.rows.with_history(prepared.tables, 5), torch.device("cpu"))
    with torch.no_grad():
        ranker.affinity_wide.weight.fill_(1.0)
        own, _ = ranker(**inputs)
        same, _ = ranker(**inputs, affinity_raw=torch.as_tensor(shared))
        refitted, _ = ranker(**inputs, affinity_raw=torch.as_tensor(raw))
    assert torch.allclose(own, same, atol=1e-5) and not torch.allclose(own, refitted, atol=1e-3)


def test_fit_wide_weights_each_affinity_channel_by_its_information():
    from trainer.models.dcn import DCNConfig, DCNRanker
    from trainer.ranking_training import Rows, fit_wide

    rng = np.random.default_rng(1)
    n_users, n_items, n = 50, 80, 6000
    ranker = DCNRanker(DCNConfig(n_users=n_users, n_items=n_items, user_cat_cardinalities=(), n_user_num=0,
                                 item_cat_cardinalities=(), n_item_num=0, embedding_dim=4, deep_dims=(8,),
                                 affinity_rank=3, affinity_channels=2))
    users, items = rng.integers(1, n_users + 1, n), rng.integers(1, n_items + 1, n)
    ranker.set_affinity(torch.as_tensor(rng.standard_normal((n_users + 1, 6)), dtype=torch.float32),
                        torch.as_tensor(rng.standard_normal((n_items + 1, 6)), dtype=torch.float32),
                        torch.as_tensor(users), torch.as_tensor(items))
    affinity = ranker.affinity(torch.as_tensor(users), torch.as_tensor(items)).numpy()
    scores = rng.standard_normal(n).astype(np.float32) + 5.0          # retrieval: offset, uninformative
    clicks = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * affinity[:, 1] - 1.0)))).astype(np.float32)
    rows = Rows(users, items, np.zeros(n, np.int64), scores, clicks, np.full(n, np.nan, np.float32))
    fit_wide(ranker, rows, torch.device("cpu"))
    first, second = ranker.affinity_wide.weight[0].tolist()
    assert abs(first) < 0.25 and 1.2 < second < 1.8
    assert abs(ranker.retrieval_skip.weight.item()) < 0.25


def test_fit_wide_weights_an_informative_affinity_and_keeps_the_calibration():
    from trainer.models.dcn import DCNConfig, DCNRanker
    from trainer.ranking_training import Rows, fit_wide

    rng = np.random.default_rng(0)
    n_users, n_items, n = 50, 80, 4000
    ranker = DCNRanker(DCNConfig(n_users=n_users, n_items=n_items, user_cat_cardinalities=(), n_user_num=0,
                                 item_cat_cardinalities=(), n_item_num=0, embedding_dim=4, deep_dims=(8,),
                                 affinity_rank=3))
    users, items = rng.integers(1, n_users + 1, n), rng.integers(1, n_items + 1, n)
    ranker.set_affinity(torch.as_tensor(rng.standard_normal((n_users + 1, 3)), dtype=torch.float32),
                        torch.as_tensor(rng.standard_normal((n_items + 1, 3)), dtype=torch.float32),
                        torch.as_tensor(users), torch.as_tensor(items))
    affinity = ranker.affinity(torch.as_tensor(users), torch.as_tensor(items)).squeeze(1).numpy()
    scores = rng.standard_normal(n).astype(np.float32) + 5.0          # retrieval: offset, uninformative
    clicks = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * affinity - 1.0)))).astype(np.float32)
    rows = Rows(users, items, np.zeros(n, np.int64), scores, clicks, np.full(n, np.nan, np.float32))
    fit_wide(ranker, rows, torch.device("cpu"))
    assert 1.6 < ranker.affinity_wide.weight.item() < 2.4
    assert abs(ranker.retrieval_skip.weight.item()) < 0.3
    ranker.eval()
    with torch.no_grad():
        inputs = {"user_idx": torch.as_tensor(users), "user_cat": torch.zeros(n, 0, dtype=torch.int64),
                  "user_num": torch.zeros(n, 0), "history": torch.zeros(n, 4, dtype=torch.int64),
                  "timestamp": torch.zeros(n, dtype=torch.int64), "item_idx": torch.as_tensor(items),
                  "item_cat": torch.zeros(n, 0, dtype=torch.int64), "item_num": torch.zeros(n, 0),
                  "retrieval_score": torch.as_tensor(scores)}
        ctr_logit, _ = ranker(**inputs)
    # A logistic fit with an intercept matches the mean predicted click rate to the observed one.
    assert abs(float(torch.sigmoid(ctr_logit).mean()) - clicks.mean()) < 1e-3


def test_row_scores_run_the_ranker_in_batches_and_match_one_pass(prepared):
    """``row_scores`` (the evaluation's head metrics) runs aligned rows through the ranker a batch at a time;
    each row's CTR logit and rating are the one pass's."""
    from trainer.models.dcn import DCNRanker
    from trainer.ranking_training import Rows, dcn_config, ranker_inputs, row_scores

    torch.manual_seed(0)
    cfg = load_config(None, ["ranking.affinity_rank=8"])
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables)).eval()
    with torch.no_grad():
        ranker.affinity_user.normal_()
        ranker.affinity_item.normal_()
        ranker.ctr_head.weight.normal_()          # a trained head: the logit reads the deep layers too
    train, n = prepared.train, 1000
    rows = Rows(train.users[:n], train.items[:n], train.timestamps[:n],
                np.random.default_rng(0).standard_normal(n).astype(np.float32), np.zeros(n, np.float32),
                train.ratings[:n].astype(np.float32))
    with torch.no_grad():
        ctr, rating = (t.numpy() for t in ranker(**ranker_inputs(prepared.tables, rows, torch.device("cpu"))))
    assert np.ptp(ctr) > 0
    for batch in (1000, 300, 7):
        got_ctr, got_rating = row_scores(ranker, prepared.tables, rows, torch.device("cpu"), rows_per_batch=batch)
        np.testing.assert_allclose(got_ctr, ctr, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_rating, rating, rtol=1e-5, atol=1e-5)
    assert [a.shape for a in row_scores(ranker, prepared.tables, rows.take(np.arange(0)), torch.device("cpu"))] == \
        [(0,), (0,)]


def test_rating_head_refit_lowers_the_error_and_changes_nothing_else(prepared):
    """The kept ranker is often the untrained start: its rating head is refitted alone, trunk frozen,
    so the CTRs (the served order) stay bit-identical."""
    from trainer.models.dcn import DCNRanker
    from trainer.ranking_training import Rows, dcn_config, fit_rating_head, ranker_inputs

    torch.manual_seed(0)
    cfg = load_config(None, ["ranking.affinity=none"])
    ranker = DCNRanker(dcn_config(cfg, prepared.spec, prepared.tables)).eval()
    train, n = prepared.train, 3000
    rng = np.random.default_rng(0)
    ratings = train.ratings[:n].astype(np.float32).copy()
    ratings[::10] = np.nan                                                  # unrated rows are skipped
    rows = Rows(train.users[:n], train.items[:n], train.timestamps[:n], rng.standard_normal(n).astype(np.float32),
                np.zeros(n, np.float32), ratings)
    device = torch.device("cpu")
    with torch.no_grad():
        ctr_before, rating_before = ranker(**ranker_inputs(prepared.tables, rows, device))
    others = {k: v.clone() for k, v in ranker.state_dict().items() if not k.startswith("rating_head.")}
    whole = copy.deepcopy(ranker)
    before, after = fit_rating_head(ranker, prepared.tables, rows, device)      # ~2,700 rated rows: 2 batches
    # The trunk runs in batches of rows; one batch fits the same head.
    assert fit_rating_head(whole, prepared.tables, rows, device, rows_per_batch=10**6) == pytest.approx((before, after),
                                                                                                       rel=1e-4)
    assert torch.allclose(whole.rating_head.weight, ranker.rating_head.weight, atol=1e-4)
    with torch.no_grad():
        ctr_after, rating_after = ranker(**ranker_inputs(prepared.tables, rows, device))
    rated = torch.as_tensor(np.isfinite(ratings))
    target = torch.as_tensor(np.nan_to_num(ratings))
    mse = lambda pred: float(((pred - target)[rated] ** 2).mean())          # noqa: E731
    assert before == pytest.approx(mse(rating_before), rel=1e-5) and after == pytest.approx(mse(rating_after), rel=1e-5)
    variance = float(target[rated].var(unbiased=False))
    assert after < 0.9 * before and after < variance        # beats predicting the mean, not just the random head
    assert torch.equal(ctr_before, ctr_after)
    assert all(torch.equal(v, ranker.state_dict()[k]) for k, v in others.items())
    assert float(rating_after.min()) >= 1.0 and float(rating_after.max()) <= 5.0


def test_next_items_cut_each_users_time_ordered_items_into_history_and_next_positives(prepared):
    user_items = UserItems.from_interactions(prepared.train, prepared.vocab.n_users)
    users = user_items.users_with_items()[:30]
    history, positives, timestamps = user_items.next_items(users, 3, 7, np.random.default_rng(2))
    assert history.shape == (30, 7) and positives.shape == (30, 3)
    for row, user in enumerate(users):
        lo, hi = user_items.indptr[user], user_items.indptr[user + 1]
        items = user_items.items[lo:hi]                      # oldest first
        cut = int(np.flatnonzero(items == positives[row, 0])[0])   # items are unique per user
        assert 1 <= cut <= hi - lo - 1 if hi - lo > 1 else cut == 0
        before = items[max(0, cut - 7):cut]
        assert history[row].tolist() == [0] * (7 - before.size) + before.tolist()   # left-padded, oldest first
        after = items[cut:cut + 3]
        assert positives[row].tolist() == after.tolist() + [0] * (3 - after.size)
        assert timestamps[row] == user_items.timestamps[lo + cut]


def test_the_sequential_tower_learns_from_next_item_examples(prepared):
    from trainer.distributed import Distributed
    from trainer.models.sequential import SequentialUserTower
    from trainer.retrieval_training import fit_retrieval

    cfg = load_config(None, ["features.history_length=20", "run.threads=1", "run.progress=false",
                             "retrieval.user_tower=sequential", "retrieval.sequence_length=10",
                             "retrieval.epochs=4", "retrieval.distill_weight=0"])
    model, history = fit_retrieval(cfg, prepared.spec, prepared.tables, prepared.train, prepared.val,
                                   prepared.eval_timestamps, torch.device("cpu"), Distributed())
    assert isinstance(model.user_tower, SequentialUserTower)
    losses = [epoch["loss"] for epoch in history.epochs]
    assert losses[-1] < losses[0]
    assert history.best_score > 0.0


def test_fold_rows_rank_hidden_training_items_against_candidates_with_the_rest_as_history(prepared):
    from trainer.config import load_config as _load
    from trainer.models import build_two_tower
    from trainer.ranking_training import fold_rows
    from trainer.retrieval_training import tower_config

    cfg = _load(None, ["features.history_length=20", "ranking.folds=2", "ranking.fold_share=0.3",
                       "ranking.negative_pool=40"])
    torch.manual_seed(0)
    tower = build_two_tower(tower_config(cfg, prepared.spec, prepared.tables)).eval()
    user_items = UserItems.from_interactions(prepared.train, prepared.vocab.n_users)
    rows = fold_rows(tower, prepared.tables, user_items, prepared.eval_timestamps, cfg.ranking, 5,
                     np.random.default_rng(0), torch.device("cpu")).rows
    assert rows.history.shape == (rows.users.size, 5)
    assert (rows.clicks == 1).sum() > 0 and (rows.clicks == 0).sum() > 0
    for row in np.flatnonzero(rows.clicks == 1)[:50]:
        user, item = rows.users[row], rows.items[row]
        own = user_items.items[user_items.indptr[user]:user_items.indptr[user + 1]]
        assert item in own                                 # a positive is one of the user's training items
        assert item not in rows.history[row]               # hidden from the history the row is ranked with
        assert set(rows.history[row][rows.history[row] > 0].tolist()) <= set(own.tolist())
    # A negative is a retrieved candidate the user has not in the visible history, never padding.
    assert (rows.items > 0).all() and np.isfinite(rows.scores).all()
    # Asked for more recent items than the history holds (20), the rows carry the whole history.
    wide = fold_rows(tower, prepared.tables, user_items, prepared.eval_timestamps, cfg.ranking, 30,
                     np.random.default_rng(0), torch.device("cpu")).rows
    assert wide.history.shape == (wide.users.size, 20)


def test_recent_folds_hide_each_users_latest_items_with_only_earlier_items_as_history(prepared):
    from trainer.config import load_config as _load
    from trainer.models import build_two_tower
    from trainer.ranking_training import _recent_fold, fold_rows
    from trainer.retrieval_training import tower_config

    user_items = UserItems.from_interactions(prepared.train, prepared.vocab.n_users)
    entry_user = np.repeat(np.arange(user_items.indptr.size - 1), np.diff(user_items.indptr))
    for fold in (0, 1):
        hidden, kept = _recent_fold(user_items, entry_user, fold, None)
        for user in np.flatnonzero(np.diff(user_items.indptr) >= 3)[:40]:
            span = slice(user_items.indptr[user], user_items.indptr[user + 1])
            # fold f hides exactly the user's (f+1)-th most recent item; the history is what came before it
            assert np.flatnonzero(hidden[span]).tolist() == [span.stop - span.start - 1 - fold]
            assert np.flatnonzero(kept[span]).tolist() == list(range(span.stop - span.start - 1 - fold))
    hidden, kept = _recent_fold(user_items, entry_user, 0, 0.25)
    counts = np.diff(user_items.indptr)
    per_user = np.bincount(entry_user[hidden], minlength=counts.size)
    busy = counts >= 8
    assert (per_user[busy] == np.maximum(1, np.round(0.25 * counts[busy]))).all()
    assert not (hidden & kept).any()

    cfg = _load(None, ["features.history_length=20", "ranking.folds=2", "ranking.negative_pool=40"])
    torch.manual_seed(0)
    tower = build_two_tower(tower_config(cfg, prepared.spec, prepared.tables)).eval()
    rows = fold_rows(tower, prepared.tables, user_items, prepared.eval_timestamps, cfg.ranking, 20,
                     np.random.default_rng(0), torch.device("cpu"), recent_share=None).rows
    positives = np.flatnonzero(rows.clicks == 1)
    assert positives.size > 0
    for row in positives[:50]:
        user, item = rows.users[row], rows.items[row]
        own = user_items.items[user_items.indptr[user]:user_items.indptr[user + 1]]
        assert item in own[-2:]                            # one of the two most recent training items
        history = rows.history[row][rows.history[row] > 0]
        assert history.tolist() == own[:len(history)].tolist() or history.tolist() == \
            own[:np.flatnonzero(own == item)[-1]][-len(history):].tolist()   # the items before it, in order


def test_early_stop_counts_epochs_without_a_relative_gain():
    from trainer.retrieval_training import EarlyStop

    stop = EarlyStop(patience=2, min_improvement=0.01)
    # 0.200 sets the reference; 0.201 (+0.5%) and 0.2015 are below +1%: two stale epochs -> stop.
    assert [stop.update(s) for s in (0.200, 0.201, 0.2015)] == [False, False, True]
    stop = EarlyStop(patience=2, min_improvement=0.01)
    # 0.203 (+1.5%) restarts the count; 0.0 first scores still set a reference (no division by 0).
    assert [stop.update(s) for s in (0.0, 0.200, 0.201, 0.203, 0.2031, 0.2032)] == [False] * 5 + [True]


def test_full_softmax_loss_by_hand_covers_every_unseen_item_and_never_the_padding():
    # One user, D = 1, user vector 1: each item scores its own embedding value. Items 1..4; the user
    # has items 1 and 3 (the rows' positives); items 2 and 4 are the negatives; item 0 is padding.
    from trainer.losses import full_softmax_loss

    item_emb = torch.tensor([[9.0], [0.5], [0.2], [0.3], [0.1]])
    seen = torch.tensor([[False, True, False, True, False]])
    loss = full_softmax_loss(torch.ones(1, 1), torch.tensor([0, 0]), item_emb, 1.0, torch.tensor([1, 3]), seen)
    e = math.exp
    negatives = e(0.2) + e(0.1)
    expected = ((math.log(negatives + e(0.5)) - 0.5) + (math.log(negatives + e(0.3)) - 0.3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_softmax_loss_is_the_grouped_loss_with_every_item_a_sampled_negative(seed):
    """With no logQ, the whole catalog as the sampler's negatives and every seen item masked (which
    masks the in-batch columns: one user, so they are all its own positives),
    the grouped sampled softmax and the full softmax are one loss, gradients included."""
    from trainer.losses import full_softmax_loss

    torch.manual_seed(seed)
    n_items, per_user = 10, 3
    item_emb = torch.randn(n_items + 1, 4, requires_grad=True)
    user_emb = torch.randn(1, 4, requires_grad=True)
    pos_idx = torch.randperm(n_items)[:per_user] + 1
    seen = torch.rand(1, n_items + 1) < 0.3
    seen[0, pos_idx] = True
    seen[0, 0] = False
    row_user = torch.zeros(per_user, dtype=torch.long)
    full = full_softmax_loss(user_emb, row_user, item_emb, 0.3, pos_idx, seen)
    full_grads = torch.autograd.grad(full, [user_emb, item_emb])
    negatives = torch.arange(1, n_items + 1)
    grouped = grouped_sampled_softmax_loss(user_emb, row_user, item_emb[pos_idx], item_emb[negatives], 0.3,
                                           torch.zeros(per_user), torch.zeros(n_items), pos_idx, negatives,
                                           seen[:, torch.cat([pos_idx, negatives])])
    grouped_grads = torch.autograd.grad(grouped, [user_emb, item_emb])
    assert full.item() == pytest.approx(grouped.item(), abs=1e-5)
    for a, b in zip(full_grads, grouped_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    (dict(pos_idx=torch.tensor([0, 2])), r"pos_idx must hold item indices in \[1, 5\)"),
    (dict(pos_idx=torch.tensor([1, 5])), r"pos_idx must hold item indices in \[1, 5\)"),
    (dict(user_seen=torch.zeros(2, 4, dtype=torch.bool)), r"user_seen must have shape \(2, 5\)"),
    (dict(item_emb=torch.zeros(5, 2)), "must share D"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_full_softmax_loss_rejects(change, message):
    from trainer.losses import full_softmax_loss

    args = dict(user_emb=torch.zeros(2, 3), row_user=torch.tensor([0, 1]), item_emb=torch.zeros(5, 3),
                temperature=0.1, pos_idx=torch.tensor([1, 2]), user_seen=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        full_softmax_loss(**(args | change))


@pytest.mark.parametrize("tower", ["pooled", "sequential"])
def test_full_softmax_training_learns_repeats_and_only_below_its_catalog_size(prepared, tower):
    """retrieval.full_softmax_below: a catalog at or below it trains on the full softmax (the setup
    says so; the tower beats its untrained start on validation and repeats bit for bit); one item
    more keeps the sampled path."""
    from trainer.distributed import Distributed
    from trainer.retrieval_training import SamplingSetup, fit_retrieval, validate
    from trainer.training import deterministic_kernels

    n_items = prepared.tables.vocab.n_items
    device = torch.device("cpu")
    sampled = _tiny_cfg(f"retrieval.full_softmax_below={n_items - 1}", f"retrieval.user_tower={tower}")
    full = _tiny_cfg(f"retrieval.full_softmax_below={n_items}", f"retrieval.user_tower={tower}",
                     "retrieval.epochs=3", "retrieval.patience=3")
    assert not SamplingSetup.build(sampled, prepared.tables, prepared.train, device).full_catalog
    assert SamplingSetup.build(full, prepared.tables, prepared.train, device).full_catalog

    def train():
        with deterministic_kernels(device):
            return fit_retrieval(full, prepared.spec, prepared.tables, prepared.train, prepared.val,
                                 prepared.eval_timestamps, device, Distributed())

    (model, history), (again, _) = train(), train()
    assert all(np.isfinite(r["loss"]) for r in history.epochs)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    from trainer.models.two_tower import build_two_tower
    from trainer.retrieval_training import tower_config

    torch.manual_seed(full.run.seed)
    untrained = build_two_tower(tower_config(full, prepared.spec, prepared.tables),
                                init_temperature=full.retrieval.temperature)
    start = validate(untrained, prepared.tables, prepared.val, prepared.eval_timestamps, device)
    assert history.best_score > start
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def _click_list_rows(users, clicks):
    n = len(users)
    return Rows(np.asarray(users, np.int64), np.arange(1, n + 1), np.zeros(n, np.int64), np.zeros(n, np.float32),
                np.asarray(clicks, np.float32), np.full(n, np.nan, np.float32))


def test_list_starts_split_at_a_new_user_or_a_positive_after_a_negative():
    from trainer.ranking_training import list_starts

    # user 1 (2 positives, 2 negatives), user 2, then user 3's lists of two folds back to back.
    rows = _click_list_rows([1, 1, 1, 1, 2, 2, 3, 3, 3, 3], [1, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    assert list_starts(rows).tolist() == [0, 4, 6, 8, 10]
    assert list_starts(_click_list_rows([], [])).tolist() == [0]


def test_list_batches_hold_whole_lists_and_every_row_once():
    from trainer.ranking_training import list_batches

    starts = np.array([0, 3, 5, 12, 13, 20])
    batches = list_batches(starts, 6, np.random.default_rng(0))
    joined = np.concatenate(batches)
    assert sorted(joined.tolist()) == list(range(20))
    for batch in batches:
        for a, b in zip(starts[:-1], starts[1:]):
            inside = np.isin(np.arange(a, b), batch)
            assert inside.all() or not inside.any()         # a list is never split
    # each batch but the last reaches the row target; none holds more lists than it needs
    assert all(b.size >= 6 for b in batches[:-1])


def test_listwise_loss_by_hand_and_its_gradient_moves_positives_up():
    from trainer.ranking_training import listwise_loss

    logits = torch.tensor([0.5, 0.2, -0.1, 1.0, 0.3], requires_grad=True)
    clicks = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    list_id = torch.tensor([0, 0, 0, 1, 1])
    loss = listwise_loss(logits, clicks, list_id)
    e = math.exp
    expected = ((math.log(e(0.5) + e(0.2) + e(-0.1)) - 0.5) + (math.log(e(1.0) + e(0.3)) - 1.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert (logits.grad[clicks > 0] < 0).all() and (logits.grad[clicks == 0] > 0).all()
    # A shift of every logit of a list changes nothing (softmax), unlike a pointwise loss.
    shifted = listwise_loss(logits.detach() + torch.tensor([3.0, 3.0, 3.0, -2.0, -2.0]), clicks, list_id)
    assert shifted.item() == pytest.approx(expected, abs=1e-5)


def test_an_epoch_trains_on_at_most_max_rows_in_whole_batches_as_many_on_every_rank():
    batches = [np.arange(start, min(start + 256, 1000)) for start in range(0, 1000, 256)]   # 3 x 256 + 232
    assert epoch_batches(batches, 0, 256, 1) is batches                                     # 0: every row
    assert epoch_batches(batches, 10_000, 256, 1) == batches
    assert [b.size for b in epoch_batches(batches, 512, 256, 1)] == [256, 256]
    assert [b.size for b in epoch_batches(batches, 513, 256, 1)] == [256, 256, 256]         # whole batches, rounded up
    assert [b.size for b in epoch_batches(batches, 512, 256, 2)] == [256]                   # a rank's share of the rows
    assert [b.size for b in epoch_batches(batches, 1, 256, 4)] == [256]                      # at least one step


def test_the_ranker_trains_on_capped_epochs_and_the_default_cap_leaves_small_logs_alone(prepared):
    """Counted on the real ranker's training-mode forward passes (one per step): with a cap of one or two
    batches every epoch takes one or two steps; the default cap (200k rows) is above what a small log
    has, so training is exactly that of no cap."""
    from trainer.distributed import Distributed
    from trainer.models.dcn import DCNRanker

    steps = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: steps.append(module.training) if isinstance(module, DCNRanker) else None)
    runs = {}
    try:
        for cap in ("0", "256", "512", None):
            settings = ["features.history_length=20", "run.threads=1", "retrieval.epochs=1", "ranking.epochs=3",
                        "ranking.patience=5", "ranking.deep_dims=16", "ranking.candidates=50", "run.progress=false"]
            cfg = load_config(None, settings + ([f"ranking.max_rows_per_epoch={cap}"] if cap else []))
            steps.clear()
            _run, histories = training.train_models(cfg, prepared, torch.device("cpu"), Distributed(), Timings())
            runs[cap] = (sum(steps), len(histories["ranking"]) - 1, [e["val_ndcg@10"] for e in histories["ranking"]])
    finally:
        hook.remove()
    (one, one_epochs, _), (two, two_epochs, _) = runs["256"], runs["512"]
    assert one_epochs == two_epochs == 3
    outside = one - one_epochs * 1                           # training-mode passes outside the epochs (refit)
    assert two == two_epochs * 2 + outside
    assert runs["0"][0] > two + 3                            # uncapped epochs take more than two steps here
    assert runs[None] == runs["0"]                           # the default cap changes nothing on a small log
    assert load_config(None, []).ranking.max_rows_per_epoch == 200_000


def test_ease_score_factors_are_the_dense_factors_without_the_dense_scores():
    from trainer.baselines import EASE, SparseMatrix, ease_score_factors

    rng = np.random.default_rng(0)
    dense = rng.random((300, 120)) < 0.08
    users, items = np.nonzero(dense)
    ease = EASE(50.0).fit(SparseMatrix.from_coo(users, items, dense.shape))
    scores = ease.scores(np.arange(300))
    left, right = dense_factors(scores, 16, 3)
    implicit_left, implicit_right = ease_score_factors(ease, 16, np.random.default_rng(3))
    assert implicit_left.shape == (300, 16) and implicit_right.shape == (120, 16)
    assert np.abs(left @ right.T - implicit_left @ implicit_right.T).max() < 1e-4
    assert np.abs(scores - left @ right.T).max() > 1e-2                     # rank 16 is not exact: a real test
    # The users side (120 users x 300 items): S = X - l2 C X D through C (120, 120), the same factors.
    wide = EASE(50.0).fit(SparseMatrix.from_coo(items, users, dense.T.shape))
    assert not wide._solution.solver.items_side
    wide_left, wide_right = dense_factors(wide.scores(np.arange(120)), 16, 3)
    implicit_left, implicit_right = ease_score_factors(wide, 16, np.random.default_rng(3))
    assert np.abs(wide_left @ wide_right.T - implicit_left @ implicit_right.T).max() < 1e-4
    with pytest.raises(RuntimeError, match="called before EASE.fit"):
        ease_score_factors(EASE(50.0), 16, np.random.default_rng(3))


def test_top_k_kept_counts_the_exact_top_k_the_approximation_holds_leaving_out_seen_items():
    from trainer.ranking_training import top_k_kept

    exact = np.array([[0, 5, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5]], np.float32)        # column 0: the padding item
    approx = np.array([[9, 5, 1, 3, 2, 4], [0, 5, 4, 3, 2, 1]], np.float32)
    # Row 0, top 2 over items 1-5: exact {1, 2}, approx {1, 5}: half kept. Row 1 has seen item 5: exact {4, 3},
    # approx {1, 2}: none kept.
    assert top_k_kept(exact, approx, [np.array([], np.int64), np.array([5])], k=2) == pytest.approx(0.25)
    assert top_k_kept(exact, exact, [np.array([], np.int64), np.array([5])], k=2) == 1.0


def test_affinity_rank_grows_until_the_factors_keep_enough_of_eases_top_10(prepared):
    """``affinity_rank`` starts at ``ranking.affinity_rank`` and multiplies it by 4 (up to
    ``ranking.affinity_rank_max`` and EASE's full rank) until the binary channel's factors keep
    ``ranking.affinity_fidelity`` of exact EASE's top 10; the factors it returns are those ``affinity_factors``
    computes at that rank; with nothing to choose it returns the rank alone."""
    from trainer.ranking_training import affinity_factors, affinity_rank

    vocab, train = prepared.vocab, prepared.train
    full = min(vocab.n_users, vocab.n_items) + 1
    train_rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                      np.ones(train.users.size, np.float32), train.ratings)

    def choose(*overrides):
        cfg = load_config(None, ["ranking.affinity_l2=50", "ranking.affinity_rank=1", "ranking.affinity_rank_max=4096",
                                 *overrides])
        return cfg, affinity_rank(cfg, prepared.tables, train_rows)

    cfg, (rank, factors, choice) = choose("ranking.affinity_fidelity=1")
    kept = choice["ease_top10_kept"]
    assert rank == choice["rank"] == full and list(kept) == ["1", "4", "16", "64", str(full)]
    assert kept[str(full)] == 1.0 and kept["1"] < 0.7 and all(kept[r] < 1.0 for r in ("1", "4", "16", "64"))
    expected = affinity_factors(train_rows, vocab.n_users + 1, vocab.n_items + 1, full, 2, 50.0,
                                np.random.default_rng(cfg.run.seed + 3))
    assert all(np.array_equal(a, b) for a, b in zip(factors, expected))
    # The first rank that keeps enough stops the climb; its factors are affinity_factors' at that rank.
    threshold = kept["16"]
    cfg, (rank, factors, choice) = choose(f"ranking.affinity_fidelity={threshold}")
    assert rank == 16 and list(choice["ease_top10_kept"]) == ["1", "4", "16"]
    expected = affinity_factors(train_rows, vocab.n_users + 1, vocab.n_items + 1, 16, 2, 50.0,
                                np.random.default_rng(cfg.run.seed + 3))
    assert all(np.array_equal(a, b) for a, b in zip(factors, expected))
    # A ceiling stops it too; nothing to choose without a larger rank allowed or without EASE's channels.
    assert choose("ranking.affinity_fidelity=1", "ranking.affinity_rank_max=4")[1][0] == 4
    assert choose("ranking.affinity_rank_max=1")[1] == (1, None, None)
    assert choose("ranking.affinity=none")[1] == (1, None, None)


def test_affinity_rank_stops_below_a_rank_whose_tables_would_not_fit_and_says_nothing_is_left_out(
        prepared, monkeypatch, caplog):
    """A larger rank whose factor tables the program could not carry (``affinity_fits``) is not tried, and asking
    leaves no warning: the affinity is kept, at the rank below. The call that shapes the ranker still warns."""
    from trainer import baselines
    from trainer.ranking_training import affinity_rank, dcn_config

    vocab, train = prepared.vocab, prepared.train
    train_rows = Rows(train.users, train.items, train.timestamps, np.zeros(train.users.size, np.float32),
                      np.ones(train.users.size, np.float32), train.ratings)
    cfg = load_config(None, ["ranking.affinity_l2=50", "ranking.affinity_rank=4", "ranking.affinity_rank_max=4096",
                             "ranking.affinity_fidelity=1"])
    # Two EASE channels at rank 16 fit; at rank 64 they would not.
    monkeypatch.setattr(baselines, "MAX_DENSE_CELLS", (vocab.n_users + 1 + vocab.n_items + 1) * 2 * 16)
    with caplog.at_level("WARNING", logger="trainer.ranking_training"):
        rank, factors, choice = affinity_rank(cfg, prepared.tables, train_rows)
    assert rank == 16 and list(choice["ease_top10_kept"]) == ["4", "16"] and factors[0].shape[1] == 2 * 16
    assert "left out" not in caplog.text
    with caplog.at_level("WARNING", logger="trainer.ranking_training"):
        assert dcn_config(load_config(None, ["ranking.affinity_rank=64"]), prepared.spec, prepared.tables)\
            .affinity_rank == 0
    assert caplog.text.count("ranker affinity left out: its factor tables would hold") == 1


@pytest.mark.parametrize(("protocol", "context"), [("leave_one_out", "auto"), ("temporal", "auto"),
                                                   ("random", "validation")])
def test_the_test_split_is_judged_with_the_validation_interactions_known(protocol, context):
    """``eval.test_context``: each user's validation interactions join the history every model reads on test
    (the latest by time last) and EASE's rows, by default under temporal and leave-one-out (where they precede
    the test ones), on request under random; ``train`` (and "auto" under random) judges on the training
    histories alone."""
    from trainer.evaluation import data_report, context_rows_for_test
    from trainer.full_ranking import baseline_reports, interaction_matrix

    dataset = generate(60, 120, 3000, seed=6)
    base = ["features.history_length=30", "run.threads=1", f"data.protocol={protocol}"]
    prep = prepare.prepare(load_config(None, [*base, f"eval.test_context={context}"]), dataset)
    old = prepare.prepare(load_config(None, [*base, "eval.test_context=train"]), dataset)
    for train_only in (old, *([prepare.prepare(load_config(None, base), dataset)] if protocol == "random" else [])):
        assert train_only.test_tables is train_only.tables and train_only.test_known == (train_only.split.train,)
        np.testing.assert_array_equal(train_only.test_timestamps, train_only.eval_timestamps)
        assert context_rows_for_test(train_only) is None
        assert data_report(train_only, protocol)["test_context"] == "train"
    assert data_report(prep, protocol)["test_context"] == "train + validation"

    both = pd.concat([prep.split.train, prep.split.val], ignore_index=True)
    users, items, stamps, _ = prepare.held_out(prep.vocab, both)
    moved = 0
    for user in prep.test.users:
        mine = np.lexsort((items[users == user], stamps[users == user]))
        expected = items[users == user][mine][-30:]
        history = prep.test_tables.history[user]
        np.testing.assert_array_equal(history[history > 0], expected)
        assert prep.test_timestamps[user] == stamps[users == user].max()
        moved += not np.array_equal(history, prep.tables.history[user])
    assert moved >= prep.test.users.size // 2               # most test users have a validation item
    for field in ("user_cat", "user_num", "item_cat", "item_num", "item_counts"):
        np.testing.assert_array_equal(getattr(prep.test_tables, field), getattr(prep.tables, field))

    def ease_ndcg(p):
        vectors = np.ones((p.vocab.n_items + 1, 1), np.float32)
        report = baseline_reports(interaction_matrix(p.vocab, [p.split.train]), p.val, p.test, (10,), (50.0,),
                                  vectors, test_context=context_rows_for_test(p))
        return report["ease"]["ndcg@10"]
    assert ease_ndcg(prep) != ease_ndcg(old)                # EASE's test rows hold the validation items
