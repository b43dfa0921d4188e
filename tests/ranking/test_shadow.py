"""Shadow scoring: the comparison metrics by hand; a live answer unchanged while the candidate scores
every request off the answer path in the shadow worker process (both services in process, the arms
file at 100 % shadow); the worker's idle CPU priority, its restart after a kill, a full queue skipped,
the worker's own exit when the service is killed, and the worker's pipeline that never falls back to
popular items."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import grpc
import pytest

from recsys_contracts.arms import Arms, write_arms
from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2
from ranking_service.retrieval_client import RetrievalClient, RetrievalFailed
from ranking_service.shadow import QUEUE_SIZE, kendall_tau, overlap_at_k
from ranking_service.shadow_retrieval import CandidateStates, LocalCandidates
from ranking_service.shadow_runner import CandidateHolder, ShadowRunner, build_pipeline
from ranking_service.shadow_worker import POLICY_IDLE, POLICY_NICE, Job
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import REPO_ROOT, config, free_port, run, sample, serve
from tests.ranking.test_pinning import _holder
from tests.ranking.test_recommend import recommend
from tests.ranking.test_untrusted_versions import publish_copy
from tests.retrieval.harness import config as retrieval_config
from tests.signing_keys import SIGNING_ENV, TRUST

RESULTS = ("scored", "skipped", "failed", "not_candidate")
WORKER_WAIT_S = 180.0     # the worker loads the candidate at idle priority: slow on a busy machine


def test_overlap_at_k_by_hand():
    # top 3 served {1, 2, 3}, shadow {3, 9, 1}: 2 shared of 3
    assert overlap_at_k([1, 2, 3, 4], [3, 9, 1, 2], 3) == pytest.approx(2 / 3)
    assert overlap_at_k([1, 2], [1, 2], 2) == 1.0
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        overlap_at_k([1], [1], 0)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    # shared 1, 2, 3; shadow order 2, 1, 3: pairs (1,2) discordant, (1,3) and (2,3) concordant: (2-1)/3
    assert kendall_tau([1, 2, 3, 4], [2, 1, 9, 3]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2], [2, 5]) is None                 # one shared item: no pair


async def _until(condition, what: str, timeout_s: float = WORKER_WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        await asyncio.sleep(0.05)


def _runs() -> dict[str, float]:
    return {r: sample("ranking_shadow_runs_total", result=r) for r in RESULTS}


@contextlib.asynccontextmanager
async def _with_shadow(root, loaded, retrieval_loaded, candidate: int | None):
    """(stub, app) with retrieval; when ``candidate`` is set, its shadow worker is started and holds it."""
    holder = await _holder(root, loaded, [1])
    retrieval_holder = await _holder(root, retrieval_loaded, [1])
    _, port, retrieval = await create_retrieval_server(retrieval_config(root, chunk_size=50), holder=retrieval_holder)
    try:
        async with serve(config(root, retrieval_target=f"127.0.0.1:{port}"), holder=holder) as (stub, _, app):
            if candidate is not None:
                app.shadow.start()
                await _until(lambda: app.shadow.worker_candidate == candidate, "the worker holding the candidate")
            yield stub, app
    finally:
        await retrieval.close(grace_s=0)


async def _answers(stub, users) -> list:
    answers = []
    for user in users:
        reply = await stub.Recommend(recommend(user, k=5), timeout=5)
        answers.append((reply.arm, reply.retrieval_version, reply.ranking_version,
                        [item.item_id for item in reply.items]))
    return answers


async def _serve_with_shadow(root, loaded, retrieval_loaded, users, candidate=None):
    async with _with_shadow(root, loaded, retrieval_loaded, candidate) as (stub, app):
        answers = await _answers(stub, users)
        await _until(lambda: app.shadow.pending == 0, "every shadow outcome coming back")
    return answers


def _armed_root(published, tmp_path) -> tuple:
    source, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    candidate = publish_copy(root, version, lambda staging: None, signed=True)
    return root, candidate


def test_shadow_scores_the_candidate_off_the_answer_path(published, loaded, retrieval_loaded, tmp_path):
    root, candidate = _armed_root(published, tmp_path)
    users = [str(u) for u in loaded.tables.user_ids[1:11]]
    plain = run(_serve_with_shadow(root, loaded, retrieval_loaded, users))
    write_arms(root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=100.0))
    before = _runs()
    overlaps = (sample("ranking_shadow_overlap_at_k_count"), sample("ranking_shadow_overlap_at_k_sum"))
    retrieves = sample("retrieval_requests_total", code="OK")
    shadowed = run(_serve_with_shadow(root, loaded, retrieval_loaded, users, candidate))
    runs = {r: value - before[r] for r, value in _runs().items()}
    # the worker retrieved from the candidate itself: the retrieval service served the live requests only
    assert sample("retrieval_requests_total", code="OK") - retrieves == len(users)
    assert shadowed == plain                                    # the answers are unchanged
    assert {arm for arm, *_ in shadowed} == {ranking_pb2.ARM_LIVE}
    assert runs["scored"] + runs["skipped"] == len(users) and runs["scored"] > 0, runs
    assert runs["failed"] == runs["not_candidate"] == 0
    assert sample("ranking_shadow_overlap_at_k_count") - overlaps[0] == runs["scored"]
    # the candidate is a copy of the live version: the same lists, overlap 1 each
    assert sample("ranking_shadow_overlap_at_k_sum") - overlaps[1] == pytest.approx(runs["scored"])


def test_the_worker_runs_at_idle_priority_comes_back_after_a_kill_and_a_full_queue_is_skipped(
        published, loaded, retrieval_loaded, tmp_path):
    root, candidate = _armed_root(published, tmp_path)
    write_arms(root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=100.0))
    users = [str(u) for u in loaded.tables.user_ids[1:4]]

    async def main():
        async with _with_shadow(root, loaded, retrieval_loaded, candidate) as (stub, app):
            first = app.shadow.worker_pid
            policy = (os.sched_getscheduler(first), os.getpriority(os.PRIO_PROCESS, first))
            reported = {p: sample("ranking_shadow_worker_priority", policy=p) for p in (POLICY_IDLE, POLICY_NICE)}
            served = await _answers(stub, users)

            exits = sample("ranking_shadow_worker_exits_total")
            os.kill(first, signal.SIGKILL)
            during = await _answers(stub, users)         # answered while the worker is dead or restarting
            await _until(lambda: app.shadow.worker_pid not in (None, first) and
                         app.shadow.worker_candidate == candidate, "the worker coming back")
            restarted = (sample("ranking_shadow_worker_exits_total") - exits, app.shadow.worker.process.is_alive())

            frozen, repeats = app.shadow.worker_pid, (QUEUE_SIZE + 3) // len(users) + 1
            before = _runs()
            os.kill(frozen, signal.SIGSTOP)               # the worker takes nothing from its queue
            try:
                full = await _answers(stub, users * repeats)
                queued = (app.shadow.pending, sample("ranking_shadow_runs_total", result="skipped") - before["skipped"])
            finally:
                os.kill(frozen, signal.SIGCONT)
            await _until(lambda: app.shadow.pending == 0, "the queued runs finishing")
            after = {r: value - before[r] for r, value in _runs().items()}
            return policy, reported, served, during, restarted, full == served * repeats, len(full), queued, after

    policy, reported, served, during, restarted, same, sent, queued, after = run(main())
    assert policy[0] == os.SCHED_IDLE or policy[1] == 19, policy
    assert reported == ({POLICY_IDLE: 1.0, POLICY_NICE: 0.0} if policy[0] == os.SCHED_IDLE else
                        {POLICY_IDLE: 0.0, POLICY_NICE: 1.0})
    assert during == served                               # a dead worker changes no answer
    assert restarted == (1.0, True)
    assert same                                           # the same answers with the queue full
    assert queued == (QUEUE_SIZE, sent - QUEUE_SIZE)
    assert after["scored"] == QUEUE_SIZE and after["skipped"] == sent - QUEUE_SIZE, after


def test_the_worker_pipeline_has_its_own_breaker_and_never_falls_back(published, loaded, tmp_path):
    """In the worker, a failed candidate retrieval is counted failed (no popular items), and enough
    of them open the worker's own retrieval breaker (the serving process's is another process's)."""
    root, candidate = _armed_root(published, tmp_path)
    write_arms(root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=100.0))
    cfg = config(root)                                  # a retrieval target that refuses connections

    async def main():
        holder = CandidateHolder(root, lambda directory, v: CandidateStates(dataclasses.replace(loaded, version=v), None),
                                 TRUST)
        changed = await holder.refresh()
        candidates = RetrievalClient(cfg)
        pipeline = build_pipeline(cfg, holder, candidates)
        runner = ShadowRunner(cfg, holder, pipeline)
        request = recommend(str(loaded.tables.user_ids[1]), k=5).SerializeToString()
        try:
            outcomes = [await runner.run(Job(request, [1, 2, 3], f"r{i}", candidate, [1]))
                        for i in range(pipeline.breaker.failure_threshold)]
            other = await runner.run(Job(request, [1, 2, 3], "other", candidate + 1, [1]))
        finally:
            await candidates.close()
            await pipeline.batcher.close()
        return changed, holder.held_versions, [o.result for o in outcomes], pipeline.breaker.state.name, \
            pipeline.fallback, other.result

    changed, held, results, breaker, fallback, other = run(main())
    assert changed and held[0] == candidate
    assert set(results) == {"failed"} and breaker == "OPEN" and fallback == "unavailable"
    assert other == "skipped"                        # a job for a candidate the worker does not hold


def test_the_workers_own_retrieval_answers_as_the_retrieval_service_does(published, loaded, retrieval_loaded):
    """``LocalCandidates`` (the worker's in-process retrieval of the candidate) streams the same chunks
    as the retrieval service answering from the same version; it refuses a version it does not hold
    (UNAVAILABLE) and a bad field as the service does (the caller's error)."""
    root, version = published
    holder = types.SimpleNamespace(retrieval=retrieval_loaded)
    users = [str(u) for u in loaded.tables.user_ids[1:6]] + ["never-seen-user"]

    def request(user: str, **fields) -> retrieval_pb2.RetrieveRequest:
        return retrieval_pb2.RetrieveRequest(**({"user_id": user, "num_candidates": 120, "version": version} | fields))

    async def collect(source, message) -> tuple:
        """(versions, item ids, scores, flags) over the stream's chunks (chunk sizes may differ)."""
        chunks = [c async for c in source.stream(message, 10.0, "local-test")]
        return ({c.model_version for c in chunks}, [i for c in chunks for i in c.item_ids],
                [x for c in chunks for x in c.scores], {tuple(c.degraded) for c in chunks})

    async def main():
        retrieval_holder = await _holder(root, retrieval_loaded, [version])
        _, port, retrieval = await create_retrieval_server(retrieval_config(root), holder=retrieval_holder)
        local, remote = LocalCandidates(holder), RetrievalClient(config(root, retrieval_target=f"127.0.0.1:{port}"))
        try:
            pairs = [(await collect(local, request(u)), await collect(remote, request(u))) for u in users]
            errors = []
            for message in (request(users[0], version=version + 7), request(users[0], num_candidates=0)):
                try:
                    await collect(local, message)
                except Exception as error:             # noqa: BLE001 -- the type is what is checked
                    errors.append(error)
            holder.retrieval = None
            try:
                await collect(local, request(users[0]))
            except RetrievalFailed as error:
                errors.append(error)
        finally:
            await local.close()
            await remote.close()
            await retrieval.close(grace_s=0)
        return pairs, errors

    pairs, errors = run(main())
    for ours, theirs in pairs:
        assert ours == theirs and ours[0] == {version} and len(ours[1]) > 0
    assert [type(e).__name__ for e in errors] == ["RetrievalFailed", "RetrievalRefused", "RetrievalFailed"]
    assert errors[0].code == errors[2].code == "UNAVAILABLE"
    assert "num_candidates must be in [1, " in str(errors[1])


def _worker_pids(pid: int) -> list[int]:
    """The shadow worker processes among ``pid``'s children (multiprocessing's resource tracker aside)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a reparented orphan may be left unreaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_worker_exits_when_the_service_is_killed(published, tmp_path):
    """A SIGKILLed service never stops its worker: the worker notices and exits by itself (no orphan
    left holding the candidate). Retrieval is down here: the popular fallback answers, and is shadowed."""
    root, candidate = _armed_root(published, tmp_path)
    write_arms(root, Arms(candidate=candidate, canary_percent=0.0, shadow_percent=100.0))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))}
    env |= SIGNING_ENV | {"PYTHONPATH": str(REPO_ROOT), "RECSYS_ARTIFACT_ROOT": str(root), "RANKING_PORT": str(port),
                          "RANKING_METRICS_PORT": "0", "RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([sys.executable, "-m", "ranking_service"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            end = time.monotonic() + WORKER_WAIT_S
            while not workers:                     # each answer is sampled; the first one starts the worker
                assert proc.poll() is None and time.monotonic() < end, "no shadow worker started"
                try:
                    stub.Recommend(recommend("1", k=5), timeout=5)
                except grpc.RpcError:              # not serving yet
                    pass
                workers = _worker_pids(proc.pid)
                time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
        end = time.monotonic() + WORKER_WAIT_S
        while any(_running(pid) for pid in workers) and time.monotonic() < end:
            time.sleep(0.1)
        left = [pid for pid in workers if _running(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in left:                               # do not leave an orphan behind a failed test
        os.kill(pid, signal.SIGKILL)
    assert len(workers) == 1 and left == []
