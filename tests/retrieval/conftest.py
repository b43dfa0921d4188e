"""Fixtures of the retrieval tests: one published tiny version per session, its loaded state, a private Redis.

``serve(...)`` (in ``harness``) starts a real server on 127.0.0.1:0 and yields a client stub.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch

from retrieval_service.state import ServingState, load_state
from tests.factories import publish_tiny_version, tiny_run


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
    return load_state(root / "versions" / str(version), version, torch.device("cpu"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_redis():
    """A private redis-server on a free port; yields (url, pid). Stopped and removed afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = redis.Redis.from_url(url, socket_timeout=1)
        for _ in range(100):  # up to ~5 s for the server to listen
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        probe.close()
        yield url, proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)
