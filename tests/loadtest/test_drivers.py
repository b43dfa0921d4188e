"""The drivers against a real stack: in-process retrieval and ranking servers over a MovieLens version.

The ranking and retrieval gRPC servers run in this process (port 0, the shared Redis under a test
namespace); the ``python -m loadtest run`` command runs as a child process, so its open loop keeps
its own clock. Assertions are about counts, codes, flags and files, never about speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import grpc
import pytest

from loadtest.client import CHANNEL_OPTIONS, Caller, closed_loop, ramp
from loadtest.config import LoadConfig
from loadtest.stack import REPO_ROOT, wait_serving
from loadtest.users import UNKNOWN_PREFIX, UserSampler, load_population
from ranking_service.config import RankingConfig
from ranking_service.server import create_server as create_ranking_server
from retrieval_service.config import RetrievalConfig
from tests.signing_keys import PUBLIC_KEY_FILE
from retrieval_service.server import create_server as create_retrieval_server

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def serving(root: Path, redis_url: str, namespace: str):
    """Yields (ranking target, retrieval target) of started in-process servers; stops them afterwards."""
    shared = {"artifact_root": root, "redis_url": redis_url, "redis_namespace": namespace, "port": 0,
              "metrics_port": 0, "log_level": "WARNING", "trusted_keys": PUBLIC_KEY_FILE}
    _, retrieval_port, retrieval_app = await create_retrieval_server(RetrievalConfig(**shared))
    retrieval_target = f"127.0.0.1:{retrieval_port}"
    await wait_serving(retrieval_target, 60)
    ranking_server, ranking_port, ranking_app = await create_ranking_server(
        RankingConfig(**shared, retrieval_target=retrieval_target))
    ranking_target = f"127.0.0.1:{ranking_port}"
    try:
        await wait_serving(ranking_target, 60)
        yield ranking_target, retrieval_target
    finally:
        await ranking_server.stop(0)
        await ranking_app.close()
        await retrieval_app.close(grace_s=0)


async def _cli_run(target: str, data_dir: Path, out: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", "run", "--target", target, "--mode", "open", "--rate", "50",
        "--duration", "2", "--k", "10", "--deadline-ms", "5000", "--users-from", str(data_dir),
        "--skew", "1.0", "--unknown-share", "0.2", "--rpc", "recommend", "--out", str(out), cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await child.communicate()
    assert child.returncode == 0, output.decode()


async def _other_modes(ranking_target: str, retrieval_target: str, population) -> dict:
    """Closed loop, both ramp endings, Rank and Retrieve over short runs; returns what each produced."""
    base = LoadConfig(deadline_ms=5000, unknown_share=0.2, rate=20, step_duration_s=0.5, duration_s=1.0)
    found = {}
    async with grpc.aio.insecure_channel(ranking_target, options=CHANNEL_OPTIONS) as channel:
        loop = asyncio.get_running_loop()
        caller = Caller(channel, base, population)
        sampler = UserSampler(population.user_ids, 1.0, 0.2, seed=3)
        found["closed"] = await closed_loop(caller, sampler, 4, 0.5, 10_000, loop.time())
        found["ramp_held"] = await ramp(caller, sampler, LoadConfig(**{**base.__dict__, "p99_target_ms": 60_000}),
                                        loop.time())
        found["ramp_broken"] = await ramp(caller, sampler, LoadConfig(**{**base.__dict__, "p99_target_ms": 1e-6}),
                                          loop.time())
        rank = Caller(channel, LoadConfig(rpc="rank", rank_items=20, deadline_ms=5000), population)
        found["rank"] = [await rank(user) for user in ("405", f"{UNKNOWN_PREFIX}1")]
    async with grpc.aio.insecure_channel(retrieval_target, options=CHANNEL_OPTIONS) as channel:
        retrieve = Caller(channel, LoadConfig(rpc="retrieve", num_candidates=50, deadline_ms=5000), population)
        found["retrieve"] = [await retrieve(user) for user in ("405", f"{UNKNOWN_PREFIX}1")]
    return found


def test_drivers_against_a_real_stack(published, ml100k_dir, redis_url, redis_namespace, tmp_path):
    root, version = published
    population = load_population(str(ml100k_dir))

    async def scenario():
        async with serving(root, redis_url, redis_namespace) as (ranking_target, retrieval_target):
            await _cli_run(ranking_target, ml100k_dir.parent, tmp_path / "run")
            return await _other_modes(ranking_target, retrieval_target, population)

    found = asyncio.run(scenario())

    # The 2-second open loop at 50/s: exactly 100 requests, all answered within the generous deadline.
    document = json.loads((tmp_path / "run" / "results.json").read_text())
    summary = document["summary"]
    assert summary["requests"] == 100 and summary["codes"] == {"OK": 100}
    assert summary["versions"] == {"ranking": {str(version): 100}, "retrieval": {str(version): 100}}
    assert summary["degraded"]["DEGRADED_PATH_COLD_START_USER"] >= 1   # 20 % unknown users: ~20 of 100
    assert len(document["outcomes"]["intended_s"]) == 100 and document["machine"]["cpus"] >= 1
    # the client's own collector during the load is reported (100 requests allocate enough for some passes)
    assert document["client_gc"]["collections"] >= 1 and document["client_gc"]["longest_ms"] > 0
    assert all((tmp_path / "run" / name).stat().st_size > 0 for name in ("latency.png", "histogram.png"))

    closed = found["closed"]
    assert closed and all(o.code == "OK" and o.latency_s >= 0 for o in closed)

    held_outcomes, held_steps = found["ramp_held"]
    # 1 s of ramp in 0.5 s steps: 20/s then 70/s (step +50), both held under a 60 s p99 target.
    assert [(s["rate"], s["held"], s["requests"]) for s in held_steps] == [(20, True, 10), (70, True, 35)]
    assert len(held_outcomes) == 45
    _, broken_steps = found["ramp_broken"]
    assert [(s["rate"], s["held"]) for s in broken_steps] == [(20, False)]   # no p99 fits 1 ns: stops at once

    (known_rank, unknown_rank), (known_retrieve, unknown_retrieve) = found["rank"], found["retrieve"]
    assert known_rank[0] == "OK" and known_rank[2] == (("ranking", version),)
    assert "DEGRADED_PATH_COLD_START_USER" in unknown_rank[1]
    assert known_retrieve[0] == "OK" and known_retrieve[2] == (("retrieval", version),)
    assert "DEGRADED_PATH_COLD_START_USER" in unknown_retrieve[1]
