"""The stack's failure reports: each names what did not come up."""

from __future__ import annotations

import asyncio
import socket

import pytest

from loadtest.stack import RedisServer, Service, Stack, wait_serving

pytestmark = pytest.mark.slow


def test_wait_serving_times_out_when_nothing_serves():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))   # a port nobody listens on while the socket stays bound
        port = sock.getsockname()[1]
        with pytest.raises(TimeoutError, match="not SERVING"):
            asyncio.run(wait_serving(f"127.0.0.1:{port}", 0.3))


def test_a_service_that_exits_is_reported_with_its_status(tmp_path):
    service = Service("loadtest_no_such_module", 1, {}, tmp_path)
    with pytest.raises(RuntimeError, match=r"loadtest_no_such_module exited with 1:.*No module named"):
        asyncio.run(service.start_and_wait())


def test_redis_that_cannot_bind_is_reported(tmp_path):
    redis_server = RedisServer(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", redis_server.port))   # bound without SO_REUSEADDR: redis-server cannot bind
        try:
            with pytest.raises(RuntimeError, match="did not answer"):
                asyncio.run(redis_server.start_and_wait(timeout_s=2.0))
        finally:
            redis_server.kill()


def test_missing_redis_server_binary_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server must be installed"):
        RedisServer(tmp_path)


def test_stack_reports_features_that_never_arrive(tmp_path, published):
    # Redis up and a version published, but no ranking service to fill Redis: the wait gives up.
    root, _ = published
    stack = Stack(tmp_path, None, source_root=root)

    async def run():
        await stack.redis.start_and_wait()
        await stack.publish(1)
        await stack.wait_features(timeout_s=0.3)

    try:
        with pytest.raises(RuntimeError, match="Redis did not hold version 1"):
            asyncio.run(run())
    finally:
        stack.close()


def test_stack_rejects_a_source_without_a_version(tmp_path):
    (tmp_path / "empty").mkdir()

    async def start():
        async with Stack(tmp_path / "work", None, source_root=tmp_path / "empty"):
            pass

    with pytest.raises(RuntimeError, match="publishing 1 versions failed"):
        asyncio.run(start())
