"""Two per-request costs the 2026-12-05 afternoon changes removed, each measured against what it replaced:

- ``grpc``: one Retrieve-sized answer (500 candidates) as a unary call (``RetrieveAll``) against a
  server-streaming call of one message (``Retrieve`` with one chunk): client CPU, server CPU (the
  server runs in its own process), wall time per call, 8 calls in flight, on loopback. Two ways to
  pay less than one call per answer, measured beside them (2026-12-06, seventh session; neither is
  served): ``batch_of_8``, one unary call carrying 8 requests and their 8 answers (the figures per
  answer), and ``bidi_stream``, one long-lived bidirectional stream carrying every request and
  answer as a message (8 in flight), the floor of any transport that keeps gRPC;
- ``redis``: one user's read as one EVALSHA (``recsys_contracts.feature_store.USER_READ_SCRIPT``, what
  both services run) against the 4-command pipeline (``queue_user_read``): redis-py asyncio client
  CPU per read ($RECSYS_TEST_REDIS_URL or the local default, a private namespace deleted afterwards).

Medians of ``--rounds`` rounds, the variants' order alternating; prints a table and writes bench_results/wire_bench.json.

    .venv/bin/python benchmarks/wire_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from recsys_contracts import feature_store  # noqa: E402
from recsys_contracts.feature_store import KeyFormat  # noqa: E402
from recsys_contracts.v1 import retrieval_pb2  # noqa: E402
from recsys_serving.features import UserReader  # noqa: E402

SERVICE = "bench.Wire"
CANDIDATES = 500
BATCH = 8


def _answer() -> bytes:
    rng = np.random.default_rng(0)
    return retrieval_pb2.RetrieveResponse(item_ids=rng.integers(1, 1_700, CANDIDATES).tolist(),
                                          scores=rng.random(CANDIDATES).astype(np.float32).tolist(),
                                          model_version=1).SerializeToString()


async def _serve(port_file: str) -> None:
    """The server process: Unary and Stream answer the same bytes."""
    answer = _answer()

    async def unary(request, context):
        return answer

    async def stream(request, context):
        await context.write(answer)

    async def batch(request, context):            # BATCH requests in, BATCH answers out
        return answer * BATCH

    async def bidi(requests, context):
        async for _ in requests:
            await context.write(answer)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Batch": grpc.unary_unary_rpc_method_handler(batch),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _grpc_round(port: int, server_pid: int, calls: int, flip: bool) -> dict[str, dict[str, float]]:
    request = retrieval_pb2.RetrieveRequest(user_id="1", num_candidates=CANDIDATES).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary, stream = channel.unary_unary(f"/{SERVICE}/Unary"), channel.unary_stream(f"/{SERVICE}/Stream")
        batch, bidi = channel.unary_unary(f"/{SERVICE}/Batch"), channel.stream_stream(f"/{SERVICE}/Bidi")

        async def one_unary() -> None:
            retrieval_pb2.RetrieveResponse.FromString(await unary(request, timeout=5))

        async def one_stream() -> None:
            async for chunk in stream(request, timeout=5):
                retrieval_pb2.RetrieveResponse.FromString(chunk)

        async def eight_in_flight(one, n: int) -> None:
            async def worker() -> None:
                for _ in range(n // 8):
                    await one()
            await asyncio.gather(*(worker() for _ in range(8)))

        size, batched = len(_answer()), request * BATCH

        async def batches(n: int) -> None:            # one call of BATCH items at a time: 8 answers in flight
            for _ in range(n // BATCH):
                answers = await batch(batched, timeout=5)
                for i in range(BATCH):
                    retrieval_pb2.RetrieveResponse.FromString(answers[i * size:(i + 1) * size])

        async def bidi_stream(n: int) -> None:       # one call for all n: 8 requests in flight
            call, window = bidi(), asyncio.Semaphore(8)

            async def write() -> None:
                for _ in range(n):
                    await window.acquire()
                    await call.write(request)
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            async for answer in call:
                retrieval_pb2.RetrieveResponse.FromString(answer)
                window.release()
            await writer

        figures = {}
        variants = (("unary", lambda n: eight_in_flight(one_unary, n)),
                    ("stream_of_one", lambda n: eight_in_flight(one_stream, n)),
                    ("batch_of_8", batches), ("bidi_stream", bidi_stream))
        for name, run in variants[::-1] if flip else variants:     # alternate which goes first
            await run(200)
            client, server, wall = time.process_time(), _cpu_s(server_pid), time.perf_counter()
            await run(calls)
            figures[name] = {"client_cpu_us": (time.process_time() - client) / calls * 1e6,
                             "server_cpu_us": (_cpu_s(server_pid) - server) / calls * 1e6,
                             "wall_us": (time.perf_counter() - wall) / calls * 1e6}
        return figures


def grpc_costs(rounds: int, calls: int) -> list[dict[str, dict[str, float]]]:
    port_file = Path(tempfile.gettempdir()) / f"wire_bench_{uuid.uuid4().hex}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        port = int(port_file.read_text())
        return [asyncio.run(_grpc_round(port, server.pid, calls, flip=i % 2 == 1)) for i in range(rounds)]
    finally:
        server.kill()
        server.wait()
        port_file.unlink(missing_ok=True)


async def _redis_round(url: str, reads: int, flip: bool) -> dict[str, float]:
    import redis

    keys = KeyFormat(f"wirebench{uuid.uuid4().hex[:8]}")
    rng = np.random.default_rng(0)    # a MovieLens-sized user: 200 history items, 300 seen
    history = rng.integers(1, 1_682, 200).astype(np.int64)
    seen = np.sort(rng.choice(np.arange(1, 1_683), 300, replace=False)).astype(np.int64)
    sync = redis.Redis.from_url(url)
    feature_store.write_version(sync, keys, 1, users=[("u1", np.arange(3, dtype=np.int64), np.ones(4, np.float32),
                                                       history, seen)], items=[])
    client = feature_store.redis_client(url, asyncio=True)
    reader = UserReader(client, keys)

    async def pipelined() -> list:
        pipe = client.pipeline(transaction=False)
        feature_store.queue_user_read(pipe, keys, 1, "u1")
        return await pipe.execute()

    async def one_command() -> list:
        return await reader(1, "u1")

    try:
        assert await pipelined() == await one_command()
        figures = {}
        variants = (("pipeline_4_commands", pipelined), ("evalsha", one_command))
        for name, read in variants[::-1] if flip else variants:
            for _ in range(200):
                await read()
            started = time.process_time()
            for _ in range(reads):
                await read()
            figures[name] = (time.process_time() - started) / reads * 1e6
        return figures
    finally:
        await client.aclose()
        for key in sync.scan_iter(match=f"{keys.namespace}:*"):
            sync.delete(key)
        sync.close()


def _medians(runs: list[dict]) -> dict:
    first = runs[0]
    if isinstance(first, dict):
        return {key: _medians([run[key] for run in runs]) for key in first}
    return round(statistics.median(runs), 1) if isinstance(first, float) else first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4000, help="gRPC calls per variant and round")
    parser.add_argument("--reads", type=int, default=4000, help="Redis reads per variant and round")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "wire_bench.json"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    redis_url = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    result = {
        "grpc": _medians(grpc_costs(args.rounds, args.calls)),
        "redis_client_cpu_us": _medians([asyncio.run(_redis_round(redis_url, args.reads, flip=i % 2 == 1))
                                         for i in range(args.rounds)]),
        "rounds": args.rounds, "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
