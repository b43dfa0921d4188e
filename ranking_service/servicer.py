"""The ``recsys.v1.RankingService`` servicer: translate, don't decide.

Every RPC goes through ``recsys_serving.rpc`` (deadline, admission, status mapping, metrics,
request id), configured here with this service's settings and error types:

- DEADLINE_EXCEEDED at once when less than ``RANKING_MIN_DEADLINE_MS`` is left on arrival (no
  retrieval or Redis call), and when the deadline (the caller's, else ``RANKING_DEFAULT_DEADLINE_MS``)
  passes while serving;
- RESOURCE_EXHAUSTED at once when the RPC cannot finish within its deadline given the queue, or
  ``RANKING_MAX_IN_FLIGHT`` RPCs are already admitted (``recsys_serving.admission``; the refusal
  carries a ``grpc-retry-pushback-ms`` trailer); DEADLINE_EXCEEDED, unstarted, when its deadline
  passes while it waits for one of the ``RANKING_MAX_CONCURRENCY`` slots; past
  ``recsys_serving.runtime.rpc_limit`` active calls gRPC itself refuses (no trailer, nothing counted
  here), before this servicer runs;
- UNAVAILABLE while no version is loaded, when retrieval fails with fallback disabled, or when
  Redis does not take recorded interactions;
- INVALID_ARGUMENT with the ValueError's message naming the field and value (the request's, or one
  retrieval refused);
- FAILED_PRECONDITION when a Recommend pins a version a service does not hold (the held ones named);
- CANCELLED when the caller went away (DEADLINE_EXCEEDED when that was its deadline);
- INTERNAL for anything unexpected (logged with its traceback; never sent on the wire).
"""

from __future__ import annotations

import logging

import grpc

from ranking_service import arms, display, metrics, validation
from ranking_service.config import RankingConfig
from ranking_service.features import FeatureStore, StoreUnavailable
from ranking_service.pipeline import Answer, Pipeline, RetrievalUnavailable, VersionNotHeld
from ranking_service.shadow import Shadow
from ranking_service.state import ServingState
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from recsys_serving.admission import Admission
from recsys_serving.reload import VersionHolder
from recsys_serving.rpc import Call, Rpc, RpcError

log = logging.getLogger(__name__)
_RECORD_TIMEOUT_CAP_S = 1.0   # RecordInteractions waits at most this long for Redis
ERRORS = {ValueError: grpc.StatusCode.INVALID_ARGUMENT, RetrievalUnavailable: grpc.StatusCode.UNAVAILABLE,
          StoreUnavailable: grpc.StatusCode.UNAVAILABLE, VersionNotHeld: grpc.StatusCode.FAILED_PRECONDITION}


def rpc(config: RankingConfig, admission: Admission) -> Rpc:
    """The RPC wrapper with this service's deadlines, metrics and error types."""
    return Rpc(admission=admission, default_deadline_s=config.default_deadline_ms / 1000,
               min_deadline_s=config.min_deadline_ms / 1000, log=log, count=metrics.count_request, errors=ERRORS)


def _scored_items(answer: Answer) -> list[ranking_pb2.ScoredItem]:
    items = answer.items
    if items is None:
        return []
    return [ranking_pb2.ScoredItem(item_id=int(i), score=float(s), ctr=float(c), predicted_rating=float(r),
                                   retrieval_score=float(rs))
            for i, s, c, r, rs in zip(items.item_ids.tolist(), items.score.tolist(), items.ctr.tolist(),
                                      items.rating.tolist(), items.retrieval_score.tolist())]


def _count_degraded(answer: Answer) -> list[int]:
    flags = sorted(answer.degraded)
    for flag in flags:
        metrics.DEGRADED.labels(common_pb2.DegradedPath.Name(flag)).inc()
    return flags


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Recommend, Rank and RecordInteractions over the app's holder, pipeline, shadow and features."""

    def __init__(self, *, config: RankingConfig, holder: VersionHolder[ServingState], pipeline: Pipeline,
                 features: FeatureStore, shadow: Shadow, admission: Admission) -> None:
        self.config, self.holder, self.pipeline, self.features, self.shadow = config, holder, pipeline, features, shadow
        self.rpc = rpc(config, admission)

    def _current(self) -> ServingState:
        state = self.holder.current
        if state is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no model version loaded yet")
        return state

    async def Recommend(self, request: ranking_pb2.RecommendRequest, context) -> ranking_pb2.RecommendResponse:
        async def handle(call: Call) -> ranking_pb2.RecommendResponse:
            async with call.admitted():
                return await self._recommend(request, call)

        return await self.rpc.serve("Recommend", context, handle)

    async def _recommend(self, request: ranking_pb2.RecommendRequest, call: Call) -> ranking_pb2.RecommendResponse:
        state = self._current()
        state, arm = (self._pinned(request.version), ranking_pb2.ARM_PINNED) if request.version > 0 \
            else arms.route(self.holder, request.user_id, state)
        query = validation.recommend_query(request, state.spec, self.config)
        history_size = display.history_size(request.options)
        answer = await self.pipeline.recommend(state, query, call.deadline, call.request_id)
        if arm == ranking_pb2.ARM_CANARY and answer.ranking_version != state.version:
            arm = ranking_pb2.ARM_LIVE       # retrieval did not hold the candidate: the live version answered
        metrics.ARM_ANSWERS.labels(ranking_pb2.Arm.Name(arm)).inc()
        if arm == ranking_pb2.ARM_LIVE:
            self.shadow.maybe_start(request, answer, call.request_id)
        reply = ranking_pb2.RecommendResponse(items=_scored_items(answer), retrieval_version=answer.retrieval_version,
                                              ranking_version=answer.ranking_version,
                                              degraded=_count_degraded(answer), arm=arm)
        # titles from the version that answered (the previous one, while the two stages swap)
        answered = state if answer.ranking_version == state.version else self.holder.held(answer.ranking_version)
        if request.options.include_item_metadata and answered is not None:
            display.describe(answered, reply.items)
        if history_size and answered is not None:
            reply.history.extend(await display.history(self.features, answered, query.user_id, history_size))
        return reply

    def _pinned(self, version: int) -> ServingState:
        """The held state of a pinned version, else FAILED_PRECONDITION naming the held versions."""
        state = self.holder.held(version)
        if state is None:
            raise VersionNotHeld(f"version {version} is not held by the ranking service; held versions: "
                                 f"{self.holder.held_versions}")
        return state

    async def Rank(self, request: ranking_pb2.RankRequest, context) -> ranking_pb2.RankResponse:
        async def handle(call: Call) -> ranking_pb2.RankResponse:
            async with call.admitted():
                state = self._current()
                query = validation.rank_query(request, state.spec, self.config)
                answer = await self.pipeline.rank(state, query)
                reply = ranking_pb2.RankResponse(items=_scored_items(answer), ranking_version=answer.ranking_version,
                                                 degraded=_count_degraded(answer),
                                                 unknown_item_ids=answer.unknown_item_ids.tolist())
                if request.include_item_metadata:
                    display.describe(state, reply.items)
                return reply

        return await self.rpc.serve("Rank", context, handle)

    async def RecordInteractions(self, request: ranking_pb2.RecordInteractionsRequest,
                                 context) -> ranking_pb2.RecordInteractionsResponse:
        async def handle(call: Call) -> ranking_pb2.RecordInteractionsResponse:
            async with call.admitted():
                self._current()
                pairs = validation.interactions(request)
                recorded = await self.pipeline.record(pairs, min(call.left_s(), _RECORD_TIMEOUT_CAP_S))
                return ranking_pb2.RecordInteractionsResponse(recorded=recorded)

        return await self.rpc.serve("RecordInteractions", context, handle)
