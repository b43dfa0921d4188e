"""The shadow worker process: the arms file's candidate scores sampled live requests at idle CPU priority.

``ranking_service.shadow.Shadow`` (in the serving process) starts ``main`` in a "spawn" child. The
child first lowers its own CPU priority (``lower_priority``: ``SCHED_IDLE`` where the kernel allows
it, else nice 19), so the OS runs it only on CPU time the live service leaves over: a live request
never waits behind shadow work. Then it:

- follows the artifact root's arms file and holds ONLY the candidate (``CandidateHolder``: the same
  signature and checksum check, ``artifacts.verify``, and loaders, ``state.load_state`` and
  retrieval's, as the services' ``VersionHolder``). This is one more copy of the candidate in memory
  (its user tower and index included), beside the ones the services hold for the canary share;
- takes jobs (``Job``: the request's bytes, the served ids, the request id, the candidate and the
  live versions) from a bounded queue, at most ``MAX_IN_FLIGHT`` at once, and runs the Recommend
  pipeline on the candidate: features from Redis under the service's namespace, the candidate's
  retrieval in this process (``shadow_retrieval``: the retrieval service never sees shadow work,
  and all of it runs at this process's idle priority), the DCN on its own ONNX Runtime
  session (one intra-op thread, ``recsys_contracts.programs``) behind its own micro-batcher and
  retrieval breaker; it never falls back to popular items (a failed retrieval fails the run).
  Without Redis the worker does not see the interactions recorded in the serving process's memory
  (``ranking_service.fresh``): its runs then use the artifact's features only;
- sends back one ``Outcome`` per job (scored with overlap@k and Kendall's tau, not_candidate when
  retrieval did not answer from the candidate, failed, or skipped when it does not hold the job's
  candidate yet) and a ``Status`` when it starts and whenever the candidate it holds changes.

Prometheus lives in the serving process, which turns these messages into the ``ranking_shadow_*``
metrics. Only the standard library is imported at module level: numpy, ONNX Runtime and the
pipeline are imported inside ``main`` once the priority is lowered, so even that start-up work runs
below live work.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

MAX_IN_FLIGHT = 4            # shadow runs the worker scores at once
SHADOW_DEADLINE_S = 2.0      # a run may wait for idle CPU: it is bounded, but not by the live deadline
POLICY_IDLE, POLICY_NICE = "idle", "nice19"


@dataclass(frozen=True)
class Job:
    """A sampled live request, as the serving process enqueues it."""

    request: bytes                      # the RecommendRequest, serialized
    served: list[int]                   # the served item ids, best first
    request_id: str
    candidate: int                      # the arms' candidate version the sample was drawn for
    fallback_versions: list[int]        # the live versions retrieval may answer from instead


@dataclass(frozen=True)
class Outcome:
    """One job's result: scored, not_candidate, failed or skipped."""

    result: str
    request_id: str
    overlap: float | None = None        # overlap@k of the served and the candidate's lists, when scored
    tau: float | None = None            # Kendall's tau of their shared items, when scored and >= 2 shared
    error: str = ""                     # why a run failed (repr of the exception)


@dataclass(frozen=True)
class Status:
    """The worker's pid, the CPU priority it took (``POLICY_IDLE`` or ``POLICY_NICE``) and the
    candidate version it holds (None while it holds none)."""

    pid: int
    policy: str
    candidate: int | None


def lower_priority() -> str:
    """Puts the calling thread (the worker's main thread, before it starts any other; threads
    inherit it) under ``SCHED_IDLE``, else at nice 19; returns which one it took."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return POLICY_IDLE
    except (AttributeError, OSError):      # not Linux, or a kernel/sandbox that refuses SCHED_IDLE
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        return POLICY_NICE


def main(config, jobs, outcomes) -> None:
    """The worker's entry point: ``config`` is the service's ``RankingConfig``, ``jobs`` and
    ``outcomes`` the two multiprocessing queues; returns when a ``None`` job arrives."""
    policy = lower_priority()
    # Behind N service workers (recsys_serving.workers) this names their shared metrics folder: the
    # shadow's own pipeline metrics must not be summed into the service's.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Imported here, below live work (module docstring).
    from ranking_service.shadow_runner import serve

    asyncio.run(serve(config, jobs, outcomes, policy))
