"""A scenario end to end: its own redis-server and both services as subprocesses, a fault, the phases.

The table's scenarios run for a minute or more; this one is the redis-freeze fault scaled down
(20 req/s, 1.5 s frozen), serving copies of the session's MovieLens version. It checks what the
harness owns: the stack comes up, the fault happens and is undone, requests are split into
phases, and the answers during the freeze show the degraded path the freeze forces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path

import pytest

from loadtest.__main__ import service_cpu_line
from loadtest.config import LoadConfig
from loadtest.results import Outcome
from loadtest.scenarios import (SCENARIOS, arm_windows, fault_row, phases, recovery, run_and_save, run_scenario,
                                service_cpu_figures, shadow_ab, shadow_ab_line, shortened)
from recsys_contracts.arms import Arms, read_arms

pytestmark = pytest.mark.slow


def test_redis_freeze_scaled_down(published, ml100k_dir, tmp_path):
    root, _ = published
    scenario = dataclasses.replace(shortened(SCENARIOS["redis-freeze"], duration_s=5.0, fault_at_s=1.0, fault_s=1.5),
                                   settle_s=0.5)
    config = LoadConfig(rate=20, deadline_ms=2000, users_from=str(ml100k_dir), warmup_s=0.5)
    document, outcomes = asyncio.run(run_scenario(scenario, config, None, tmp_path, source_root=root))

    fault, by_phase = document["fault"], document["phases"]
    assert 1.0 <= fault["start_s"] and fault["end_s"] - fault["start_s"] >= 1.5 and fault["frozen_s"] == 1.5
    assert len(outcomes) == 100 == sum(summary["requests"] for summary in by_phase.values() if summary)
    # A frozen Redis answers nothing: the services fall back to the artifact's features.
    assert by_phase["during"]["degraded"].get("DEGRADED_PATH_FEATURES_FROM_ARTIFACT", 0) >= 1
    # Served versions are copies republished into the stack's own root (version 1 there).
    assert set(document["summary"]["versions"]["ranking"]) == {"1"}
    assert document["client_gc"]["collections"] >= 1
    assert document["recovery"]["deadline_ms"] == 2000 and "recovery_s" in document["recovery"]
    assert fault_row(document).startswith("| redis-freeze | 20 | 100 | ")
    # The services' CPU over the load window, per answered request: both ran, so both spent some.
    cpu = document["service_cpu"]
    assert cpu["ok"] == document["summary"]["ok"] > 0
    assert cpu["cpu_s"]["ranking"] > 0 and cpu["cpu_s"]["retrieval"] > 0
    assert cpu["services_cpu_ms_per_ok"] >= cpu["cpu_ms_per_ok"]["ranking"] > 0
    # ... and by thread: each service's event loop (its main thread) served, beside its named compute
    # thread and gRPC's threads; the groups never add up to more than the process spent.
    threads = cpu["threads_cpu_s"]
    assert {"main", "dcn", "event_engine"} <= set(threads["ranking"])
    assert {"main", "tower", "event_engine"} <= set(threads["retrieval"])
    assert threads["ranking"]["main"] > 0 and threads["retrieval"]["main"] > 0
    for service in ("ranking", "retrieval"):
        assert sum(threads[service].values()) <= cpu["cpu_s"][service] + 0.02      # two reads, 10 ms ticks


def test_shadow_scaled_down_alternates_the_arm_and_changes_no_answer(published, ml100k_dir, tmp_path):
    root, _ = published
    scenario = dataclasses.replace(SCENARIOS["shadow"], duration_s=8.0, fault_at_s=0.5, fault=functools.partial(
        shadow_ab, shadow_percent=100.0, load_wait_s=1.0, window_s=1.2, windows=4, guard_s=0.4))
    config = LoadConfig(rate=20, deadline_ms=2000, users_from=str(ml100k_dir), warmup_s=0.5)
    fast_polls = {"RANKING_POLL_INTERVAL_S": "0.2", "RETRIEVAL_POLL_INTERVAL_S": "0.2"}
    document, outcomes = asyncio.run(run_scenario(scenario, config, None, tmp_path, source_root=root,
                                                  service_env=fast_polls))
    fault, ab = document["fault"], document["shadow_ab"]
    assert (fault["candidate"], fault["shadow_percent"]) == (2, 100.0)
    assert [span["shadow"] for span in fault["windows"]] == [False, True, True, False]
    assert all(later["start"] >= earlier["end"] - 1e-6 for earlier, later in zip(fault["windows"], fault["windows"][1:]))
    # The shadow is switched off again at the end; the candidate stays staged with no traffic.
    assert read_arms(tmp_path / "artifacts") == Arms(candidate=2, canary_percent=0.0, shadow_percent=0.0)
    assert ab["off"]["windows"] == ab["on"]["windows"] == 2 and ab["off"]["requests"] > 0 < ab["on"]["requests"]
    assert ab["off"]["failed"] == ab["on"]["failed"] == 0 == document["summary"]["failed"]
    assert set(document["summary"]["versions"]["ranking"]) == {"1"}      # the shadow never answers
    assert ab["p99_ratio"] == pytest.approx(ab["on"]["latency_ms"]["p99"] / ab["off"]["latency_ms"]["p99"])
    assert "on/off p99" in shadow_ab_line(ab)
    # each window's CPU by process and shadow runs by result, over its measured part
    assert all(span["measured_s"] > 0 and set(span["cpu_s"]) == {"ranking", "shadow_worker", "retrieval", "redis"}
               for span in fault["windows"])
    assert ab["on"]["cpu_s_per_s"]["ranking"] > 0 < ab["on"]["cpu_s_per_s"]["retrieval"]
    assert sum(ab["on"]["shadow_runs"].values()) > 0          # sampled: skipped while the worker loads, or run


def test_arm_windows_pools_each_arm_after_its_guard():
    # Windows [0, 2) off, [2, 4) on, [4, 6) on, [6, 8) off; the first 0.5 s of each is left out.
    spans = [{"shadow": shadow, "start": 2.0 * i, "end": 2.0 * (i + 1)}
             for i, shadow in enumerate((False, True, True, False))]
    outcomes = [Outcome(t / 10, 0.010 if (t // 20) in (0, 3) else 0.020, "OK") for t in range(80)]
    outcomes.append(Outcome(2.1, 5.0, "DEADLINE_EXCEEDED"))       # inside the guard of an "on" window: left out
    ab = arm_windows(outcomes, spans, guard_s=0.5)
    assert ab["off"]["requests"] == ab["on"]["requests"] == 30 and ab["on"]["failed"] == 0
    assert ab["off"]["latency_ms"]["p99"] == pytest.approx(10.0) and ab["on"]["latency_ms"]["p99"] == pytest.approx(20.0)
    assert ab["off"]["window_p99_ms"] == pytest.approx([10.0, 10.0]) and ab["median_window_p99_ratio"] == pytest.approx(2.0)
    assert ab["p99_ratio"] == pytest.approx(2.0)


def test_phases_split_by_intended_time():
    outcomes = [Outcome(t, 0.01, "OK") for t in (0.5, 1.0, 2.9, 3.0, 4.5)]
    # fault 1.0 .. 2.5 s, settle 0.5 s -> during is [1.0, 3.0); after is [3.0, 5.0).
    split = phases(outcomes, {"start_s": 1.0, "end_s": 2.5, "settle_s": 0.5}, total_s=5.0)
    assert [split[name]["requests"] for name in ("before", "during", "after")] == [1, 2, 2]
    assert split["during"]["duration_s"] == 2.0
    # A fault undone after the load ended leaves no "after" phase.
    assert phases(outcomes, {"start_s": 1.0, "end_s": 6.0, "settle_s": 0.5}, total_s=5.0)["after"] is None


def test_service_cpu_figures_are_per_answered_request():
    outcomes = [Outcome(0.0, 0.01, "OK")] * 4 + [Outcome(0.0, 0.001, "RESOURCE_EXHAUSTED")] * 6
    figures = service_cpu_figures({"ranking": 0.02, "shadow_worker": 0.0, "retrieval": 0.008, "redis": 0.004},
                                  outcomes)
    assert figures["ok"] == 4
    assert figures["cpu_ms_per_ok"] == pytest.approx({"ranking": 5.0, "shadow_worker": 0.0, "retrieval": 2.0,
                                                      "redis": 1.0})
    assert figures["services_cpu_ms_per_ok"] == pytest.approx(7.0)   # ranking, its shadow worker, retrieval
    nothing = service_cpu_figures({"ranking": 0.02, "shadow_worker": 0.0, "retrieval": 0.0, "redis": 0.0},
                                  outcomes[4:])
    assert nothing["services_cpu_ms_per_ok"] is None and nothing["cpu_ms_per_ok"]["ranking"] is None
    assert "threads_cpu_ms_per_ok" not in figures                    # not recorded: not reported


def test_service_cpu_figures_by_thread_are_per_answered_request_too():
    outcomes = [Outcome(0.0, 0.01, "OK")] * 4 + [Outcome(0.0, 0.001, "RESOURCE_EXHAUSTED")] * 6
    threads = {"ranking": {"main": 0.012, "dcn": 0.006, "lifeguard": 0.0}, "retrieval": {"main": 0.004, "tower": 0.002}}
    figures = service_cpu_figures({"ranking": 0.02, "shadow_worker": 0.0, "retrieval": 0.008, "redis": 0.0},
                                  outcomes, threads)
    assert figures["threads_cpu_s"] == threads
    assert figures["threads_cpu_ms_per_ok"] == {"ranking": pytest.approx({"dcn": 1.5, "lifeguard": 0.0, "main": 3.0}),
                                                "retrieval": pytest.approx({"main": 1.0, "tower": 0.5})}
    assert list(figures["threads_cpu_ms_per_ok"]["ranking"]) == ["dcn", "lifeguard", "main"]    # name order
    line = service_cpu_line(figures)                 # a group that spent nothing stays out of the line
    assert line.splitlines()[1:] == ["  ranking by thread: dcn 1.50, main 3.00",
                                     "  retrieval by thread: main 1.00, tower 0.50"]
    none_answered = service_cpu_figures({"ranking": 0.02, "shadow_worker": 0.0, "retrieval": 0.0, "redis": 0.0},
                                        outcomes[4:], threads)
    assert none_answered["threads_cpu_ms_per_ok"]["ranking"] == {"dcn": None, "lifeguard": None, "main": None}
    assert len(service_cpu_line(none_answered).splitlines()) == 1      # nothing per answer to show


def test_run_and_save_rejects_an_unknown_scenario(tmp_path):
    with pytest.raises(ValueError, match="scenario must be one of"):
        run_and_save("meteor-strike", LoadConfig(), None, Path(tmp_path))


def test_recovery_is_the_first_window_after_the_fault_that_holds():
    # 10 req/s for 6 s; the fault ends at 2.0 s; requests due in [2.0, 3.0) are slow (300 ms > the
    # 200 ms deadline) and one due at 3.2 s fails: the first 1 s window without either starts at 3.3 s.
    outcomes = [Outcome(i / 10, 0.3 if 2.0 <= i / 10 < 3.0 else 0.01, "UNAVAILABLE" if i == 32 else "OK")
                for i in range(60)]
    got = recovery(outcomes, {"start_s": 1.0, "end_s": 2.0}, deadline_s=0.2, total_s=6.0)
    assert got["recovery_s"] == pytest.approx(1.3)
    # Undisturbed after the end: 0; never held before the load ended: None.
    assert recovery(outcomes, {"end_s": 4.0}, deadline_s=0.2, total_s=6.0)["recovery_s"] == 0.0
    slow = [Outcome(i / 10, 0.5, "OK") for i in range(60)]
    assert recovery(slow, {"end_s": 2.0}, deadline_s=0.2, total_s=6.0)["recovery_s"] is None


@pytest.mark.parametrize(("lengths", "message"), [
    ({"duration_s": 0.0}, "duration_s must be a finite number of seconds > 0, got 0.0"),
    ({"fault_s": 2.0}, "fault_s applies to the kill and freeze scenarios only"),
    ({"duration_s": 5.0}, r"fault_at_s must be < duration_s \(5\), got 10.0"),
])
def test_shortened_names_a_bad_length(lengths, message):
    name = "redis-flush"
    with pytest.raises(ValueError, match=message):
        shortened(SCENARIOS[name], **lengths)


def test_shortened_replaces_only_what_is_given():
    short = shortened(SCENARIOS["retrieval-freeze"], duration_s=12, fault_at_s=3, fault_s=2)
    assert (short.duration_s, short.fault_at_s, short.fault_s, short.settle_s) == (12, 3, 2, 3.0)
