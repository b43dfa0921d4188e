"""Shared fixtures: where the data lives and a unique Redis namespace per test; the test signing keys.

Every version a test publishes is signed with the suite's key (``tests/signing_keys.py``), and
every service it starts trusts it: the variables below reach service and trainer subprocesses."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.signing_keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["RECSYS_SIGNING_KEY"] = str(PRIVATE_KEY_FILE)
os.environ["RECSYS_TRUSTED_KEYS"] = str(PUBLIC_KEY_FILE)


def data_dir() -> Path:
    """The data directory: $RECSYS_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("RECSYS_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    path = data_dir() / "ml-100k"
    if not (path / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {path} (set RECSYS_DATA_DIR)")
    return path


@pytest.fixture
def redis_url() -> str:
    return os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_namespace(redis_url):
    """A namespace unique to the test; every key under it is deleted afterwards."""
    import redis

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield namespace
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
