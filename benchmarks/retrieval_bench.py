"""Retrieval benchmarks: per-stage latency on MovieLens 100K, ANN vs exact on 1M x 64, micro-batching on/off.

    python benchmarks/retrieval_bench.py [--only stages,ann,batching] [--items 1000000]

Prints the figures and writes ``bench_results/retrieval_bench.json``. Sections:

- ``stages``: publishes a version built from the real MovieLens 100K data (untrained seeded models,
  ``trainer.tiny.tiny_run`` sizes: the cost of the pipeline, not the quality), writes its features
  to Redis ($RECSYS_TEST_REDIS_URL or the local default, a private namespace deleted afterwards),
  and times Retrieve(500) for known users: each stage in process (features = one Redis round
  trip, tower, search) and the whole call over gRPC on loopback.
- ``ann``: 1M synthetic clustered unit vectors x 64 dims; exact flat inner-product search, an IVF
  index (sweep of nprobe) and an HNSW index (sweep of efSearch) measured side by side in one run:
  recall@100 against exact, and single-query latency (one thread) timed in ``--repeats`` rounds,
  each round timing exact and every setting in turn, so a slow spell of a shared machine hits them
  alike; the figures are medians over rounds. For each kind, the smallest setting reaching recall
  >= 0.95 gives the speed-up over exact.
- ``batching``: the server in a subprocess with micro-batching on, then off; an open-loop client
  offers the same request rates to both and records throughput and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
WHEN = 1_700_000_000   # fixed request time (seconds since the epoch)
# ANN data: per-coordinate noise around 2000 cluster centres (centres ~N(0, 1) in 64 dims, norm ~8;
# a point sits ~0.8 * 8 = 6.4 from its centre, so clusters overlap): clustered like trained
# embeddings without being trivially separable. Queries come from the same centres.
NOISE = 0.8


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds."""
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": int(ms.size)}


# ---------------------------------------------------------------- MovieLens version


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


def drop_namespace(redis_url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    client.close()


# ---------------------------------------------------------------- stages


async def _stages(root: Path, redis_url: str, namespace: str, users: list[str], n: int) -> dict:
    import grpc

    from recsys_contracts.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
    from retrieval_service.config import RetrievalConfig
    from retrieval_service.server import create_server
    from retrieval_service.validation import Query

    config = RetrievalConfig(artifact_root=root, redis_url=redis_url, redis_namespace=namespace, port=0,
                             metrics_port=0, max_candidates=1000, chunk_size=100, redis_timeout_ms=1000,
                             trusted_keys=Path(os.environ["RECSYS_TRUSTED_KEYS"]))
    server, port, app = await create_server(config)
    while not app.holder.ready:
        await asyncio.sleep(0.05)
    state, rng = app.holder.current, np.random.default_rng(0)
    picked = [users[i] for i in rng.integers(len(users), size=n)]
    stages: dict[str, list[float]] = {"features": [], "batch_wait": [], "tower": [], "search": [], "generate": []}
    for user in picked:   # in process: what each stage costs for one request
        started = time.perf_counter()
        result = await app.generator.generate(state, Query(user, 500, {}, {}, (), WHEN, False), time.monotonic() + 5)
        stages["generate"].append(time.perf_counter() - started)
        for name in ("features", "batch_wait", "tower", "search"):
            stages[name].append(result.stages[name])
        assert len(result.item_ids) == 500 and not result.degraded
    end_to_end = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for user in picked:
            request = retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=500,
                                                    context=common_pb2.Context(timestamp_s=WHEN))
            started = time.perf_counter()
            chunks = [chunk async for chunk in stub.Retrieve(request, timeout=5)]
            end_to_end.append(time.perf_counter() - started)
            assert sum(len(c.item_ids) for c in chunks) == 500
    await app.close(grace_s=0)
    return {"requests": n, "num_candidates": 500, "chunk_size": 100, "backend": state.backend,
            "n_items": state.tables.n_items, "n_users": state.tables.n_users, "dim": state.dim,
            **{name: percentiles(values) for name, values in stages.items()},
            "grpc_end_to_end": percentiles(end_to_end)}


# ---------------------------------------------------------------- ANN vs exact


def clustered_unit_vectors(centres: np.ndarray, n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """(n, D) float32 unit vectors scattered around random rows of ``centres`` (C, D), item-embedding-like."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):   # in slices: keeps the temporaries small (memory < 4 GB)
        stop = min(n, start + 100_000)
        block = centres[rng.integers(len(centres), size=stop - start)]
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def single_query_seconds(index, queries: np.ndarray, k: int) -> list[float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None, :], k)
        times.append(time.perf_counter() - started)
    return times


def _timed_build(build, *args) -> tuple[object, float]:
    started = time.perf_counter()
    index = build(*args)
    return index, time.perf_counter() - started


def _chosen(rows: list[dict]) -> dict:
    """The cheapest setting with recall@100 >= 0.95 (the sweeps run from cheap to dear), else the best."""
    good = [row for row in rows if row["recall@100"] >= 0.95]
    return good[0] if good else max(rows, key=lambda row: row["recall@100"])


def ann(n_items: int, dim: int, n_queries: int, nprobes: list[int], ef_searches: list[int], repeats: int,
        hnsw_m: int, ef_construction: int) -> dict:
    import faiss

    from recsys_contracts.ann import FaissIndex, IndexParams, build_index, recall_against_exact

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    items = clustered_unit_vectors(centres, n_items, rng, NOISE)
    queries = clustered_unit_vectors(centres, n_queries, rng, NOISE)   # users live near the same clusters
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    nlist = 512
    exact = build_index(items, ids, IndexParams(kind="flat"))   # FAISS flat = exact search, the reference
    ivf, ivf_build_s = _timed_build(build_index, items, ids, IndexParams(kind="ivf", nlist=nlist))
    hnsw_params = IndexParams(kind="hnsw", hnsw_m=hnsw_m, ef_construction=ef_construction)
    hnsw, hnsw_build_s = _timed_build(build_index, items, ids, hnsw_params)   # all cores (OpenMP)
    del items
    # Settings share one built index each; FaissIndex applies nprobe / efSearch when it is made, so a
    # view is made right before each use.
    settings = ([("ivf", "nprobe", v, ivf, IndexParams(kind="ivf", nlist=nlist, nprobe=v)) for v in nprobes]
                + [("hnsw", "ef_search", v, hnsw, IndexParams(kind="hnsw", hnsw_m=hnsw_m,
                                                              ef_construction=ef_construction, ef_search=v))
                   for v in ef_searches])
    # One thread per query, as in the service (concurrency comes from requests, not OpenMP).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    recalls = [recall_against_exact(FaissIndex(built.index, params), exact, queries, k=100)
               for _, _, _, built, params in settings]       # flat FAISS stands in for the exact twin
    exact_p50, setting_p50 = [], [[] for _ in settings]       # ms, one entry per round
    for _ in range(repeats):
        exact_p50.append(1000 * float(np.median(single_query_seconds(exact, queries, 100))))
        for i, (_, _, _, built, params) in enumerate(settings):
            setting_p50[i].append(1000 * float(np.median(single_query_seconds(FaissIndex(built.index, params),
                                                                              queries, 100))))
    faiss.omp_set_num_threads(threads)
    exact_ms = float(np.median(exact_p50))
    sweeps: dict[str, list[dict]] = {"ivf": [], "hnsw": []}
    for (kind, knob, value, _, _), recall, rounds in zip(settings, recalls, setting_p50):
        p50 = float(np.median(rounds))
        sweeps[kind].append({knob: value, "recall@100": recall, "p50_ms": p50, "p50_ms_rounds": rounds,
                             "speedup_p50": exact_ms / p50})
    chosen = {kind: _chosen(rows) for kind, rows in sweeps.items()}
    return {"n_items": n_items, "dim": dim, "queries": n_queries, "repeats": repeats,
            "data": f"2000 clusters, noise {NOISE}, unit norm",
            "index": {"ivf": f"IVF{nlist},Flat (inner product)",
                      "hnsw": f"HNSW{hnsw_m},Flat efConstruction {ef_construction} (inner product)"},
            "build_s": {"ivf": ivf_build_s, "hnsw": hnsw_build_s, "threads": threads},
            "exact_flat": {"p50_ms": exact_ms, "p50_ms_rounds": exact_p50},
            "ivf_sweep": sweeps["ivf"], "hnsw_sweep": sweeps["hnsw"], "chosen": chosen,
            "target_met": {kind: row["recall@100"] >= 0.95 and row["speedup_p50"] >= 20
                           for kind, row in chosen.items()}}


def ann_lines(result: dict) -> list[str]:
    """The section's headline: exact, and each kind's chosen setting."""
    lines = [f"exact flat: p50 {result['exact_flat']['p50_ms']:.2f} ms (median of {result['repeats']} rounds)"]
    for kind, knob in (("ivf", "nprobe"), ("hnsw", "ef_search")):
        row = result["chosen"][kind]
        lines.append(f"{kind} {knob}={row[knob]}: recall@100 {row['recall@100']:.3f}, p50 {row['p50_ms']:.3f} ms, "
                     f"{row['speedup_p50']:.1f}x exact (build {result['build_s'][kind]:.0f} s)")
    return lines


# ---------------------------------------------------------------- micro-batching


async def _serve(args: argparse.Namespace) -> None:
    """The ``serve`` subcommand: one retrieval server with micro-batching on or off, until SIGTERM."""
    from retrieval_service.config import RetrievalConfig
    from retrieval_service.server import create_server

    config = RetrievalConfig(artifact_root=Path(args.root), redis_url=args.redis_url, redis_namespace=args.namespace,
                             port=0, metrics_port=0, chunk_size=100, microbatch_max_size=32,
                             microbatch_max_wait_ms=float(args.max_wait_ms), redis_timeout_ms=1000,
                             trusted_keys=Path(os.environ["RECSYS_TRUSTED_KEYS"]))
    _, port, app = await create_server(config, batching=args.batching == "on")
    while not app.holder.ready:
        await asyncio.sleep(0.05)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    Path(args.port_file).write_text(str(port))
    await stop.wait()
    await app.close(grace_s=0)


async def _offer(port: int, users: list[str], rate: float, duration_s: float, k: int) -> dict:
    """Open loop: request i starts at i / rate seconds whatever the answers do; latency counts from then."""
    import grpc

    from loadtest.collector import measured_window
    from recsys_contracts.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

    loop = asyncio.get_running_loop()
    latencies, errors, finished = [], [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for user in users[:20]:   # warm the channel and the server
            _ = [c async for c in stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=k))]

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            request = retrieval_pb2.RetrieveRequest(user_id=users[i % len(users)], num_candidates=k,
                                                    context=common_pb2.Context(timestamp_s=WHEN))
            try:
                _ = [c async for c in stub.Retrieve(request, timeout=2.0)]
                latencies.append(loop.time() - scheduled)
                finished.append(loop.time())
            except grpc.aio.AioRpcError as error:
                errors.append(error.code().name)

        with measured_window() as collector:       # this process holds torch: see loadtest.collector
            start = loop.time() + 0.05                   # after the window's own full collection
            await asyncio.gather(*(one(i) for i in range(int(rate * duration_s))))
    span = max(finished) - start if finished else float("nan")
    return {"offered_rps": rate, "completed": len(latencies), "errors": len(errors),
            "throughput_rps": len(latencies) / span, "client_gc": collector.as_dict(),
            **percentiles(latencies or [float("nan")])}


def batching(root: Path, redis_url: str, namespace: str, users: list[str], rates: list[float],
             duration_s: float, k: int, max_wait_ms: float) -> dict:
    results = {}
    for mode in ("on", "off"):
        port_file = Path(tempfile.mkstemp(prefix="retrieval-port-")[1])
        port_file.write_text("")
        server = subprocess.Popen([sys.executable, __file__, "serve", "--root", str(root), "--redis-url", redis_url,
                                   "--namespace", namespace, "--batching", mode, "--port-file", str(port_file),
                                   "--max-wait-ms", str(max_wait_ms)],
                                  cwd=REPO_ROOT)
        try:
            while not port_file.read_text():
                if server.poll() is not None:
                    raise RuntimeError(f"benchmark server exited with {server.returncode}")
                time.sleep(0.1)
            port = int(port_file.read_text())
            results[mode] = [asyncio.run(_offer(port, users, rate, duration_s, k)) for rate in rates]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            port_file.unlink()
    summary = []
    for on, off in zip(results["on"], results["off"]):
        summary.append({"offered_rps": on["offered_rps"], "throughput_on": on["throughput_rps"],
                        "throughput_off": off["throughput_rps"], "p99_on_ms": on["p99_ms"],
                        "p99_off_ms": off["p99_ms"], "p50_on_ms": on["p50_ms"], "p50_off_ms": off["p50_ms"]})
    return {"num_candidates": k, "duration_s": duration_s, "microbatch_max_size": 32,
            "microbatch_max_wait_ms": max_wait_ms, "runs": results, "summary": summary}


# ---------------------------------------------------------------- main


def _print(title: str, data: dict) -> None:
    print(f"\n== {title}")
    print(json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="internal: run one benchmark server")
    for flag in ("--root", "--redis-url", "--namespace", "--port-file"):
        serve.add_argument(flag, required=True)
    serve.add_argument("--batching", choices=("on", "off"), required=True)
    serve.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--only", default="stages,ann,batching", help="comma-separated sections")
    parser.add_argument("--items", type=int, default=1_000_000, help="ANN section: catalog size")
    parser.add_argument("--repeats", type=int, default=5, help="ANN section: timing rounds (medians reported)")
    parser.add_argument("--hnsw-m", type=int, default=32, help="ANN section: HNSW neighbours per node")
    parser.add_argument("--ef-construction", type=int, default=64, help="ANN section: HNSW build candidate list")
    parser.add_argument("--requests", type=int, default=200, help="stages section: requests timed")
    parser.add_argument("--rates", default="100,200,400", help="batching section: offered req/s")
    parser.add_argument("--duration", type=float, default=5.0, help="batching section: seconds per rate")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="batching section: longest wait for a batch to fill (0 = run what is queued; "
                             "batches still form while the previous one runs)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args))
        return 0
    sections = set(args.only.split(","))
    from recsys_contracts.signing import local_key_env
    os.environ.update(local_key_env(REPO_ROOT / "keys"))      # sign what it publishes, trust what it serves
    redis_url = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    report: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        try:
            if sections & {"stages", "batching"}:
                version, users = publish_movielens(Path(tmp), redis_url, namespace)
            if "stages" in sections:
                report["stages"] = asyncio.run(_stages(Path(tmp), redis_url, namespace, users, args.requests))
                _print("Retrieve(500) on MovieLens 100K, per stage (in process) and over gRPC", report["stages"])
            if "batching" in sections:
                rates = [float(r) for r in args.rates.split(",")]
                report["batching"] = batching(Path(tmp), redis_url, namespace, users, rates, args.duration, 100,
                                               args.max_wait_ms)
                _print("micro-batching on vs off, Retrieve(100), open loop", report["batching"]["summary"])
        finally:
            drop_namespace(redis_url, namespace)
    if "ann" in sections:
        report["ann"] = ann(args.items, 64, 200, [1, 2, 4, 8, 16, 32, 64], [32, 64, 128, 256, 512], args.repeats,
                            args.hnsw_m, args.ef_construction)
        _print(f"ANN (IVF, HNSW) vs exact flat, {args.items} x 64", report["ann"])
        print("\n".join(ann_lines(report["ann"])))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval_bench.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {RESULTS / 'retrieval_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
