"""The load generator's collector window: heap frozen while it lasts, pauses counted, handed back after."""

from __future__ import annotations

import gc
import weakref

from loadtest.collector import measured_window


class _Node:
    self: object = None


def test_window_freezes_the_heap_counts_pauses_and_hands_it_back():
    assert gc.get_freeze_count() == 0, "another test left the heap frozen"
    before = gc.callbacks[:]
    survivor = _Node()                                   # alive on entry: frozen for the window
    with measured_window() as pauses:
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        gc.collect(2)
        gc.collect(0)
        # objects made inside the window stay collectable: a reference cycle is freed
        node = _Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None
        assert gc.get_freeze_count() == frozen          # the window's passes never touched the frozen heap
    assert pauses.collections == 3 and pauses.full_collections == 2
    assert 0.0 < pauses.longest_ms <= pauses.total_ms
    assert gc.get_freeze_count() == 0 and gc.callbacks == before
    gc.collect()
    assert pauses.collections == 3                       # no longer counting
    assert set(pauses.as_dict()) == {"collections", "full_collections", "longest_ms", "total_ms"}
    del survivor


def test_a_heap_frozen_on_entry_stays_frozen():
    gc.freeze()
    try:
        owner = gc.get_freeze_count()
        with measured_window():
            gc.collect()
        assert gc.get_freeze_count() >= owner
    finally:
        gc.unfreeze()
