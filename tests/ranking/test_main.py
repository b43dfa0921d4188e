"""``python -m ranking_service`` as a real process (config errors, health, metrics, JSON logs, SIGTERM) and TLS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from ranking_service.config import RetrievalClientTls, TlsConfig
from ranking_service.server import create_server
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from recsys_serving.runtime import REQUEST_ID_KEY
from retrieval_service.config import TlsConfig as RetrievalTls
from tests.processes import wait_serving
from tests.ranking.harness import REPO_ROOT, cached_holder, config, free_port, run, serve_retrieval
from tests.signing_keys import SIGNING_ENV


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))} | SIGNING_ENV
    return {**env, "PYTHONPATH": str(REPO_ROOT), **values}


def test_bad_configuration_exits_2_naming_the_variable(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ranking_service"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=_env(RECSYS_ARTIFACT_ROOT=str(tmp_path), RANKING_PORT="http"), timeout=60)
    assert done.returncode == 2
    assert "RANKING_PORT must be an integer in [0, 65535], got 'http'" in done.stderr


def test_process_serves_exports_metrics_logs_json_and_stops_on_sigterm(published):
    root, version = published
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ranking_service"], cwd=REPO_ROOT, stderr=subprocess.PIPE,
                            text=True, env=_env(RECSYS_ARTIFACT_ROOT=str(root), RANKING_PORT=str(port),
                                                RANKING_METRICS_PORT=str(metrics_port),
                                                RANKING_RETRIEVAL_TARGET=f"127.0.0.1:{free_port()}"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, 60.0)
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1, 2]), timeout=5).ranking_version == version
            with pytest.raises(grpc.RpcError) as error:
                stub.Rank(ranking_pb2.RankRequest(user_id="1"), timeout=5, metadata=((REQUEST_ID_KEY, "log-me-1"),))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'ranking_requests_total{code="OK",method="Rank"} 1.0' in scraped
        assert f"ranking_model_version {float(version)}" in scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tagged = [line for line in lines if line.get("request_id") == "log-me-1"]
    assert tagged and tagged[0]["code"] == "INVALID_ARGUMENT" and tagged[0]["level"] == "INFO"
    assert any("shutting down" in line["msg"] for line in lines)
    assert any(line["msg"] == "GIL switch interval 1 ms" for line in lines)   # RANKING_GIL_SWITCH_MS's default


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        sh("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
           "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mtls_on_both_hops(tmp_path, published, loaded, retrieval_loaded):
    root, version = published
    certs = _certificates(tmp_path)
    read = {name: path.read_bytes() for name, path in certs.items()}

    async def main():
        async with serve_retrieval(root, retrieval_loaded, tls=RetrievalTls(
                certs["server.pem"], certs["server.key"], certs["ca.pem"])) as (target, _):
            cfg = config(root, retrieval_target=target,
                         tls=TlsConfig(certs["server.pem"], certs["server.key"], certs["ca.pem"]),
                         retrieval_tls=RetrievalClientTls(certs["ca.pem"], certs["client.pem"], certs["client.key"]))
            server, port, app = await create_server(cfg, holder=cached_holder(root, loaded))
            try:
                credentials = grpc.ssl_channel_credentials(read["ca.pem"], read["client.key"], read["client.pem"])
                async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                    reply = await ranking_pb2_grpc.RankingServiceStub(channel).Recommend(ranking_pb2.RecommendRequest(
                        user_id="1", k=3, context=common_pb2.Context(timestamp_s=1)), timeout=10)
                no_client_cert = grpc.ssl_channel_credentials(read["ca.pem"])
                async with grpc.aio.secure_channel(f"127.0.0.1:{port}", no_client_cert) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await ranking_pb2_grpc.RankingServiceStub(channel).Rank(
                            ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5)
            finally:
                await server.stop(0)
                await app.close()
            return reply, refused.value

    reply, refused = run(main())
    # The candidates came from retrieval over mTLS (not the popular fallback).
    assert reply.retrieval_version == version and list(reply.degraded) == []
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
