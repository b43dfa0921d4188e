"""The gateway over real HTTP in front of real retrieval + ranking servers: answers, status mapping,
problem+json bodies naming the field, request ids, deadlines, size limits, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from gateway import problems
from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc
from tests.gateway.harness import running

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack.base_url, timeout=10) as session:
        yield session


def _ranking_calls(method: str) -> float:
    """RPCs of ``method`` the in-process ranking service has answered so far, whatever their code."""
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "ranking_requests"
               for sample in metric.samples
               if sample.name == "ranking_requests_total" and sample.labels["method"] == method)


def _problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["detail"] and body["request_id"] == response.headers["x-request-id"]
    if field is not None:
        assert body["field"] == field, body
    return body


def test_recommendations_carry_titles_scores_versions_and_history(client):
    response = client.get("/v1/users/1/recommendations", params={"k": 5, "history": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["items"]) == 5 and body["ranking_version"] == 1 and body["retrieval_version"] == 1
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    for item in body["items"]:
        assert item["title"].startswith(f"Synthetic Movie {item['item_id']}"), item
        assert item["genres"] and 0 <= item["ctr"] <= 1
    assert len(body["history"]) == 4
    times = [entry["timestamp_s"] for entry in body["history"]]
    assert times == sorted(times, reverse=True) and all(entry["title"] for entry in body["history"])
    assert body["latency_ms"] > 0


def test_metadata_and_history_are_left_out_when_not_asked(client):
    body = client.get("/v1/users/1/recommendations", params={"k": 3, "include_metadata": "false"}).json()
    assert [item["title"] for item in body["items"]] == ["", "", ""] and body["history"] == []


def test_watched_item_leaves_the_list_and_enters_the_history(client):
    before = client.get("/v1/users/7/recommendations", params={"k": 5, "history": 3}).json()
    first = before["items"][0]["item_id"]
    recorded = client.post("/v1/interactions", json={"interactions": [{"user_id": "7", "item_id": first}]})
    assert recorded.status_code == 200 and recorded.json()["recorded"] == 1
    after = client.get("/v1/users/7/recommendations", params={"k": 5, "history": 3}).json()
    assert first not in [item["item_id"] for item in after["items"]]
    assert after["history"][0]["item_id"] == first and after["history"][0]["fresh"] is True


def test_rank_scores_the_given_items_best_first(client):
    response = client.post("/v1/rank", json={"user_id": "2", "item_ids": [3, 1, 2, 3, 999999]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(item["item_id"] for item in body["items"]) == [1, 2, 3, 999999]
    assert body["unknown_item_ids"] == [999999] and "unknown_items" in body["degraded"]
    assert {item["title"] for item in body["items"] if item["item_id"] != 999999} != {""}


@pytest.mark.parametrize("path, field", [
    ("/v1/users/1/recommendations?k=0", "k"),
    ("/v1/users/1/recommendations?k=101", "k"),
    ("/v1/users/1/recommendations?k=ten", "k"),
    ("/v1/users/1/recommendations?diversity=nan", "diversity"),
    ("/v1/users/1/recommendations?k=10&num_candidates=5", "num_candidates"),
    ("/v1/users/1/recommendations?history=51", "history"),
    ("/v1/users/1/recommendations?timestamp_s=-1", "timestamp_s"),
    ("/v1/users/" + "u" * 129 + "/recommendations", "user_id"),
    ("/v1/users/" + "é" * 65 + "/recommendations", "user_id"),      # 65 characters, 130 bytes
    ("/v1/users/a%7Bb/recommendations", "user_id"),
    ("/v1/users/1/recommendations?timeout_ms=-1", "timeout_ms"),
    ("/v1/users/1/recommendations?timeout_ms=30001", "timeout_ms"),
])
def test_bad_query_is_400_naming_the_field(client, path, field):
    before = _ranking_calls("Recommend")
    body = _problem(client.get(path), 400, field)
    assert len(body["detail"]) < 300
    assert _ranking_calls("Recommend") == before, "refused by the gateway: nothing reaches ranking"


@pytest.mark.parametrize("body, field", [
    ({"user_id": "1"}, "item_ids"),
    ({"user_id": "1", "item_ids": []}, "item_ids"),
    ({"user_id": "1", "item_ids": [-1]}, "item_ids.0"),
    ({"user_id": "1", "item_ids": [2**63]}, "item_ids.0"),
    ({"user_id": "", "item_ids": [1]}, "user_id"),
    ({"user_id": "1", "item_ids": [1], "surprise": 1}, "surprise"),
    ({"user_id": "1", "item_ids": list(range(1001))}, "item_ids"),
    ({"user_id": "1", "item_ids": [1], "user_features": {"recent_item_ids": list(range(201))}},
     "user_features.recent_item_ids"),
    ({"user_id": "1", "item_ids": [1], "user_features": {"categorical": {"nope": "x"}}}, "user_features"),
])
def test_bad_rank_body_is_400_naming_the_field(client, body, field):
    before = _ranking_calls("Rank")
    _problem(client.post("/v1/rank", json=body), 400, field)
    # only the version knows its feature names: that one is ranking's refusal, passed on
    assert _ranking_calls("Rank") == before + (field == "user_features")


def test_non_json_and_non_finite_bodies_are_400(client):
    before = _ranking_calls("Rank") + _ranking_calls("RecordInteractions")
    _problem(client.post("/v1/rank", content=b"{user_id: 1", headers={"content-type": "application/json"}), 400, "body")
    nan = b'{"interactions": [{"user_id": "1", "item_id": 1, "rating": NaN}]}'
    _problem(client.post("/v1/interactions", content=nan, headers={"content-type": "application/json"}), 400,
             "interactions.0.rating")
    _problem(client.post("/v1/interactions", json={"interactions": []}), 400, "interactions")
    assert _ranking_calls("Rank") + _ranking_calls("RecordInteractions") == before


def test_huge_bodies_are_413_declared_or_streamed(client):
    limit = 1024 * 1024
    _problem(client.post("/v1/rank", content=b" " * (limit + 1), headers={"content-type": "application/json"}),
             413, "body")

    def chunks():
        for _ in range(2 * limit // 65536):
            yield b" " * 65536

    _problem(client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"}), 413, "body")


def test_request_id_goes_in_comes_out_and_is_what_ranking_logs(client, caplog):
    caplog.set_level(logging.INFO, logger="ranking_service.servicer")
    response = client.get("/v1/users/3/recommendations", headers={"X-Request-Id": "trace-me.42"})
    assert response.headers["x-request-id"] == "trace-me.42" and response.json()["request_id"] == "trace-me.42"
    # the ranking service writes a log line for each call it refuses (here: a feature name it does not know)
    refused = client.post("/v1/rank", json={"user_id": "3", "item_ids": [1], "user_features": {"numeric": {"x": 1}}},
                          headers={"X-Request-Id": "trace-me.43"})
    assert refused.headers["x-request-id"] == "trace-me.43" and refused.status_code == 400
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-me.43"]
    assert logged and logged[0].code == "INVALID_ARGUMENT"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    _problem(client.get("/healthz", headers={"X-Request-Id": "spaces are not allowed"}), 400, "X-Request-Id")


def test_the_deadline_reaches_ranking(published, loaded, retrieval_loaded):
    # Ranking refuses, naming what it received, a call that leaves less than its RANKING_MIN_DEADLINE_MS
    # (500 ms here): its message shows the deadline the gateway passed on, with time to spare for it.
    root, _ = published
    with running(root, loaded, retrieval_loaded, ranking={"min_deadline_ms": 500}) as strict, \
            httpx.Client(base_url=strict.base_url, timeout=10) as session:
        by_query = _problem(session.get("/v1/users/1/recommendations", params={"timeout_ms": 300}), 504)
        by_header = _problem(session.get("/v1/users/1/recommendations", headers={"X-Timeout-Ms": "300"}), 504)
        assert session.get("/v1/users/1/recommendations", headers={"X-Timeout-Ms": "5000"}).status_code == 200
    for body in (by_query, by_header):
        received = re.search(r"deadline must leave at least 500 ms, got ([\d.]+) ms", body["detail"])
        # not ranking's 2000 ms default (a little over 300: the grpc-timeout header rounds up)
        assert received and 0 < float(received.group(1)) <= 305, body["detail"]


def test_health_metrics_docs_and_page(client):
    assert client.get("/v1/users/1/recommendations?k=3").status_code == 200     # counted in /metrics below
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "serving"}
    assert 'gateway_requests_total{route="/v1/users/{user_id}/recommendations",status="200"}' in client.get("/metrics").text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/rank", "/v1/interactions"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "https://" not in docs.text and "cdn" not in docs.text.lower()          # served here, no CDN
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "/static/page.js" in page.text
    assert "http" not in client.get("/static/page.js").text.replace("http-equiv", "")   # no external fetches


def test_ranking_down_is_503_and_not_ready(published):
    root, _ = published
    with running(root) as down, httpx.Client(base_url=down.base_url, timeout=10) as session:
        _problem(session.get("/v1/users/1/recommendations"), 503)
        assert session.get("/readyz").status_code == 503
        assert session.get("/healthz").status_code == 200


def test_too_many_in_flight_is_429_with_retry_after(published, loaded, retrieval_loaded):
    root, _ = published
    with running(root, loaded, retrieval_loaded, ranking={"max_in_flight": 1, "max_concurrency": 1}) as busy, \
            httpx.Client(base_url=busy.base_url, timeout=10) as session:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: session.get("/v1/users/1/recommendations?num_candidates=150"),
                                      range(48)))
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 429} and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    detail = _problem(refused, 429)["detail"]     # ranking's admission: full, or not within the deadline
    assert ("too many requests in flight" in detail or "cannot finish within the deadline" in detail
            or "adaptive throttle" in detail), detail   # or the gateway's throttle, once ranking refused some


class _Refusing(ranking_pb2_grpc.RankingServiceServicer):
    """Answers every Recommend with the status code named by the user id: the codes the real ranking
    service never sends (NOT_FOUND, INTERNAL) still need their HTTP mapping checked end to end."""

    async def Recommend(self, request, context):
        await context.abort(grpc.StatusCode[request.user_id], f"{request.user_id.lower()} on purpose")


class _CountingRefusal(ranking_pb2_grpc.RankingServiceServicer):
    """Refuses every Recommend with the code its user id names; counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def Recommend(self, request, context):
        self.calls += 1
        context.set_code(grpc.StatusCode[request.user_id])
        context.set_details("refused on purpose")
        return ranking_pb2.RecommendResponse()


@pytest.mark.parametrize("code, status", [("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503)])
@pytest.mark.parametrize("throttle_k", [2.0, 0.0])
def test_while_ranking_refuses_the_gateway_answers_most_calls_itself(tmp_path, code, status, throttle_k):
    """With the adaptive throttle (the default) about 60 of 150 calls reach a ranking that refuses them
    all, and the rest get the same HTTP status from the gateway at once; with it off every call goes."""
    servicer = _CountingRefusal()

    async def serve():
        server = grpc.aio.server()
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
        return server, server.add_insecure_port("127.0.0.1:0")

    loop = asyncio.new_event_loop()
    server, port = loop.run_until_complete(serve())
    loop.run_until_complete(server.start())
    gateway = {"ranking_target": f"127.0.0.1:{port}", "throttle_k": throttle_k}
    try:
        with running(tmp_path, gateway=gateway) as stack:
            def calls():
                with httpx.Client(base_url=stack.base_url, timeout=10) as session:
                    return [session.get(f"/v1/users/{code}/recommendations") for _ in range(150)]
            before = _throttled_count()
            responses = loop.run_until_complete(loop.run_in_executor(None, calls))
            counted = _throttled_count() - before
    finally:
        loop.run_until_complete(server.stop(0))
        loop.close()
    assert {r.status_code for r in responses} == {status}
    throttled = [r for r in responses if "adaptive throttle" in _problem(r, status)["detail"]]
    if throttle_k:
        # no call accepted: the first 50 go (the floor), then 1 in 10 (p capped at 0.9): ~60 expected
        assert 50 <= servicer.calls <= 90 and len(throttled) == 150 - servicer.calls
        assert counted == 150 - servicer.calls
    else:
        assert servicer.calls == 150 and not throttled and counted == 0


def _throttled_count() -> float:
    return REGISTRY.get_sample_value("gateway_ranking_throttled_total", {"method": "Recommend"}) or 0.0


@pytest.mark.parametrize("code, status", [*problems.STATUS_FOR_CODE.items(), (grpc.StatusCode.INTERNAL, 502),
                                          (grpc.StatusCode.UNKNOWN, 502)])
def test_every_grpc_code_maps_to_its_http_status(tmp_path, code, status):
    async def serve_refusing():
        server = grpc.aio.server()
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Refusing(), server)
        return server, server.add_insecure_port("127.0.0.1:0")

    loop = asyncio.new_event_loop()
    server, port = loop.run_until_complete(serve_refusing())
    loop.run_until_complete(server.start())
    try:
        with running(tmp_path, gateway={"ranking_target": f"127.0.0.1:{port}"}) as stack:
            future = loop.run_in_executor(None, lambda: httpx.get(f"{stack.base_url}/v1/users/{code.name}/recommendations",
                                                                  timeout=10))
            response = loop.run_until_complete(future)
    finally:
        loop.run_until_complete(server.stop(0))
        loop.close()
    body = _problem(response, status)
    assert (response.headers.get("retry-after") == "1") == (status == 429)
    if status == 502:
        assert "on purpose" not in body["detail"]          # the service's internals are not forwarded
    else:
        assert f"{code.name.lower()} on purpose" in body["detail"]


def test_mtls_to_ranking_when_configured(tmp_path, published, loaded, retrieval_loaded):
    from gateway.config import RankingTls
    from recsys_serving.env import TlsConfig
    from tests.ranking.test_main import _certificates

    root, _ = published
    certs = _certificates(tmp_path)
    server_tls = TlsConfig(certs["server.pem"], certs["server.key"], certs["ca.pem"])
    with running(root, loaded, retrieval_loaded, ranking={"tls": server_tls},
                 gateway={"ranking_tls": RankingTls(certs["ca.pem"], certs["client.pem"], certs["client.key"])}) as mtls:
        assert httpx.get(f"{mtls.base_url}/v1/users/1/recommendations?k=2", timeout=10).status_code == 200
        assert httpx.get(f"{mtls.base_url}/readyz", timeout=10).json() == {"status": "serving"}
    # without its client certificate the gateway is refused: the call fails UNAVAILABLE -> 503
    with running(root, loaded, retrieval_loaded, ranking={"tls": server_tls},
                 gateway={"ranking_tls": RankingTls(certs["ca.pem"])}) as no_cert:
        _problem(httpx.get(f"{no_cert.base_url}/v1/users/1/recommendations", timeout=10), 503)


class _Hanging(ranking_pb2_grpc.RankingServiceServicer):
    """Holds every Recommend until the caller goes away."""

    async def Recommend(self, request, context):
        await asyncio.sleep(30)
        return ranking_pb2.RecommendResponse()


def test_a_call_its_caller_abandons_counts_as_accepted_not_refused():
    """An HTTP caller that leaves cancels the gateway's call to ranking: the throttle must not count it
    as a call ranking refused (that would throttle a healthy ranking after many impatient callers)."""
    from gateway.config import GatewayConfig
    from gateway.ranking import RankingClient

    async def scenario() -> tuple[int, int]:
        server = grpc.aio.server()
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Hanging(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = RankingClient(GatewayConfig(ranking_target=f"127.0.0.1:{port}", throttle_k=2.0))
        try:
            for _ in range(3):
                call = asyncio.ensure_future(client.recommend(ranking_pb2.RecommendRequest(user_id="1", k=3),
                                                              timeout_s=20, request_id="r"))
                await asyncio.sleep(0.3)       # the call has left and waits on the server
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            return sum(client.throttle._requests), sum(client.throttle._accepts)
        finally:
            await client.channel.close()
            await server.stop(0)

    requests, accepts = asyncio.run(scenario())
    assert (requests, accepts) == (3, 3)
