"""PNG plots of a run: latency over time (with fault marks) and the latency histogram (Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from loadtest.results import Outcome, percentile  # noqa: E402


def _latency_ms(outcomes: Sequence[Outcome]) -> np.ndarray:
    # Clamped at 0.01 ms so the log axis can show every point.
    return np.maximum(np.array([1000 * o.latency_s for o in outcomes], dtype=np.float64), 0.01)


def rolling_p99(outcomes: Sequence[Outcome], bucket_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bucket starts in s, p99 latency in ms of the requests intended in each 1-s bucket); empty buckets skipped."""
    buckets: dict[int, list[float]] = {}
    for o in outcomes:
        buckets.setdefault(math.floor(o.intended_s / bucket_s), []).append(1000 * o.latency_s)
    keys = sorted(buckets)
    return (np.array([k * bucket_s for k in keys]),
            np.array([percentile(sorted(buckets[k]), 99.0) for k in keys]))


def plot_latency_over_time(outcomes: Sequence[Outcome], path: Path, title: str,
                           marks: Sequence[tuple[float, str]] = ()) -> Path:
    """Scatter of each request's latency at its intended time (failures as red x), 1-s p99, vertical marks."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ok = [o for o in outcomes if o.code == "OK"]
    failed = [o for o in outcomes if o.code != "OK"]
    if ok:
        ax.scatter([o.intended_s for o in ok], _latency_ms(ok), s=3, alpha=0.4, label="ok")
    if failed:
        ax.scatter([o.intended_s for o in failed], _latency_ms(failed), s=12, marker="x", color="red",
                   label=f"failed ({len(failed)})")
    starts, p99 = rolling_p99(outcomes)
    if len(starts):
        ax.step(starts, p99, where="post", color="black", linewidth=1.2, label="p99 per second")
    for at_s, label in marks:
        ax.axvline(at_s, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (at_s, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize=8)
    ax.set(yscale="log", xlabel="intended send time (s)", ylabel="latency (ms)", title=title)
    if outcomes:
        ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_histogram(outcomes: Sequence[Outcome], path: Path, title: str) -> Path:
    """Histogram of latency (log-spaced bins) with the p50 and p99 marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = _latency_ms(outcomes)
    if len(values):
        low, high = values.min(), values.max()
        bins = np.geomspace(low, max(high, low * 1.01), 60)
        ax.hist(values, bins=bins)
        ordered = sorted(values.tolist())
        for q, style in ((50.0, ":"), (99.0, "--")):
            ax.axvline(percentile(ordered, q), color="black", linestyle=style, label=f"p{q:g}")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="latency (ms)", ylabel="requests", title=title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
