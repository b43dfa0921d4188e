"""Background loops stop when cancelled, even when the thing they wait for arrives in the same step.

Python 3.11's ``asyncio.wait_for`` drops a cancellation that lands in the loop step in which its
awaitable finishes; a CI run hung for 300 s in ``RankingApp.close`` waiting for a refiller that had
swallowed its cancel. The project waits with ``recsys_serving.aio.within`` instead; these tests
rebuild the race deterministically (the awaited event is set and the task cancelled in one step).
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from ranking_service.features import FeatureStore
from ranking_service.refill import run_refiller
from recsys_serving.aio import within
from recsys_serving.batching import MicroBatcher

ROOT = Path(__file__).resolve().parent.parent


async def _steps(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_within_delivers_a_cancel_that_lands_as_its_wait_ends():
    async def main():
        event = asyncio.Event()
        waiter = asyncio.ensure_future(within(event.wait(), 10.0))
        await _steps()
        event.set()
        waiter.cancel()
        await asyncio.wait([waiter], timeout=2)
        return waiter.cancelled()

    assert asyncio.run(main())


def test_within_times_out():
    async def main():
        with pytest.raises(TimeoutError):
            await within(asyncio.Event().wait(), 0.01)
        return await within(asyncio.sleep(0, result="done"), None)

    assert asyncio.run(main()) == "done"


def test_the_refiller_stops_when_cancelled_as_a_refill_is_asked_for(redis_url, redis_namespace):
    async def main():
        store = FeatureStore(redis_url, redis_namespace, 200)
        try:
            task = asyncio.ensure_future(run_refiller(store, lambda: None, 10.0))
            await _steps()
            store.refill_wanted.set()              # a read asks for a refill ...
            task.cancel()                          # ... as the service closes
            done, _ = await asyncio.wait([task], timeout=2)
            return task in done and task.cancelled()
        finally:
            await store.close()

    assert asyncio.run(main())


def test_the_batcher_closes_while_a_job_arrives_mid_collection():
    async def main():
        batcher = MicroBatcher(lambda jobs: [job * 10 for job in jobs], max_jobs=4, max_wait_s=5.0, name="test")
        first = asyncio.ensure_future(batcher.submit(1))
        await _steps()                              # the worker holds job 1, waiting up to 5 s for company
        second = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)                      # job 2 queued: the worker's wait ends in this step ...
        closing = asyncio.ensure_future(batcher.close())   # ... and close cancels it in the same one
        done, _ = await asyncio.wait([closing], timeout=2)
        await asyncio.wait([first, second], timeout=2)
        outcomes = [job.exception() if job.done() else "still waiting" for job in (first, second)]
        return closing in done, outcomes

    closed, outcomes = asyncio.run(main())
    assert closed
    assert all(isinstance(outcome, RuntimeError) and "closed" in str(outcome) for outcome in outcomes), outcomes


@pytest.mark.parametrize("folder", ["recsys_contracts", "recsys_serving", "retrieval_service", "ranking_service",
                                    "gateway", "trainer", "loadtest", "benchmarks", "scripts"])
def test_no_code_waits_with_asyncio_wait_for(folder):
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted((ROOT / folder).rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute) and node.attr == "wait_for"
                 and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]
    assert not offenders, f"use recsys_serving.aio.within (wait_for can swallow a cancel on 3.11): {offenders}"
