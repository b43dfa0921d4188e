"""Micro-batching: concurrent requests share one tower forward + one search, bounded in size and wait."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from retrieval_service.batching import MicroBatcher, run_batch
from retrieval_service.state import UserRow, table_row

WHEN = 1_700_000_000


def rows(state, n: int) -> list[UserRow]:
    return [table_row(state.tables, 1 + i % state.tables.n_users, WHEN) for i in range(n)]


def test_concurrent_requests_share_one_batch_with_the_same_answers(loaded):
    users = rows(loaded, 6)
    ks = [5, 10, 3, 7, 10, 1]

    async def body():
        batcher = MicroBatcher(max_size=6, max_wait_s=1.0)
        try:
            return await asyncio.gather(*(batcher.search(loaded, row, k) for row, k in zip(users, ks)))
        finally:
            await batcher.close()

    results = asyncio.run(body())
    assert len({id(batch) for _, _, batch in results}) == 1, "one forward + one search for all six"
    assert results[0][2].ids.shape[0] == 6
    for (scores, ids, _), row, k in zip(results, users, ks):
        alone = run_batch(loaded, [row], k)
        assert ids.tolist() == alone.ids[0].tolist() and len(ids) == k
        assert np.allclose(scores, alone.scores[0], atol=1e-5)


def test_batches_are_bounded_by_max_size(loaded):
    async def body():
        batcher = MicroBatcher(max_size=4, max_wait_s=0.5)
        try:
            return await asyncio.gather(*(batcher.search(loaded, row, 5) for row in rows(loaded, 10)))
        finally:
            await batcher.close()

    sizes = {id(batch): batch.ids.shape[0] for _, _, batch in asyncio.run(body())}
    assert sorted(sizes.values()) == [2, 4, 4]


def test_disabled_batcher_runs_each_request_alone(loaded):
    async def body():
        batcher = MicroBatcher(max_size=8, max_wait_s=0.5, enabled=False)
        return await asyncio.gather(*(batcher.search(loaded, row, 5) for row in rows(loaded, 3)))

    assert [batch.ids.shape[0] for _, _, batch in asyncio.run(body())] == [1, 1, 1]


def test_a_cancelled_request_is_dropped_from_its_batch(loaded):
    async def body():
        batcher = MicroBatcher(max_size=8, max_wait_s=0.3)
        try:
            doomed = asyncio.create_task(batcher.search(loaded, rows(loaded, 1)[0], 5))
            kept = asyncio.create_task(batcher.search(loaded, rows(loaded, 2)[1], 5))
            await asyncio.sleep(0.05)
            doomed.cancel()
            return await kept, doomed.cancelled()
        finally:
            await batcher.close()

    (_, _, batch), cancelled = asyncio.run(body())
    assert cancelled and batch.ids.shape[0] == 1


def test_a_failing_batch_fails_its_requests_and_batching_goes_on(loaded):
    good = rows(loaded, 1)[0]
    bad = UserRow(1, good.cat[:-1], good.num, good.history, WHEN)   # one categorical column short

    async def body():
        batcher = MicroBatcher(max_size=1, max_wait_s=0.0)
        try:
            with pytest.raises(ValueError, match="input .user_cat. must have shape"):
                await batcher.search(loaded, bad, 5)
            return await batcher.search(loaded, good, 5)
        finally:
            await batcher.close()

    _, ids, _ = asyncio.run(body())
    assert len(ids) == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"max_size": 0, "max_wait_s": 0.0}, "max_jobs must be >= 1, got 0"),
    ({"max_size": 4, "max_wait_s": -0.001}, "max_wait_s must be >= 0, got -0.001"),
])
def test_batcher_rejects_bad_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(**kwargs)
