"""Fixtures of the gateway tests: the ranking tests' session version (tiny synthetic, with item
metadata) and a gateway in front of real retrieval + ranking servers for the module."""

from __future__ import annotations

import pytest

from tests.gateway.harness import running
from tests.ranking.conftest import loaded, published, retrieval_loaded, tiny  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def stack(published, loaded, retrieval_loaded):
    root, _ = published
    with running(root, loaded, retrieval_loaded) as started:
        yield started
