"""A canary arm end to end: with the arms file naming a candidate for 50 % of users, both services
hold it beside CURRENT, exactly the users ``in_canary`` picks are answered by it (both stages), the
rest by CURRENT, each answer says its arm, and the split is the same on every call."""

from __future__ import annotations

import shutil

from recsys_contracts import artifacts
from recsys_contracts.arms import Arms, in_canary, write_arms
from recsys_contracts.v1 import ranking_pb2
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import config, run, sample, serve
from tests.ranking.test_pinning import _holder
from tests.ranking.test_recommend import recommend
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config as retrieval_config


async def _arms_of(root, loaded, retrieval_loaded, users):
    holder = await _holder(root, loaded, [1])
    retrieval_holder = await _holder(root, retrieval_loaded, [1])
    held = (holder.held_versions, retrieval_holder.held_versions)
    _, port, retrieval = await create_retrieval_server(retrieval_config(root, chunk_size=50), holder=retrieval_holder)
    answers = []
    try:
        async with serve(config(root, retrieval_target=f"127.0.0.1:{port}"), holder=holder) as (stub, _, _):
            for _ in range(2):
                for user in users:
                    reply = await stub.Recommend(recommend(user, k=5), timeout=5)
                    answers.append((user, reply.arm, reply.retrieval_version, reply.ranking_version))
    finally:
        await retrieval.close(grace_s=0)
    return held, answers


def test_the_canary_share_is_answered_by_the_candidate_in_both_stages(published, loaded, retrieval_loaded, tmp_path):
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    candidate = publish_copy(root, version, lambda staging: None, signed=True)
    write_arms(root, Arms(candidate=candidate, canary_percent=50.0))
    users = [str(u) for u in loaded.tables.user_ids[1:61]]
    before = sample("ranking_arm_answers_total", arm="ARM_CANARY")
    held, answers = run(_arms_of(root, loaded, retrieval_loaded, users))
    assert held == ([version, candidate], [version, candidate])       # both hold the candidate beside CURRENT
    expected = [(u, ranking_pb2.ARM_CANARY, candidate, candidate) if in_canary(u, 50.0)
                else (u, ranking_pb2.ARM_LIVE, version, version) for u in users]
    assert answers == expected + expected                             # exactly these users, every time
    canaries = sum(in_canary(u, 50.0) for u in users)
    assert 0 < canaries < len(users)
    assert sample("ranking_arm_answers_total", arm="ARM_CANARY") - before == 2 * canaries
    assert artifacts.current_version(root) == version
