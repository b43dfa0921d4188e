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
import ranking_service.server, retrieval_service.server
from recsys_contracts.programs import load_ranker
from recsys_serving import runtime
runtime.tame_garbage_collector()
frozen = gc.get_freeze_count()
program = load_ranker(sys.argv[1])
gc.collect()
print(frozen, len(gc.get_objects()), "torch" in sys.modules)
"""


def test_services_load_programs_without_torch_and_leave_the_collector_little(tmp_path):
    """In a fresh process importing both services, loading a program imports no torch (onnxruntime
    serves it) and leaves a small fraction of the frozen import-time objects for the collector."""
    from tests.factories import publish_tiny_version

    version = publish_tiny_version(tmp_path)
    program = str(tmp_path / "versions" / str(version) / "ranker.onnx")
    out = subprocess.run([sys.executable, "-c", _PROBE, program], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120, check=True)
    frozen, left, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    assert int(left) * 5 < int(frozen), (frozen, left)
