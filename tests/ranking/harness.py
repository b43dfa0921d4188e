"""Starting real ranking (and retrieval) servers for tests, in process or as subprocesses, and metric deltas."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from ranking_service.config import RankingConfig
from ranking_service.server import create_server
from recsys_contracts.v1 import ranking_pb2_grpc
from recsys_serving.reload import VersionHolder
from retrieval_service.config import RetrievalConfig
from retrieval_service.server import create_server as create_retrieval_server
from tests.signing_keys import PUBLIC_KEY_FILE, SIGNING_ENV, TRUST
from tests.processes import ChildProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def config(root: Path, **overrides) -> RankingConfig:
    """A test config: port 0, no metrics endpoint, fast polling, no Redis, a retrieval target that refuses."""
    base = RankingConfig(artifact_root=Path(root), port=0, metrics_port=0, poll_interval_s=0.1,
                         trusted_keys=PUBLIC_KEY_FILE,
                         retrieval_target=f"127.0.0.1:{free_port()}", default_deadline_ms=2000)
    return dataclasses.replace(base, **overrides)


def cached_holder(root: Path, state, **kwargs) -> VersionHolder:
    """A holder that verifies the version as usual but reuses an already loaded state (saves seconds)."""
    return VersionHolder(root, lambda directory, version: state, trust=TRUST, **kwargs)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


@contextlib.asynccontextmanager
async def serve(cfg: RankingConfig, *, state=None, holder=None, candidates=None):
    """Yields (stub, channel, app) for a started in-process ranking server; closes everything afterwards."""
    if holder is None and state is not None:
        holder = cached_holder(cfg.artifact_root, state, poll_interval_s=cfg.poll_interval_s)
    server, port, app = await create_server(cfg, holder=holder, candidates=candidates)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ranking_pb2_grpc.RankingServiceStub(channel), channel, app
    finally:
        await channel.close()
        await server.stop(0)
        await app.close()


@contextlib.asynccontextmanager
async def serve_retrieval(root: Path, state, **overrides):
    """Yields (target, app) for an in-process retrieval server on loopback reusing a loaded state."""
    cfg = dataclasses.replace(RetrievalConfig(artifact_root=Path(root), port=0, metrics_port=0,
                                              trusted_keys=PUBLIC_KEY_FILE,
                                              poll_interval_s=0.1, chunk_size=50), **overrides)
    holder = VersionHolder(root, lambda directory, version: state, trust=TRUST, poll_interval_s=0.1)
    await holder.refresh()
    _, port, app = await create_retrieval_server(cfg, holder=holder)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        await app.close(grace_s=0)


class RetrievalProcess(ChildProcess):
    """``python -m retrieval_service`` as a subprocess on a free port, to kill or freeze for real."""

    def __init__(self, root: Path, redis_url: str | None = None, **env: str) -> None:
        self.port = free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))} | SIGNING_ENV
        environ.update({"RECSYS_ARTIFACT_ROOT": str(root),
                        "RETRIEVAL_PORT": str(self.port), "RETRIEVAL_METRICS_PORT": "0",
                        "RECSYS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO_ROOT), **env})
        if redis_url:
            environ["RECSYS_REDIS_URL"] = redis_url
        self.proc = subprocess.Popen([sys.executable, "-m", "retrieval_service"], cwd=REPO_ROOT, env=environ,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            end = time.monotonic() + timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"retrieval exited with {self.proc.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise AssertionError("retrieval never became SERVING")
                time.sleep(0.1)



def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def run(coro):
    """Runs one test coroutine in a fresh event loop."""
    return asyncio.run(coro)
