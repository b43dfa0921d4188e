"""Starting a real retrieval server inside a test's event loop, and reading metric deltas."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.reload import VersionHolder
from retrieval_service.config import RetrievalConfig
from retrieval_service.server import create_server
from retrieval_service.state import ServingState
from tests.signing_keys import PUBLIC_KEY_FILE, TRUST


def config(root: Path, **overrides) -> RetrievalConfig:
    """A test config: loopback, port 0, no metrics endpoint, fast polling."""
    base = RetrievalConfig(artifact_root=Path(root), port=0, metrics_port=0, trusted_keys=PUBLIC_KEY_FILE,
                           poll_interval_s=0.1, chunk_size=10, microbatch_max_wait_ms=1.0)
    return dataclasses.replace(base, **overrides)


def cached_holder(root: Path, state: ServingState, **kwargs) -> VersionHolder[ServingState]:
    """A holder that verifies the version as usual but reuses an already loaded state (saves seconds)."""
    return VersionHolder(root, lambda directory, version: state, trust=TRUST, **kwargs)


@contextlib.asynccontextmanager
async def serve(cfg: RetrievalConfig, *, holder=None, batching: bool = True, wait_serving: bool = True):
    """Yields (stub, channel, app) for a started server; closes everything afterwards."""
    server, port, app = await create_server(cfg, holder=holder, batching=batching)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if wait_serving:
            await wait_for_health(channel, health_pb2.HealthCheckResponse.SERVING)
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel), channel, app
    finally:
        await channel.close()
        await app.close(grace_s=0)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


async def wait_for_health(channel: grpc.aio.Channel, status: int, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while await health_status(channel) != status:
        if loop.time() > end:
            raise AssertionError(f"health never became {status}")
        await asyncio.sleep(0.02)


async def retrieve(stub, timeout: float = 5.0, **fields) -> list[retrieval_pb2.RetrieveResponse]:
    return [chunk async for chunk in stub.Retrieve(retrieval_pb2.RetrieveRequest(**fields), timeout=timeout)]


def items(chunks: list[retrieval_pb2.RetrieveResponse]) -> list[int]:
    return [item for chunk in chunks for item in chunk.item_ids]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
