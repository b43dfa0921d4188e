"""``python -m loadtest curve``: latency and goodput against offered load, one line per variant.

Reads saved runs (each a ``results.json`` of ``run`` or ``scenario``), groups them by a label
(``--run LABEL=DIR``, repeatable: e.g. ``before=runs/a-300`` and ``after=runs/b-300`` for several
rates each), and for each label and offered rate takes the **median over its runs** of: answered
p50 and p99 latency, goodput (OK answers per second), refusal p99 (RESOURCE_EXHAUSTED) and the
services' CPU milliseconds per answer when the run recorded them, and the same by thread (each
service's event loop, its compute thread and gRPC's threads). Writes a table (JSON) and a PNG with
three panels (latency, goodput, refusal latency), and a fourth with the CPU per answer by thread as
stacked bars when the runs recorded it, so a person can see where each variant stops holding its p99,
what it serves past that point, and where its CPU goes.

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
    # CPU ms per answer by "service loop|compute|grpc" (THREAD_PARTS), None for runs without it
    threads_cpu_ms_per_ok: dict[str, float] | None = None


# The thread groups the harness records (loadtest.stack.thread_cpu_seconds), folded into three parts per
# service: the event loop (the main thread), the compute thread (the micro-batcher's: the DCN, the user
# tower and the index) and the rest (gRPC's event-engine and poller threads, the metrics server).
COMPUTE_THREADS = {"ranking": "dcn", "retrieval": "tower"}
THREAD_PARTS = tuple(f"{service} {part}" for service in ("ranking", "retrieval") for part in ("loop", "compute", "grpc"))


def thread_parts(per_ok: dict[str, dict[str, float | None]]) -> dict[str, float] | None:
    """A run's ``threads_cpu_ms_per_ok`` (service -> group -> ms) as THREAD_PARTS -> ms; None without answers."""
    parts = {}
    for service, groups in per_ok.items():
        if any(ms is None for ms in groups.values()):
            return None
        for group, ms in groups.items():
            part = "loop" if group == "main" else "compute" if group == COMPUTE_THREADS.get(service) else "grpc"
            parts[f"{service} {part}"] = parts.get(f"{service} {part}", 0.0) + ms
    return parts


def _median_parts(documents: Sequence[dict]) -> dict[str, float] | None:
    runs = [thread_parts(d["service_cpu"]["threads_cpu_ms_per_ok"]) for d in documents
            if "threads_cpu_ms_per_ok" in d.get("service_cpu", {})]
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    return {part: statistics.median(r.get(part, 0.0) for r in runs) for part in THREAD_PARTS if any(part in r for r in runs)}


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
            throttled_share=_median(s["codes"].get(THROTTLED, 0) / max(s["requests"], 1) for s in summaries),
            threads_cpu_ms_per_ok=_median_parts(documents)))
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


def _plot_threads(axis, curve: Sequence[Point], labels: Sequence[str]) -> None:
    """Stacked bars of CPU per answer by thread part at each offered rate, the variants side by side."""
    rates = sorted({p.offered_rps for p in curve})
    gap = min((b - a for a, b in zip(rates, rates[1:])), default=rates[0] or 1.0)
    width = 0.8 * gap / len(labels)
    colors = {part: f"C{index}" for index, part in enumerate(THREAD_PARTS)}
    for index, label in enumerate(labels):
        mine = [p for p in curve if p.label == label and p.threads_cpu_ms_per_ok]
        xs = [p.offered_rps + (index - (len(labels) - 1) / 2) * width for p in mine]
        bottom = [0.0] * len(mine)
        for part in THREAD_PARTS:
            heights = [p.threads_cpu_ms_per_ok.get(part, 0.0) for p in mine]
            axis.bar(xs, heights, width=width, bottom=bottom, color=colors[part], edgecolor="white", linewidth=0.3,
                     label=part if index == 0 else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
    axis.set(xlabel="offered req/s", ylabel="CPU ms per OK answer")
    axis.set_title("services' CPU by thread" + (f"\nbars left to right: {', '.join(labels)}" if len(labels) > 1 else ""),
                   fontsize=9 if len(labels) > 1 else None)


def plot(curve: Sequence[Point], out: Path, title: str = "") -> None:
    """Three panels against offered req/s: answered p50/p99 (log ms), goodput, refusal p99; a fourth,
    CPU per answer by thread, when any run recorded it."""
    by_thread = any(p.threads_cpu_ms_per_ok for p in curve)
    figure, axes = plt.subplots(1, 4 if by_thread else 3, figsize=(20 if by_thread else 15, 4.5))
    latency, goodput, refusal = axes[:3]
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
    if by_thread:
        _plot_threads(axes[3], curve, labels)
    for axis in axes:
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
