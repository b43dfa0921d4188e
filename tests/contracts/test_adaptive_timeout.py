"""recsys_serving.latency.AdaptiveTimeout: max(floor, multiplier x p99) of the recent calls."""

from __future__ import annotations

import pytest

from recsys_serving.latency import AdaptiveTimeout


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timeout(**kwargs) -> tuple[AdaptiveTimeout, Clock]:
    clock = Clock()
    return AdaptiveTimeout(kwargs.pop("multiplier", 4.0), kwargs.pop("floor_s", 0.02), clock=clock, **kwargs), clock


def test_no_cut_until_min_samples_then_multiplier_times_p99_above_the_floor():
    cut, _ = timeout(min_samples=50)
    for _ in range(49):
        cut.observe(0.010)
    assert cut.timeout_s() is None                  # too few calls seen: the caller's budget applies
    cut.observe(0.010)
    assert cut.timeout_s() == pytest.approx(0.040)  # 4 x 10 ms


def test_the_floor_holds_for_a_fast_peer():
    cut, _ = timeout(min_samples=10)
    for _ in range(10):
        cut.observe(0.001)
    assert cut.timeout_s() == pytest.approx(0.020)  # 4 x 1 ms = 4 ms < the 20 ms floor


def test_the_p99_ignores_the_rare_slow_call_and_follows_the_tail_when_it_is_common():
    cut, clock = timeout(window=200, min_samples=10, refresh_s=0.1)
    for _ in range(199):
        cut.observe(0.010)
    cut.observe(0.500)                              # one slow call in 200: below the 99th percentile
    assert cut.timeout_s() == pytest.approx(0.040, rel=0.01)
    for _ in range(4):                              # 5 in 200 (2.5 %): now the tail
        cut.observe(0.500)
    assert cut.timeout_s() == pytest.approx(0.040, rel=0.01)   # cached until refresh_s passed
    clock.now += 0.1
    assert cut.timeout_s() > 1.0


def test_timed_out_calls_raise_the_cut_so_it_follows_a_peer_that_slowed_down_for_good():
    cut, clock = timeout(window=100, min_samples=10, refresh_s=0.0)
    for _ in range(100):
        cut.observe(0.010)
    first = cut.timeout_s()                         # 40 ms
    for _ in range(3):
        cut.observe(first)                          # calls cut at 40 ms are observed at 40 ms
    second = cut.timeout_s()
    assert second == pytest.approx(4 * first, rel=0.05)


def test_the_window_forgets_old_calls():
    cut, _ = timeout(window=64, min_samples=10, refresh_s=0.0)
    for _ in range(64):
        cut.observe(0.100)
    assert cut.timeout_s() == pytest.approx(0.400)
    for _ in range(64):
        cut.observe(0.005)
    assert cut.timeout_s() == pytest.approx(0.020)  # the floor: the slow calls left the window


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"multiplier": 0.0}, "multiplier must be > 0, got 0.0"),
    ({"floor_s": -1.0}, "floor_s must be > 0, got -1.0"),
    ({"window": 10, "min_samples": 11}, r"min_samples must be in \[1, window=10\], got 11"),
])
def test_bad_arguments_are_refused_with_what_was_expected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timeout(**kwargs)
