"""The load generator's collector window: heap frozen while it lasts, pauses counted, handed back after."""

from __future__ import annotations

import gc
import weakref

from loadtest.collector import measured_window
from tests.gc_cycles import _Node, new_cycle_is_freed


def test_window_freezes_the_heap_counts_pauses_and_hands_it_back():
    assert gc.get_freeze_count() == 0, "another test left the heap frozen"
    before = gc.callbacks[:]
    # A cycle alive when the window opens, dropped inside it: garbage in the frozen heap. (The count of
    # frozen objects is no witness: other threads may free frozen objects by their reference counts.)
    holder = [_Node()]
    holder[0].self = holder[0]
    frozen_cycle = weakref.ref(holder[0])
    with measured_window() as pauses:
        assert gc.get_freeze_count() > 0
        holder.clear()
        gc.collect(2)
        gc.collect(0)
        assert frozen_cycle() is not None               # the window's passes never touched the frozen heap
        assert new_cycle_is_freed()                     # objects made inside the window stay collectable
    assert pauses.collections == 3 and pauses.full_collections == 2
    assert 0.0 < pauses.longest_ms <= pauses.total_ms
    assert gc.get_freeze_count() == 0 and gc.callbacks == before
    gc.collect()
    assert frozen_cycle() is None                        # handed back: collectable again
    assert pauses.collections == 3                       # no longer counting
    assert set(pauses.as_dict()) == {"collections", "full_collections", "longest_ms", "total_ms"}


def test_a_heap_frozen_on_entry_stays_frozen():
    gc.freeze()
    try:
        owner = gc.get_freeze_count()
        with measured_window():
            gc.collect()
        assert gc.get_freeze_count() >= owner
    finally:
        gc.unfreeze()
