"""Shadow scoring: the comparison metrics by hand, and a live answer unchanged while the candidate
scores every request off the answer path (both services in process, the arms file at 100 % shadow)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from recsys_contracts.arms import Arms, write_arms
from recsys_contracts.v1 import ranking_pb2
from ranking_service.shadow import kendall_tau, overlap_at_k
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import config, run, sample, serve
from tests.ranking.test_pinning import _holder
from tests.ranking.test_recommend import recommend
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config as retrieval_config


def test_overlap_at_k_by_hand():
    # top 3 served {1, 2, 3}, shadow {3, 9, 1}: 2 shared of 3
    assert overlap_at_k([1, 2, 3, 4], [3, 9, 1, 2], 3) == pytest.approx(2 / 3)
    assert overlap_at_k([1, 2], [1, 2], 2) == 1.0
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        overlap_at_k([1], [1], 0)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    # shared 1, 2, 3; shadow order 2, 1, 3: pairs (1,2) discordant, (1,3) and (2,3) concordant: (2-1)/3
    assert kendall_tau([1, 2, 3, 4], [2, 1, 9, 3]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2], [2, 5]) is None                 # one shared item: no pair


async def _serve_with_shadow(root, loaded, retrieval_loaded, users):
    holder = await _holder(root, loaded, [1])
    retrieval_holder = await _holder(root, retrieval_loaded, [1])
    _, port, retrieval = await create_retrieval_server(retrieval_config(root, chunk_size=50), holder=retrieval_holder)
    answers = []
    try:
        async with serve(config(root, retrieval_target=f"127.0.0.1:{port}"), holder=holder) as (stub, _, app):
            for user in users:
                reply = await stub.Recommend(recommend(user, k=5), timeout=5)
                answers.append((reply.arm, reply.retrieval_version, reply.ranking_version,
                                [item.item_id for item in reply.items]))
            while app.shadow.in_flight:
                await asyncio.sleep(0.01)
    finally:
        await retrieval.close(grace_s=0)
    return answers


def test_shadow_scores_the_candidate_off_the_answer_path(published, loaded, retrieval_loaded, tmp_path):
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    candidate = publish_copy(root, version, lambda staging: None, signed=True)
    users = [str(u) for u in loaded.tables.user_ids[1:11]]
    plain = run(_serve_with_shadow(root, loaded, retrieval_loaded, users))
    write_arms(root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=100.0))
    before = {r: sample("ranking_shadow_runs_total", result=r) for r in ("scored", "skipped", "failed", "not_candidate")}
    overlaps = (sample("ranking_shadow_overlap_at_k_count"), sample("ranking_shadow_overlap_at_k_sum"))
    shadowed = run(_serve_with_shadow(root, loaded, retrieval_loaded, users))
    runs = {r: sample("ranking_shadow_runs_total", result=r) - before[r] for r in before}
    assert shadowed == plain                                    # the answers are unchanged
    assert {arm for arm, *_ in shadowed} == {ranking_pb2.ARM_LIVE}
    assert runs["scored"] + runs["skipped"] == len(users) and runs["scored"] > 0, runs
    assert runs["failed"] == runs["not_candidate"] == 0
    assert sample("ranking_shadow_overlap_at_k_count") - overlaps[0] == runs["scored"]
    # the candidate is a copy of the live version: the same lists, overlap 1 each
    assert sample("ranking_shadow_overlap_at_k_sum") - overlaps[1] == pytest.approx(runs["scored"])


def test_the_shadow_has_its_own_batcher_and_breaker_and_never_falls_back(published, loaded):
    """A shadow batch never joins or queues before a live one, a failing candidate cannot open the
    live retrieval breaker, and a failed candidate retrieval is counted failed, not compared."""
    root, _ = published

    async def main():
        async with serve(config(root), state=loaded) as (_, _, app):
            live, shadow = app.pipeline, app.shadow.pipeline
            for _ in range(live.breaker.failure_threshold):
                shadow.breaker.record_failure(RuntimeError("candidate retrieval failed"))
            return (shadow.batcher is not live.batcher, shadow.breaker is not live.breaker,
                    shadow.breaker.state.name, live.breaker.state.name, shadow.fallback)

    assert run(main()) == (True, True, "OPEN", "CLOSED", "unavailable")
