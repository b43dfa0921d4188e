"""Pure parts of the ranking service on hand-computed cases: MMR, top-k, score rule, lookups, stores, batching."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from ranking_service.batching import MAX_ROWS, MicroBatcher
from ranking_service.fresh import InProcessFreshStore
from ranking_service.pipeline import fallback_reserve_s
from ranking_service.selection import RunningTopK, Scored, mmr_order
from ranking_service.state import ItemLookup, load_state, ranker_inputs, run_ranker
from recsys_contracts.bundle import ScoreRule, ServingConfig, check_ranker
from recsys_contracts.feature_store import FreshInteraction
from recsys_contracts.programs import RANKER, RANKER_ROWS, aligned_rows
from tests.factories import publish_tiny_version, tiny_run
from tests.ranking.harness import sample


def scored(ids, scores) -> Scored:
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    return Scored(item_ids=ids, item_idx=ids, arrival=np.arange(ids.size), score=scores, ctr=scores,
                  rating=scores, retrieval_score=scores)


def test_mmr_trades_relevance_for_novelty_as_computed_by_hand():
    # a and b are identical directions, c is orthogonal. relevance a=1.0, b=0.9, c=0.5.
    relevance = np.array([1.0, 0.9, 0.5])
    embeddings = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # strength 0: relevance order.
    assert mmr_order(relevance, embeddings, 3, 0.0).tolist() == [0, 1, 2]
    # strength 0.5: first a (penalty 0). Then b: 0.5*0.9 - 0.5*1 = -0.05; c: 0.5*0.5 - 0.5*0 = 0.25 -> c, then b.
    assert mmr_order(relevance, embeddings, 3, 0.5).tolist() == [0, 2, 1]
    # strength 0.1: b: 0.9*0.9 - 0.1*1 = 0.71; c: 0.9*0.5 - 0 = 0.45 -> b first.
    assert mmr_order(relevance, embeddings, 3, 0.1).tolist() == [0, 1, 2]
    # k larger than the pool is clipped.
    assert mmr_order(relevance, embeddings, 10, 1.0).tolist() == [0, 2, 1]


def test_mmr_measures_cosine_whatever_the_embeddings_lengths():
    """The autoencoder tower's item vectors are not unit vectors: lengths must not change the order."""
    relevance = np.array([1.0, 0.9, 0.5])
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scaled = unit * np.array([[7.0], [0.2], [3.0]])
    for strength in (0.1, 0.5, 1.0):
        assert mmr_order(relevance, scaled, 3, strength).tolist() == mmr_order(relevance, unit, 3, strength).tolist()
    # A zero row (an unknown item) is no item's neighbour, not a division by zero.
    assert mmr_order(relevance, np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), 3, 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("strength, rows, message", [(1.5, 3, "strength must be in"), (0.5, 2, "embeddings must have 3")])
def test_mmr_rejects_bad_arguments(strength, rows, message):
    with pytest.raises(ValueError, match=message):
        mmr_order(np.ones(3), np.ones((rows, 2)), 2, strength)


def test_running_top_k_keeps_the_best_with_ties_broken_by_arrival():
    top = RunningTopK(3)
    assert top.ranked() is None and len(top) == 0
    top.add(scored([10, 11, 12], [0.2, 0.9, 0.5]))
    second = scored([13, 14], [0.9, 0.1])
    top.add(Scored(second.item_ids, second.item_idx, np.array([3, 4]), second.score, second.ctr, second.rating,
                   second.retrieval_score))
    # 11 and 13 tie at 0.9: 11 arrived first.
    assert top.ranked().item_ids.tolist() == [11, 13, 12]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        RunningTopK(0)


def test_score_rule_combines_ctr_and_rating():
    ctr, rating = np.array([0.5, 0.2], np.float32), np.array([5.0, 2.5], np.float32)
    assert ScoreRule("ctr", 0.0, 5.0).apply(ctr, rating).tolist() == pytest.approx([0.5, 0.2])
    # 0.5 * (5/5)^2 = 0.5; 0.2 * (2.5/5)^2 = 0.05
    assert ScoreRule("ctr_x_rating", 2.0, 5.0).apply(ctr, rating).tolist() == pytest.approx([0.5, 0.05])
    serving = {"temperature": 0.1, "rating_min": 1.0, "rating_max": 5.0}
    assert ServingConfig.from_dict(serving, 10).score_rule("ctr_x_rating").mode == "ctr_x_rating"
    assert ServingConfig.from_dict({**serving, "score_mode": "ctr"}, 10).score_rule("ctr_x_rating").mode == "ctr"
    # the trainer evaluates with the same rule on torch tensors: 0.2 * (2.5/5)^2 = 0.05
    assert ScoreRule("ctr_x_rating", 2.0, 5.0).apply(torch.tensor([0.2]), torch.tensor([2.5])).tolist() == \
        pytest.approx([0.05])


@pytest.mark.parametrize("mode, weight, rating_max, message", [
    ("bogus", 0.0, 5.0, "score_mode must be one of"), ("ctr", -1.0, 5.0, "rating_weight must be"),
    ("ctr", 0.0, 0.0, "rating_max must be")])
def test_score_rule_rejects_bad_settings(mode, weight, rating_max, message):
    with pytest.raises(ValueError, match=message):
        ScoreRule(mode, weight, rating_max)


def test_item_lookup_maps_known_ids_and_zero_for_unknown():
    lookup = ItemLookup(np.array([-1, 50, 7, 300], dtype=np.int64))
    assert lookup.indices(np.array([7, 300, 50, 8, 0, 10**12])).tolist() == [2, 3, 1, 0, 0, 0]
    assert ItemLookup(np.array([-1], dtype=np.int64)).indices(np.array([1])).tolist() == [0]


def test_in_process_fresh_store_is_bounded_per_user_and_in_users():
    store = InProcessFreshStore(max_users=2, max_per_user=3)
    store.record([("a", FreshInteraction(i, 100 + i)) for i in range(5)])
    assert [f.item_id for f in store.get("a")] == [2, 3, 4]       # the last 3, oldest first
    store.record([("b", FreshInteraction(1, 1)), ("c", FreshInteraction(2, 2))])
    assert len(store) == 2 and store.get("a") == []                # "a" was written least recently
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        InProcessFreshStore(max_users=0)
    with pytest.raises(ValueError, match="max_per_user must be >= 1"):
        InProcessFreshStore(max_per_user=0)


def test_fallback_reserve_is_a_fifth_of_the_time_left_within_bounds():
    assert fallback_reserve_s(0.2) == pytest.approx(0.04)
    assert fallback_reserve_s(0.01) == 0.005
    assert fallback_reserve_s(10.0) == 0.05


def test_microbatcher_merges_concurrent_jobs_into_one_pass_with_the_same_scores(loaded):
    state = loaded
    tables = state.tables

    def inputs(user: int, items: np.ndarray) -> dict[str, np.ndarray]:
        return ranker_inputs(state, user_idx=user, user_cat=tables.user_cat[user], user_num=tables.user_num[user],
                             history=tables.history[user], timestamp=1_000_000, item_idx=items,
                             retrieval_score=np.linspace(-1, 1, items.size).astype(np.float32))

    jobs = [inputs(u, np.arange(1 + u, 21 + u)) for u in (1, 2, 3)]
    expected = [run_ranker(state.ranker, job) for job in jobs]

    async def main():
        batcher = MicroBatcher(max_jobs=8, max_wait_s=0.05)
        try:
            return await asyncio.gather(*(batcher.score(state.ranker, job) for job in jobs))
        finally:
            await batcher.close()

    passes_before = sample("ranking_dcn_batch_jobs_count")
    merged_before = sample("ranking_dcn_batch_jobs_sum")
    results = asyncio.run(main())
    for (ctr, rating), (ctr_ref, rating_ref) in zip(results, expected):
        np.testing.assert_allclose(ctr, ctr_ref, atol=1e-6)
        np.testing.assert_allclose(rating, rating_ref, atol=1e-5)
    assert sample("ranking_dcn_batch_jobs_count") - passes_before == 1        # one forward pass ...
    assert sample("ranking_dcn_batch_jobs_sum") - merged_before == 3          # ... holding the 3 jobs


@pytest.mark.parametrize("kwargs, message", [
    ({"max_jobs": 0, "max_wait_s": 0.0}, "max_jobs must be >= 1"),
    ({"max_jobs": 1, "max_wait_s": 2.0}, "max_wait_s must be in"),
    ({"max_jobs": 1, "max_wait_s": 0.0, "max_rows": MAX_ROWS + 1}, "max_rows must be in")])
def test_microbatcher_rejects_bad_settings(kwargs, message):
    async def make():
        MicroBatcher(**kwargs)

    with pytest.raises(ValueError, match=message):
        asyncio.run(make())


def test_microbatcher_rejects_an_oversized_job(loaded):
    async def main():
        batcher = MicroBatcher(max_jobs=1, max_wait_s=0.0, max_rows=4)
        try:
            await batcher.score(loaded.ranker, {"item_idx": np.arange(5)})
        finally:
            await batcher.close()

    with pytest.raises(ValueError, match=r"rows must be in \[1, 4\], got 5"):
        asyncio.run(main())


class _Ranker:
    """A callable standing in for a broken program: constant float32 outputs of a chosen shape."""

    signature = RANKER

    def __init__(self, ctr_logit: float, rating: float, drop_row: bool = False) -> None:
        self.ctr_logit, self.rating, self.drop_row = ctr_logit, rating, drop_row

    def __call__(self, item_idx, **_):
        n = item_idx.shape[0] - (1 if self.drop_row else 0)
        return np.full((n,), self.ctr_logit, np.float32), np.full((n,), self.rating, np.float32)


@pytest.mark.parametrize("ranker, message", [
    (_Ranker(float("nan"), 3.0), "ranker smoke request must be finite"),
    (_Ranker(0.0, 9.0), r"ranker ratings must lie in \[1.0, 5.0\]"),
    (_Ranker(0.0, 3.0, drop_row=True), "ranker must return")])
def test_smoke_check_refuses_a_broken_ranker(loaded, ranker, message):
    with pytest.raises(ValueError, match=message):
        check_ranker(ranker, loaded.tables, loaded.ranker_history)


def test_ranker_takes_only_its_recent_history_and_scores_as_the_eager_model(tmp_path):
    run = tiny_run(3, history_length=30)
    version = publish_tiny_version(tmp_path, run=run)
    directory = tmp_path / "versions" / str(version)
    assert json.loads((directory / "serving.json").read_text())["ranker_history_length"] == 20
    state = load_state(directory, version)
    assert state.ranker_history == 20
    tables = state.tables
    user = int(np.argmax((tables.history > 0).sum(axis=1)))
    assert (tables.history[user] > 0).sum() > 20                     # the cut drops real items
    items = np.arange(1, 9, dtype=np.int64)
    scores = np.linspace(-1, 1, items.size).astype(np.float32)
    inputs = ranker_inputs(state, user_idx=user, user_cat=tables.user_cat[user], user_num=tables.user_num[user],
                           history=tables.history[user], timestamp=1_700_000_000, item_idx=items,
                           retrieval_score=scores)
    assert inputs["history"].shape == (1, 20) and inputs["row_user"].tolist() == [0] * items.size
    np.testing.assert_array_equal(inputs["history"][0], tables.history[user][-20:])
    ctr, rating = run_ranker(state.ranker, inputs)
    # the eager model on aligned rows, each with the user's whole history: it pools only the recent 20
    eager = {**aligned_rows(inputs), "history": np.broadcast_to(tables.history[user], (items.size, 30)).copy()}
    with torch.no_grad():
        logit, eager_rating = run.ranker(**{name: torch.from_numpy(np.array(value)) for name, value in eager.items()})
    np.testing.assert_allclose(ctr, torch.sigmoid(logit).numpy(), atol=1e-6)
    np.testing.assert_allclose(rating, eager_rating.numpy(), atol=1e-5)


@pytest.mark.parametrize("width", [0, 11, 2.5, True, "20"])
def test_ranker_history_length_outside_the_history_is_refused(width):
    serving = {"temperature": 0.1, "rating_min": 1.0, "rating_max": 5.0}
    with pytest.raises(ValueError, match=r"ranker_history_length must be an integer in \[1, 10\], got"):
        ServingConfig.from_dict({**serving, "ranker_history_length": width}, 10)
    assert ServingConfig.from_dict(serving, 10).ranker_history_length == 10


def test_a_version_published_with_the_earlier_aligned_rows_ranker_scores_the_same(tmp_path):
    """Versions published before the grouped ranker hold an aligned-rows program (RANKER_ROWS): the
    service loads them (the bundle's check included) and scores as with the grouped program of the
    same model, alone and in a batch of several users."""
    from tests.ranking.test_untrusted_versions import publish_copy
    from trainer.export import export_ranker_rows
    from trainer.publish import _export_examples

    run = tiny_run(4)
    grouped_version = publish_tiny_version(tmp_path, run=run)
    _, example = _export_examples(run.tables, run.ranker.recent_items)
    aligned = aligned_rows({name: value.numpy() for name, value in example.items()})
    legacy_version = publish_copy(tmp_path, grouped_version, lambda staging: export_ranker_rows(
        run.ranker.eval(), {name: torch.from_numpy(value) for name, value in aligned.items()},
        staging / "ranker.onnx"), signed=True)
    grouped = load_state(tmp_path / "versions" / str(grouped_version), grouped_version)
    legacy = load_state(tmp_path / "versions" / str(legacy_version), legacy_version)
    assert (grouped.ranker.signature, legacy.ranker.signature) == (RANKER, RANKER_ROWS)
    tables = grouped.tables

    def inputs(user: int) -> dict[str, np.ndarray]:
        items = np.arange(1, 12, dtype=np.int64) + user
        return ranker_inputs(grouped, user_idx=user, user_cat=tables.user_cat[user], user_num=tables.user_num[user],
                             history=tables.history[user], timestamp=1_000_000, item_idx=items,
                             retrieval_score=np.linspace(-1, 1, items.size).astype(np.float32))

    jobs = [inputs(u) for u in (0, 1, 2)]
    for job in jobs:
        for got, want in zip(run_ranker(legacy.ranker, job), run_ranker(grouped.ranker, job)):
            np.testing.assert_allclose(got, want, atol=1e-6)

    async def batched(state):
        batcher = MicroBatcher(max_jobs=8, max_wait_s=0.05)
        try:
            return await asyncio.gather(*(batcher.score(state.ranker, job) for job in jobs))
        finally:
            await batcher.close()

    for (got_ctr, got_rating), (want_ctr, want_rating) in zip(asyncio.run(batched(legacy)),
                                                              asyncio.run(batched(grouped))):
        np.testing.assert_allclose(got_ctr, want_ctr, atol=1e-6)
        np.testing.assert_allclose(got_rating, want_rating, atol=1e-5)
