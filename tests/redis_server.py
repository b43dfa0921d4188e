"""A redis-server of the test's own, on a free loopback port: for tests that kill, freeze or flush Redis
(never the shared instance). Skips the test when the binary is not installed."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.processes import ChildProcess, free_port


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


class PrivateRedis(ChildProcess):
    """redis-server on a fixed free port (no persistence); restartable, freezable (SIGSTOP), killable."""

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

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


@contextlib.contextmanager
def private_redis_server() -> Iterator[PrivateRedis]:
    """A started ``PrivateRedis``, killed afterwards whatever the test did to it."""
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.kill()
