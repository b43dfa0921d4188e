"""The micro-batcher's compute thread runs at a lower CPU priority than the event loop when asked
(``thread_nice``, the services' ``*_COMPUTE_NICE``), and never at a higher one than it already had; it
carries the batcher's name as its OS-level thread name."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from recsys_serving.batching import MicroBatcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _own_nice(jobs: list[object]) -> list[int]:
    return [os.getpriority(os.PRIO_PROCESS, 0)] * len(jobs)     # who = 0: the calling thread


async def _nice_seen_by_a_job(thread_nice: int) -> int:
    batcher = MicroBatcher(_own_nice, max_jobs=4, max_wait_s=0, name="nice-test", thread_nice=thread_nice)
    try:
        return await batcher.submit("job")
    finally:
        await batcher.close()


def _in_a_thread_at(nice: int, thread_nice: int) -> tuple[int, int]:
    """(the compute thread's nice, the loop thread's nice after) for a batcher whose loop runs in a new
    thread at ``nice``; the test's own thread keeps its priority."""
    seen: list[int] = []

    def body() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        seen.append(asyncio.run(_nice_seen_by_a_job(thread_nice)))
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))
    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    return seen[0], seen[1]


def test_the_compute_thread_runs_at_the_nice_value_asked_and_the_loop_keeps_its_own():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base > 5:
        pytest.skip(f"this process already runs at nice {base}")
    assert _in_a_thread_at(base, 7) == (7, base)
    assert _in_a_thread_at(base, 0) == (base, base)            # 0: the priority the loop has


def test_a_thread_already_at_a_lower_priority_is_left_there():
    """The shadow worker runs at idle priority: its batcher must not raise it (nor could it, unprivileged)."""
    assert _in_a_thread_at(15, 7) == (15, 15)


@pytest.mark.parametrize("value", [-1, 20, True, 2.5])
def test_a_bad_nice_value_is_refused_by_name(value):
    with pytest.raises(ValueError, match=r"thread_nice must be an int in \[0, 19\], got"):
        MicroBatcher(_own_nice, max_jobs=1, max_wait_s=0, name="bad", thread_nice=value)


def _own_os_name(jobs: list[object]) -> list[str]:
    tid = threading.get_native_id()
    with open(f"/proc/self/task/{tid}/comm") as comm:
        return [comm.read().strip()] * len(jobs)


@pytest.mark.parametrize("name, expected", [("dcn", "dcn"), ("a-very-long-batcher-name", "a-very-long-bat")])
def test_the_compute_thread_carries_the_batchers_name_in_the_os(name, expected):
    """/proc shows the batcher's name (cut to the kernel's 15 bytes), so CPU by thread can tell it apart."""
    async def seen() -> str:
        batcher = MicroBatcher(_own_os_name, max_jobs=1, max_wait_s=0, name=name)
        try:
            return await batcher.submit("job")
        finally:
            await batcher.close()
    assert asyncio.run(seen()) == expected
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
        assert comm.read().strip() != expected           # the caller's own thread keeps its name
