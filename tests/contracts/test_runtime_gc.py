"""The serving runtime's garbage-collector setting: import-time objects frozen, pauses observed."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from prometheus_client import REGISTRY

from recsys_serving import runtime
from tests.gc_cycles import new_cycle_is_freed


def _pauses(generation: int) -> float:
    return REGISTRY.get_sample_value("recsys_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_tame_garbage_collector_freezes_what_is_alive_and_observes_pauses():
    try:
        runtime.tame_garbage_collector()
        runtime.tame_garbage_collector()                       # idempotent: one callback
        assert gc.get_freeze_count() > 1000                    # pytest, numpy, grpc... are frozen
        assert gc.callbacks.count(runtime._observe_gc) == 1
        before = _pauses(2)
        gc.collect()
        assert _pauses(2) == before + 1
        assert new_cycle_is_freed()                            # objects created afterwards stay collectable
    finally:
        gc.callbacks.remove(runtime._observe_gc)
        gc.unfreeze()


_PROBE = """
import gc, sys
import ranking_service.server
from recsys_contracts.programs import load_program, warm_up_loader
from recsys_serving import runtime
runtime.tame_garbage_collector(warm_up=warm_up_loader if sys.argv[2] == "warm" else None)
load_program(sys.argv[1])
gc.collect()
print(len(gc.get_objects()))
"""


def test_warm_up_loader_lets_freeze_take_the_loaders_lazy_imports(tmp_path):
    """In a fresh service process, the objects left for the collector after loading a program: the
    warm-up leaves a small fraction of what a cold start leaves (the loader's lazy imports)."""
    from tests.factories import publish_tiny_version

    version = publish_tiny_version(tmp_path)
    program = str(tmp_path / "versions" / str(version) / "ranker.pt2")
    left = {}
    for mode in ("warm", "cold"):
        out = subprocess.run([sys.executable, "-c", _PROBE, program, mode], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[2], timeout=120, check=True)
        left[mode] = int(out.stdout.split()[-1])
    assert left["warm"] * 3 < left["cold"], left
