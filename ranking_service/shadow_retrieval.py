"""The candidate's retrieval inside the shadow worker: the retrieval service's own domain code, in process.

The shadow worker (``ranking_service.shadow_worker``) runs at idle CPU priority, so the OS gives it
only the CPU time live requests leave over. Its Retrieve calls used to go to the retrieval service,
where they ran at the service's priority: the background lane (``x-recsys-priority: background``,
``recsys_serving.admission.Admission.background``) moved them to quiet moments and let them step
aside between steps, but a step already running (a tower forward, a search) still delayed the live
request that arrived during it (the shadow cost +3..+6 % of p99 at 100 req/s by the medians, single
runs up to +45 %). Here the worker runs the very same generator (``retrieval_service.generator``)
on the candidate's retrieval state, built from the same verified bundle as the service builds it
(``retrieval_service.state.load_state``; FAISS on the CPU), so the retrieval service never sees
shadow work and all of it runs below live work.

What differs from the service: the search runs on FAISS's CPU index (the service may use a GPU or
another backend of the same index), and this generator has no Redis client of its own. The
pipeline hands it the user's record whenever ranking read one (``RetrieveRequest.stored_user``);
when ranking's own read failed, the candidate's retrieval answers from the artifact's features.

This is the only module of the ranking service that imports the retrieval service
(``tests/test_import_rules.py``), and it is imported only inside the worker process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ranking_service.retrieval_client import RetrievalFailed, RetrievalRefused
from ranking_service.state import ServingState as RankingState
from ranking_service.state import load_state as load_ranking
from recsys_contracts import feature_store
from recsys_contracts.v1 import retrieval_pb2
from retrieval_service.batching import MicroBatcher
from retrieval_service.config import RetrievalConfig
from retrieval_service.features import FeatureStore
from retrieval_service.generator import CandidateGenerator, DeadlineExceeded
from retrieval_service.servicer import chunks
from retrieval_service.state import ServingState as RetrievalState
from retrieval_service.state import load_state as load_retrieval
from retrieval_service.validation import InvalidRequest, validate

# The pipeline already checked num_candidates against the ranking service's own limit.
MAX_CANDIDATES = 100_000


@dataclass(frozen=True, eq=False)
class CandidateStates:
    """One candidate version as the worker holds it: the ranking state and the retrieval state."""

    ranking: RankingState
    retrieval: RetrievalState | None        # None: runs need another CandidateSource (tests)

    @property
    def version(self) -> int:
        return self.ranking.version


def load_candidate(directory: Path, version: int, *, default_score_mode: str = "ctr") -> CandidateStates:
    """Both stages' states of ``version`` (each loader runs ``verify_bundle``; blocking)."""
    return CandidateStates(load_ranking(directory, version, default_score_mode=default_score_mode),
                           load_retrieval(directory, version))


class LocalCandidates:
    """A ``CandidateSource`` that answers from the holder's candidate retrieval state, in this process."""

    def __init__(self, holder) -> None:
        """``holder``: the worker's ``CandidateHolder``; its ``retrieval`` is the candidate's retrieval state."""
        self.holder = holder
        defaults = RetrievalConfig
        self.chunk_size = defaults.chunk_size
        self.generator = CandidateGenerator(
            FeatureStore(None, feature_store.KeyFormat(), defaults.redis_timeout_ms / 1000),
            MicroBatcher(defaults.microbatch_max_size, defaults.microbatch_max_wait_ms / 1000))

    async def stream(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float,
                     request_id: str) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        state = self.holder.retrieval
        try:
            query = validate(request, MAX_CANDIDATES)
            if state is None or state.version not in query.versions:
                raise RetrievalFailed("UNAVAILABLE", f"the shadow worker holds no retrieval state for the "
                                                     f"versions {list(query.versions)}")
            result = await self.generator.generate(state, query, time.monotonic() + timeout_s)
        except InvalidRequest as error:
            raise RetrievalRefused(f"retrieval refused the request: {error}") from None
        except DeadlineExceeded as error:
            raise RetrievalFailed("DEADLINE_EXCEEDED", str(error)) from None
        for message in chunks(result, self.chunk_size):
            yield message

    async def close(self) -> None:
        await self.generator.batcher.close()
