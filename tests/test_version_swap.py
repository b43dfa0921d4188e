"""Every answer from one version: a version goes live while a client sends a steady stream of
Recommend calls to the real services (both in this process, their default holders and loaders,
sharing Redis), and no answer mixes versions, fails or is degraded, and the swap does happen.

Ranking asks retrieval for its own version; each service keeps its previous version loaded beside
the current one, so whichever service swaps first, the two answer from one version.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis

from ranking_service.server import create_server
from recsys_contracts import artifacts, bundle, feature_store
from recsys_contracts.v1 import ranking_pb2_grpc
from retrieval_service.server import create_server as create_retrieval_server
from tests.factories import publish_tiny_version
from tests.ranking.harness import config, sample
from tests.ranking.test_recommend import recommend
from tests.retrieval.harness import config as retrieval_config
from tests.signing_keys import TRUST

pytestmark = pytest.mark.slow

INTERVAL_S = 0.02          # one Recommend every 20 ms: 50 req/s, open loop
REDIS_TIMEOUT_MS = 500     # this shared 2-core machine stalls; a slow Redis read is not what is tested


async def _stream_through_publish(root: Path, new: int, redis_url: str, namespace: str, users: list[str],
                                  polls_s: dict[str, float]):
    """Starts both services on CURRENT, sends Recommend calls every INTERVAL_S, puts ``new`` live
    through ``bundle.go_live`` one second in, and keeps sending until both serve it plus a second."""
    shared = {"redis_url": redis_url, "redis_namespace": namespace, "redis_timeout_ms": REDIS_TIMEOUT_MS}
    _, port, retrieval = await create_retrieval_server(dataclasses.replace(
        retrieval_config(root), chunk_size=50, poll_interval_s=polls_s["retrieval"], **shared))
    server, ranking_port, ranking = await create_server(config(
        root, retrieval_target=f"127.0.0.1:{port}", poll_interval_s=polls_s["ranking"], **shared))
    outcomes: list[tuple[str, int, int, tuple[int, ...]]] = []
    try:
        loop = asyncio.get_running_loop()
        ready_by = loop.time() + 60
        while not (retrieval.holder.ready and ranking.holder.ready):
            assert loop.time() < ready_by, (retrieval.holder.stats, ranking.holder.stats)
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ranking_port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)

            async def one(user: str) -> None:
                try:
                    reply = await stub.Recommend(recommend(user, k=5), timeout=3.0)
                    outcomes.append(("OK", reply.retrieval_version, reply.ranking_version, tuple(reply.degraded)))
                except grpc.aio.AioRpcError as error:
                    outcomes.append((error.code().name, 0, 0, ()))

            def go_live() -> None:
                client = redis.Redis.from_url(redis_url)
                try:
                    bundle.go_live(root, new, trust=TRUST, redis_client=client,
                                   keys=feature_store.KeyFormat(namespace))
                finally:
                    client.close()

            started, publishing, both_since, tasks = loop.time(), None, None, []
            while loop.time() - started < 60:
                if publishing is None and loop.time() - started > 1.0:
                    publishing = asyncio.ensure_future(asyncio.to_thread(go_live))
                if both_since is None and retrieval.holder.version == ranking.holder.version == new:
                    both_since = loop.time()
                if both_since is not None and loop.time() - both_since > 1.0:
                    break
                tasks.append(asyncio.ensure_future(one(users[len(tasks) % len(users)])))
                await asyncio.sleep(INTERVAL_S)
            await asyncio.gather(*tasks)
            await publishing
        return outcomes, (retrieval.holder.version, ranking.holder.version)
    finally:
        await _bounded("ranking server stop", server.stop(0), server)
        await _bounded("ranking close", ranking.close(), server)
        await _bounded("retrieval close", retrieval.close(grace_s=0), retrieval.server)


# Objects whose close did not finish: kept referenced, so their __del__ never runs on a closed loop
# in a later test (gRPC's Server.__del__ then raises "Event loop is closed").
_UNCLOSED: list = []
CLOSE_TIMEOUT_S = 30.0


async def _bounded(step: str, closing, keep) -> None:
    """Runs one cleanup step for at most CLOSE_TIMEOUT_S. In two CI runs one of them never finished
    (cause not found yet, see the closing note); what this test checks is the answers, so a stuck
    cleanup is reported, not waited for."""
    task = asyncio.ensure_future(closing)
    done, _ = await asyncio.wait([task], timeout=CLOSE_TIMEOUT_S)
    if task not in done:
        _UNCLOSED.append((keep, task))
        print(f"cleanup step {step!r} did not finish in {CLOSE_TIMEOUT_S:g} s; stack: {task.get_stack()}")
        task.cancel()


# The service that polls CURRENT every 2 s swaps up to 2 s after the other: a window in which the two
# hold different current versions, in either order.
@pytest.mark.parametrize("polls_s", [{"retrieval": 0.1, "ranking": 2.0}, {"retrieval": 2.0, "ranking": 0.3}],
                         ids=["retrieval-swaps-first", "ranking-swaps-first"])
def test_a_publish_under_steady_load_gives_only_single_version_answers(tmp_path, redis_url, redis_namespace,
                                                                       polls_s):
    first = publish_tiny_version(tmp_path, 0, make_current=False)
    client = redis.Redis.from_url(redis_url)
    try:
        bundle.go_live(tmp_path, first, trust=TRUST, redis_client=client,
                       keys=feature_store.KeyFormat(redis_namespace))
    finally:
        client.close()
    new = publish_tiny_version(tmp_path, 1, make_current=False)          # staged, not live
    users = [str(u) for u in bundle.load_tables(artifacts.version_dir(tmp_path, first)).user_ids[1:41]]
    before = {result: sample("ranking_version_match_total", result=result) for result in ("same", "held", "mixed")}
    outcomes, serving = asyncio.run(_stream_through_publish(tmp_path, new, redis_url, redis_namespace, users,
                                                                polls_s))
    matches = {result: sample("ranking_version_match_total", result=result) - before[result] for result in before}
    codes = Counter(code for code, *_ in outcomes)
    mixed = [(r, k) for code, r, k, _ in outcomes if code == "OK" and r != k]
    degraded = [flags for code, _, _, flags in outcomes if flags]
    versions = Counter(k for code, _, k, _ in outcomes if code == "OK")
    print(f"{len(outcomes)} answers, codes {dict(codes)}, ranking versions {dict(versions)}, match {matches}")
    assert serving == (new, new)                                        # the swap happened in both
    assert codes == {"OK": len(outcomes)}, codes                        # 0 failed
    assert mixed == []                                                  # 0 answers with different versions
    assert degraded == []                                               # 0 degraded
    assert versions[first] > 0 and versions[new] > 0, versions          # answers before and after the swap
    assert matches["mixed"] == 0
    if polls_s["ranking"] < polls_s["retrieval"]:
        assert matches["held"] > 0     # ranking on the new version ranked retrieval's old candidates with the old one
