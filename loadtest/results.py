"""Per-request outcomes, percentiles and run summaries, and the JSON results file.

Percentiles use the nearest-rank definition: the q-th percentile of n sorted values is the value
of rank ceil(q * n / 100), so every reported figure is a latency some request really had.
Latency is charged from the request's intended send time (see ``schedule``). Summaries give it
over all requests (a fast failure is a reply too) and over successful ones alone, so a fault that
fails fast cannot flatter the tail.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SCHEMA = "recsys.loadtest.v1"
THROTTLED = "THROTTLED"     # the code of a request the client's own throttle kept (never sent; not a gRPC code)


@dataclass(frozen=True)
class Outcome:
    intended_s: float                       # when it was due, seconds after the run started
    latency_s: float                        # reply (or failure) time minus the intended time
    code: str                               # gRPC status name; "OK" on success; THROTTLED: not sent
    degraded: tuple[str, ...] = ()          # DegradedPath names the server reported
    versions: tuple[tuple[str, int], ...] = ()  # (model role, artifact version), e.g. ("ranking", 3)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank q-th percentile (q in (0, 100]) of ascending values; NaN for no values."""
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q!r}")
    if not sorted_values:
        return math.nan
    # The 1e-9 absorbs float noise such as 99.9 * 1000 / 100 = 999.0000000000001.
    rank = max(1, math.ceil(q * len(sorted_values) / 100 - 1e-9))
    return sorted_values[rank - 1]


def latency_stats(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds (NaN when there are none)."""
    values = sorted(1000 * x for x in latencies_s)
    stats = {f"p{q:g}": percentile(values, q) for q in PERCENTILES}
    stats["max"] = values[-1] if values else math.nan
    stats["mean"] = sum(values) / len(values) if values else math.nan
    return stats


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict:
    """Counts, throughput (successful replies per second of ``duration_s``), latency, codes, flags, versions,
    and ``mixed_versions``: successful answers whose candidates came from another version than the one
    that ranked them (retrieval version 0, the popular fallback without retrieval, is not mixed)."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    ok = [o for o in outcomes if o.code == "OK"]
    versions: dict[str, Counter] = {}
    for o in ok:
        for role, version in o.versions:
            versions.setdefault(role, Counter())[str(version)] += 1
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "duration_s": duration_s,
        "offered_rps": len(outcomes) / duration_s,
        "throughput_rps": len(ok) / duration_s,
        "latency_ms": latency_stats([o.latency_s for o in outcomes]),
        "ok_latency_ms": latency_stats([o.latency_s for o in ok]),
        # how fast the server said no (admission's RESOURCE_EXHAUSTED); a refusal should cost no wait
        "refused_latency_ms": latency_stats([o.latency_s for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]),
        # every "no" the caller got: the server's refusals and its own throttle's (which never left it)
        "rejected_latency_ms": latency_stats([o.latency_s for o in outcomes
                                              if o.code in ("RESOURCE_EXHAUSTED", THROTTLED)]),
        "codes": dict(sorted(Counter(o.code for o in outcomes).items())),
        "degraded": dict(sorted(Counter(flag for o in outcomes for flag in o.degraded).items())),
        "versions": {role: dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
                     for role, counts in sorted(versions.items())},
        "mixed_versions": sum(1 for o in ok if _mixed(dict(o.versions))),
    }


def _mixed(versions: dict[str, int]) -> bool:
    return versions.get("retrieval", 0) != 0 and "ranking" in versions and versions["retrieval"] != versions["ranking"]


def window(outcomes: Sequence[Outcome], start_s: float, end_s: float) -> list[Outcome]:
    """The outcomes intended in [start_s, end_s)."""
    return [o for o in outcomes if start_s <= o.intended_s < end_s]


def elapsed_s(outcomes: Sequence[Outcome], floor_s: float) -> float:
    """Seconds from the run's start to its last reply, at least ``floor_s`` (the scheduled duration)."""
    last = max((o.intended_s + o.latency_s for o in outcomes), default=0.0)
    return max(last, floor_s)


def to_json(outcomes: Sequence[Outcome]) -> dict:
    """Column-wise outcomes (compact: one list per field)."""
    return {
        "intended_s": [round(o.intended_s, 6) for o in outcomes],
        "latency_ms": [round(1000 * o.latency_s, 4) for o in outcomes],
        "code": [o.code for o in outcomes],
        "degraded": [list(o.degraded) for o in outcomes],
        "versions": [[list(pair) for pair in o.versions] for o in outcomes],
    }


def from_json(columns: dict) -> list[Outcome]:
    return [Outcome(t, ms / 1000, code, tuple(flags), tuple((role, int(v)) for role, v in versions))
            for t, ms, code, flags, versions in zip(columns["intended_s"], columns["latency_ms"], columns["code"],
                                                    columns["degraded"], columns["versions"])]


def write_results(path: Path, document: dict) -> Path:
    """Writes ``document`` (with the schema tag) as JSON; NaN becomes null so any JSON reader takes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none({"schema": SCHEMA, **document}), indent=1) + "\n")
    return path


def read_results(path: Path) -> dict:
    document = json.loads(Path(path).read_text())
    if document.get("schema") != SCHEMA:
        raise ValueError(f"results file must have schema {SCHEMA!r}, got {document.get('schema')!r} in {str(path)!r}")
    return document


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def format_summary(summary: dict, title: str = "") -> str:
    """A few lines for the terminal: counts and codes, latency percentiles, degraded flags, versions."""
    lat, codes = summary["latency_ms"], summary["codes"]
    lines = [f"{title}requests={summary['requests']} ok={summary['ok']} failed={summary['failed']} "
             f"throughput={summary['throughput_rps']:.1f}/s over {summary['duration_s']:.1f} s",
             "  latency ms: " + " ".join(f"{key}={lat[key]:.1f}" for key in ("p50", "p90", "p99", "p99.9", "max")),
             "  codes: " + ", ".join(f"{code}={n}" for code, n in codes.items())]
    refused = summary.get("refused_latency_ms")     # absent from results written before it existed
    if codes.get("RESOURCE_EXHAUSTED") and refused:
        lines.append(f"  refused in ms: p50={refused['p50']:.1f} p99={refused['p99']:.1f} max={refused['max']:.1f}")
    rejected = summary.get("rejected_latency_ms")
    if codes.get(THROTTLED) and rejected:
        lines.append(f"  refused or throttled in ms: p50={rejected['p50']:.2f} p99={rejected['p99']:.1f} "
                     f"max={rejected['max']:.1f}")
    if summary["degraded"]:
        lines.append("  degraded: " + ", ".join(f"{flag}={n}" for flag, n in summary["degraded"].items()))
    if summary["versions"]:
        lines.append("  versions: " + "; ".join(f"{role} " + ", ".join(f"v{v}={n}" for v, n in counts.items())
                                                for role, counts in summary["versions"].items())
                     + f"; mixed-version answers={summary.get('mixed_versions', 0)}")
    return "\n".join(lines)
