"""The load generator's own garbage-collector pauses: kept out of what it measures, and reported.

An open-loop client charges each request from its intended send time, so a pause of the client's
event loop lands on every request in flight as if the server had been slow. The cyclic collector's
full (generation 2) pass walks every object the process holds; in a client that has imported torch
and loaded a version (the ranking benchmark's in-process side, the scenarios' publisher) that is
130-150 ms on the 2-core development machine, and the thousands of request objects of a load
trigger one every few tens of seconds: one such pause at 100 req/s put ~15 requests over 100 ms.

``measured_window`` does for the client what ``recsys_serving.runtime.tame_garbage_collector`` does
for the services: everything alive when the window opens is frozen (``gc.freeze``: never scanned
again while it lasts), so the passes during the load see only the load's own objects. The window's
pauses are counted, so a result shows whether the client's collector could have touched it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass


@dataclass
class CollectorPauses:
    """The client's collections during a measured window."""

    collections: int = 0
    full_collections: int = 0      # generation 2
    longest_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {name: round(value, 3) if isinstance(value, float) else value for name, value in asdict(self).items()}


@contextlib.contextmanager
def measured_window() -> Iterator[CollectorPauses]:
    """Freezes the heap alive now for the window and counts the collector's pauses within it.

    On leaving, the objects frozen here are handed back to the collector (unless the heap was frozen
    already on entry: that owner keeps it so).
    """
    pauses = CollectorPauses()
    started = [0.0]

    def observe(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - started[0]) * 1000.0
        pauses.collections += 1
        pauses.full_collections += info["generation"] == 2
        pauses.longest_ms = max(pauses.longest_ms, pause_ms)
        pauses.total_ms += pause_ms

    owns_freeze = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    gc.callbacks.append(observe)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(observe)
        if owns_freeze:
            gc.unfreeze()
