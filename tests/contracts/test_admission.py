"""Deadline-aware admission on a real event loop: refusals, the queue, expiry, cancellation, metrics."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from recsys_serving.admission import (MAX_BACKGROUND_QUEUED, PUSHBACK_KEY, QUEUE_WAIT_SLACK, Admission,
                                      AdmissionMetrics, Expired, Refused)
from recsys_serving.looplag import LoopLag


@pytest.fixture
def registry():
    return CollectorRegistry()


def admission(registry, concurrency: int = 1, in_flight: int = 10) -> Admission:
    metrics = AdmissionMetrics(
        in_flight=Gauge("t_in_flight", "", registry=registry), queued=Gauge("t_queued", "", registry=registry),
        refused=Counter("t_refused", "", ["reason"], registry=registry),
        expired=Counter("t_expired", "", registry=registry),
        service_seconds=Gauge("t_service_seconds", "", registry=registry),
        queue_wait=Histogram("t_queue_wait_seconds", "", registry=registry),
        background=Counter("t_background", "", ["result"], registry=registry))
    return Admission(concurrency, in_flight, metrics)


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def hold(gate: Admission, release: asyncio.Event, deadline_s: float = 30.0) -> None:
    async with gate.slot(time.monotonic() + deadline_s):
        await release.wait()


async def occupied(gate: Admission) -> tuple[asyncio.Event, asyncio.Task]:
    """A request holding the only slot until the returned event is set."""
    release = asyncio.Event()
    task = asyncio.ensure_future(hold(gate, release))
    while gate.running < 1:
        await asyncio.sleep(0.001)
    return release, task


def test_a_request_that_cannot_finish_in_time_given_the_queue_is_refused_at_once(registry):
    async def main():
        gate = admission(registry)
        async with gate.slot(time.monotonic() + 5):
            await asyncio.sleep(0.1)              # one completion: the service time is now >= 100 ms
        assert gate.service_s >= 0.1
        release, holder = await occupied(gate)
        # Expected: a wait of one service time for the slot + one to serve = >= 200 ms > 50 ms left.
        with pytest.raises(Refused) as refused:
            async with gate.slot(time.monotonic() + 0.05):
                raise AssertionError("a refused request must not run")
        assert gate.queued == 0                   # refused without queueing
        late = asyncio.ensure_future(hold(gate, asyncio.Event(), deadline_s=5.0))  # enough time: it queues
        await asyncio.sleep(0.01)
        queued = gate.queued
        release.set()
        await holder
        late.cancel()
        return refused.value, queued

    refused, queued = asyncio.run(main())
    assert refused.reason == "deadline" and "cannot finish within the deadline: 50 ms left" in str(refused)
    assert refused.trailing_metadata == ((PUSHBACK_KEY, "-1"),)     # a retry could not fit either
    assert value(registry, "t_refused_total", reason="deadline") == 1
    assert queued == 1


def test_queued_work_whose_deadline_passes_is_dropped_before_it_starts(registry):
    async def main():
        gate = admission(registry)
        release, holder = await occupied(gate)    # no completion yet: the estimate is 0, so it is admitted
        started = []

        async def short():
            async with gate.slot(time.monotonic() + 0.05):
                started.append(True)

        with pytest.raises(Expired):
            await short()
        after_expiry = (gate.queued, gate.running)
        release.set()
        await holder
        return started, after_expiry, (gate.queued, gate.running)

    started, after_expiry, idle = asyncio.run(main())
    assert started == [] and after_expiry == (0, 1) and idle == (0, 0)
    assert value(registry, "t_expired_total") == 1


def test_too_many_in_flight_is_refused_with_a_pushback(registry):
    async def main():
        gate = admission(registry, concurrency=1, in_flight=2)
        release, holder = await occupied(gate)
        queued = asyncio.ensure_future(hold(gate, release))
        await asyncio.sleep(0.01)
        with pytest.raises(Refused) as refused:
            async with gate.slot(time.monotonic() + 30):
                pass
        release.set()
        await asyncio.gather(holder, queued)
        return refused.value

    refused = asyncio.run(main())
    assert refused.reason == "full" and "too many requests in flight (max 2)" in str(refused)
    assert refused.pushback_ms >= 1                                   # fits after the wait: retry then
    assert value(registry, "t_refused_total", reason="full") == 1


def test_slots_go_first_in_first_out_and_a_cancelled_waiter_leaks_nothing(registry):
    async def main():
        gate = admission(registry, concurrency=1)
        release, holder = await occupied(gate)
        order = []

        async def request(name: str):
            async with gate.slot(time.monotonic() + 30):
                order.append(name)

        first, cancelled, last = (asyncio.ensure_future(request(n)) for n in ("first", "cancelled", "last"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        release.set()
        await asyncio.gather(holder, first, last)
        return order, gate.running, gate.queued, value(registry, "t_in_flight")

    assert asyncio.run(main()) == (["first", "last"], 0, 0, 0)


@pytest.mark.parametrize(("concurrency", "in_flight", "message"), [
    (0, 10, "max_concurrency must be an integer >= 1, got 0"),
    (4, 2, r"max_in_flight must be an integer >= max_concurrency \(4\), got 2"),
])
def test_bad_limits_name_the_value(concurrency, in_flight, message):
    with pytest.raises(ValueError, match=message):
        Admission(concurrency, in_flight)


def test_an_idle_service_admits_whatever_the_estimate_so_a_slow_spell_cannot_refuse_forever(registry):
    async def main():
        gate = admission(registry, concurrency=2)
        async with gate.slot(time.monotonic() + 5):
            await asyncio.sleep(0.1)              # the estimate is now >= 100 ms
        async with gate.slot(time.monotonic() + 0.05):   # 50 ms left, but nothing is running
            pass
        return value(registry, "t_refused_total", reason="deadline")

    assert asyncio.run(main()) == 0


def test_with_a_slot_free_but_work_running_a_request_shorter_than_the_service_time_is_refused(registry):
    async def main():
        gate = admission(registry, concurrency=2)
        async with gate.slot(time.monotonic() + 5):
            await asyncio.sleep(0.1)              # the estimate is now >= 100 ms
        release, holder = await occupied(gate)    # one of the two slots busy, one free
        with pytest.raises(Refused) as refused:
            async with gate.slot(time.monotonic() + 0.05):
                raise AssertionError("a refused request must not run")
        release.set()
        await holder
        return refused.value

    refused = asyncio.run(main())
    assert refused.reason == "deadline" and "expected 0 ms queued" in str(refused)


def test_the_queue_wait_counts_twice_so_a_request_whose_mean_finish_just_fits_is_refused(registry):
    # One slot, busy; a service time of 100 ms: a newcomer waits 100 ms on average, then serves
    # 100 ms. With 250 ms left its mean finish (200 ms) fits, but not with the wait counted twice
    # (300 ms): refused. With 350 ms left it queues.
    async def main():
        gate = admission(registry)
        release, holder = await occupied(gate)
        gate.service_s = 0.1
        with pytest.raises(Refused) as refused:
            async with gate.slot(time.monotonic() + 0.25):
                raise AssertionError("a refused request must not run")
        late = asyncio.ensure_future(hold(gate, asyncio.Event(), deadline_s=0.35))
        await asyncio.sleep(0.01)
        queued = gate.queued
        late.cancel()
        release.set()
        await asyncio.gather(holder, late, return_exceptions=True)
        return refused.value, queued

    refused, queued = asyncio.run(main())
    assert QUEUE_WAIT_SLACK == 2.0
    assert refused.reason == "deadline" and "expected 100 ms queued (x2) + 100 ms serving" in str(refused)
    assert queued == 1


async def background_job(gate: Admission, log: list, name: str, deadline_s: float = 30.0,
                         release: asyncio.Event | None = None) -> None:
    async with gate.background(time.monotonic() + deadline_s):
        log.append(f"{name} started")
        if release is not None:
            await release.wait()
    log.append(f"{name} done")


def test_background_work_waits_for_a_quiet_moment_one_at_a_time(registry):
    async def main():
        gate = admission(registry, concurrency=2)
        log: list[str] = []
        release, live = await occupied(gate)
        held = asyncio.Event()
        first = asyncio.ensure_future(background_job(gate, log, "bg1", release=held))
        second = asyncio.ensure_future(background_job(gate, log, "bg2"))
        await asyncio.sleep(0.02)
        while_live = list(log)                    # nothing started while a live request runs
        release.set()
        await live
        await asyncio.sleep(0.01)
        after_live = list(log)                    # bg1 runs, bg2 waits for it
        # A live request arriving while bg1 runs is admitted at once, beside it.
        async with gate.slot(time.monotonic() + 1):
            log.append("live ran")
        held.set()
        await asyncio.gather(first, second)
        return while_live, after_live, log, gate.running, gate.background_running

    while_live, after_live, log, running, background_running = asyncio.run(main())
    assert while_live == []
    assert after_live == ["bg1 started"]
    assert log == ["bg1 started", "live ran", "bg1 done", "bg2 started", "bg2 done"]
    assert (running, background_running) == (0, False)
    assert value(registry, "t_background_total", result="ran") == 2


def test_background_work_takes_no_live_slot_and_no_part_in_the_estimate(registry):
    async def main():
        gate = admission(registry, concurrency=1)
        started = asyncio.Event()
        job = asyncio.ensure_future(background_job(gate, [], "bg", release=started))
        await asyncio.sleep(0.05)                 # the background call runs for >= 50 ms
        async with gate.slot(time.monotonic() + 1):   # the only live slot is free: admitted at once
            slot_taken = gate.running
        started.set()
        await job
        return slot_taken, gate.service_s

    slot_taken, service_s = asyncio.run(main())
    assert slot_taken == 1
    assert service_s < 0.05                       # only the live request's time, not the background's


def test_background_work_whose_deadline_passes_waiting_never_starts(registry):
    async def main():
        gate = admission(registry)
        log: list[str] = []
        release, live = await occupied(gate)
        with pytest.raises(Expired, match="quiet moment"):
            await background_job(gate, log, "bg", deadline_s=0.05)
        release.set()
        await live
        return log, gate.background_running

    assert asyncio.run(main()) == ([], False)
    assert value(registry, "t_background_total", result="expired") == 1


def test_too_many_background_calls_waiting_are_refused_at_once(registry):
    async def main():
        gate = admission(registry)
        release, live = await occupied(gate)
        waiting = [asyncio.ensure_future(background_job(gate, [], f"bg{i}")) for i in range(MAX_BACKGROUND_QUEUED)]
        await asyncio.sleep(0.01)
        with pytest.raises(Refused) as refused:
            await background_job(gate, [], "one too many")
        release.set()
        await asyncio.gather(live, *waiting)
        return refused.value

    refused = asyncio.run(main())
    assert refused.reason == "background" and refused.pushback_ms == -1
    assert value(registry, "t_background_total", result="refused") == 1
    assert value(registry, "t_background_total", result="ran") == MAX_BACKGROUND_QUEUED


def test_a_cancelled_background_waiter_passes_its_turn_on(registry):
    async def main():
        gate = admission(registry)
        log: list[str] = []
        release, live = await occupied(gate)
        cancelled = asyncio.ensure_future(background_job(gate, log, "cancelled"))
        kept = asyncio.ensure_future(background_job(gate, log, "kept"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        release.set()
        await asyncio.gather(live, kept)
        return log, gate.background_running

    assert asyncio.run(main()) == (["kept started", "kept done"], False)


def test_a_background_call_pauses_between_steps_while_live_work_runs(registry):
    async def main():
        gate = admission(registry, concurrency=2)
        log: list[str] = []
        step_two = asyncio.Event()

        async def background():
            async with gate.background(time.monotonic() + 30):
                log.append("step 1")
                await step_two.wait()
                await gate.pause_for_live(time.monotonic() + 30)    # a live request arrived meanwhile
                log.append("step 2")

        job = asyncio.ensure_future(background())
        await asyncio.sleep(0.01)
        release, live = await occupied(gate)
        step_two.set()
        await asyncio.sleep(0.02)
        while_live = list(log)
        release.set()
        await asyncio.gather(live, job)
        return while_live, log

    while_live, log = asyncio.run(main())
    assert while_live == ["step 1"]
    assert log == ["step 1", "step 2"]


def test_a_background_call_paused_past_its_deadline_expires(registry):
    async def main():
        gate = admission(registry)
        async with gate.background(time.monotonic() + 30):
            release, live = await occupied(gate)
            try:
                with pytest.raises(Expired, match="paused for live work"):
                    await gate.pause_for_live(time.monotonic() + 0.05)
            finally:
                release.set()
                await live
            await gate.pause_for_live(time.monotonic() + 0.05)          # no live work: returns at once
        return gate.background_running, gate._paused

    assert asyncio.run(main()) == (False, [])
    assert value(registry, "t_background_total", result="expired") == 1


# --- the event loop's lag (recsys_serving.looplag) -------------------------------------------------------


def test_standing_lag_is_the_smallest_of_the_window_and_a_silent_probe_counts_as_late():
    lag = LoopLag(interval_s=0.005, window_s=0.1)
    assert lag.standing_s(now=0.0) == 0.0                           # no sample yet: no evidence of lag
    for when, late in ((1.00, 0.030), (1.04, 0.012), (1.08, 0.050)):
        lag.record(when, late)
    assert lag.standing_s(now=1.09) == pytest.approx(0.012)        # one spike does not make a standing lag
    assert lag.standing_s(now=1.15) == pytest.approx(0.050)        # 1.00 and 1.04 left the window
    # Nothing woke for 0.3 s: the pending probe is 0.3 - 0.005 s late, whatever the last sample said.
    assert lag.standing_s(now=1.38) == pytest.approx(0.295)
    with pytest.raises(ValueError, match="interval_s"):
        LoopLag(interval_s=0.2, window_s=0.1)


def test_the_probe_measures_a_loop_that_is_blocked():
    async def main():
        lag = LoopLag(interval_s=0.005, window_s=0.1)
        lag.start()
        await asyncio.sleep(0.05)
        quiet = lag.standing_s()
        for _ in range(8):                    # blocking callbacks: 30 ms each, back to back
            time.sleep(0.03)
            await asyncio.sleep(0)
        busy = lag.standing_s()
        await lag.close()
        return quiet, busy

    quiet, busy = asyncio.run(main())
    assert quiet < 0.02 and busy >= 0.02


def test_a_loop_standing_behind_refuses_new_work_while_something_runs_and_counts_in_the_deadline(registry):
    async def main():
        lag = LoopLag(interval_s=0.005, window_s=0.1)
        gate = admission(registry, concurrency=4)
        gate.lag, gate.max_lag_s = lag, 0.010
        now = asyncio.get_running_loop().time()
        lag.record(now, 0.025)                                        # 25 ms behind > the 10 ms limit
        async with gate.slot(time.monotonic() + 1):                   # idle: admitted whatever the lag
            with pytest.raises(Refused) as refused:                   # busy and behind: refused
                async with gate.slot(time.monotonic() + 1):
                    raise AssertionError("must not run")
            assert refused.value.reason == "lag" and "25 ms late" in str(refused.value)
            assert refused.value.pushback_ms == -1
            gate.max_lag_s = 0.030                                     # within the limit: the lag still
            with pytest.raises(Refused) as refused:                   # counts in the expected finish
                async with gate.slot(time.monotonic() + 0.02):
                    raise AssertionError("must not run")
            assert refused.value.reason == "deadline" and "25 ms loop lag" in str(refused.value)
            async with gate.slot(time.monotonic() + 1):               # 1 s left: fits
                pass

    asyncio.run(main())
    assert value(registry, "t_refused_total", reason="lag") == 1
    assert value(registry, "t_refused_total", reason="deadline") == 1


def test_a_lag_limit_of_zero_is_off_and_a_bad_one_is_named(registry):
    gate = Admission(2, 4, lag=LoopLag(), max_lag_s=0.0)
    gate.lag.record(0.0, 5.0)
    gate.running = 1
    gate.check(10.0)                                                  # off: a 5 s lag refuses nothing
    with pytest.raises(ValueError, match="max_lag_s"):
        Admission(2, 4, max_lag_s=-1)


def test_the_lag_probe_wakes_often_only_when_admission_reads_it(registry):
    """``for_service``: a 5 ms probe when a lag limit is set, a 50 ms one that only feeds the gauge when off."""
    from types import SimpleNamespace

    from recsys_serving.looplag import GAUGE_INTERVAL_S, PROBE_INTERVAL_S

    metrics = admission(registry).metrics
    on = Admission.for_service(SimpleNamespace(max_concurrency=2, max_in_flight=8, max_loop_lag_ms=10,
                                               max_queue_ms=0), metrics)
    off = Admission.for_service(SimpleNamespace(max_concurrency=2, max_in_flight=8, max_loop_lag_ms=0,
                                                max_queue_ms=25), metrics)
    assert (on.max_queue_s, off.max_queue_s) == (0.0, 0.025)
    assert (on.lag.interval_s, on.max_lag_s) == (PROBE_INTERVAL_S, 0.010)
    assert (off.lag.interval_s, off.max_lag_s) == (GAUGE_INTERVAL_S, 0.0)
    assert PROBE_INTERVAL_S < GAUGE_INTERVAL_S <= off.lag.window_s


def test_a_request_expected_to_queue_longer_than_the_limit_is_refused_with_a_pushback(registry):
    """Service time 100 ms, one slot taken: the next request expects 100 ms in the queue. With a 250 ms
    limit it is admitted; with a 50 ms limit it is refused at once (its deadline of 30 s would have
    let it wait), with the expected wait as pushback; a limit of 0 is off."""
    async def main():
        gate = admission(registry)
        async with gate.slot(time.monotonic() + 5):
            await asyncio.sleep(0.1)              # one completion: the service time is now >= 100 ms
        release, holder = await occupied(gate)
        service_s = gate.service_s                # the expected wait: one service time (one slot, none queued)
        outcomes = {}
        for limit_s in (0.0, 0.25, 0.05):
            gate.max_queue_s = limit_s
            try:
                gate.check(30.0)
                outcomes[limit_s] = "admitted"
            except Refused as refused:
                outcomes[limit_s] = refused
        release.set()
        await holder
        return service_s, outcomes

    service_s, outcomes = asyncio.run(main())
    assert outcomes[0.0] == "admitted" and outcomes[0.25] == "admitted"
    refused = outcomes[0.05]
    assert refused.reason == "queue" and "the queue is too long" in str(refused) and "limit 50 ms" in str(refused)
    assert refused.pushback_ms == pytest.approx(1000 * service_s, abs=1)   # a retry after the wait fits
    assert value(registry, "t_refused_total", reason="queue") == 1


def test_a_bad_queue_limit_is_named():
    for bad in (-1, float("inf"), "5"):
        with pytest.raises(ValueError, match="max_queue_s must be a number of seconds >= 0"):
            Admission(2, 4, max_queue_s=bad)
