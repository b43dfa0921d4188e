"""Arrival schedules and ramp steps, with hand-computed numbers."""

import math

import numpy as np
import pytest

from loadtest.schedule import constant_arrivals, ramp_rates


def test_constant_arrivals_are_i_over_rate():
    # rate 4/s for 1 s: due at 0, 0.25, 0.5, 0.75 (1.0 is the end, not a request).
    np.testing.assert_allclose(constant_arrivals(4, 1.0, 100), [0.0, 0.25, 0.5, 0.75])


def test_constant_arrivals_do_not_add_a_request_at_the_end_from_rounding():
    # 3/s for 1 s: 3 requests (0, 1/3, 2/3); 3 * 1.0 must not round up to 4.
    assert len(constant_arrivals(3, 1.0, 100)) == 3
    # 100/s for 2 s: 200 requests, the last due at 1.99 s.
    arrivals = constant_arrivals(100, 2.0, 10_000)
    assert len(arrivals) == 200 and math.isclose(arrivals[-1], 1.99)


def test_constant_arrivals_stop_at_max_requests():
    np.testing.assert_allclose(constant_arrivals(4, 10.0, 2), [0.0, 0.25])


def test_a_fractional_count_rounds_up():
    # 2.5/s for 1 s: every 0.4 s while before 1 s, so 0, 0.4 and 0.8 (ceil(2.5) = 3 requests).
    np.testing.assert_allclose(constant_arrivals(2.5, 1.0, 100), [0.0, 0.4, 0.8])


@pytest.mark.parametrize(("rate", "duration", "max_requests", "field"), [
    (0, 1.0, 1, "rate"), (float("inf"), 1.0, 1, "rate"), (1, 0.0, 1, "duration_s"),
    (1, float("nan"), 1, "duration_s"), (1, 1.0, 0, "max_requests"),
])
def test_constant_arrivals_reject_bad_arguments(rate, duration, max_requests, field):
    with pytest.raises(ValueError, match=field):
        constant_arrivals(rate, duration, max_requests)


def test_ramp_rates_step_up_from_start():
    assert ramp_rates(50, 50, 4) == [50, 100, 150, 200]
    assert ramp_rates(10, 2.5, 3) == [10, 12.5, 15]


@pytest.mark.parametrize(("start", "step", "max_steps", "field"), [
    (0, 1, 1, "start"), (1, -1, 1, "step"), (1, 1, 0, "max_steps"),
])
def test_ramp_rates_reject_bad_arguments(start, step, max_steps, field):
    with pytest.raises(ValueError, match=field):
        ramp_rates(start, step, max_steps)
