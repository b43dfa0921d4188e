"""End to end: the trainer CLI publishes a version; both services serve it as real processes over real Redis.

``python -m trainer`` trains on a small synthetic log and publishes into a temporary artifact root
and the test's Redis namespace; ``python -m retrieval_service`` and ``python -m ranking_service``
start as subprocesses on free loopback ports and are called over gRPC through the generated stubs
(Recommend, Rank, RecordInteractions) and once with server reflection only, the way a generic client
(grpcurl, Postman) builds its messages. Both services are stopped with SIGTERM and must exit 0.
One test holds the whole story: training dominates its time, so every check shares one stack.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from recsys_contracts.artifacts import current_version
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from trainer.data import synthetic
from tests.signing_keys import SIGNING_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
K = 5
START_TIMEOUT_S = 60.0       # per service, from process start to health SERVING
RPC_TIMEOUT_S = 10.0         # generous: the cores are shared with other test runs
# Just after the synthetic log's year: the request time drives the temporal features.
CONTEXT = common_pb2.Context(timestamp_s=synthetic.START_TIME + synthetic.YEAR_S)
COLD_START = common_pb2.DegradedPath.DEGRADED_PATH_COLD_START_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    # The programs reject unknown RECSYS_* / RETRIEVAL_* / RANKING_* names: none may leak in from the caller.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))} | SIGNING_ENV
    return {**env, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train(tmp: Path, artifact_root: Path, redis_url: str, namespace: str) -> str:
    """Runs the trainer CLI on a synthetic log and publishes; returns the log's most active user id."""
    log = tmp / "interactions.parquet"
    interactions = synthetic.generate(120, 200, 5000, seed=11).interactions
    interactions.to_parquet(log)
    settings = {
        "data.dataset": log, "retrieval.epochs": 2, "retrieval.embedding_dim": 16,
        "retrieval.user_tower_dims": 32, "retrieval.item_tower_dims": 32, "ranking.epochs": 1,
        "ranking.deep_dims": 32, "ranking.candidates": 50, "features.history_length": 20,
        "eval.retrieval_ks": "10,20,50", "eval.ease_grid": 10, "run.progress": "false", "run.threads": 1,
        "run.output_dir": tmp / "run", "publish.gate": "false", "publish.artifact_root": artifact_root,
        "publish.redis_url": redis_url, "publish.redis_namespace": namespace,
    }
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"trainer exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return str(interactions["user_id"].value_counts().index[0])


def _wait_serving(target: str, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited {proc.returncode} before serving:\n{proc.stderr.read()[-3000:]}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"{name} did not report SERVING within {START_TIMEOUT_S:.0f} s")


def _stop(procs: list[tuple[str, subprocess.Popen]]) -> dict[str, int | None]:
    """SIGTERM, front door first; returns each exit code (None = still running after 30 s, killed)."""
    for _, proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for name, proc in procs:
        try:
            codes[name] = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[name] = None
    return codes


@contextmanager
def _serving(tmp: Path, artifact_root: Path, redis_url: str, namespace: str) -> Iterator[str]:
    """Both services as subprocesses; yields the ranking service's target; SIGTERM, each must exit 0."""
    retrieval_port, ranking_port = _free_port(), _free_port()
    env = {**_clean_env(), "RECSYS_ARTIFACT_ROOT": str(artifact_root), "RECSYS_REDIS_URL": redis_url,
           "RECSYS_REDIS_NAMESPACE": namespace, "RECSYS_LOG_LEVEL": "WARNING",
           "RETRIEVAL_PORT": str(retrieval_port), "RETRIEVAL_METRICS_PORT": "0",
           "RANKING_PORT": str(ranking_port), "RANKING_METRICS_PORT": "0",
           "RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{retrieval_port}",
           # 50 ms per Redis round trip is a production budget; on shared cores one slow read would
           # flag FEATURES_FROM_ARTIFACT and make the "no degraded path" assertions flaky.
           "RETRIEVAL_REDIS_TIMEOUT_MS": "5000", "RANKING_REDIS_TIMEOUT_MS": "5000"}
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        for name, port in (("retrieval_service", retrieval_port), ("ranking_service", ranking_port)):
            proc = subprocess.Popen([sys.executable, "-m", name], cwd=tmp, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append((name, proc))
            _wait_serving(f"127.0.0.1:{port}", proc, name)
        yield f"127.0.0.1:{ranking_port}"
    finally:
        codes = _stop(procs)
    assert all(code == 0 for code in codes.values()), f"services did not exit 0 on SIGTERM: {codes}"


def _recommend(stub: ranking_pb2_grpc.RankingServiceStub, user_id: str, k: int = K) -> ranking_pb2.RecommendResponse:
    return stub.Recommend(ranking_pb2.RecommendRequest(user_id=user_id, k=k, context=CONTEXT), timeout=RPC_TIMEOUT_S)


def _check_recommend_serves_the_published_version(stub, user: str, version: int) -> None:
    reply = _recommend(stub, user)
    ids = [item.item_id for item in reply.items]
    assert len(ids) == K and len(set(ids)) == K
    assert (reply.retrieval_version, reply.ranking_version) == (version, version)
    assert list(reply.degraded) == []
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)


def _check_rank_returns_the_distinct_ids_best_first(stub, user: str, version: int) -> None:
    ids = [item.item_id for item in _recommend(stub, user, k=10).items]
    asked = list(reversed(ids)) + ids[:3]  # worst first, three ids twice
    reply = stub.Rank(ranking_pb2.RankRequest(user_id=user, item_ids=asked, context=CONTEXT), timeout=RPC_TIMEOUT_S)
    assert sorted(item.item_id for item in reply.items) == sorted(ids)
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= item.ctr <= 1.0 and item.retrieval_score != 0.0 for item in reply.items)
    # Rank scores each item with its own retrieval score, so the items are told apart.
    assert len({round(item.ctr, 6) for item in reply.items}) > 1
    assert reply.ranking_version == version
    assert list(reply.degraded) == [] and list(reply.unknown_item_ids) == []


def _check_reflection_only_call_matches_the_stubs(stub, channel: grpc.Channel, user: str, version: int) -> None:
    by_stub = _recommend(stub, user)
    # From here on every type comes from the server's reflection service, none from a generated module.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("recsys.v1.RankingService").FindMethodByName("Recommend")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                               request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)
    request = request_class(user_id=user, k=K)
    request.context.timestamp_s = CONTEXT.timestamp_s
    reply = call(request, timeout=RPC_TIMEOUT_S)
    assert type(reply) is not ranking_pb2.RecommendResponse
    assert reply.DESCRIPTOR.full_name == "recsys.v1.RecommendResponse"
    assert [item.item_id for item in reply.items] == [item.item_id for item in by_stub.items]
    assert [item.score for item in reply.items] == pytest.approx([item.score for item in by_stub.items])
    assert (reply.retrieval_version, reply.ranking_version) == (version, version)
    assert list(reply.degraded) == []


def _check_unknown_user_is_cold_start(stub, version: int) -> None:
    reply = _recommend(stub, "e2e-user-never-seen")
    assert len(reply.items) == K
    assert COLD_START in reply.degraded
    assert reply.ranking_version == version


def _check_recorded_item_is_not_recommended_again(stub, user: str) -> None:
    watched = _recommend(stub, user).items[0].item_id
    recorded = stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
        common_pb2.Interaction(user_id=user, item_id=watched, rating=5.0, timestamp_s=CONTEXT.timestamp_s)]),
        timeout=RPC_TIMEOUT_S)
    assert recorded.recorded == 1
    again = _recommend(stub, user)
    assert len(again.items) == K and list(again.degraded) == []
    assert watched not in [item.item_id for item in again.items]


def _check_history_comes_from_the_version(stub, user: str) -> None:
    # The log is bare interactions (no items table): empty titles; the times come from the training log
    options = ranking_pb2.RecommendOptions(history_size=5, include_item_metadata=True)
    reply = stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=K, context=CONTEXT, options=options),
                           timeout=RPC_TIMEOUT_S)
    times = [entry.timestamp_s for entry in reply.history]
    assert len(times) == 5 and times == sorted(times, reverse=True) and min(times) > 0
    assert not any(entry.fresh for entry in reply.history)
    assert all(item.title == "" for item in reply.items) and all(entry.title == "" for entry in reply.history)


def test_a_trained_version_is_served_end_to_end(tmp_path, redis_url, redis_namespace):
    artifact_root = tmp_path / "artifacts"
    user = _train(tmp_path, artifact_root, redis_url, redis_namespace)
    version = current_version(artifact_root)
    assert version is not None and version >= 1
    with _serving(tmp_path, artifact_root, redis_url, redis_namespace) as target:
        with grpc.insecure_channel(target) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            _check_recommend_serves_the_published_version(stub, user, version)
            _check_rank_returns_the_distinct_ids_best_first(stub, user, version)
            _check_reflection_only_call_matches_the_stubs(stub, channel, user, version)
            _check_unknown_user_is_cold_start(stub, version)
            _check_history_comes_from_the_version(stub, user)
            # Last: it changes the user's history, which the checks above rely on being the trained one.
            _check_recorded_item_is_not_recommended_again(stub, user)
