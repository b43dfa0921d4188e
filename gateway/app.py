"""The gateway's HTTP routes: HTTP/JSON in, the ranking service's gRPC out, problem+json on failure.

``create_app(config)`` builds the FastAPI app; its lifespan opens the process's one ranking channel
(``gateway.ranking``). Routes translate, they don't decide: check the request against the proto's
limits (``gateway.schemas``), build the protobuf request, call ranking with the request's deadline
(``timeout_ms`` query parameter, else the ``X-Timeout-Ms`` header, else ``GATEWAY_DEFAULT_TIMEOUT_MS``)
and request id, and turn the reply into JSON or the gRPC status into an HTTP one (``gateway.problems``).

No ``from __future__ import annotations`` here: FastAPI evaluates the routes' annotations, and their
bounds close over the config (``le=config.max_k``), which a string annotation could not see.
"""

import contextlib
import http
import time
from pathlib import Path as FilePath
from typing import Annotated

import grpc
import swagger_ui_bundle
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException

from gateway import problems, schemas
from gateway.config import GatewayConfig
from gateway.edge import Edge
from gateway.ranking import RankingClient
from recsys_contracts.v1 import common_pb2, ranking_pb2
from recsys_serving.throttle import Throttled

STATIC_DIR = FilePath(__file__).resolve().parent / "static"
RANKING_THROTTLED = Counter("gateway_ranking_throttled", "Ranking calls the gateway's adaptive throttle answered "
                            "itself (never sent: ranking had been refusing), by method", ["method"])
RANKING_SECONDS = Histogram("gateway_ranking_seconds", "gRPC round trip to the ranking service, by method and code",
                            ["method", "code"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))


class RankingFailed(Exception):
    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.code().name)
        self.error = error


def _documented(*statuses: int) -> dict[int | str, dict]:
    schema = schemas.Problem.model_json_schema()
    return {status: {"description": http.HTTPStatus(status).phrase,
                     "content": {problems.MEDIA_TYPE: {"schema": schema}}} for status in statuses}


def _degraded(flags) -> list[str]:
    return [common_pb2.DegradedPath.Name(flag).removeprefix("DEGRADED_PATH_").lower() for flag in flags]


def _items(items) -> list[dict]:
    return [{"item_id": i.item_id, "score": i.score, "ctr": i.ctr, "predicted_rating": i.predicted_rating,
             "retrieval_score": i.retrieval_score, "title": i.title, "genres": list(i.genres)} for i in items]


def _features(features: schemas.UserFeatures | None) -> common_pb2.UserFeatures | None:
    if features is None:
        return None
    return common_pb2.UserFeatures(categorical=features.categorical, numeric=features.numeric,
                                   recent_item_ids=features.recent_item_ids)


def create_app(config: GatewayConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.ranking = RankingClient(config)   # one channel per process, in the serving loop
        try:
            yield
        finally:
            await app.state.ranking.close()

    app = FastAPI(title="recsys gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="HTTP/JSON in front of the ranking service's gRPC. Errors are "
                              "application/problem+json naming the field.")

    async def call(request: Request, method: str, message, timeout_s: float):
        """(reply, round trip ms) of one ranking RPC; a gRPC failure becomes ``RankingFailed``."""
        rpc = {"Recommend": app.state.ranking.recommend, "Rank": app.state.ranking.rank,
               "RecordInteractions": app.state.ranking.record}[method]
        started = time.perf_counter()
        try:
            reply = await rpc(message, timeout_s, request.state.request_id)
        except Throttled as error:           # never sent: no round trip to time
            RANKING_THROTTLED.labels(method).inc()
            raise RankingFailed(error) from None
        except grpc.aio.AioRpcError as error:
            RANKING_SECONDS.labels(method, error.code().name).observe(time.perf_counter() - started)
            raise RankingFailed(error) from None
        RANKING_SECONDS.labels(method, "OK").observe(time.perf_counter() - started)
        return reply, round((time.perf_counter() - started) * 1000, 3)

    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a hand-off per request
    async def timeout_s(timeout_ms: Annotated[int, Query(
                      ge=0, le=config.max_timeout_ms, description="Deadline in ms, passed to gRPC; 0 = unset.")] = 0,
                  x_timeout_ms: Annotated[int, Header(
                      ge=0, le=config.max_timeout_ms, description="Deadline in ms (the query parameter wins); "
                                                                        "0 = unset.")] = 0) -> float:
        chosen = timeout_ms or x_timeout_ms or config.default_timeout_ms
        return chosen / 1000

    Deadline = Annotated[float, Depends(timeout_s)]

    @app.exception_handler(RankingFailed)
    async def ranking_failed(request: Request, failure: RankingFailed) -> JSONResponse:
        return problems.from_rpc_error(failure.error, request.state.request_id, config.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return problems.from_validation_errors(list(error.errors()), request.state.request_id)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        field = "body" if error.status_code == 413 else None
        return problems.problem(error.status_code, str(error.detail), request.state.request_id, field=field,
                                headers=error.headers)

    @app.get("/v1/users/{user_id}/recommendations", response_model=schemas.Recommendations,
             responses=_documented(400, 404, 413, 429, 503, 504), tags=["recommend"])
    async def recommendations(
            request: Request, deadline: Deadline,
            user_id: Annotated[str, Path(min_length=1, max_length=schemas.MAX_USER_ID_BYTES,
                                         pattern=r"^[^\s{}/]+$", description="External user id (no '/').")],
            k: Annotated[int, Query(ge=1, le=config.max_k, description="Items wanted.")] = 10,
            diversity: Annotated[float | None, Query(ge=0.0, le=1.0, description="MMR strength; unset = server default.")] = None,
            num_candidates: Annotated[int, Query(ge=0, le=config.max_candidates,
                                                 description="Candidates to retrieve: 0 (server default) or >= k.")] = 0,
            include_seen: bool = False,
            include_metadata: Annotated[bool, Query(description="Titles and genres from the served version.")] = True,
            history: Annotated[int, Query(ge=0, le=schemas.MAX_HISTORY, description="Recent interactions to return.")] = 0,
            timestamp_s: Annotated[int, Query(ge=0, lt=schemas.MAX_TIMESTAMP_S, description="Request time; 0 = now.")] = 0,
    ) -> dict:
        problem = _user_id_problem(user_id, request) or _candidates_problem(num_candidates, k, request)
        if problem is not None:
            return problem
        options = ranking_pb2.RecommendOptions(num_candidates=num_candidates, include_seen=include_seen,
                                               include_item_metadata=include_metadata, history_size=history)
        if diversity is not None:
            options.diversity = diversity
        message = ranking_pb2.RecommendRequest(user_id=user_id, k=k, options=options,
                                               context=common_pb2.Context(timestamp_s=timestamp_s))
        reply, latency_ms = await call(request, "Recommend", message, deadline)
        return {"user_id": user_id, "items": _items(reply.items), "retrieval_version": reply.retrieval_version,
                "ranking_version": reply.ranking_version, "degraded": _degraded(reply.degraded),
                "history": [{"item_id": h.item_id, "timestamp_s": h.timestamp_s, "title": h.title,
                             "genres": list(h.genres), "fresh": h.fresh} for h in reply.history],
                "latency_ms": latency_ms, "request_id": request.state.request_id}

    @app.post("/v1/rank", response_model=schemas.Ranked, responses=_documented(400, 404, 413, 429, 503, 504),
              tags=["recommend"])
    async def rank(request: Request, body: schemas.RankBody, deadline: Deadline) -> dict:
        if len(body.item_ids) > config.max_candidates:
            return problems.problem(400, f"item_ids must hold 1..{config.max_candidates} ids, got "
                                         f"{len(body.item_ids)}", request.state.request_id, field="item_ids")
        message = ranking_pb2.RankRequest(user_id=body.user_id, item_ids=body.item_ids,
                                          context=common_pb2.Context(timestamp_s=body.timestamp_s),
                                          user_features=_features(body.user_features),
                                          include_item_metadata=body.include_metadata)
        reply, latency_ms = await call(request, "Rank", message, deadline)
        return {"user_id": body.user_id, "items": _items(reply.items), "ranking_version": reply.ranking_version,
                "degraded": _degraded(reply.degraded), "unknown_item_ids": list(reply.unknown_item_ids),
                "latency_ms": latency_ms, "request_id": request.state.request_id}

    @app.post("/v1/interactions", response_model=schemas.Recorded,
              responses=_documented(400, 404, 413, 429, 503, 504), tags=["interactions"])
    async def interactions(request: Request, body: schemas.InteractionsBody, deadline: Deadline) -> dict:
        message = ranking_pb2.RecordInteractionsRequest(interactions=[
            common_pb2.Interaction(user_id=i.user_id, item_id=i.item_id, rating=i.rating, timestamp_s=i.timestamp_s)
            if i.rating is not None else
            common_pb2.Interaction(user_id=i.user_id, item_id=i.item_id, timestamp_s=i.timestamp_s)
            for i in body.interactions])
        reply, _ = await call(request, "RecordInteractions", message, deadline)
        return {"recorded": reply.recorded, "request_id": request.state.request_id}

    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz() -> dict:
        """Live: the process answers HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Health, tags=["health"],
             responses={503: {"model": schemas.Health, "description": "ranking is not SERVING"},
                        **_documented(400)})
    async def readyz(deadline: Deadline):
        """Ready: the ranking service reports SERVING over the gateway's own channel."""
        if await app.state.ranking.serving(deadline):
            return {"status": "serving"}
        return JSONResponse({"status": "not_serving"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        # Swagger UI from the pinned swagger-ui-bundle, served here: FastAPI's default loads it from a CDN.
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="recsys gateway: API docs",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    app.openapi = lambda: _openapi(app)
    app.add_middleware(Edge, max_body_bytes=config.max_body_bytes)
    return app


def _user_id_problem(user_id: str, request: Request) -> JSONResponse | None:
    size = len(user_id.encode("utf-8", errors="surrogatepass"))
    if size > schemas.MAX_USER_ID_BYTES:
        return problems.problem(400, f"user_id must be 1..{schemas.MAX_USER_ID_BYTES} bytes of UTF-8, got {size} "
                                     f"bytes: {problems.clip(user_id)}", request.state.request_id, field="user_id")
    return None


def _candidates_problem(num_candidates: int, k: int, request: Request) -> JSONResponse | None:
    if num_candidates and num_candidates < k:
        return problems.problem(400, f"num_candidates must be 0 or >= k ({k}), got {num_candidates}",
                                request.state.request_id, field="num_candidates")
    return None


def _openapi(app: FastAPI) -> dict:
    """The generated document without FastAPI's 422 entries: validation errors are 400 problem+json here."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in document["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = document
    return app.openapi_schema
