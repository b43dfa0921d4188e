"""Versions going live faster than the services load them: each service skips some, and still
every answer comes from one version.

Each holder keeps current + previous; when one service skipped the version the other is on, those
two pairs can have nothing in common (retrieval on {3, 1}, ranking on {2, 1}, then {4, 2}). So
ranking asks for its version with its other held versions as fallbacks
(``RetrieveRequest.fallback_versions``), and a version the other service still uses is retained
(``VersionHolder.used`` / ``retained``) until unused for ``RETAIN_S``. Here the holders are
refreshed by hand in the order that used to give mixed answers, with both real servers in process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import grpc
import pytest

from recsys_contracts import artifacts
from recsys_serving import reload
from recsys_serving.reload import VersionHolder
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import config, serve
from tests.ranking.test_recommend import recommend
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config as retrieval_config
from tests.retrieval.harness import retrieve
from tests.retrieval.harness import serve as serve_retrieval
from tests.signing_keys import TRUST


@pytest.fixture
def root_with_copies(published, tmp_path):
    """An artifact root holding the session's version and four signed copies (versions 2..5)."""
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    copies = [publish_copy(root, version, lambda staging: None, signed=True) for _ in range(4)]
    return root, [version, *copies]


def holder_of(root, state, loads: list[int] | None = None) -> VersionHolder:
    """A real holder (signature and checksums verified) whose load reuses ``state`` under each
    version, noting each loaded version in ``loads``."""
    def load(directory, version):
        if loads is not None:
            loads.append(version)
        return dataclasses.replace(state, version=version)

    return VersionHolder(root, load, trust=TRUST, poll_interval_s=60)


def test_a_used_version_is_retained_after_it_leaves_current_and_previous_then_released(root_with_copies, loaded,
                                                                                       monkeypatch):
    root, (v1, v2, v3, v4, v5) = root_with_copies

    loads = []

    async def body():
        holder = holder_of(root, loaded, loads)
        await holder.refresh()
        holder.used(v1)                                   # a request answered from v1
        for target in (v2, v3):
            artifacts.set_current(root, target)
            await holder.refresh()
        # v1 left current/previous but was used: kept; v2 was never used: gone.
        assert (holder.version, holder.previous_version, sorted(holder.retained)) == (v3, v2, [v1])
        assert holder.held(v1).version == v1 and holder.held_versions == [v3, v2, v1]
        artifacts.set_current(root, v4)
        await holder.refresh()
        assert holder.held(v2) is None and holder.held_versions == [v4, v3, v1]
        artifacts.set_current(root, v1)                   # going back to a retained version loads nothing
        assert await holder.refresh()
        assert (holder.version, holder.previous_version, holder.retained) == (v1, v4, {})
        assert loads == [v1, v2, v3, v4]
        # At most MAX_RETAINED are kept (the most recently used), and none longer than RETAIN_S unused.
        monkeypatch.setattr(reload, "MAX_RETAINED", 1)
        holder.used(v4)
        holder.used(v1)
        for target in (v5, v2):
            artifacts.set_current(root, target)
            await holder.refresh()
        assert (holder.version, holder.previous_version, sorted(holder.retained)) == (v2, v5, [v1])
        monkeypatch.setattr(reload, "RETAIN_S", 0.01)
        await asyncio.sleep(0.05)
        await holder.refresh()
        assert holder.retained == {} and holder.held_versions == [v2, v5]

    asyncio.run(body())


def test_retrieval_answers_from_the_first_held_fallback_version(root_with_copies, retrieval_loaded):
    root, (v1, v2, *_) = root_with_copies

    async def body():
        holder = holder_of(root, retrieval_loaded)
        await holder.refresh()
        artifacts.set_current(root, v2)
        await holder.refresh()                            # holds v2 (current) and v1 (previous)
        async with serve_retrieval(retrieval_config(root), holder=holder) as (stub, _, _):
            answered = [(await retrieve(stub, user_id="1", num_candidates=5, version=asked,
                                        fallback_versions=fallbacks))[0].model_version
                        for asked, fallbacks in ((99, [98, v1, v2]), (99, [98]), (v2, [v1]), (0, [v1]))]
            errors = []
            for fallbacks in ([0], [v1] * 9):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await retrieve(stub, user_id="1", num_candidates=5, version=v2, fallback_versions=fallbacks)
                errors.append((error.value.code(), error.value.details()))
        return answered, errors, dict(holder._last_used)

    answered, errors, last_used = asyncio.run(body())
    # v1 is the first held fallback; nothing held: the current one; the asked one first; 0 asks for
    # nothing (current), fallbacks still first.
    assert answered == [v1, v2, v2, v1]
    assert errors == [(grpc.StatusCode.INVALID_ARGUMENT, "fallback_versions must be versions >= 1, got 0"),
                      (grpc.StatusCode.INVALID_ARGUMENT, "fallback_versions must have at most 8 entries, got 9")]
    assert set(last_used) == {v1, v2}                      # both were answered from: both noted as used


def test_services_that_skip_different_versions_still_answer_from_one(root_with_copies, loaded, retrieval_loaded):
    root, (v1, v2, v3, v4, v5) = root_with_copies

    async def body():
        retrieval_holder, ranking_holder = holder_of(root, retrieval_loaded), holder_of(root, loaded)
        _, port, retrieval = await create_retrieval_server(
            retrieval_config(root, poll_interval_s=60, chunk_size=50), holder=retrieval_holder)
        answers, held = [], []
        try:
            # retrieval loads v1 in the background: the first question must not race it (ranking would
            # answer from popular items, retrieval version 0)
            for _ in range(3000):
                if retrieval_holder.ready:
                    break
                await asyncio.sleep(0.01)
            assert retrieval_holder.ready, "retrieval never loaded v1"
            async with serve(config(root, retrieval_target=f"127.0.0.1:{port}", poll_interval_s=60),
                             holder=ranking_holder) as (stub, _, _):
                async def ask():
                    reply = await stub.Recommend(recommend("1", k=5), timeout=5)
                    answers.append((reply.retrieval_version, reply.ranking_version))
                    held.append((retrieval_holder.held_versions, ranking_holder.held_versions))

                async def go_live(version, *holders):
                    artifacts.set_current(root, version)
                    for holder in holders:
                        await holder.refresh()

                await ask()                                       # both on v1
                await go_live(v3, retrieval_holder)               # retrieval skipped v2: {3, 1}
                await go_live(v2, ranking_holder)                 # ranking skipped v3: {2, 1}
                await ask()
                await go_live(v4, ranking_holder)                 # ranking {4, 2} and v1 retained
                await ask()
                await go_live(v5, retrieval_holder)               # retrieval {5, 3} and v1 retained
                await ask()
                await go_live(v5, ranking_holder)                 # ranking caught up: {5, 4}
                await ask()
        finally:
            await retrieval.close(grace_s=0)
        return answers, held

    answers, held = asyncio.run(body())
    assert answers == [(v1, v1), (v1, v1), (v1, v1), (v1, v1), (v5, v5)], (answers, held)
    assert held[2] == ([v3, v1], [v4, v2, v1]) and held[3] == ([v5, v3, v1], [v4, v2, v1])
