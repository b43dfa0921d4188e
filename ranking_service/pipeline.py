"""The ranking pipeline: Recommend (stream, score, select), Rank and RecordInteractions, gRPC-free.

Recommend, for one ``ServingState`` snapshot:

1. the user's record is read (one Redis round trip), then ``Retrieve`` is opened with it
   (``RetrieveRequest.stored_user``: retrieval uses it instead of reading Redis again, so a
   Recommend reads the user once) and with the remaining deadline minus a reserve kept for the
   fallback (``fallback_reserve_s``);
2. each candidate chunk, as it arrives, is filtered (items already taken, and the user's seen +
   fresh + recent items unless ``include_seen``) and handed to the DCN micro-batcher; finished
   chunks are merged into a running top-k (the whole pool when MMR will re-rank it);
3. if retrieval fails, times out or is unreachable, the version's popular items fill the pool
   (flag POPULAR_FALLBACK) or, when configured, the request fails UNAVAILABLE; after
   ``RANKING_RETRIEVAL_BREAKER_FAILURES`` such failures in a row a circuit breaker
   (``recsys_serving.breaker``) skips retrieval for ``RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS`` and
   goes straight to that fallback (failure code CIRCUIT_OPEN), then lets one probe through: a
   frozen retrieval would otherwise hold every Recommend for most of its deadline, and its
   admission slot with it. A refusal (RESOURCE_EXHAUSTED) is fast and does not count, nor does a
   call the client's adaptive throttle did not send while retrieval refuses (THROTTLED). A call still
   waiting after ``RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER`` x retrieval's recent p99 (at least
   ``RANKING_RETRIEVAL_TIMEOUT_FLOOR_MS``; ``recsys_serving.latency``) keeps waiting, and counts
   towards the breaker at once when retrieval has answered no call at all since it began; when the
   breaker opens, every call past its cut stops waiting and is answered from popular items (SLOW). A
   frozen retrieval thus opens the breaker within tens of milliseconds, while a slow call of a
   retrieval that still answers others (a version loading) gets its answer;
4. the best k come out in score order, or in MMR order over the item embeddings.

Every answer comes from one version: the Retrieve call asks for the version this request started
on, with this service's other held versions as fallbacks, and the candidates are ranked by
whichever version retrieval answered from when this service still holds it (``held``: its current,
previous or a retained one), its features read under that version. Both services keep a version
loaded while the other still uses it (``VersionHolder.used``), so even when versions go live faster
than the services load them (each skipping some), retrieval_version == ranking_version.

A retrieval refusal of a field we passed through (``RetrievalRefused``, a ValueError) is the caller's
error, so it surfaces as one, not as a fallback. No gRPC here: the retrieval client turns a failed
call into ``RetrievalFailed`` (its status code's name), and the servicer maps exceptions to codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ranking_service import metrics
from ranking_service.batching import MAX_ROWS, MicroBatcher
from ranking_service.features import FeatureStore
from recsys_serving.features import UserView
from ranking_service.retrieval_client import THROTTLED, CandidateSource, RetrievalFailed, RetrievalRefused
from ranking_service.selection import RunningTopK, Scored, best_first, mmr_order
from ranking_service.state import ServingState, ranker_inputs, retrieval_scores
from ranking_service.validation import RankQuery, RecommendQuery
from recsys_contracts.feature_store import FreshInteraction
from recsys_contracts.ids import in_sorted
from recsys_contracts.v1 import common_pb2
from recsys_serving import wire
from recsys_serving.breaker import CircuitBreaker, State as BreakerState
from recsys_serving.latency import AdaptiveTimeout
from recsys_serving.reload import VersionHolder

log = logging.getLogger(__name__)
CIRCUIT_OPEN = "CIRCUIT_OPEN"   # the failure code of a Recommend that skipped retrieval (breaker open)
SLOW = "SLOW"                   # the failure code of a Retrieve past the adaptive cut when the breaker opened
BREAKER_MIN_BUDGET_S = 0.05     # a retrieval timeout counts towards the breaker only with this much time given


class RetrievalUnavailable(Exception):
    """Retrieval failed and the server is configured not to fall back (RANKING_FALLBACK=unavailable)."""


class VersionNotHeld(Exception):
    """A request pinned a version that a service does not hold (FAILED_PRECONDITION)."""


@dataclass(frozen=True, eq=False)
class Answer:
    items: Scored | None            # best first; None = no candidate survived
    ranking_version: int
    retrieval_version: int = 0
    degraded: frozenset[int] = frozenset()
    unknown_item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def fallback_reserve_s(remaining_s: float) -> float:
    """Time kept back from retrieval for the popular fallback: 20 % of what is left, in [5, 50] ms."""
    return min(max(0.2 * remaining_s, 0.005), 0.05)


@dataclass(eq=False)
class _Wait:
    """One Retrieve call's wait: its timeout (rescheduled to now when it is cut), when it began, whether
    it was counted towards the breaker past the adaptive cut (a suspect of a silent retrieval) and
    whether it was cut."""

    timeout: asyncio.Timeout
    started: float                 # loop.time() when the call began
    suspected: bool = False
    cut: bool = False


class _Pool:
    """The candidates of one Recommend: dedupe and exclusion, scoring tasks, the running top-k."""

    def __init__(self, pipeline: Pipeline, state: ServingState, query: RecommendQuery, view: UserView) -> None:
        self.pipeline, self.state, self.query, self.view = pipeline, state, query, view
        self.top = RunningTopK(query.k if query.diversity == 0 else query.num_candidates)
        self.taken = np.zeros(0, dtype=np.int64)     # ids already in the pool (sorted)
        self.tasks: list[asyncio.Task] = []
        self.unknown = False
        self.model_fallback = False

    def add(self, ids: np.ndarray, retrieval_scores: np.ndarray, limit: int | None = None) -> None:
        keep = ~in_sorted(ids, self.taken)
        if not self.query.include_seen:
            keep &= ~in_sorted(ids, self.view.exclude_ids)
        ids, retrieval_scores = ids[keep], retrieval_scores[keep]
        _, first = np.unique(ids, return_index=True)
        first = np.sort(first)[:limit]                # a repeated id keeps its first occurrence
        ids, retrieval_scores = ids[first], retrieval_scores[first]
        if ids.size == 0:
            return
        arrival = np.arange(self.taken.size, self.taken.size + ids.size, dtype=np.int64)
        self.taken = np.sort(np.concatenate([self.taken, ids]))   # disjoint: their union, sorted
        self.harvest()
        self.tasks.append(asyncio.ensure_future(self.pipeline.score(
            self.state, self.view, self.query.timestamp, ids, retrieval_scores, arrival)))

    def harvest(self) -> None:
        """Merges finished chunks into the running top-k (running, so the pool stays small)."""
        for task in [t for t in self.tasks if t.done()]:
            self.tasks.remove(task)
            self._merge(task.result())

    def _merge(self, scored: Scored) -> None:
        self.unknown |= bool((scored.item_idx == 0).any())
        self.model_fallback |= model_fell_back(scored)
        self.top.add(scored)

    async def finish(self) -> Scored | None:
        for scored in await asyncio.gather(*self.tasks):
            self._merge(scored)
        self.tasks.clear()
        return self.top.ranked()

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class Pipeline:
    def __init__(self, *, features: FeatureStore, batcher: MicroBatcher, candidates: CandidateSource,
                 fallback: str, breaker: CircuitBreaker, holder: VersionHolder[ServingState],
                 retrieval_timeout: AdaptiveTimeout | None = None) -> None:
        self.features, self.batcher, self.candidates, self.fallback = features, batcher, candidates, fallback
        self.breaker = breaker
        self.retrieval_timeout = retrieval_timeout   # None: a Retrieve may take the request's whole budget
        self._suspects: set[_Wait] = set()           # Retrieve calls past the adaptive cut, still waiting
        self._answered_at = -float("inf")            # loop.time() of retrieval's latest answer to any call
        self.holder = holder           # the versions this service holds (current, previous, candidate, retained)

    async def score(self, state: ServingState, view: UserView, timestamp: int, ids: np.ndarray,
                    retrieval_scores: np.ndarray, arrival: np.ndarray) -> Scored:
        """DCN scores of ``ids`` (N,) for the user, in pieces of at most MAX_ROWS rows."""
        idx = state.items.indices(ids)
        pieces = []
        for start in range(0, ids.size, MAX_ROWS):
            part = slice(start, start + MAX_ROWS)
            inputs = ranker_inputs(state, user_idx=view.user_idx, user_cat=view.cat, user_num=view.num,
                                   history=view.history, timestamp=timestamp, item_idx=idx[part],
                                   retrieval_score=retrieval_scores[part])
            pieces.append(self.batcher.score(state.ranker, inputs))
        # one piece (up to MAX_ROWS candidates, the usual case) is awaited as is: no gather task
        results = [await pieces[0]] if len(pieces) == 1 else await asyncio.gather(*pieces)
        ctr = np.concatenate([r[0] for r in results])
        rating = np.concatenate([r[1] for r in results])
        retrieval_scores = retrieval_scores.astype(np.float32)
        score = state.score_rule.apply(ctr, rating)
        bad = ~(np.isfinite(score) & np.isfinite(ctr) & np.isfinite(rating) & np.isfinite(retrieval_scores))
        if bad.any():
            score, ctr, rating, retrieval_scores = _finite_fallback(state, bad, score, ctr, rating, retrieval_scores)
        return Scored(item_ids=ids, item_idx=idx, arrival=arrival, score=score, ctr=ctr, rating=rating,
                      retrieval_score=retrieval_scores)

    async def recommend(self, state: ServingState, query: RecommendQuery, deadline: float,
                        request_id: str) -> Answer:
        """``deadline`` is in ``loop.time()`` seconds; the caller bounds the whole call by it."""
        read = await self.features.read_user(state.version, query.user_id)
        view = self.features.view(state, query.user_id, read, query.overrides)
        if read.from_redis:           # retrieval answering from this version takes our read
            query.retrieve.stored_user.CopyFrom(wire.stored_user_message(state.version, read.record))
        pools: list[_Pool] = []       # at most one; a list so the finally clause sees it
        try:
            retrieval_version, flags, failure = await self._retrieve(state, query, deadline, request_id,
                                                                     view, pools)
            if not pools:
                pools.append(_Pool(self, state, query, view))
            pool = pools[0]
            state = pool.state                         # the version retrieval answered from, when held
            if failure:
                self._fall_back(state, pool, failure, request_id)
                flags.add(common_pb2.DEGRADED_PATH_POPULAR_FALLBACK)
            ranked = await pool.finish()
        finally:
            for pool in pools:
                pool.cancel()
        flags |= pool.view.degraded
        if pool.unknown:
            flags.add(common_pb2.DEGRADED_PATH_UNKNOWN_ITEMS)
        if pool.model_fallback:
            flags.add(common_pb2.DEGRADED_PATH_MODEL_FALLBACK)
        return Answer(items=_select(state, ranked, query), ranking_version=state.version,
                      retrieval_version=retrieval_version, degraded=frozenset(flags))

    async def _retrieve(self, state: ServingState, query: RecommendQuery, deadline: float, request_id: str,
                        view: UserView, pools: list[_Pool]) -> tuple[int, set[int], str]:
        """Streams candidates into a pool; (retrieval version, its flags, failure code name or "")."""
        loop = asyncio.get_running_loop()
        retrieval_deadline = deadline - fallback_reserve_s(deadline - loop.time())
        retrieval_version, flags = 0, set()
        if not self.breaker.allow():
            return retrieval_version, flags, CIRCUIT_OPEN
        suspect_at = None                        # when this call becomes a suspect (the adaptive cut)
        if self.retrieval_timeout is not None:
            cut_s = self.retrieval_timeout.timeout_s()
            metrics.RETRIEVAL_TIMEOUT.set(cut_s or 0.0)
            if cut_s is not None and loop.time() + cut_s < retrieval_deadline:
                suspect_at = loop.time() + cut_s
        budget_s = retrieval_deadline - loop.time()
        started = time.perf_counter()
        # this request's own message: answer from our version, else from another one we hold
        query.retrieve.version = state.version
        # (never the arms' candidate: only a canary request ranks with it, and asks for it)
        query.retrieve.fallback_versions[:] = [] if query.pinned_version else \
            [v for v in self.holder.held_versions if v not in (state.version, self.holder.candidate_version)]
        wait: _Wait | None = None
        try:
            async with asyncio.timeout_at(retrieval_deadline) as timeout:
                wait = _Wait(timeout, loop.time())
                watch = None if suspect_at is None else loop.call_at(suspect_at, self._suspect, wait)
                try:
                    stream = self.candidates.stream(query.retrieve, max(retrieval_deadline - loop.time(), 0.001),
                                                    request_id)
                    async for chunk in stream:
                        retrieval_version = chunk.model_version
                        flags.update(chunk.degraded)
                        if not pools:
                            pools.append(await self._pool_for(state, retrieval_version, query, view))
                        if len(chunk.item_ids) != len(chunk.scores):   # a broken peer: a failed retrieval
                            log.error("retrieval sent a chunk with %d item_ids but %d scores (expected equal "
                                      "lengths)", len(chunk.item_ids), len(chunk.scores),
                                      extra={"request_id": request_id})
                            self.breaker.record_failure()
                            return retrieval_version, flags, "DATA_LOSS"
                        pools[0].add(np.array(chunk.item_ids, dtype=np.int64),
                                     np.array(chunk.scores, dtype=np.float32))
                finally:
                    if watch is not None:
                        watch.cancel()
                    self._suspects.discard(wait)
        except RetrievalRefused:
            self._answered_at = loop.time()
            self.breaker.record_success()          # retrieval answered: the request was bad
            raise
        except RetrievalFailed as error:
            if error.code == "RESOURCE_EXHAUSTED":
                self._answered_at = loop.time()
                self.breaker.record_success()      # a fast, deliberate refusal: retrieval is alive
            elif error.code == THROTTLED:          # not sent: no evidence either way
                self.breaker.release_probe()       # (if it was the half-open probe, the next call probes)
            elif wait is None or not wait.suspected:   # a suspect was counted at the cut already
                self.breaker.record_failure(error)
            if error.code == "DEADLINE_EXCEEDED":  # gRPC's timeout fired before ours: the same outcome
                self._observe(started)
            return retrieval_version, flags, error.code
        except TimeoutError as error:
            self._observe(started)
            suspected, cut = (False, False) if wait is None else (wait.suspected, wait.cut)
            if not suspected and budget_s >= BREAKER_MIN_BUDGET_S:   # a caller's tiny deadline is no
                self.breaker.record_failure(error)                    # evidence against retrieval
            return retrieval_version, flags, SLOW if cut else "DEADLINE_EXCEEDED"
        self._answered_at = loop.time()
        self.breaker.record_success()              # a suspect that answered after all clears the count too
        metrics.STAGE_SECONDS.labels("retrieval_stream").observe(self._observe(started))
        return retrieval_version, flags, ""

    def _observe(self, started: float) -> float:
        """The call's wait so far, fed to the adaptive timeout (timed-out calls too: a retrieval that slows
        down for good then raises the cut instead of being cut for ever)."""
        elapsed = time.perf_counter() - started
        if self.retrieval_timeout is not None:
            self.retrieval_timeout.observe(elapsed)
        return elapsed

    def _suspect(self, wait: _Wait) -> None:
        """A Retrieve ran past the adaptive cut and keeps waiting (a slow answer is still an answer). When
        retrieval has answered no call at all since this one began (silent, as in a freeze), the call
        counts once towards the breaker; a retrieval that answers others, only slower (a version
        loading), gets no count. Once the breaker opens (enough silent calls in a row, or the half-open
        probe stuck), every call past its cut stops waiting: answered from popular items at once (SLOW)
        instead of at the end of its budget."""
        self._suspects.add(wait)
        if self._answered_at > wait.started:
            return
        wait.suspected = True
        self.breaker.record_failure(None)
        if self.breaker.state is BreakerState.OPEN:
            now = asyncio.get_running_loop().time()
            for stuck in self._suspects:
                stuck.cut = True
                stuck.timeout.reschedule(now)
            self._suspects.clear()

    async def _pool_for(self, state: ServingState, version: int, query: RecommendQuery, view: UserView) -> _Pool:
        """The pool ranked by ``version``'s state: ours, else the held one retrieval answered from
        (its user features read under that version), else ours (a mixed answer, counted). The
        request's features were encoded with our spec: another version's must encode them alike."""
        if query.pinned_version and version != state.version:
            raise VersionNotHeld(f"version {query.pinned_version} is not held by the retrieval service "
                                 f"(it answered from version {version})")
        matching = None if version == state.version else self.holder.held(version)
        if matching is not None and query.overrides.has_features and \
                (matching.spec.user_categorical, matching.spec.user_numeric) != \
                (state.spec.user_categorical, state.spec.user_numeric):
            matching = None
        if version == state.version:
            metrics.VERSION_MATCH.labels("same").inc()
            self.holder.used(version)
        elif matching is not None:
            metrics.VERSION_MATCH.labels("held").inc()
            self.holder.used(version)   # retrieval still answers from it: keep it loaded
            return _Pool(self, matching, query, await self.features.user_view(matching, query.user_id,
                                                                              query.overrides))
        else:
            metrics.VERSION_MATCH.labels("mixed").inc()
        return _Pool(self, state, query, view)

    def _fall_back(self, state: ServingState, pool: _Pool, failure: str, request_id: str) -> None:
        """Fills the pool up to num_candidates with popular items (chunks already scored stay); their
        retrieval score, fed to the DCN and returned, is log(1 + training count) as in retrieval's own
        popular fallback."""
        metrics.RETRIEVAL_FAILURES.labels(failure).inc()
        if self.fallback == "unavailable":
            raise RetrievalUnavailable(f"the retrieval service failed ({failure}) and fallback is disabled")
        # Not logged when the breaker is open (it logs when it opens) or retrieval refused (overload:
        # a line per request would be CPU spent under overload); both are counted above.
        if failure not in (CIRCUIT_OPEN, "RESOURCE_EXHAUSTED", THROTTLED):
            log.warning("retrieval failed (%s): answering from popular items", failure,
                        extra={"request_id": request_id})
        popular = state.tables.popular_items                       # (m,) item indices, most popular first
        room = pool.query.num_candidates - pool.taken.size
        pool.add(state.tables.item_ids[popular], state.popular_scores[popular], limit=max(room, 0))

    async def rank(self, state: ServingState, query: RankQuery) -> Answer:
        view = await self.features.user_view(state, query.user_id, query.overrides)
        scores = retrieval_scores(state, user_idx=view.user_idx, user_cat=view.cat, user_num=view.num,
                                  history=view.history, timestamp=query.timestamp,
                                  item_idx=state.items.indices(query.item_ids))
        scored = await self.score(state, view, query.timestamp, query.item_ids, scores,
                                  np.arange(query.item_ids.size, dtype=np.int64))
        unknown = query.item_ids[scored.item_idx == 0]
        flags = set(view.degraded) | ({common_pb2.DEGRADED_PATH_UNKNOWN_ITEMS} if unknown.size else set())
        if model_fell_back(scored):
            flags.add(common_pb2.DEGRADED_PATH_MODEL_FALLBACK)
        return Answer(items=scored.take(best_first(scored)), ranking_version=state.version,
                      degraded=frozenset(flags), unknown_item_ids=unknown)

    async def record(self, pairs: list[tuple[str, FreshInteraction]], timeout_s: float) -> int:
        return await self.features.record(pairs, timeout_s)


def _finite_fallback(state: ServingState, bad: np.ndarray, score: np.ndarray, ctr: np.ndarray, rating: np.ndarray,
                     retrieval_scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows whose model output is not finite: ctr 0, the rating range's floor, and a score in
    (-2, -1) that keeps their retrieval order below every real score (real scores are >= 0: a CTR,
    times a non-negative rating ratio). ``model_fell_back`` reads that sign; the answer is flagged."""
    metrics.MODEL_FALLBACK_ROWS.inc(int(bad.sum()))
    retrieval_scores = np.where(np.isfinite(retrieval_scores), retrieval_scores, np.float32(0.0)).astype(np.float32)
    with np.errstate(over="ignore"):
        order = (1.0 / (1.0 + np.exp(-retrieval_scores.astype(np.float64)))).astype(np.float32)   # (0, 1)
    return (np.where(bad, order - np.float32(2.0), score).astype(np.float32),
            np.where(bad, np.float32(0.0), ctr).astype(np.float32),
            np.where(bad, np.float32(state.tables.spec.rating_min), rating).astype(np.float32),
            retrieval_scores)


def model_fell_back(scored: Scored | None) -> bool:
    """True when some rows got ``_finite_fallback``'s scores (only those are negative)."""
    return scored is not None and bool((scored.score < 0).any())


def _select(state: ServingState, ranked: Scored | None, query: RecommendQuery) -> Scored | None:
    if ranked is None:
        return None
    if query.diversity == 0:
        return ranked.take(np.arange(min(query.k, len(ranked))))
    order = mmr_order(ranked.score, state.item_embeddings[ranked.item_idx], query.k, query.diversity)
    return ranked.take(order)
