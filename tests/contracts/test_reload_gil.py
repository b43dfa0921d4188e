"""While a version loads in its worker thread, the GIL switch interval is short; afterwards it is restored."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from recsys_contracts import artifacts
from tests.signing_keys import SIGNER, TRUST
from recsys_serving import reload
from recsys_serving.reload import LOADING_SWITCH_INTERVAL_S, VersionHolder, gil_shared_with_the_loop


def _publish(root, text: str) -> int:
    def write(staging):
        (staging / "payload.txt").write_text(text)
    return artifacts.publish(root, write, signer=SIGNER, data={"note": text}, config={}, metrics={})


def test_the_loader_thread_runs_with_a_short_switch_interval_and_the_setting_comes_back(tmp_path):
    before = sys.getswitchinterval()
    seen: list[tuple[float, bool]] = []

    def load(directory, version):
        seen.append((sys.getswitchinterval(), threading.current_thread() is threading.main_thread()))
        if (directory / "payload.txt").read_text() == "broken":
            raise ValueError("a refused version restores the setting too")
        return version

    async def body():
        holder = VersionHolder(tmp_path, load, trust=TRUST)
        assert await holder.refresh()
        _publish(tmp_path, "broken")
        assert not await holder.refresh()
        return holder

    _publish(tmp_path, "first")
    holder = asyncio.run(body())
    assert holder.current == 1 and holder.stats.refused == 1
    assert [in_main for _, in_main in seen] == [False, False]          # loads run in a worker thread
    assert [interval for interval, _ in seen] == pytest.approx([LOADING_SWITCH_INTERVAL_S] * 2)
    assert sys.getswitchinterval() == before


def test_overlapping_uses_restore_the_setting_only_when_the_last_one_ends():
    before = sys.getswitchinterval()
    outer = gil_shared_with_the_loop()
    inner = gil_shared_with_the_loop()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)            # the first one ends while the other still loads
    assert sys.getswitchinterval() == pytest.approx(LOADING_SWITCH_INTERVAL_S)
    inner.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
    assert reload._loading["count"] == 0


def test_an_error_inside_restores_the_setting():
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with gil_shared_with_the_loop():
            raise RuntimeError("load failed")
    assert sys.getswitchinterval() == before


def test_the_services_switch_interval_setting_holds_outside_loads_and_comes_back_after_one():
    from recsys_serving import runtime

    before = sys.getswitchinterval()
    try:
        runtime.set_gil_switch_interval(0.5)                     # <PREFIX>GIL_SWITCH_MS=0.5
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        with gil_shared_with_the_loop():
            assert sys.getswitchinterval() == pytest.approx(LOADING_SWITCH_INTERVAL_S)
        assert sys.getswitchinterval() == pytest.approx(0.0005)   # the service's value, not Python's default
    finally:
        sys.setswitchinterval(before)
