"""Retrieval keeps its previous version (and the arms file's candidate) beside the current one and
answers from the version asked for when it holds it (the ranking service asks for its own), else from
its current one; a rollback to the previous version or a promotion of the candidate swaps without
loading anything."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import grpc
import pytest

from recsys_contracts import artifacts
from recsys_contracts.arms import ARMS_FILE, Arms, write_arms
from recsys_serving.reload import VersionHolder
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config, retrieve, serve
from tests.signing_keys import TRUST


def test_answers_from_the_asked_version_when_held_else_the_current_one(published, loaded, tmp_path):
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    newer = publish_copy(root, version, lambda staging: None, signed=True)
    loads = []

    def load(directory, v):
        loads.append(v)
        return dataclasses.replace(loaded, version=v)

    async def body():
        holder = VersionHolder(root, load, trust=TRUST, poll_interval_s=60)
        await holder.refresh()
        artifacts.set_current(root, newer)
        await holder.refresh()
        assert (holder.version, holder.previous_version, holder.held_versions) == (newer, version, [newer, version])
        assert holder.held(version).version == version and holder.held(newer + 5) is None
        async with serve(config(root), holder=holder) as (stub, _, _):
            answered = {asked: (await retrieve(stub, user_id="1", num_candidates=5, version=asked))[0].model_version
                        for asked in (0, version, newer, newer + 5)}
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await retrieve(stub, user_id="1", num_candidates=5, version=-1)
        artifacts.set_current(root, version)           # rollback to the held previous version
        assert await holder.refresh()
        return answered, error.value, (holder.version, holder.previous_version), loads

    answered, error, after_rollback, loads = asyncio.run(body())
    assert answered == {0: newer, version: version, newer: newer, newer + 5: newer}
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "version must be >= 0 (0 = the current version), got -1"
    assert after_rollback == (version, newer)
    assert loads == [version, newer]                   # the rollback loaded nothing


def test_the_arms_candidate_is_held_beside_current_and_promoted_without_a_load(published, loaded, tmp_path):
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    candidate = publish_copy(root, version, lambda staging: None, signed=True)
    loads = []

    def load(directory, v):
        loads.append(v)
        return dataclasses.replace(loaded, version=v)

    async def body():
        holder = VersionHolder(root, load, trust=TRUST, poll_interval_s=60)
        (root / ARMS_FILE).write_text("garbage")                  # unreadable: logged, no candidate
        await holder.refresh()
        steps = [(holder.held_versions, holder.arms)]
        write_arms(root, Arms(candidate=candidate, canary_percent=10))
        await holder.refresh()
        steps.append((holder.held_versions, holder.arms))
        artifacts.set_current(root, candidate)                    # promotion
        await holder.refresh()
        steps.append((holder.held_versions, holder.arms))
        write_arms(root, None)
        await holder.refresh()
        steps.append((holder.held_versions, holder.arms))
        return steps

    steps = asyncio.run(body())
    assert steps == [([version], None), ([version, candidate], Arms(candidate, 10.0)),
                     ([candidate, version], Arms(candidate, 10.0)), ([candidate, version], None)]
    assert loads == [version, candidate]                          # the promotion loaded nothing
