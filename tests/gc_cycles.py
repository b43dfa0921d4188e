"""What both garbage-collector tests check after a freeze: objects made afterwards stay collectable."""

from __future__ import annotations

import gc
import weakref


class _Node:
    self: object = None


def new_cycle_is_freed() -> bool:
    """Makes a reference cycle, drops it and runs a full collection: True when the cycle was freed."""
    node = _Node()
    node.self = node
    alive = weakref.ref(node)
    del node
    gc.collect()
    return alive() is None
