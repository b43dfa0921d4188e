"""Fixtures of the ranking tests: one published tiny version per session, its loaded states, a private Redis.

Loading a version costs seconds (the exported programs), so the session loads it once for each
service and tests hand the loaded state to their servers through ``harness.cached_holder``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ranking_service.state import ServingState, load_state
from retrieval_service.state import load_state as load_retrieval_state
from tests.factories import publish_tiny_version, tiny_run
from tests.redis_server import private_redis_server


@pytest.fixture(scope="session")
def tiny():
    """The TrainedRun behind the session's published version (its tables and eager models)."""
    return tiny_run(0)


@pytest.fixture(scope="session")
def published(tmp_path_factory, tiny) -> tuple[Path, int]:
    """(artifact root, version) holding one published tiny version."""
    root = tmp_path_factory.mktemp("ranking-artifacts")
    return root, publish_tiny_version(root, 0, run=tiny)


@pytest.fixture(scope="session")
def loaded(published) -> ServingState:
    root, version = published
    return load_state(root / "versions" / str(version), version)


@pytest.fixture(scope="session")
def retrieval_loaded(published):
    root, version = published
    return load_retrieval_state(root / "versions" / str(version), version, "cpu")


@pytest.fixture
def private_redis():
    """A private redis-server on a free port (stopped afterwards)."""
    with private_redis_server() as server:
        yield server
