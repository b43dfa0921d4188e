"""Gateway overhead: the same Recommend(k=10, 500 candidates) over HTTP through the gateway and over
gRPC straight to the ranking service, open loop, side by side.

    python benchmarks/gateway_bench.py [--artifact-root ROOT] [--loads 50,100] [--duration 10] [--rounds 3]

The stack is ``benchmarks/ranking_bench.py``'s (a version over MovieLens 100K, or ``--artifact-root``'s
CURRENT one, features in Redis under a private namespace; retrieval and ranking as processes) plus
``python -m gateway`` as a process in front of ranking. For each round and offered load the two paths
run one after the other (gRPC, then HTTP), so machine noise hits both alike, and the figures are medians
over rounds of each pair's difference; latency counts from each request's scheduled start (no
coordinated omission). The HTTP client is a small keep-alive HTTP/1.1
client on asyncio streams, so the client's own cost stays close to the gRPC client's. The gateway's
CPU per request is read from /proc. Prints the figures, writes ``bench_results/gateway_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ranking_bench as rb  # noqa: E402  (the stack, the request, the percentiles)

REPO_ROOT = rb.REPO_ROOT
RESULTS = rb.RESULTS
HTTP_QUERY = f"k={rb.K}&num_candidates={rb.CANDIDATES}&timestamp_s={rb.WHEN}&include_metadata=false"


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one host: a request takes an idle one or opens a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str, timeout_s: float) -> int:
        """The status of one GET; a pooled connection the server closed meanwhile (uvicorn drops idle
        keep-alive connections after 5 s) is replaced once, as HTTP clients do."""
        async with asyncio.timeout(timeout_s):
            if self.idle:
                try:
                    return await self._exchange(self.idle.pop(), path, timeout_s)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
            return await self._exchange(await asyncio.open_connection(self.host, self.port), path, timeout_s)

    async def _exchange(self, conn, path: str, timeout_s: float) -> int:
        reader, writer = conn
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                         f"X-Timeout-Ms: {int(timeout_s * 1000)}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        self.idle.append(conn)
        return int(lines[0].split()[1])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _open_loop(path: str, ranking: str, gateway_port: int, users: list[str], rate: float, duration_s: float,
                     seed: int) -> dict:
    import grpc

    from loadtest.collector import measured_window
    from recsys_contracts.v1 import ranking_pb2_grpc

    rng = np.random.default_rng(seed)
    n = int(rate * duration_s)
    picked = [users[i] for i in rng.integers(len(users), size=n)]
    latencies, codes = [], {}
    pool = HttpPool("127.0.0.1", gateway_port)
    async with grpc.aio.insecure_channel(ranking) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)

        async def call(user: str) -> str:
            if path == "grpc":
                try:
                    await stub.Recommend(rb.request(user), timeout=rb.TIMEOUT_S)
                    return "OK"
                except grpc.aio.AioRpcError as error:
                    return error.code().name
            try:
                return str(await pool.get(f"/v1/users/{user}/recommendations?{HTTP_QUERY}", rb.TIMEOUT_S))
            except TimeoutError:
                return "timeout"
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                return type(error).__name__

        for user in users[:rb.WARMUP_REQUESTS]:
            await call(user)
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            code = await call(picked[i])
            codes[code] = codes.get(code, 0) + 1
            if code in ("OK", "200"):
                latencies.append(loop.time() - scheduled)

        with measured_window() as collector:
            start = loop.time() + 0.05
            await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = loop.time() - start
    pool.close()
    ok = codes.get("OK", 0) + codes.get("200", 0)
    return {"path": path, "offered_rps": rate, "achieved_rps": round(ok / elapsed, 1), "codes": codes,
            "latencies_s": latencies, "client_gc": collector.as_dict()}


def _gateway(ranking_port: int, port: int):
    import contextlib
    import signal
    import subprocess
    import time
    import urllib.request

    @contextlib.contextmanager
    def running():
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "GATEWAY_"))}
        environ.update({"PYTHONPATH": str(REPO_ROOT), "RECSYS_LOG_LEVEL": "ERROR", "GATEWAY_HOST": "127.0.0.1",
                        "GATEWAY_PORT": str(port), "GATEWAY_RANKING_TARGET": f"127.0.0.1:{ranking_port}"})
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=REPO_ROOT, env=environ)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    return running()


def _measure(root: Path, redis_url: str, namespace: str, users: list[str], args) -> list[dict]:
    retrieval_port, ranking_port, gateway_port = rb.free_port(), rb.free_port(), rb.free_port()
    common = {"RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": redis_url, "RECSYS_REDIS_NAMESPACE": namespace}
    runs = []
    with rb.service("retrieval_service", {**common, "RETRIEVAL_PORT": str(retrieval_port),
                                          "RETRIEVAL_METRICS_PORT": "0"}, retrieval_port), \
            rb.service("ranking_service", {**common, "RANKING_PORT": str(ranking_port), "RANKING_METRICS_PORT": "0",
                                           "RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{retrieval_port}"}, ranking_port), \
            _gateway(ranking_port, gateway_port) as gateway:
        for round_ in range(args.rounds):
            for rate in args.loads:
                for path in ("grpc", "http"):
                    before = rb.thread_cpu_ms(gateway.pid)
                    result = asyncio.run(_open_loop(path, f"127.0.0.1:{ranking_port}", gateway_port, users, rate,
                                                    args.duration, seed=round_))
                    if path == "http":
                        sent = int(rate * args.duration) + rb.WARMUP_REQUESTS
                        result["gateway_cpu"] = rb.cpu_per_request(gateway.pid, before, rb.thread_cpu_ms(gateway.pid),
                                                                   sent)
                    result["round"] = round_
                    runs.append(result)
                    stats = rb.percentiles(result["latencies_s"])
                    print(f"round {round_} {rate:>5.0f} req/s {path:>4}: p50 {stats['p50_ms']:6.2f} ms  "
                          f"p99 {stats['p99_ms']:6.2f} ms  codes {result['codes']}"
                          + (f"  gateway CPU {result['gateway_cpu']['total_ms']} ms/req" if path == "http" else ""),
                          flush=True)
    return runs


def summarize(runs: list[dict], loads: list[float]) -> dict:
    """Per load: each round's gRPC and HTTP p50/p99 and what the gateway added, the median of those
    per-round differences (robust to a round the shared machine slowed down), and the pooled figures."""
    table = {}
    for rate in loads:
        rounds = []
        for round_ in sorted({r["round"] for r in runs}):
            pair = {r["path"]: rb.percentiles(r["latencies_s"]) for r in runs
                    if r["offered_rps"] == rate and r["round"] == round_}
            rounds.append({"grpc": pair["grpc"], "http": pair["http"],
                           "added_p50_ms": pair["http"]["p50_ms"] - pair["grpc"]["p50_ms"],
                           "added_p99_ms": pair["http"]["p99_ms"] - pair["grpc"]["p99_ms"]})
        pooled = {path: rb.percentiles([s for r in runs if r["offered_rps"] == rate and r["path"] == path
                                        for s in r["latencies_s"]]) for path in ("grpc", "http")}
        cpu = [r["gateway_cpu"]["total_ms"] for r in runs if r["offered_rps"] == rate and "gateway_cpu" in r]
        table[str(rate)] = {
            "median_added_p50_ms": float(np.median([r["added_p50_ms"] for r in rounds])),
            "median_added_p99_ms": float(np.median([r["added_p99_ms"] for r in rounds])),
            "median_grpc_p50_ms": float(np.median([r["grpc"]["p50_ms"] for r in rounds])),
            "median_http_p50_ms": float(np.median([r["http"]["p50_ms"] for r in rounds])),
            "median_grpc_p99_ms": float(np.median([r["grpc"]["p99_ms"] for r in rounds])),
            "median_http_p99_ms": float(np.median([r["http"]["p99_ms"] for r in rounds])),
            "gateway_cpu_ms_per_request": float(np.median(cpu)) if cpu else None,
            "rounds": rounds, "pooled": pooled}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="50,100", help="offered loads, req/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load and path")
    parser.add_argument("--rounds", type=int, default=3, help="gRPC/HTTP pairs per load (medians over rounds)")
    parser.add_argument("--artifact-root", type=Path, help="serve this root's CURRENT version instead of tiny_run models")
    args = parser.parse_args()
    args.loads = [float(x) for x in args.loads.split(",")]
    redis_url = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench-gw-{uuid.uuid4().hex[:8]}"
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            if args.artifact_root is None:
                version, users = rb.publish_movielens(root, redis_url, namespace)
            else:
                version, users = rb.use_published(args.artifact_root, root, redis_url, namespace)
            print(f"serving version {version} ({len(users)} users)", flush=True)
            runs = _measure(root, redis_url, namespace, users, args)
        finally:
            rb.drop_namespace(redis_url, namespace)
    table = summarize(runs, args.loads)
    print("\n  load   medians over rounds:  gRPC p50 / p99 ms   HTTP via gateway p50 / p99 ms   "
          "added p50 / p99 ms   gateway CPU ms/req")
    for rate, row in table.items():
        print(f"{float(rate):>6.0f}   {row['median_grpc_p50_ms']:26.2f} / {row['median_grpc_p99_ms']:6.2f}"
              f"   {row['median_http_p50_ms']:19.2f} / {row['median_http_p99_ms']:6.2f}"
              f"   {row['median_added_p50_ms']:+11.2f} / {row['median_added_p99_ms']:+6.2f}"
              f"   {row['gateway_cpu_ms_per_request']:10.2f}")
    for run in runs:
        run.pop("latencies_s")
    out = RESULTS / "gateway_bench.json"
    out.write_text(json.dumps({"args": {**vars(args), "artifact_root": str(args.artifact_root)},
                               "summary": table, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
