"""The stack's failure reports (each names what did not come up) and its CPU accounting by thread."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from loadtest.stack import RedisServer, Service, Stack, thread_cpu_delta, thread_cpu_seconds, wait_serving
from recsys_serving.batching import name_native_thread

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


def test_thread_cpu_seconds_groups_threads_by_their_os_name():
    """The process's first thread is ``main``, a thread named at the OS level keeps its name, an unnamed
    one (named as the process) is ``other``; a delta counts a thread born in between from zero."""
    me = os.getpid()
    before = thread_cpu_seconds(me)
    assert before[me][0] == "main"
    done, started = threading.Event(), threading.Event()
    named: list[int] = []

    def spin(name: str | None) -> None:
        if name:
            name_native_thread(name)
        named.append(threading.get_native_id())
        started.set()
        end = time.thread_time() + 0.05
        while time.thread_time() < end:      # 50 ms of this thread's own CPU
            pass
        done.wait(30)
    threads = [threading.Thread(target=spin, args=(name,)) for name in ("busy-named", None)]
    for thread in threads:
        thread.start()
    try:
        while len(named) < 2:
            time.sleep(0.01)
        time.sleep(0.2)
        after = thread_cpu_seconds(me)
        groups = {after[tid][0] for tid in named}
        assert groups == {"busy-named", "other"}
        delta = thread_cpu_delta(after, before)
        assert delta["busy-named"] >= 0.04                 # born after `before`: counted from zero
        assert delta["main"] >= 0
    finally:
        done.set()
        for thread in threads:
            thread.join(30)


def test_thread_cpu_delta_sums_by_group_and_leaves_out_ended_threads():
    before = {1: ("main", 1.0), 2: ("event_engine", 0.5), 3: ("event_engine", 0.25), 4: ("dcn", 2.0)}
    after = {1: ("main", 1.5), 2: ("event_engine", 0.75), 5: ("event_engine", 0.125), 4: ("dcn", 2.5)}
    assert thread_cpu_delta(after, before) == {"main": 0.5, "event_engine": 0.375, "dcn": 0.5}
    assert thread_cpu_seconds(2 ** 22 + 12345) == {}        # no such process
