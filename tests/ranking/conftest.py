"""Fixtures of the ranking tests: one published tiny version per session, its loaded states, a private Redis.

Loading a version costs seconds (the exported programs), so the session loads it once for each
service and tests hand the loaded state to their servers through ``harness.cached_holder``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch

from ranking_service.state import ServingState, load_state
from retrieval_service.state import load_state as load_retrieval_state
from tests.factories import publish_tiny_version, tiny_run
from tests.ranking.harness import free_port


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
    return load_retrieval_state(root / "versions" / str(version), version, torch.device("cpu"))


class PrivateRedis:
    """A redis-server of our own on a fixed free port, so tests can kill, restart, freeze and flush it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not installed")
        self.binary, self.port = binary, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_redis(self.url)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
        self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


@pytest.fixture
def private_redis():
    """A private redis-server on a free port (stopped afterwards)."""
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.kill()


def wait_for_redis(url: str, timeout_s: float = 5.0) -> None:
    probe = redis.Redis.from_url(url, socket_timeout=1)
    end = time.monotonic() + timeout_s
    try:
        while True:
            try:
                probe.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    finally:
        probe.close()
