"""``python -m loadtest curve``: latency and goodput against offered load, one line per variant.

Reads saved runs (each a ``results.json`` of ``run`` or ``scenario``), groups them by a label
(``--run LABEL=DIR``, repeatable: e.g. ``before=runs/a-300`` and ``after=runs/b-300`` for several
rates each), and for each label and offered rate takes the **median over its runs** of: answered
p50 and p99 latency, goodput (OK answers per second), refusal p99 (RESOURCE_EXHAUSTED) and the
services' CPU milliseconds per answer when the run recorded them. Writes a table (JSON) and a PNG
with three panels (latency, goodput, refusal latency) so a person can see where each variant
stops holding its p99 and what it serves past that point.

    python -m loadtest curve --run before=runs/ab/old-* --run after=runs/ab/new-* --out docs/img/load_curve.png
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from loadtest.results import THROTTLED, read_results  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One variant at one offered rate: medians over ``runs`` runs (None where no run had the figure)."""

    label: str
    offered_rps: float
    runs: int
    goodput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    refused_share: float
    refused_p99_ms: float | None
    services_cpu_ms_per_ok: float | None
    throttled_share: float = 0.0            # rejected by the client's own throttle (never sent)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def points(runs: Sequence[tuple[str, dict]]) -> list[Point]:
    """(label, results document) pairs -> one ``Point`` per (label, configured rate), sorted."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for label, document in runs:
        rate = document.get("config", {}).get("rate")
        if rate is None:
            raise ValueError(f"a run of {label!r} has no config.rate (expected an open-loop results.json)")
        groups.setdefault((label, float(rate)), []).append(document)
    out = []
    for (label, rate), documents in sorted(groups.items()):
        summaries = [d["summary"] for d in documents]
        out.append(Point(
            label=label, offered_rps=rate, runs=len(documents),
            goodput_rps=_median(s["throughput_rps"] for s in summaries),
            p50_ms=_median(s["ok_latency_ms"].get("p50") for s in summaries),
            p99_ms=_median(s["ok_latency_ms"].get("p99") for s in summaries),
            refused_share=_median(s["codes"].get("RESOURCE_EXHAUSTED", 0) / max(s["requests"], 1) for s in summaries),
            refused_p99_ms=_median(s["refused_latency_ms"].get("p99") for s in summaries),
            services_cpu_ms_per_ok=_median(d.get("service_cpu", {}).get("services_cpu_ms_per_ok")
                                           for d in documents),
            throttled_share=_median(s["codes"].get(THROTTLED, 0) / max(s["requests"], 1) for s in summaries)))
    return out


def parse_run_arguments(pairs: Sequence[str]) -> list[tuple[str, Path]]:
    """``LABEL=DIR`` strings -> (label, results.json path); ValueError naming a malformed or missing one."""
    out = []
    for pair in pairs:
        label, sep, directory = pair.partition("=")
        if not sep or not label or not directory:
            raise ValueError(f"--run must be LABEL=DIR, got {pair!r}")
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise ValueError(f"--run {pair!r}: no results.json in {directory!r}")
        out.append((label, path))
    return out


def plot(curve: Sequence[Point], out: Path, title: str = "") -> None:
    """Three panels against offered req/s: answered p50/p99 (log ms), goodput, refusal p99."""
    figure, (latency, goodput, refusal) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = sorted({p.label for p in curve})
    highest = max(p.offered_rps for p in curve)
    for index, label in enumerate(labels):
        mine = [p for p in curve if p.label == label]
        rates = [p.offered_rps for p in mine]
        color = f"C{index}"
        latency.plot(rates, [p.p99_ms for p in mine], "o-", color=color, label=f"{label} p99")
        latency.plot(rates, [p.p50_ms for p in mine], "s--", color=color, alpha=0.6, label=f"{label} p50")
        goodput.plot(rates, [p.goodput_rps for p in mine], "o-", color=color, label=label)
        refusal.plot(rates, [p.refused_p99_ms for p in mine], "o-", color=color, label=label)
    goodput.plot([0, highest], [0, highest], ":", color="grey", label="offered")
    latency.set(yscale="log", xlabel="offered req/s", ylabel="answered latency, ms", title="latency (OK answers)")
    goodput.set(xlabel="offered req/s", ylabel="OK answers per s", title="goodput")
    refusal.set(xlabel="offered req/s", ylabel="ms", title="refusal (RESOURCE_EXHAUSTED) p99")
    for axis in (latency, goodput, refusal):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)


def run_curve(pairs: Sequence[str], out: Path, title: str = "") -> list[Point]:
    """The CLI's work: read, group, plot to ``out`` and write the table beside it (``out`` with .json)."""
    runs = [(label, read_results(path)) for label, path in parse_run_arguments(pairs)]
    curve = points(runs)
    plot(curve, out, title)
    out.with_suffix(".json").write_text(json.dumps([asdict(p) for p in curve], indent=1) + "\n")
    return curve


def format_points(curve: Sequence[Point]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = ["| variant | offered | runs | goodput | p50 / p99 ms | refused | refusal p99 ms | throttled "
            "| services CPU ms/answer |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {p.label} | {p.offered_rps:g} | {p.runs} | {p.goodput_rps:.1f} | {ms(p.p50_ms)} / {ms(p.p99_ms)} | "
             f"{100 * p.refused_share:.0f} % | {ms(p.refused_p99_ms)} | {100 * p.throttled_share:.0f} % | "
             f"{ms(p.services_cpu_ms_per_ok)} |"
             for p in curve]
    return "\n".join(rows)
