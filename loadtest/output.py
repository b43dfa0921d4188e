"""Writes one run's files: ``results.json``, ``latency.png`` (over time) and ``histogram.png``."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loadtest.plots import plot_histogram, plot_latency_over_time
from loadtest.results import Outcome, to_json, write_results


def machine() -> dict:
    """Where the figures were measured (they mean little without it)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "loadavg_after": list(os.getloadavg())}


def save_run(out_dir: Path, document: dict, outcomes: Sequence[Outcome], title: str,
             marks: Sequence[tuple[float, str]] = ()) -> list[Path]:
    """Writes the results (document + machine + command + outcomes) and both plots; returns the paths."""
    out_dir = Path(out_dir)
    full = {**document, "machine": machine(), "command": sys.argv,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "outcomes": to_json(outcomes)}
    return [write_results(out_dir / "results.json", full),
            plot_latency_over_time(outcomes, out_dir / "latency.png", title, marks),
            plot_histogram(outcomes, out_dir / "histogram.png", title)]
