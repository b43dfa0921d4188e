"""Fixtures of the load-test tests: one small real version over MovieLens 100K per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.signing_keys import SIGNER
from loadtest.publish import publish_tiny


@pytest.fixture(scope="session")
def published(tmp_path_factory, ml100k_dir) -> tuple[Path, int]:
    """(artifact root, version): the tests' tiny real models fitted to MovieLens 100K's features."""
    root = tmp_path_factory.mktemp("loadtest-artifacts")
    (version,) = publish_tiny(root, ml100k_dir, count=1, interval_s=0.0, seed=0, signer=SIGNER)
    return root, version
