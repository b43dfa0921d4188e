"""A Recommend may pin the version that answers: served while both services hold it (current or
previous), else FAILED_PRECONDITION naming what is held; both versions in the answer are the pin."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import grpc
import pytest

from recsys_contracts import artifacts
from recsys_serving.reload import VersionHolder
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import config, run, serve
from tests.ranking.test_recommend import recommend
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config as retrieval_config
from tests.signing_keys import TRUST


async def _holder(root, state, versions):
    """A holder that went through ``versions`` in order (the real verify, a reused loaded state)."""
    holder = VersionHolder(root, lambda directory, v: dataclasses.replace(state, version=v), trust=TRUST,
                           poll_interval_s=60)
    for version in versions:
        artifacts.set_current(root, version)
        await holder.refresh()
    return holder


async def _answers(root, loaded, retrieval_loaded, retrieval_versions, pins):
    # Both holders before either server starts watching (a started holder follows CURRENT at once).
    holder = await _holder(root, loaded, [1, 2])
    retrieval_holder = await _holder(root, retrieval_loaded, retrieval_versions)
    _, port, retrieval = await create_retrieval_server(retrieval_config(root, chunk_size=50), holder=retrieval_holder)
    results = {}
    try:
        async with serve(config(root, retrieval_target=f"127.0.0.1:{port}"), holder=holder) as (stub, _, _):
            for pin in pins:
                try:
                    reply = await stub.Recommend(recommend(k=5, version=pin), timeout=5)
                    results[pin] = (reply.retrieval_version, reply.ranking_version, len(reply.items))
                except grpc.aio.AioRpcError as error:
                    results[pin] = (error.code().name, error.details())
    finally:
        await retrieval.close(grace_s=0)
    return results


@pytest.fixture
def two_versions(published, tmp_path):
    source, version = published
    assert version == 1
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    assert publish_copy(root, 1, lambda staging: None, signed=True) == 2
    return root


def test_a_pinned_version_answers_while_both_services_hold_it(two_versions, loaded, retrieval_loaded):
    results = run(_answers(two_versions, loaded, retrieval_loaded, [1, 2], [0, 1, 2, 3, -1]))
    assert results[0] == (2, 2, 5) and results[1] == (1, 1, 5) and results[2] == (2, 2, 5)
    assert results[3] == ("FAILED_PRECONDITION", "version 3 is not held by the ranking service; held versions: [2, 1]")
    assert results[-1] == ("INVALID_ARGUMENT", "version must be >= 0 (0 = the current version), got -1")


def test_a_pin_retrieval_does_not_hold_fails_instead_of_mixing(two_versions, loaded, retrieval_loaded):
    results = run(_answers(two_versions, loaded, retrieval_loaded, [2], [1, 2]))
    assert results[1] == ("FAILED_PRECONDITION",
                          "version 1 is not held by the retrieval service (it answered from version 2)")
    assert results[2] == (2, 2, 5)
