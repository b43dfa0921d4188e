"""``python -m loadtest compare a.json b.json``: each headline figure of b as a ratio of a's."""

from __future__ import annotations

import math
from dataclasses import dataclass

# (label, path into the summary); latency in ms, throughput in successful replies/s.
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("throughput_rps", ("throughput_rps",)),
    ("requests", ("requests",)),
    ("failed", ("failed",)),
    *((f"latency_ms.{p}", ("latency_ms", p)) for p in ("p50", "p90", "p99", "p99.9", "max")),
    *((f"ok_latency_ms.{p}", ("ok_latency_ms", p)) for p in ("p50", "p99")),
)


@dataclass(frozen=True)
class Row:
    metric: str
    a: float
    b: float
    ratio: float   # b / a; inf when only a is 0, NaN when both are 0 or a figure is missing


def ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a == 0:
        return math.nan if b == 0 else math.inf
    return b / a


def _lookup(summary: dict, path: tuple[str, ...]) -> float:
    value = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return math.nan if value is None else float(value)


def compare(a: dict, b: dict) -> list[Row]:
    """Rows for two results documents (their ``summary``), ratio = b / a."""
    for name, document in (("a", a), ("b", b)):
        if not isinstance(document.get("summary"), dict):
            raise ValueError(f"{name} must be a results document with a 'summary', got keys {sorted(document)!r}")
    rows = []
    for label, path in METRICS:
        x, y = _lookup(a["summary"], path), _lookup(b["summary"], path)
        rows.append(Row(label, x, y, ratio(x, y)))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'metric':<22}{'a':>12}{'b':>12}{'b/a':>10}"]
    lines += [f"{row.metric:<22}{row.a:>12.2f}{row.b:>12.2f}{row.ratio:>10.3f}" for row in rows]
    return "\n".join(lines)
