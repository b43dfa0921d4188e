"""``<PREFIX>WORKERS`` = N > 1: N real worker processes behind one port (``recsys_serving.workers``).

Real ``python -m`` services over a tiny signed version on loopback: the workers each hold a
listening socket on the one port and each answer calls (their per-pid gauges on the one metrics
port), a SIGKILLed worker is replaced while the port keeps answering, SIGTERM drains them all and
the supervisor exits 0, a SIGKILLed supervisor takes its workers with it, and bad values exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.client import run_load
from loadtest.config import LoadConfig
from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.workers import OWNER_LOCK, sweep_stale_metrics
from retrieval_service import config as retrieval_config
from tests.conftest import REPO_ROOT
from tests.factories import publish_tiny_version
from tests.processes import free_port, wait_serving
from tests.signing_keys import SIGNING_ENV

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    publish_tiny_version(root, 0)
    return root


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))}
    return {**env, **SIGNING_ENV, "PYTHONPATH": str(REPO_ROOT), **values}


class Service:
    """``python -m <module>`` with ``<PREFIX>WORKERS``; its port, metrics port, and its worker pids."""

    def __init__(self, module: str, prefix: str, root: Path, workers: int, **extra: str) -> None:
        self.port, self.metrics_port, self.count = free_port(), free_port(), workers
        # A file, not a pipe: N workers' logs would fill a pipe nobody reads until the end, and block them.
        self.log = root.parent / f"{module}-{self.port}.log"
        settings = {"RECSYS_ARTIFACT_ROOT": str(root), f"{prefix}PORT": str(self.port),
                    f"{prefix}METRICS_PORT": str(self.metrics_port), f"{prefix}WORKERS": str(workers),
                    f"{prefix}GRACE_S": "5", **extra,
                    "TMPDIR": str(root.parent)}    # the metrics folder: a SIGKILLed supervisor leaves it
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO_ROOT, stderr=log,
                                         env=_env(**settings))

    def wait_serving(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            wait_serving(channel, self.proc, START_TIMEOUT_S, lambda: self.stderr()[-2000:])

    def wait_all_serving(self, gauge: str, version: int = 1) -> set[int]:
        """Waits until every worker holds ``version`` (its per-pid ``gauge``; health checks reach one
        worker per connection); returns the workers' pids."""
        def loaded() -> set[int] | None:
            workers = self.workers()
            versions = _per_pid(self.metrics().get(gauge.removesuffix("_total"), []), gauge)
            return workers if len(workers) == self.count and all(versions.get(pid) == version for pid in workers) else None

        self.wait_serving()
        return _wait(loaded, START_TIMEOUT_S, "not every worker loaded the version")

    def stderr(self) -> str:
        return self.log.read_text()

    def workers(self) -> set[int]:
        """The supervisor's worker processes (not multiprocessing's resource tracker, also its child)."""
        return {pid for pid in _children(self.proc.pid) if b"spawn_main" in _cmdline(pid)}

    def metrics(self) -> dict[str, list]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {family.name: family.samples for family in text_string_to_metric_families(text)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.workers():        # none normally: orphans would show here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children |= {int(child) for child in task.read_text().split()}
        except OSError:
            continue
    return children


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _listening_pids(port: int) -> dict[int, int]:
    """{pid: listening sockets it holds on 127.0.0.1:port} over every process (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):        # gRPC listens on IPv4-mapped IPv6 sockets
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":      # state 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        count = sum(link in inodes for link in links)
        if count:
            holders[int(proc.name)] = count
    return holders


def _retrieve_on_new_connections(port: int, calls: int) -> None:
    """One Retrieve per new connection (the kernel spreads connections, not calls, over the workers)."""
    for i in range(calls):
        # A local subchannel pool: a new TCP connection per channel instead of the process-wide shared one.
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            chunks = list(stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=str(1 + i % 5), num_candidates=5),
                                        timeout=10))
            assert chunks and chunks[0].item_ids


def _per_pid(samples: list, name: str) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value for s in samples if s.name == name}


def _wait(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_two_workers_share_the_port_both_answer_and_sigterm_stops_them_all(root):
    service = Service("retrieval_service", "RETRIEVAL_", root, 2)
    try:
        workers = service.wait_all_serving("retrieval_model_version")
        assert len(workers) == 2 and service.proc.pid not in workers
        # Each worker holds its own listening socket on the port; the supervisor holds none. A worker binds
        # only after its first version loaded (and its gauge said so), so the second bind may lag a moment.
        expected = {pid: 1 for pid in workers}
        _wait(lambda: _listening_pids(service.port) == expected, START_TIMEOUT_S,
              f"each worker {sorted(workers)} listening on the port once, the supervisor not")
        assert _listening_pids(service.port) == expected

        _retrieve_on_new_connections(service.port, 24)        # all on one worker: odds 2 in 2**24
        metrics = service.metrics()
        served = _per_pid(metrics["retrieval_service_seconds_estimate"], "retrieval_service_seconds_estimate")
        assert set(served) == workers and all(seconds > 0 for seconds in served.values()), served
        (ok,) = [s.value for s in metrics["retrieval_requests"] if s.labels == {"code": "OK"}
                 and s.name == "retrieval_requests_total"]
        assert ok == 24.0                                      # summed over the workers
        assert [s.value for s in metrics["recsys_workers_alive"]] == [2.0]

        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
        stderr = service.stderr()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        assert stderr.count("NOT_SERVING, draining") == 2 and "every worker has exited" in stderr
        # each worker's lines carry its index; the supervisor's carry none
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        draining = sorted(line.get("worker", -1) for line in lines if "NOT_SERVING, draining" in line["msg"])
        assert draining == [0, 1], draining
        assert all("worker" not in line for line in lines if "every worker has exited" in line["msg"])
    finally:
        service.stop()


def test_a_worker_listens_only_once_it_holds_a_version(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    refused = publish_tiny_version(root, 0, signer=None)          # unsigned: every worker refuses it
    service = Service("retrieval_service", "RETRIEVAL_", root, 2, RETRIEVAL_POLL_INTERVAL_S="0.2")
    try:
        _wait(lambda: service.stderr().count(f"refused version {refused}") == 2, START_TIMEOUT_S,
              "both workers did not refuse the unsigned version")
        assert len(service.workers()) == 2
        # Nobody listens: a connection (or a readiness probe) is refused rather than reaching a
        # worker with nothing to serve.
        assert _listening_pids(service.port) == {}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", service.port), timeout=5).close()

        good = publish_tiny_version(root, 0)
        workers = service.wait_all_serving("retrieval_model_version", good)
        _wait(lambda: _listening_pids(service.port) == {pid: 1 for pid in workers}, 30,
              "a worker holding the version does not listen")
        _retrieve_on_new_connections(service.port, 8)
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
    finally:
        service.stop()


@pytest.mark.parametrize("module, prefix", [("ranking_service", "RANKING_"), ("retrieval_service", "RETRIEVAL_")])
def test_workers_stopped_before_their_first_version_exit_cleanly(tmp_path, module, prefix):
    root = tmp_path / "artifacts"
    root.mkdir()
    refused = publish_tiny_version(root, 0, signer=None)
    extra = {"RANKING_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}"} if prefix == "RANKING_" else {}
    service = Service(module, prefix, root, 2, **{f"{prefix}POLL_INTERVAL_S": "0.2"}, **extra)
    try:
        _wait(lambda: service.stderr().count(f"refused version {refused}") == 2, START_TIMEOUT_S,
              "both workers did not refuse the unsigned version")
        assert _listening_pids(service.port) == {}
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
        stderr = service.stderr()
        assert stderr.count("stopped before the first version loaded") == 2, stderr[-3000:]
        assert "every worker has exited" in stderr and "Traceback" not in stderr
    finally:
        service.stop()


def _metrics_folders(parent: Path) -> set[str]:
    return set(glob.glob(os.path.join(parent, "retrieval_service-metrics-*")))


def test_a_killed_worker_is_replaced_and_a_killed_supervisor_takes_its_workers_along(root):
    before = _metrics_folders(root.parent)                    # the services' TMPDIR here
    service = Service("retrieval_service", "RETRIEVAL_", root, 2)
    try:
        first = service.wait_all_serving("retrieval_model_version")
        (folder,) = _metrics_folders(root.parent) - before     # this supervisor's
        assert folder not in sweep_stale_metrics(str(root.parent), "retrieval_service-metrics-")
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # The port keeps answering: a new connection lands on the live worker (or on the dead one's
        # socket before the kernel closes it; gRPC then fails the call and the client retries).
        for attempt in range(20):
            try:
                _retrieve_on_new_connections(service.port, 1)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        else:
            raise AssertionError("the port stopped answering after one worker was killed")
        replaced = _wait(lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(service.workers()),
                         30, "no replacement worker started")
        assert first - {victim} <= replaced
        _wait(lambda: set(_listening_pids(service.port)) == replaced, START_TIMEOUT_S,
              "the replacement never listened on the port")
        restarts = service.metrics()["recsys_worker_restarts"]
        assert [s.value for s in restarts if s.name == "recsys_worker_restarts_total"] == [1.0]

        service.proc.kill()                                    # no signal passed on: the workers notice
        service.proc.wait()
        _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in replaced), 30,
              "workers outlived their supervisor")
        # SIGKILLed, it could not remove its metrics folder; the next supervisor's sweep does
        assert os.path.isdir(folder)
        assert folder in sweep_stale_metrics(str(root.parent), "retrieval_service-metrics-")
        assert not os.path.exists(folder)
    finally:
        service.stop()


def test_the_sweep_removes_only_unlocked_folders_of_its_prefix(tmp_path):
    def folder(name: str, lock: bool) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"x")
        if lock:
            (path / OWNER_LOCK).touch()
        return path

    stale, alive = folder("svc-metrics-a", lock=True), folder("svc-metrics-b", lock=True)
    unowned, other = folder("svc-metrics-c", lock=False), folder("other-metrics-d", lock=True)
    held = os.open(alive / OWNER_LOCK, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)                       # a live supervisor's lock
        assert sweep_stale_metrics(str(tmp_path), "svc-metrics-") == [str(stale)]
    finally:
        os.close(held)
    assert not stale.exists() and alive.exists() and unowned.exists() and other.exists()
    assert sweep_stale_metrics(str(tmp_path), "svc-metrics-") == [str(alive)]     # its owner is gone now


def test_two_ranking_workers_answer_the_load_generators_channels_and_reach_both_retrieval_workers(root):
    retrieval = Service("retrieval_service", "RETRIEVAL_", root, 2)
    # 2 ranking workers x 8 connections to retrieval, used in turn: both retrieval workers get calls.
    ranking = Service("ranking_service", "RANKING_", root, 2, RANKING_RETRIEVAL_TARGET=f"127.0.0.1:{retrieval.port}",
                      RANKING_RETRIEVAL_CHANNELS="8")
    try:
        retrieval.wait_all_serving("retrieval_model_version")
        ranking.wait_all_serving("ranking_model_version")
        # The load generator's 16 connections (odds that one worker gets them all: 2 in 2**16), used in turn.
        document, outcomes = asyncio.run(run_load(LoadConfig(
            target=f"127.0.0.1:{ranking.port}", rate=40, duration_s=1.0, k=3, users_from="5", channels=16,
            deadline_ms=5000, connect_timeout_s=30)))
        assert {outcome.code for outcome in outcomes} == {"OK"} and len(outcomes) == 40
        metrics = ranking.metrics()
        served = _per_pid(metrics["ranking_service_seconds_estimate"], "ranking_service_seconds_estimate")
        assert set(served) == ranking.workers() and all(seconds > 0 for seconds in served.values()), served
        metrics = retrieval.metrics()
        served = _per_pid(metrics["retrieval_service_seconds_estimate"], "retrieval_service_seconds_estimate")
        assert set(served) == retrieval.workers() and all(seconds > 0 for seconds in served.values()), served
        for service in (ranking, retrieval):
            service.proc.send_signal(signal.SIGTERM)
            assert service.proc.wait(timeout=60) == 0
    finally:
        ranking.stop()
        retrieval.stop()


def test_port_zero_cannot_be_shared_by_several_workers(tmp_path):
    assert retrieval_config.from_env({"RECSYS_ARTIFACT_ROOT": str(tmp_path), "RETRIEVAL_PORT": "0"}).workers == 1
    with pytest.raises(ValueError, match=r"^RETRIEVAL_PORT must be a fixed port \(1\.\.65535\) when "
                                         r"RETRIEVAL_WORKERS > 1 \(2 worker processes share it\), got 0"):
        retrieval_config.from_env({"RECSYS_ARTIFACT_ROOT": str(tmp_path), "RETRIEVAL_PORT": "0",
                                   "RETRIEVAL_WORKERS": "2"})


@pytest.mark.parametrize("module, prefix", [("retrieval_service", "RETRIEVAL_"), ("ranking_service", "RANKING_")])
def test_a_bad_workers_value_exits_2_before_any_worker_starts(tmp_path, module, prefix):
    done = subprocess.run([sys.executable, "-m", module], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env=_env(RECSYS_ARTIFACT_ROOT=str(tmp_path), **{f"{prefix}WORKERS": "100"}))
    assert done.returncode == 2
    assert f"{prefix}WORKERS must be an integer in [1, 64], got '100'" in done.stderr
