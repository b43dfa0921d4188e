"""The PNG plots and the per-second p99 they draw."""

import numpy as np

from loadtest.plots import plot_histogram, plot_latency_over_time, rolling_p99
from loadtest.results import Outcome

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rolling_p99_by_hand():
    # second 0: 1, 2, 3 ms -> p99 = 3 ms; second 1: nothing; second 2: 10 ms.
    outcomes = [Outcome(0.1, 0.001, "OK"), Outcome(0.5, 0.003, "OK"), Outcome(0.9, 0.002, "OK"),
                Outcome(2.2, 0.010, "DEADLINE_EXCEEDED")]
    starts, p99 = rolling_p99(outcomes)
    np.testing.assert_allclose(starts, [0.0, 2.0])
    np.testing.assert_allclose(p99, [3.0, 10.0])


def test_plots_write_png_files(tmp_path):
    outcomes = [Outcome(i / 100, 0.001 * (1 + i % 7), "OK" if i % 10 else "UNAVAILABLE") for i in range(300)]
    latency = plot_latency_over_time(outcomes, tmp_path / "a" / "latency.png", "t", marks=[(1.0, "fault")])
    histogram = plot_histogram(outcomes, tmp_path / "a" / "histogram.png", "t")
    for path in (latency, histogram):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_plots_of_an_empty_run_still_write_files(tmp_path):
    assert plot_latency_over_time([], tmp_path / "l.png", "empty").read_bytes()[:8] == PNG_MAGIC
    assert plot_histogram([], tmp_path / "h.png", "empty").read_bytes()[:8] == PNG_MAGIC
