"""A whole serving stack on loopback for the scenarios: redis-server, retrieval and ranking subprocesses.

``Stack`` owns a work directory (artifact root, logs), publishes the first version, starts its own
``redis-server`` on a free port (no persistence: a restart comes back empty, like a lost cache),
then ``python -m retrieval_service`` and ``python -m ranking_service`` configured through their
environment variables, and waits until both report SERVING on ``grpc.health.v1`` and Redis holds
the version (its ``complete`` marker, which the ranking service's refiller sets). Each process can
be killed, frozen, stopped with SIGTERM and started again on the same port, which is how the
scenarios inject faults. Everything it started is killed on ``close``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import redis
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys_contracts import artifacts, feature_store

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "loadtest"
START_TIMEOUT_S = 120.0   # a service imports torch and loads a version before it reports SERVING
_OWN_PREFIXES = ("RECSYS_", "RETRIEVAL_", "RANKING_")
TRUST_VARS = ("RECSYS_TRUSTED_KEYS", "RECSYS_ALLOW_UNSIGNED")
# Kept from this process's environment for every child: the publisher signs, the services trust.
SIGNING_VARS = ("RECSYS_SIGNING_KEY", *TRUST_VARS)


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_cpu_seconds(stat_path: str | Path) -> float:
    """User + system CPU seconds in a Linux ``/proc/.../stat`` file (a process's or a thread's);
    OSError when it cannot be read (the process or thread is gone, or not Linux)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S     # utime, stime (stat fields 14, 15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``); 0.0 once it is gone or elsewhere."""
    try:
        return stat_cpu_seconds(f"/proc/{pid}/stat")
    except (OSError, IndexError):
        return 0.0


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of a process: thread id -> (its group, user + system CPU seconds so far). The
    group is ``main`` for the process's first thread (where both services run their event loop), the
    thread's OS-level name otherwise (``dcn``, ``tower``: the compute threads, ``recsys_serving.batching``;
    ``event_engine``: gRPC's), and ``other`` for threads named as the process itself (gRPC's poller
    thread, the metrics server). {} once the process is gone or elsewhere than Linux."""
    try:
        process_name = Path(f"/proc/{pid}/comm").read_text().strip()
        tids = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except (OSError, ValueError):
        return {}
    threads = {}
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            seconds = stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, IndexError):      # the thread ended between the listing and the read
            continue
        threads[tid] = ("main" if tid == pid else "other" if name == process_name else name, seconds)
    return threads


def thread_cpu_delta(after: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by thread group between two ``thread_cpu_seconds`` snapshots of one process. A thread
    born in between counts from zero; one that ended in between is missing (its CPU stays in the
    process's total, which is why callers report the process's total beside these)."""
    groups: dict[str, float] = {}
    for tid, (group, seconds) in after.items():
        groups[group] = groups.get(group, 0.0) + seconds - before.get(tid, (group, 0.0))[1]
    return groups


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux ``/proc``; [] elsewhere)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return children


def descendant_pids(pid: int) -> list[int]:
    """The live children of ``pid``, their children, and so on (Linux ``/proc``; [] elsewhere)."""
    found, todo = [], child_pids(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += child_pids(child)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without the services' own names, plus ``settings`` and the repo on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES) or k in SIGNING_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(settings)
    return env


async def wait_serving(target: str, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
    """Polls ``grpc.health.v1`` at ``target`` every 0.1 s until SERVING; TimeoutError after ``timeout_s``.

    ``check`` runs before each poll and may raise (e.g. when the server's process has exited).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            check()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > end:
                raise TimeoutError(f"{target} was not SERVING within {timeout_s:g} s")
            await asyncio.sleep(0.1)


class Process:
    """One child process that can be started again after a kill, a freeze or a SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, so a frozen process dies too), then reap."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    async def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit (the graceful drain); SIGKILL after ``timeout_s``. Returns the status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the process (``self``) and of its live descendants together
        (``children``: the ranking service's shadow worker; with ``<PREFIX>WORKERS`` > 1 the worker
        processes, which do the serving, and their shadow workers)."""
        if not self.alive():
            return {"self": 0.0, "children": 0.0}
        return {"self": cpu_seconds(self.proc.pid),
                "children": sum(cpu_seconds(child) for child in descendant_pids(self.proc.pid))}

    def thread_cpu_s(self) -> dict[int, tuple[str, float]]:
        """The process's own threads' CPU seconds so far (``thread_cpu_seconds``; not its children's)."""
        return thread_cpu_seconds(self.proc.pid) if self.alive() else {}

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class RedisServer(Process):
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server must be installed (on PATH) for the scenarios, got none")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__("redis", [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], dict(os.environ), workdir / "redis.log")

    async def start_and_wait(self, timeout_s: float = 10.0) -> None:
        self.start()
        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=1)
        try:
            end = asyncio.get_running_loop().time() + timeout_s
            while True:
                try:
                    await client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    if asyncio.get_running_loop().time() > end or not self.alive():
                        raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log_tail()}")
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def flush(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=5)
        try:
            await client.flushall()
        finally:
            await client.aclose()


class Service(Process):
    """``python -m <module>`` serving gRPC on ``port`` of loopback."""

    def __init__(self, module: str, port: int, settings: dict[str, str], workdir: Path) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        super().__init__(module, [sys.executable, "-m", module], child_env(settings), workdir / f"{module}.log")

    async def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def check() -> None:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")

        try:
            await wait_serving(self.target, timeout_s, check)
        except TimeoutError:
            raise RuntimeError(f"{self.name} was not SERVING within {timeout_s:g} s: {self.log_tail()}") from None

    async def start_and_wait(self) -> None:
        self.start()
        await self.wait_serving()


class Stack:
    """redis-server + retrieval + ranking over a fresh artifact root in ``workdir``; an async context manager."""

    def __init__(self, workdir: Path, data_dir: Path | None, source_root: Path | None = None, seed: int = 0,
                 service_env: dict[str, str] | None = None) -> None:
        self.workdir, self.data_dir, self.source_root, self.seed = Path(workdir), data_dir, source_root, seed
        self.root = self.workdir / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.workdir)
        # service_env (e.g. RANKING_DEFAULT_CANDIDATES) goes to both services: each ignores the other's prefix.
        shared = {"RECSYS_ARTIFACT_ROOT": str(self.root), "RECSYS_REDIS_URL": self.redis.url,
                  "RECSYS_REDIS_NAMESPACE": NAMESPACE, "RECSYS_LOG_LEVEL": "WARNING",
                  **(service_env or {})}
        retrieval_port, ranking_port, self.ranking_metrics_port = free_port(), free_port(), free_port()
        self.retrieval = Service("retrieval_service", retrieval_port, {
            **shared, "RETRIEVAL_PORT": str(retrieval_port), "RETRIEVAL_METRICS_PORT": "0"}, self.workdir)
        self.ranking = Service("ranking_service", ranking_port, {
            **shared, "RANKING_PORT": str(ranking_port),
            "RANKING_METRICS_PORT": str(self.ranking_metrics_port),
            "RANKING_RETRIEVAL_TARGET": self.retrieval.target}, self.workdir)
        self._published = 0

    @property
    def target(self) -> str:
        return self.ranking.target

    def ranking_counter(self, name: str, label: str) -> dict[str, float]:
        """The ranking service's counter ``name`` (without ``_total``) by the value of ``label``, scraped
        from its Prometheus endpoint (blocking: call it in a thread)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ranking_metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return {sample.labels[label]: sample.value for family in text_string_to_metric_families(text)
                if family.name == name for sample in family.samples if sample.name == f"{name}_total"}

    async def publish(self, count: int, interval_s: float = 0.0, features: bool = False) -> None:
        """Publishes ``count`` versions from a child process at low CPU priority (as if the trainer ran
        elsewhere). With ``features`` each version's features go to Redis before it goes live, as the
        trainer does (Redis must be up). Off by default: on one small host those writes compete with
        the services (10 reloads at 20 req/s: 22 deadline misses with them, 2 without), and the
        scenarios measure the services' reloading; without them the services serve a new version
        from its artifact features (flagged) until their refill has written Redis."""
        argv = [sys.executable, "-m", "loadtest", "publish", "--root", str(self.root), "--count", str(count),
                "--interval-s", str(interval_s), "--seed", str(self.seed + self._published), "--nice", "10"]
        if features:
            argv += ["--redis-url", self.redis.url, "--redis-namespace", NAMESPACE]
        if self.source_root is not None:
            argv += ["--from-root", str(self.source_root)]
        elif self.data_dir is not None:
            argv += ["--data-dir", str(self.data_dir)]
        self._published += count
        with open(self.workdir / "publish.log", "ab") as log:
            child = await asyncio.create_subprocess_exec(*argv, cwd=REPO_ROOT, env=child_env({}), stdout=log,
                                                         stderr=subprocess.STDOUT)
            status = await child.wait()
        if status != 0:
            raise RuntimeError(f"publishing {count} versions failed with status {status}; see "
                               f"{self.workdir / 'publish.log'}")

    async def wait_features(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Waits until Redis holds the current version completely (the services fill it after they start)."""
        version = artifacts.current_version(self.root)
        keys = feature_store.KeyFormat(NAMESPACE)
        client = redis.asyncio.Redis.from_url(self.redis.url, socket_timeout=1)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        try:
            while True:
                pipe = client.pipeline(transaction=False)
                feature_store.queue_is_complete(pipe, keys, version)
                if feature_store.parse_is_complete((await pipe.execute())[0]):
                    return
                if loop.time() > end:
                    raise RuntimeError(f"Redis did not hold version {version} within {timeout_s:g} s: "
                                       f"{self.ranking.log_tail()}")
                await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    async def __aenter__(self) -> Stack:
        try:
            await self.redis.start_and_wait()
            await self.publish(1)
            self.retrieval.start()
            self.ranking.start()
            await asyncio.gather(self.retrieval.wait_serving(), self.ranking.wait_serving())
            await self.wait_features()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for process in (self.ranking, self.retrieval, self.redis):
            process.kill()
