"""Fixtures of the retrieval tests: one published tiny version per session, its loaded state, a private Redis.

``serve(...)`` (in ``harness``) starts a real server on 127.0.0.1:0 and yields a client stub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_service.state import ServingState, load_state
from tests.factories import publish_tiny_version, tiny_run
from tests.redis_server import private_redis_server


@pytest.fixture(scope="session")
def tiny():
    """The TrainedRun behind the session's published version (its tables and eager models)."""
    return tiny_run(0)


@pytest.fixture(scope="session")
def published(tmp_path_factory, tiny) -> tuple[Path, int]:
    """(artifact root, version) holding one published tiny version."""
    root = tmp_path_factory.mktemp("artifacts")
    return root, publish_tiny_version(root, 0, run=tiny)


@pytest.fixture(scope="session")
def loaded(published) -> ServingState:
    root, version = published
    return load_state(root / "versions" / str(version), version, "cpu")


@pytest.fixture
def private_redis():
    """A private redis-server on a free port; yields (url, pid). Stopped and removed afterwards."""
    with private_redis_server() as server:
        yield server.url, server.pid
