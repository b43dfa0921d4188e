"""The shared circuit breaker's state machine, driven by a hand-set clock (seconds), with its metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from recsys_serving.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts():
    registry = CollectorRegistry()
    gauge = Gauge("t_breaker_state", "state", registry=registry)
    transitions = Counter("t_breaker_transitions", "transitions", ["to"], registry=registry)
    clock = Clock()
    breaker = CircuitBreaker("test", 3, 2.0, state_gauge=gauge, transitions=transitions, clock=clock)

    def value(name: str, **labels) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    return breaker, clock, value


def test_opens_after_consecutive_failures_only(parts):
    breaker, _, value = parts
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()            # a success in between resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is State.CLOSED and breaker.allow()
    breaker.record_failure()            # the third in a row
    assert breaker.state is State.OPEN and not breaker.allow()
    assert value("t_breaker_state") == 1
    assert value("t_breaker_transitions_total", to="open") == 1


def test_half_open_lets_one_probe_through_and_closes_on_success(parts):
    breaker, clock, value = parts
    for _ in range(3):
        breaker.record_failure()
    clock.now += 1.9
    assert not breaker.allow()          # still cooling down (2 s)
    clock.now += 0.1
    assert breaker.allow()              # the probe
    assert breaker.state is State.HALF_OPEN and value("t_breaker_state") == 2
    assert not breaker.allow()          # others keep the fallback while the probe is out
    breaker.record_success()
    assert breaker.state is State.CLOSED and breaker.allow() and breaker.allow()
    assert value("t_breaker_state") == 0
    assert [value("t_breaker_transitions_total", to=s) for s in ("open", "half_open", "closed")] == [1, 1, 1]


def test_a_failed_probe_opens_again_for_a_fresh_cool_down(parts):
    breaker, clock, value = parts
    for _ in range(3):
        breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()            # one failure is enough while half-open
    assert breaker.state is State.OPEN and not breaker.allow()
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    assert value("t_breaker_transitions_total", to="open") == 2


def test_a_probe_that_never_reports_is_written_off_after_a_cool_down(parts):
    breaker, clock, _ = parts
    for _ in range(3):
        breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()              # its caller is cancelled and reports nothing
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow() and breaker.state is State.HALF_OPEN


def test_a_probe_that_never_left_is_released_and_the_next_caller_probes_at_once(parts):
    breaker, clock, _ = parts
    breaker.release_probe()             # closed: nothing to release
    assert breaker.state is State.CLOSED and breaker.allow()
    for _ in range(3):
        breaker.record_failure()
    breaker.release_probe()             # open: nothing to release either
    assert not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()              # the probe, stopped before it left (a client-side throttle)
    assert not breaker.allow()
    breaker.release_probe()
    assert breaker.allow() and breaker.state is State.HALF_OPEN     # no cool-down to wait out
    assert not breaker.allow()          # that one is the probe now
    breaker.record_success()
    assert breaker.state is State.CLOSED


def test_late_reports_from_calls_started_before_opening_change_nothing(parts):
    breaker, clock, _ = parts
    for _ in range(3):
        breaker.record_failure()
    breaker.record_success()            # a slow call admitted while closed, finishing now
    breaker.record_failure()
    assert breaker.state is State.OPEN and not breaker.allow()


def test_reset_closes_from_any_state(parts):
    breaker, _, value = parts
    for _ in range(3):
        breaker.record_failure()
    breaker.reset()
    assert breaker.state is State.CLOSED and breaker.allow() and value("t_breaker_state") == 0


@pytest.mark.parametrize(("threshold", "cool_down", "message"), [
    (0, 1.0, "failure_threshold must be an integer >= 1, got 0"),
    (True, 1.0, "failure_threshold must be an integer >= 1, got True"),
    (2, 0.0, r"cool_down_s must be in \(0, 3600\] seconds, got 0.0"),
    (2, 7200, r"cool_down_s must be in \(0, 3600\] seconds, got 7200"),
])
def test_bad_settings_name_the_value(threshold, cool_down, message):
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("x", threshold, cool_down)
