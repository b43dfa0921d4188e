"""The hot-reload holder takes its service's callbacks when it is built (issue 16): no one assigns them later."""

from __future__ import annotations

import asyncio

import pytest

from recsys_serving.reload import VersionHolder
from tests.contracts.test_signing import _publish
from tests.signing_keys import SIGNER, TRUST


def test_callbacks_given_when_built_see_the_swap_and_the_refusal(tmp_path):
    swaps, refusals = [], []
    good = _publish(tmp_path, SIGNER)
    holder = VersionHolder(tmp_path, lambda directory, version: f"state {version}", trust=TRUST,
                           poll_interval_s=0.01, on_swap=lambda state, version: swaps.append((state, version)),
                           on_refuse=lambda version, error: refusals.append(version))

    async def main():
        await holder.refresh()
        bad = _publish(tmp_path, None)          # unsigned: refused
        await holder.refresh()
        return bad

    bad = asyncio.run(main())
    assert swaps == [(f"state {good}", good)] and refusals == [bad]


def test_a_holder_with_callbacks_refuses_to_follow_another_service(tmp_path):
    holder = VersionHolder(tmp_path, lambda directory, version: version, trust=TRUST,
                           on_swap=lambda state, version: None)
    with pytest.raises(ValueError, match="already has its callbacks"):
        holder.follow(lambda state, version: None, lambda version, error: None)
    bare = VersionHolder(tmp_path, lambda directory, version: version, trust=TRUST)
    bare.follow(print, print)
    assert bare.on_swap is print and bare.on_refuse is print
