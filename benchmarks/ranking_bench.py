"""Ranking benchmark: Recommend(k=10) from 500 candidates, both services + real Redis on loopback.

    python benchmarks/ranking_bench.py [--artifact-root ROOT] [--loads 25,50,100] [--duration 10]
                                       [--ramp 150,200,300,400]

Serves a version over the real MovieLens 100K data: one trained by ``python -m trainer`` when
``--artifact-root`` names its artifact root (copied; its CURRENT version), else one published here
from untrained seeded models at ``trainer.tiny.tiny_run`` sizes. Its features go to Redis
($RECSYS_TEST_REDIS_URL or the local default, a private namespace deleted afterwards), then:

- ``sequential``: one request at a time, alternating between the same pipeline in this process
  (ranking's ``Pipeline`` fed by retrieval's ``CandidateGenerator``, no gRPC) and the two service
  processes over gRPC on loopback, so machine noise hits both alike -> p50/p99 of each and their ratio;
- ``end_to_end``: ``python -m retrieval_service`` and ``python -m ranking_service`` as processes;
  an open-loop client offers fixed request rates (``--loads``, then ``--ramp`` until p99 > 50 ms)
  for ``--duration`` s each and records latency from each request's scheduled start;
- ``batching``: the ranking process restarted with DCN micro-batching off (max size 1), the same
  loads offered again.

Prints the figures and writes ``bench_results/ranking_bench.json`` and ``ranking_latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "bench_results"
WHEN = 1_700_000_000       # fixed request time (seconds since the epoch)
K, CANDIDATES = 10, 500
TIMEOUT_S = 1.0            # client deadline per request
P99_TARGET_MS = 50.0
WARMUP_REQUESTS = 20       # sent before each offered load (counted in its CPU per request)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds."""
    ms = np.asarray(samples_s) * 1000.0
    if ms.size == 0:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan"), "n": 0}
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": int(ms.size)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- version + Redis


def publish_movielens(root: Path, redis_url: str, namespace: str) -> tuple[int, list[str]]:
    """Publishes a version over MovieLens 100K and writes its features to Redis; returns (version, user ids)."""
    import redis

    from recsys_contracts.feature_store import KeyFormat
    from trainer.data import data_dir_from_env as data_dir
    from recsys_contracts.signing import signer_for
    from trainer.tiny import publish_tiny_version, tiny_run
    from trainer.data import load_movielens
    from trainer.publish import materialize_features

    run = tiny_run(0, dataset=load_movielens(data_dir() / "ml-100k"))
    version = publish_tiny_version(root, 0, run=run, signer=signer_for())
    client = redis.Redis.from_url(redis_url)
    materialize_features(client, KeyFormat(namespace), version, run.tables)
    client.close()
    return version, [str(u) for u in run.tables.vocab.user_ids[1:]]


def use_published(source: Path, root: Path, redis_url: str, namespace: str) -> tuple[int, list[str]]:
    """Copies an already published artifact root (e.g. ``python -m trainer`` output) and writes its
    serving version's features to Redis; returns (version, user ids)."""
    import redis

    from recsys_contracts import artifacts, feature_store
    from recsys_contracts.bundle import load_tables

    shutil.copytree(source, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(artifacts.STAGING_DIR))
    version = artifacts.resolve(root, None)
    tables = load_tables(artifacts.version_dir(root, version))
    client = redis.Redis.from_url(redis_url)
    feature_store.write_tables(client, feature_store.KeyFormat(namespace), version, tables,
                               user_ids=tables.user_ids, item_ids=tables.item_ids)
    client.close()
    return version, [str(u) for u in tables.user_ids[1:]]


def drop_namespace(redis_url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    client.close()


def request(user: str):
    from recsys_contracts.v1 import common_pb2, ranking_pb2

    return ranking_pb2.RecommendRequest(user_id=user, k=K, context=common_pb2.Context(timestamp_s=WHEN),
                                        options=ranking_pb2.RecommendOptions(num_candidates=CANDIDATES))


# ---------------------------------------------------------------- in process


class InProcessCandidates:
    """Retrieval's generator called directly: the candidate stream without gRPC (same chunk messages)."""

    def __init__(self, app, max_candidates: int, chunk_size: int) -> None:
        self.app, self.max_candidates, self.chunk_size = app, max_candidates, chunk_size

    async def stream(self, req, timeout_s: float, request_id: str):
        from retrieval_service.servicer import chunks
        from retrieval_service.validation import validate

        result = await self.app.generator.generate(self.app.holder.current, validate(req, self.max_candidates),
                                                   time.monotonic() + timeout_s)
        for message in chunks(result, self.chunk_size):
            yield message

    async def close(self) -> None:
        return None


async def _until_ready(holder, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while not holder.ready:
        if time.monotonic() > end or holder.stats.refused:
            raise RuntimeError(f"version never loaded: {holder.stats.last_error}")
        await asyncio.sleep(0.05)


async def _in_process_vs_grpc(root: Path, redis_url: str, namespace: str, users: list[str], n: int,
                              target: str) -> dict:
    """Sequential Recommends alternating between the pipeline in this process and the two service
    processes over gRPC at ``target``, so machine noise hits both sides alike; p50/p99 of each."""
    import grpc

    from ranking_service import validation
    from ranking_service.config import RankingConfig
    from ranking_service.server import create_server
    from ranking_service.servicer import _scored_items
    from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc
    from retrieval_service.config import RetrievalConfig
    from retrieval_service.server import create_server as create_retrieval

    trusted = Path(os.environ["RECSYS_TRUSTED_KEYS"])
    rconfig = RetrievalConfig(artifact_root=root, redis_url=redis_url, redis_namespace=namespace, port=0,
                              metrics_port=0, trusted_keys=trusted)
    _, _, rapp = await create_retrieval(rconfig)
    await _until_ready(rapp.holder)
    config = RankingConfig(artifact_root=root, redis_url=redis_url, redis_namespace=namespace, port=0,
                           metrics_port=0, trusted_keys=trusted)
    server, _, app = await create_server(config, candidates=InProcessCandidates(rapp, rconfig.max_candidates,
                                                                                rconfig.chunk_size))
    await _until_ready(app.holder)
    loop, state = asyncio.get_running_loop(), app.holder.current
    picked = [users[i] for i in np.random.default_rng(1).integers(len(users), size=n)]
    local, remote, degraded = [], [], 0
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            for i, user in enumerate(picked):
                started = time.perf_counter()
                query = validation.recommend_query(request(user), state.spec, config)
                answer = await app.pipeline.recommend(state, query, loop.time() + TIMEOUT_S, f"bench-{i}")
                ranking_pb2.RecommendResponse(items=_scored_items(answer), ranking_version=answer.ranking_version,
                                              retrieval_version=answer.retrieval_version,
                                              degraded=sorted(answer.degraded))
                local.append(time.perf_counter() - started)
                started = time.perf_counter()
                reply = await stub.Recommend(request(user), timeout=TIMEOUT_S)
                remote.append(time.perf_counter() - started)
                degraded += bool(answer.degraded) + bool(reply.degraded)
    finally:
        await server.stop(0)
        await app.close()
        await rapp.close(grace_s=0)
    warm = n // 10                                                   # the first 10 % warm up
    return {"requests": n, "degraded_answers": degraded, "in_process": percentiles(local[warm:]),
            "grpc_sequential": percentiles(remote[warm:])}


# ---------------------------------------------------------------- processes + open-loop load


@contextlib.contextmanager
def service(module: str, env: dict[str, str], port: int):
    """A service as a subprocess, SERVING before it is yielded; SIGTERM afterwards."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_")) or k == "RECSYS_TRUSTED_KEYS"}
    # One intra-op thread per service (the deployment knob; k8s sets it per pod): the cores are shared.
    environ.update({"PYTHONPATH": str(REPO_ROOT), "RECSYS_LOG_LEVEL": "ERROR", "OMP_NUM_THREADS": "1", **env})
    proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO_ROOT, env=environ)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited with {proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _open_loop(target: str, users: list[str], rate: float, duration_s: float, seed: int) -> dict:
    """Offers ``rate`` req/s for ``duration_s`` s; latency counts from each request's scheduled start."""
    import grpc

    from loadtest.collector import measured_window
    from recsys_contracts.v1 import ranking_pb2_grpc

    rng = np.random.default_rng(seed)
    n = int(rate * duration_s)
    picked = [users[i] for i in rng.integers(len(users), size=n)]
    latencies, codes, degraded = [], {}, 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        for user in users[:WARMUP_REQUESTS]:                          # warm the channel and both services
            await stub.Recommend(request(user), timeout=5)
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            nonlocal degraded
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            try:
                reply = await stub.Recommend(request(picked[i]), timeout=TIMEOUT_S)
                code = "OK"
                degraded += bool(reply.degraded)
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            codes[code] = codes.get(code, 0) + 1
            if code == "OK":
                latencies.append(loop.time() - scheduled)

        # This process holds torch and a loaded version (the in-process side): its collector's full
        # passes would take ~150 ms, charged to every request in flight (loadtest.collector).
        with measured_window() as collector:
            start = loop.time() + 0.05                   # after the window's own full collection
            await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = loop.time() - start
    return {"offered_rps": rate, "achieved_rps": round(codes.get("OK", 0) / elapsed, 1), "codes": codes,
            "degraded_answers": degraded, "client_gc": collector.as_dict(), **percentiles(latencies)}


def thread_cpu_ms(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: thread id -> (its group, CPU seconds so far); {} off Linux
    (``loadtest.stack.thread_cpu_seconds``: ``main`` is the event loop)."""
    from loadtest.stack import thread_cpu_seconds

    return thread_cpu_seconds(pid)


def cpu_per_request(pid: int, before: dict, after: dict, requests: int) -> dict:
    """CPU ms per request of one service between two ``thread_cpu_ms`` readings: its event loop (the
    main thread), all its other threads (DCN / tower workers, gRPC core), and each thread group."""
    from loadtest.stack import thread_cpu_delta

    groups = thread_cpu_delta(after, before)
    loop, total, n = groups.get("main", 0.0), sum(groups.values()), max(requests, 1)
    return {"total_ms": round(1000 * total / n, 2), "event_loop_ms": round(1000 * loop / n, 2),
            "other_threads_ms": round(1000 * (total - loop) / n, 2),
            "by_thread_ms": {group: round(1000 * seconds / n, 2) for group, seconds in sorted(groups.items())}}


def _sweep(target: str, users: list[str], loads: list[float], ramp: list[float], duration_s: float,
           pids: dict[str, int]) -> list[dict]:
    results = []
    for i, rate in enumerate(loads + ramp):
        if i >= len(loads) and results and not _held(results[-1]):
            break                                                    # the ramp stops at the first miss
        before = {name: thread_cpu_ms(pid) for name, pid in pids.items()}
        result = asyncio.run(_open_loop(target, users, rate, duration_s, seed=i))
        requests = sum(result["codes"].values()) + min(WARMUP_REQUESTS, len(users))
        result["cpu_per_request"] = {name: cpu_per_request(pid, before[name], thread_cpu_ms(pid), requests)
                                     for name, pid in pids.items()}
        cpu = "  ".join(f"{name} {v['total_ms']:.1f} (loop {v['event_loop_ms']:.1f})"
                        for name, v in result["cpu_per_request"].items())
        print(f"  {rate:6.0f} req/s offered: p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
              f"achieved {result['achieved_rps']:6.1f}/s  codes {result['codes']}  CPU ms/request: {cpu}  "
              f"client GC longest {result['client_gc']['longest_ms']:.1f} ms",
              flush=True)
        results.append(result)
    return results


def _held(result: dict) -> bool:
    errors = sum(v for k, v in result["codes"].items() if k != "OK")
    return result["p99_ms"] <= P99_TARGET_MS and errors <= 0.01 * sum(result["codes"].values())


def _end_to_end(root: Path, redis_url: str, namespace: str, users: list[str], args) -> dict:
    loads = [float(x) for x in args.loads.split(",") if x]
    ramp = [float(x) for x in args.ramp.split(",") if x]
    shared = {"RECSYS_ARTIFACT_ROOT": str(root), "RECSYS_REDIS_URL": redis_url, "RECSYS_REDIS_NAMESPACE": namespace}
    rport, port = free_port(), free_port()
    ranking_env = {**shared, "RANKING_PORT": str(port), "RANKING_METRICS_PORT": "0",
                   "RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{rport}"}
    out: dict = {}
    with service("retrieval_service", {**shared, "RETRIEVAL_PORT": str(rport), "RETRIEVAL_METRICS_PORT": "0"},
                 rport) as retrieval:
        for label, extra in (("batching_on", {}), ("batching_off", {"RANKING_MICROBATCH_MAX_SIZE": "1"})):
            with service("ranking_service", {**ranking_env, **extra}, port) as ranking:
                if label == "batching_on":
                    out["sequential"] = asyncio.run(_in_process_vs_grpc(
                        root, redis_url, namespace, users, args.sequential_requests, f"127.0.0.1:{port}"))
                    seq = out["sequential"]
                    print(f"sequential: in process p50 {seq['in_process']['p50_ms']:.2f} ms, over gRPC p50 "
                          f"{seq['grpc_sequential']['p50_ms']:.2f} ms", flush=True)
                print(f"{label}:", flush=True)
                out[label] = _sweep(f"127.0.0.1:{port}", users, loads, ramp if label == "batching_on" else [],
                                    args.duration, {"ranking": ranking.pid, "retrieval": retrieval.pid})
    return out


# ---------------------------------------------------------------- report


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, color in (("batching_on", "tab:blue"), ("batching_off", "tab:green")):
        rows = results["end_to_end"][label]
        rates = [r["offered_rps"] for r in rows]
        ax.plot(rates, [r["p50_ms"] for r in rows], "-o", color=color, label=f"p50, DCN micro-batching {label[9:]}")
        ax.plot(rates, [r["p99_ms"] for r in rows], "--s", color=color, label=f"p99, DCN micro-batching {label[9:]}")
    sequential = results["sequential"]
    ax.axhline(sequential["in_process"]["p50_ms"], color="grey", lw=1, label="p50 in process (sequential)")
    ax.axhline(sequential["grpc_sequential"]["p50_ms"], color="black", lw=1, ls="-.",
               label="p50 over gRPC (sequential)")
    ax.axhline(P99_TARGET_MS, color="red", lw=0.8, ls=":", label=f"{P99_TARGET_MS:.0f} ms")
    ax.axhline(20.0, color="orange", lw=0.8, ls=":", label="20 ms")
    ax.set(xlabel="offered load (Recommend req/s, open loop)", ylabel="latency (ms)", yscale="log")
    ax.set_title(f"Recommend(k={K}) from {CANDIDATES} candidates, MovieLens 100K\n"
                 f"retrieval + ranking processes + Redis on one {os.cpu_count()}-core host", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="25,50,100", help="fixed offered loads, req/s")
    parser.add_argument("--ramp", default="150,200,300,400", help="higher loads tried until p99 > 50 ms")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    parser.add_argument("--sequential-requests", type=int, default=300,
                        help="requests of the in-process vs gRPC comparison (each side)")
    parser.add_argument("--artifact-root", type=Path,
                        help="serve this root's CURRENT version (e.g. trained by `python -m trainer`) instead of "
                             "publishing untrained tiny_run models over MovieLens 100K")
    args = parser.parse_args()
    from recsys_contracts.signing import local_key_env
    os.environ.update(local_key_env(REPO_ROOT / "keys"))     # sign what it publishes, trust what it serves
    redis_url = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            if args.artifact_root is None:
                version, users = publish_movielens(root, redis_url, namespace)
                print(f"published version {version} over MovieLens 100K ({len(users)} users)", flush=True)
            else:
                version, users = use_published(args.artifact_root, root, redis_url, namespace)
                print(f"serving version {version} of {args.artifact_root} ({len(users)} users)", flush=True)
            end_to_end = _end_to_end(root, redis_url, namespace, users, args)
        finally:
            drop_namespace(redis_url, namespace)
    sequential = end_to_end.pop("sequential")
    on = end_to_end["batching_on"]
    held = [r["offered_rps"] for r in on if _held(r)]
    at_100 = next((r for r in on if r["offered_rps"] == 100.0), None)
    summary = {
        "sequential_grpc_p50_over_in_process_p50": sequential["grpc_sequential"]["p50_ms"]
        / sequential["in_process"]["p50_ms"],
        "p99_ms_at_100_rps": at_100["p99_ms"] if at_100 else None,
        "highest_load_with_p99_le_50ms_rps": max(held) if held else 0.0,
        "batching": {str(off["offered_rps"]): {"on_p50_ms": on_row["p50_ms"], "on_p99_ms": on_row["p99_ms"],
                                               "off_p50_ms": off["p50_ms"], "off_p99_ms": off["p99_ms"]}
                     for on_row, off in zip(on, end_to_end["batching_off"])},
    }
    results = {"version": "trained (--artifact-root)" if args.artifact_root else "tiny_run, untrained, MovieLens 100K",
               "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "k": K,
               "num_candidates": CANDIDATES, "duration_s": args.duration, "client_timeout_s": TIMEOUT_S,
               "sequential": sequential, "end_to_end": end_to_end, "summary": summary}
    (RESULTS / "ranking_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, RESULTS / "ranking_latency.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS / 'ranking_bench.json'} and {RESULTS / 'ranking_latency.png'}")


if __name__ == "__main__":
    main()
