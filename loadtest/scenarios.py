"""The fault scenarios (``python -m loadtest scenario <name>``): one table, one runner.

Each scenario starts its own ``Stack``, drives open-loop Recommend load (100 req/s, k=10, 200 ms
deadline unless told otherwise), injects its fault ``fault_at_s`` seconds in, and undoes it (the
fault step returns once the system is whole again; a kill or freeze lasts ``fault_s``). The
report splits the requests by intended send time into before / during (fault start until
``settle_s`` after it was undone) / after, and gives each phase's failed requests by status code,
degraded flags and latency percentiles.

Recovery time (``recovery``): seconds from the fault's end (undone) to the start of the first
1-second window, sliding in 0.1 s steps over requests grouped by intended send time, that holds
again: its p99 latency (all requests) is within the deadline and none of its requests failed.
0.0 means the first window after the fault's end already held; None, that none held before the
load ended.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from loadtest.client import channel_options, drive, throttle_for, wait_connected, warm_up
from loadtest.collector import measured_window
from loadtest.config import LoadConfig, validate
from loadtest.output import save_run
from loadtest.publish import publish_copy
from loadtest.results import Outcome, elapsed_s, latency_stats, summarize, window
from loadtest.stack import Stack, thread_cpu_delta
from loadtest.users import load_population
from recsys_contracts import artifacts
from recsys_contracts.arms import Arms, write_arms
from recsys_contracts.signing import signer_for
from recsys_serving.channels import ChannelPool

# Users of the synthetic tiny dataset (trainer.tiny.tiny_dataset): "1".."80".
SYNTHETIC_USERS = "80"

Fault = Callable[[Stack], Awaitable[dict]]
# Seconds at the start of each shadow window left out of its figures: the services follow the arms
# file on their poll (RANKING_POLL_INTERVAL_S and RETRIEVAL_POLL_INTERVAL_S, 2 s by default).
SHADOW_GUARD_S = 3.0


async def hot_reloads(stack: Stack, count: int, interval_s: float) -> dict:
    """Publishes ``count`` versions ``interval_s`` apart in the go-live order: each version's features
    are in Redis, marked complete, before ``CURRENT`` names it, so no answer needs the artifact's copy
    (a degraded flag during this scenario is a defect, as is a mixed-version answer)."""
    await stack.publish(count, interval_s, features=True)
    return {"published": count}


async def _stage_candidate(stack: Stack) -> int:
    """Publishes a copy of the live version (signed, not current) and returns its number."""
    live = artifacts.current_version(stack.root)
    manifest = artifacts.read_manifest(stack.root, live)
    return await asyncio.to_thread(publish_copy, stack.root, stack.root, live, manifest, signer=signer_for())


# Shadow switched on in the middle two of every four windows (off, on, on, off, ...): a drift of the
# machine's load over the run falls on both arms alike.
AB_PATTERN = (False, True, True, False)


def _cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of ranking, its shadow worker (its descendants: with RANKING_WORKERS > 1
    the worker processes too, so the shadow A/B split assumes 1), retrieval and Redis."""
    ranking, retrieval, redis_cpu = stack.ranking.cpu_s(), stack.retrieval.cpu_s(), stack.redis.cpu_s()
    return {"ranking": ranking["self"], "shadow_worker": ranking["children"], "retrieval": retrieval["self"],
            "redis": redis_cpu["self"]}


def _thread_cpu_s(stack: Stack) -> dict[str, dict[int, tuple[str, float]]]:
    """Per-thread CPU snapshots of the two services' own processes (``Process.thread_cpu_s``)."""
    return {"ranking": stack.ranking.thread_cpu_s(), "retrieval": stack.retrieval.thread_cpu_s()}


def _thread_delta(after: dict[str, dict], before: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {name: thread_cpu_delta(after[name], before.get(name, {})) for name in after}


def service_cpu_figures(cpu_s: dict[str, float], outcomes: Sequence[Outcome],
                        threads_s: dict[str, dict[str, float]] | None = None) -> dict:
    """Each process's CPU seconds over the load window and its CPU milliseconds per answered (OK)
    request: the cost a capacity plan needs (a refusal costs little, so per OK answer, not per call).
    ``threads_s`` (service -> thread group -> CPU seconds, ``loadtest.stack.thread_cpu_delta``) adds
    the same per thread group: where a service's CPU goes (its event loop, its compute thread, gRPC's
    threads). With ``<PREFIX>WORKERS`` > 1 the serving runs in worker processes that these leave out."""
    ok = sum(1 for o in outcomes if o.code == "OK")
    per_ok = {name: (1000 * seconds / ok if ok else None) for name, seconds in cpu_s.items()}
    services = ("ranking", "shadow_worker", "retrieval")
    figures = {"cpu_s": cpu_s, "ok": ok, "cpu_ms_per_ok": per_ok,
               "services_cpu_ms_per_ok": (1000 * sum(cpu_s[n] for n in services) / ok) if ok else None}
    if threads_s is not None:
        figures["threads_cpu_s"] = threads_s
        figures["threads_cpu_ms_per_ok"] = {
            service: {group: (1000 * seconds / ok if ok else None) for group, seconds in sorted(groups.items())}
            for service, groups in threads_s.items()}
    return figures


async def _window_usage(stack: Stack) -> tuple[dict[str, float], dict[str, float]]:
    """(CPU seconds by process, shadow runs by result) so far; a scrape that fails gives no runs."""
    try:
        runs = await asyncio.to_thread(stack.ranking_counter, "ranking_shadow_runs", "result")
    except OSError:
        runs = {}
    return _cpu_s(stack), runs


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


async def shadow_ab(stack: Stack, shadow_percent: float, load_wait_s: float, window_s: float,
                    windows: int, guard_s: float = SHADOW_GUARD_S) -> dict:
    """Stages a candidate (a copy of the live version) with no traffic, waits ``load_wait_s`` for both
    services to load it, then switches the shadow sample between 0 and ``shadow_percent`` % every
    ``window_s`` seconds for ``windows`` windows (``AB_PATTERN``), and switches it off at the end.
    Returns the windows as loop times (``_inject`` makes them seconds after the load's start) and
    ``guard_s``, the seconds at each window's start its figures leave out (``arm_windows``). Each
    window also carries, over the same part (after its guard), the CPU seconds of each process
    (``cpu_s``) and the ranking service's shadow runs by result (``shadow_runs``)."""
    candidate = await _stage_candidate(stack)
    write_arms(stack.root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=0.0))
    await asyncio.sleep(load_wait_s)
    loop, spans = asyncio.get_running_loop(), []
    for i in range(windows):
        shadow = AB_PATTERN[i % len(AB_PATTERN)]
        write_arms(stack.root, Arms(candidate=candidate, canary_percent=0.0,
                                    shadow_percent=shadow_percent if shadow else 0.0))
        start = loop.time()
        await asyncio.sleep(min(guard_s, window_s))
        cpu_before, runs_before = await _window_usage(stack)
        measured_from = loop.time()
        await asyncio.sleep(max(0.0, start + window_s - loop.time()))
        cpu_after, runs_after = await _window_usage(stack)
        spans.append({"shadow": shadow, "start": start, "end": loop.time(), "measured_s": loop.time() - measured_from,
                      "cpu_s": _delta(cpu_after, cpu_before), "shadow_runs": _delta(runs_after, runs_before)})
    write_arms(stack.root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=0.0))
    return {"candidate": candidate, "shadow_percent": shadow_percent, "load_wait_s": load_wait_s,
            "guard_s": guard_s, "windows": spans}


def arm_windows(outcomes: list[Outcome], spans: list[dict], guard_s: float) -> dict:
    """Side by side, shadow off vs on over the interleaved windows: each window's first ``guard_s``
    seconds are left out (the services read the arms file on their poll), the rest pooled per arm.
    Gives each arm's latency over its pooled requests, the p99 of every window and their median, and
    the on/off ratios of the pooled p99 and of the median window p99."""
    arms: dict[str, dict] = {}
    for name, shadow in (("off", False), ("on", True)):
        mine = [span for span in spans if span["shadow"] == shadow]
        parts = [window(outcomes, span["start"] + guard_s, span["end"]) for span in mine]
        pooled = [o for part in parts for o in part]
        p99s = [latency_stats([o.latency_s for o in part])["p99"] for part in parts if part]
        arms[name] = {"windows": len(mine), "requests": len(pooled),
                      "failed": sum(1 for o in pooled if o.code != "OK"),
                      "latency_ms": latency_stats([o.latency_s for o in pooled]),
                      "window_p99_ms": p99s,
                      "median_window_p99_ms": statistics.median(p99s) if p99s else math.nan,
                      "cpu_s_per_s": _per_second(mine, "cpu_s"), "shadow_runs": _summed(mine, "shadow_runs")}
    off, on = arms["off"], arms["on"]
    return {"guard_s": guard_s, **arms,
            "p99_ratio": on["latency_ms"]["p99"] / off["latency_ms"]["p99"],
            "median_window_p99_ratio": on["median_window_p99_ms"] / off["median_window_p99_ms"]}


def _per_second(spans: list[dict], key: str) -> dict[str, float]:
    """The spans' ``key`` figures summed, per second of their measured time (cores busy, for CPU)."""
    seconds = sum(span.get("measured_s", 0.0) for span in spans)
    return {name: value / seconds for name, value in _summed(spans, key).items()} if seconds > 0 else {}


def _summed(spans: list[dict], key: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for span in spans:
        for name, value in span.get(key, {}).items():
            total[name] = total.get(name, 0.0) + value
    return total


async def redis_kill(stack: Stack, down_s: float) -> dict:
    stack.redis.kill()
    await asyncio.sleep(down_s)
    await stack.redis.start_and_wait()   # comes back empty: the services must refill it
    return {"down_s": down_s}


async def redis_freeze(stack: Stack, frozen_s: float) -> dict:
    stack.redis.freeze()                 # SIGSTOP: connections stay open, nothing answers
    await asyncio.sleep(frozen_s)
    stack.redis.resume()
    return {"frozen_s": frozen_s}


async def redis_flush(stack: Stack) -> dict:
    await stack.redis.flush()
    return {}


async def retrieval_freeze(stack: Stack, frozen_s: float) -> dict:
    stack.retrieval.freeze()             # SIGSTOP: ranking's stream gets no answer; it must fall back
    await asyncio.sleep(frozen_s)
    stack.retrieval.resume()
    return {"frozen_s": frozen_s}


async def retrieval_kill(stack: Stack) -> dict:
    stack.retrieval.kill()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stack.retrieval.start_and_wait()
    return {"restart_s": loop.time() - started}


async def ranking_sigterm(stack: Stack) -> dict:
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = await stack.ranking.terminate()
    drained = loop.time()
    await stack.ranking.start_and_wait()
    return {"exit_status": status, "drain_s": drained - started, "restart_s": loop.time() - drained}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    duration_s: float                  # seconds of load (a ramp's upper bound)
    fault_at_s: float = 10.0           # seconds into the load
    fault: Fault | None = None         # injects the fault and undoes it; None = load only
    settle_s: float = 3.0              # seconds after the fault is undone that still count as "during"
    mode: str = "open"
    fault_s: float | None = None       # how long a kill or freeze lasts (passed to ``fault``); None = n/a


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("steady", "steady load, no fault", duration_s=20),
    Scenario("ramp", "open-loop steps of +50 req/s until p99 exceeds the target", duration_s=150, mode="ramp"),
    Scenario("hot-reloads", "10 new versions published 1 s apart", duration_s=60, fault_at_s=5,
             fault=functools.partial(hot_reloads, count=10, interval_s=1.0)),
    Scenario("shadow", "a candidate (a copy of the live version) is loaded from 10 s on; from 25 s the "
             "shadow of 10 % of requests is switched off/on/on/off... every 10 s, 8 windows", duration_s=110,
             fault_at_s=10, fault=functools.partial(shadow_ab, shadow_percent=10.0, load_wait_s=15.0,
                                                      window_s=10.0, windows=8), settle_s=0.0),
    Scenario("redis-kill", "redis-server killed (-9), restarted empty after fault_s", duration_s=55,
             fault=redis_kill, fault_s=30.0),
    Scenario("redis-freeze", "redis-server frozen (SIGSTOP) for fault_s", duration_s=35,
             fault=redis_freeze, fault_s=10.0),
    Scenario("redis-flush", "FLUSHALL on the feature store", duration_s=30, fault=redis_flush),
    Scenario("retrieval-kill", "retrieval killed (-9) and restarted", duration_s=40, fault=retrieval_kill),
    Scenario("retrieval-freeze", "retrieval frozen (SIGSTOP) for fault_s", duration_s=35,
             fault=retrieval_freeze, fault_s=10.0),
    Scenario("ranking-sigterm", "ranking stopped with SIGTERM (graceful drain) and restarted", duration_s=40,
             fault=ranking_sigterm),
)}


async def _inject(scenario: Scenario, stack: Stack, origin: float) -> dict:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, origin + scenario.fault_at_s - loop.time()))
    start_s = loop.time() - origin
    notes = await (scenario.fault(stack) if scenario.fault_s is None else scenario.fault(stack, scenario.fault_s))
    if "windows" in notes:   # loop times -> seconds after the load's start
        notes["windows"] = [{**span, "start": span["start"] - origin, "end": span["end"] - origin}
                            for span in notes["windows"]]
    return {"start_s": start_s, "end_s": loop.time() - origin, "settle_s": scenario.settle_s, **notes}


def phases(outcomes: list[Outcome], fault: dict, total_s: float) -> dict[str, dict | None]:
    """Summaries of before / during / after the fault (None for a phase of no time)."""
    bounds = {"before": (0.0, fault["start_s"]),
              "during": (fault["start_s"], fault["end_s"] + fault["settle_s"]),
              "after": (fault["end_s"] + fault["settle_s"], total_s)}
    return {name: summarize(window(outcomes, lo, hi), hi - lo) if hi > lo else None
            for name, (lo, hi) in bounds.items()}


def shortened(scenario: Scenario, duration_s: float | None = None, fault_at_s: float | None = None,
              fault_s: float | None = None) -> Scenario:
    """The scenario with the given lengths replaced (None keeps the table's); ValueError names a bad one."""
    changes = {name: value for name, value in
               (("duration_s", duration_s), ("fault_at_s", fault_at_s), ("fault_s", fault_s)) if value is not None}
    for name, value in changes.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    if "fault_s" in changes and scenario.fault_s is None:
        raise ValueError(f"fault_s applies to the kill and freeze scenarios only, got {fault_s!r} "
                         f"for {scenario.name!r}")
    shorter = dataclasses.replace(scenario, **changes)
    if shorter.fault is not None and shorter.fault_at_s >= shorter.duration_s:
        raise ValueError(f"fault_at_s must be < duration_s ({shorter.duration_s:g}), got {shorter.fault_at_s!r}")
    return shorter


def recovery(outcomes: list[Outcome], fault: dict, deadline_s: float, total_s: float,
             window_s: float = 1.0, step_s: float = 0.1) -> dict:
    """Seconds from the fault's end until a sliding window holds again (see the module docstring)."""
    ordered = sorted(outcomes, key=lambda o: o.intended_s)
    times = [o.intended_s for o in ordered]
    start, held_at = fault["end_s"], None
    for step in range(max(0, math.floor((total_s - window_s - start) / step_s + 1e-9)) + 1):
        lo = start + step * step_s
        inside = ordered[bisect.bisect_left(times, lo):bisect.bisect_left(times, lo + window_s)]
        if inside and all(o.code == "OK" for o in inside) and \
                latency_stats([o.latency_s for o in inside])["p99"] <= 1000 * deadline_s:
            held_at = lo
            break
    return {"window_s": window_s, "step_s": step_s, "deadline_ms": 1000 * deadline_s,
            "recovery_s": None if held_at is None else held_at - start}


async def run_scenario(scenario: Scenario, config: LoadConfig, data_dir: Path | None, workdir: Path,
                       source_root: Path | None = None, seed: int = 0,
                       service_env: dict[str, str] | None = None) -> tuple[dict, list[Outcome]]:
    """Starts a stack in ``workdir``, drives ``config``'s load (its target replaced) with the fault; returns results."""
    population = load_population(config.users_from)
    loadavg_before = list(os.getloadavg())   # other work on the machine skews every figure
    cpu_before = time.process_time()         # the harness's own CPU (the stack runs in child processes)
    async with Stack(workdir, data_dir, source_root, seed, service_env) as stack:
        config = validate(dataclasses.replace(config, target=stack.target, mode=scenario.mode,
                                              duration_s=scenario.duration_s))
        async with ChannelPool.insecure(stack.target, channel_options(config.retry), config.channels) as channel:
            await wait_connected(channel, stack.target, config.connect_timeout_s)
            throttle = throttle_for(config)
            await warm_up(channel, config, population, throttle)
            with measured_window() as collector:
                loop = asyncio.get_running_loop()
                origin = loop.time()
                service_cpu_before, threads_before = _cpu_s(stack), _thread_cpu_s(stack)
                injecting = loop.create_task(_inject(scenario, stack, origin)) if scenario.fault else None
                outcomes, extra = await drive(channel, config, population, origin, throttle)
                fault = await injecting if injecting is not None else None
                service_cpu = _delta(_cpu_s(stack), service_cpu_before)
                threads_cpu = _thread_delta(_thread_cpu_s(stack), threads_before)
    total_s = elapsed_s(outcomes, scenario.duration_s if scenario.mode == "open" else 1e-9)
    document = {"scenario": scenario.name, "description": scenario.description,
                "config": dataclasses.asdict(config), "service_env": service_env or {},
                "loadavg_before": loadavg_before,
                "client_cpu_s": time.process_time() - cpu_before, "client_gc": collector.as_dict(),
                "summary": summarize(outcomes, total_s), "service_cpu": service_cpu_figures(service_cpu, outcomes, threads_cpu),
                **extra}
    if fault is not None:
        document["fault"] = fault
        document["phases"] = phases(outcomes, fault, total_s)
        document["recovery"] = recovery(outcomes, fault, config.deadline_ms / 1000, total_s)
        if "windows" in fault:
            document["shadow_ab"] = arm_windows(outcomes, fault["windows"], fault["guard_s"])
    return document, outcomes


def shadow_ab_line(ab: dict) -> str:
    """The shadow's cost in one line: each arm's pooled p50/p99 and median window p99, and the ratios."""
    def arm(name: str) -> str:
        figures = ab[name]
        return (f"{name}: {figures['requests']} requests in {figures['windows']} windows, "
                f"{figures['failed']} failed, p50 {figures['latency_ms']['p50']:.1f} ms, "
                f"p99 {figures['latency_ms']['p99']:.1f} ms, median window p99 {figures['median_window_p99_ms']:.1f} ms")
    def cpu() -> str:
        off, on = ab["off"].get("cpu_s_per_s", {}), ab["on"].get("cpu_s_per_s", {})
        return ", ".join(f"{name} {off[name]:.3f} -> {on.get(name, 0.0):.3f}" for name in off)

    runs = ", ".join(f"{result} {count:g}" for result, count in sorted(ab["on"].get("shadow_runs", {}).items()))
    return (f"shadow {arm('off')}; {arm('on')}; on/off p99 {ab['p99_ratio']:.3f}x, "
            f"median window p99 {ab['median_window_p99_ratio']:.3f}x; CPU s/s off -> on: {cpu()}; "
            f"shadow runs in the on windows: {runs or 'none'}")


def fault_row(document: dict) -> str:
    """One Markdown table row: scenario, rate, requests, failed (by code), p99 overall and during, recovery."""
    summary, config = document["summary"], document["config"]
    failed = ", ".join(f"{code} {n}" for code, n in summary["codes"].items() if code != "OK")
    during = (document.get("phases") or {}).get("during")
    recovered = (document.get("recovery") or {}).get("recovery_s", "n/a")
    recovered = "never" if recovered is None else recovered if isinstance(recovered, str) else f"{recovered:.1f} s"
    return (f"| {document['scenario']} | {config['rate']:g} | {summary['requests']} | "
            f"{summary['failed']}{f' ({failed})' if failed else ''} | {summary['latency_ms']['p99']:.0f} | "
            f"{'n/a' if during is None else format(during['latency_ms']['p99'], '.0f')} | {recovered} |")


def run_and_save(name: str, config: LoadConfig, data_dir: Path | None, out_dir: Path,
                 source_root: Path | None = None, seed: int = 0, service_env: dict[str, str] | None = None,
                 lengths: dict[str, float | None] | None = None) -> dict:
    """Runs the named scenario in a temporary work directory, saves results, plots and the stack's logs.

    ``lengths`` may replace the table's ``duration_s``, ``fault_at_s`` and ``fault_s`` (``shortened``).
    """
    if name not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {name!r}")
    scenario = shortened(SCENARIOS[name], **(lengths or {}))
    with tempfile.TemporaryDirectory(prefix=f"loadtest-{name}-") as workdir:
        try:
            document, outcomes = asyncio.run(
                run_scenario(scenario, config, data_dir, Path(workdir), source_root, seed, service_env))
        finally:
            logs = out_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in Path(workdir).glob("*.log"):
                shutil.copy(log, logs / log.name)
    fault = document.get("fault")
    marks = [(fault["start_s"], "fault"), (fault["end_s"], "undone")] if fault else []
    save_run(out_dir, document, outcomes, f"{name}: {scenario.description}", marks)
    return document
