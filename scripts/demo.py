"""The main job, end to end on one machine: train -> publish -> serve -> query -> stop.

Trains on MovieLens 100K (from $RECSYS_DATA_DIR, or downloaded), publishes a version into
./artifacts, starts the retrieval and ranking services as real processes (Redis-backed when
RECSYS_REDIS_URL is set, else features served from the artifact in process), asks the ranking
service for recommendations for a few users over gRPC and prints them with movie titles (carried
in the version), scores and both model versions, records that the first user rated their top item
and asks again (the item is gone, and the history the user tower reads has grown), starts the HTTP gateway in front of ranking and
prints its web page's URL (waiting for Enter when run from a terminal), then stops everything with
SIGTERM (graceful drain).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsys_contracts.signing import local_key_env
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{target} did not report SERVING within {timeout_s:.0f} s")


def wait_http_ready(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def show(stub: ranking_pb2_grpc.RankingServiceStub, user: str, k: int) -> ranking_pb2.RecommendResponse:
    """Asks for ``k`` recommendations for ``user`` and prints them with titles; returns the reply."""
    reply = stub.Recommend(ranking_pb2.RecommendRequest(
        user_id=user, k=k, context=common_pb2.Context(timestamp_s=int(time.time())),
        options=ranking_pb2.RecommendOptions(include_item_metadata=True)), timeout=2.0)
    flags = [common_pb2.DegradedPath.Name(d) for d in reply.degraded]
    print(f"\nuser {user}  (retrieval v{reply.retrieval_version}, ranking v{reply.ranking_version}"
          f"{', ' + ', '.join(flags) if flags else ''})")
    print(f"  {'#':>2}  {'movie':<48} {'score':>6} {'ctr':>6} {'rating':>6}")
    for rank, item in enumerate(reply.items, 1):
        title = item.title or str(item.item_id)
        print(f"  {rank:>2}  {title:<48.48} {item.score:>6.3f} {item.ctr:>6.3f} {item.predicted_rating:>6.2f}")
    return reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    parser.add_argument("--users", default="1,42,196,500", help="user ids to ask for")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true", help="serve the version already published")
    parser.add_argument("--http-port", type=int, default=8080, help="the gateway's port (the page's URL)")
    parser.add_argument("trainer_args", nargs="*", help="extra `--set section.key=value` for the trainer")
    args = parser.parse_args()
    env = {**os.environ, "RECSYS_ARTIFACT_ROOT": args.artifacts, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("RECSYS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    env.update(local_key_env(ROOT / "keys", env))   # versions are signed: a key pair under keys/ (gitignored)
    if not args.skip_training:
        print("== 1/4 training on MovieLens 100K and publishing (progress below)", flush=True)
        trainer = [sys.executable, "-m", "trainer", "--set", "run.output_dir=runs/demo", *args.trainer_args]
        if subprocess.run(trainer, env=env, cwd=ROOT).returncode not in (0, 3):
            return 1
    retrieval_port, ranking_port = free_port(), free_port()
    service_env = {**env, "RETRIEVAL_PORT": str(retrieval_port), "RETRIEVAL_METRICS_PORT": "0",
                   "RANKING_PORT": str(ranking_port), "RANKING_METRICS_PORT": "0",
                   "RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{retrieval_port}", "RECSYS_LOG_LEVEL": "WARNING"}
    print("== 2/4 starting the retrieval and ranking services", flush=True)
    procs = [subprocess.Popen([sys.executable, "-m", name], env=service_env, cwd=ROOT)
             for name in ("retrieval_service", "ranking_service")]
    try:
        wait_serving(f"127.0.0.1:{retrieval_port}", 120)
        wait_serving(f"127.0.0.1:{ranking_port}", 120)
        print("== 3/4 asking the ranking service (gRPC Recommend)", flush=True)
        with grpc.insecure_channel(f"127.0.0.1:{ranking_port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            replies = {user: show(stub, user, args.k) for user in args.users.split(",")}
            # What a backend does when the user acts: record it; the very next Recommend sees it
            # (excluded, and in the history the user tower reads; with Redis, in both services).
            user, top = next(iter(replies.items()))
            if top.items:
                watched = top.items[0]
                try:
                    stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
                        common_pb2.Interaction(user_id=user, item_id=watched.item_id, rating=5.0,
                                               timestamp_s=int(time.time()))]), timeout=2.0)
                    print(f"\nrecorded: user {user} rated {watched.title or watched.item_id} 5 stars; asking again")
                    show(stub, user, args.k)
                except grpc.RpcError as error:
                    print(f"\nrecording an interaction was refused: {error.code().name} {error.details()}")
        gateway_env = {**env, "GATEWAY_PORT": str(args.http_port), "GATEWAY_HOST": "127.0.0.1",
                       "GATEWAY_RANKING_TARGET": f"127.0.0.1:{ranking_port}", "RECSYS_LOG_LEVEL": "WARNING"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway"], env=gateway_env, cwd=ROOT))
        page = f"http://127.0.0.1:{args.http_port}/"
        wait_http_ready(page + "readyz", 60)
        print(f"\nThe web page: {page}   (the HTTP API: {page}docs)", flush=True)
        if sys.stdin.isatty():
            input("Press Enter to stop the services. ")
    finally:
        print("\n== 4/4 stopping the services (SIGTERM, graceful drain)", flush=True)
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
