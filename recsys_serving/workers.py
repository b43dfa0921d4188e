"""N worker processes of one service behind one gRPC port (``<PREFIX>WORKERS``), and how a child
process leaves with its parent.

A service's Python runs on one core at a time (the GIL). With ``WORKERS`` = N > 1 the process that
``python -m`` started becomes a supervisor: it has validated the configuration already
(``runtime.run_main``), then starts N worker processes, each a whole service (its own version
holder and hot reload, feature store, breakers, admission, micro-batcher; ranking's shadow worker
too, started by the worker on its first sampled request), each binding the SAME port with
``grpc.so_reuseport`` = 1, so the kernel spreads incoming CONNECTIONS over them (not requests: a
client with one long-lived channel talks to one worker; see docs/ARCHITECTURE.md, "Worker processes").
Each worker binds only once it holds a version (``runtime.first_version_before_bind``), so a
connection or a readiness probe never lands on a worker that cannot serve yet.
N = 1 (the default) runs the service in the ``python -m`` process itself, as before: no supervisor.

- Start: the "spawn" start method (fork + exec of a fresh interpreter). gRPC Python supports ``fork``
  without ``exec`` only before any server or channel exists, and only for clients; spawn never
  copies gRPC's (or onnxruntime's, or Redis's) state into a child, whatever the parent has imported.
  The supervisor itself creates no gRPC object. Workers are not daemonic (a daemonic process may
  not start children, and ranking's worker starts its shadow worker).
- Supervision: a worker that exits while the service is not stopping is restarted after a backoff
  (``RESTART_BACKOFF_S``, doubling while workers keep dying young, reset after ``STABLE_S`` up).
  SIGTERM/SIGINT on the supervisor is passed on to every worker as SIGTERM; each drains as a single
  process does (NOT_SERVING, then up to ``GRACE_S`` for in-flight RPCs); the supervisor exits 0 once
  all have exited 0 (1 if one did not), and SIGKILLs any still alive ``GRACE_S`` + ``KILL_MARGIN_S``
  after the signal.
- Orphans: a worker whose supervisor is gone (SIGKILLed: it never passed a signal on) drains and exits
  (``leave_with_the_parent``, also what ranking's shadow worker does).
- Metrics: prometheus_client's multiprocess mode. The supervisor makes a fresh folder, sets
  ``PROMETHEUS_MULTIPROC_DIR`` for the workers (each then writes its samples to files there) and
  serves the one metrics port with a ``MultiProcessCollector`` over the folder: counters and
  histograms are summed over the workers (including those of workers that died), gauges are per
  worker (a ``pid`` label) or summed, by each gauge's ``multiprocess_mode``. Its own:
  ``recsys_worker_restarts_total`` and ``recsys_workers_alive``. The folder is removed on exit. A
  supervisor that was SIGKILLed cannot remove it, so each supervisor holds an flock on a file in its
  folder for its whole life and, on start, removes the folders of its name whose lock nobody holds
  (``sweep_stale_metrics``: the kernel drops a dead process's locks; a PID could be reused, a lock
  cannot), so restarts in one pod do not fill its /tmp.

Port 0 ("any free port") cannot be shared by N processes: ``env.check_service`` refuses it with N > 1.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 30.0)    # the first and the longest wait before restarting a dead worker
STABLE_S = 30.0                    # a worker up this long resets its backoff
KILL_MARGIN_S = 10.0               # after GRACE_S, workers still alive after a stop signal are SIGKILLed
OWNER_LOCK = ".supervisor.lock"    # in a metrics folder: flocked by the supervisor that made it


def sweep_stale_metrics(parent: str, prefix: str) -> list[str]:
    """Removes the folders ``parent/prefix*`` whose ``OWNER_LOCK`` no live process holds; returns them.
    A folder without the lock file (another program's, or one being made) is left alone."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*"))):
        try:
            fd = os.open(os.path.join(path, OWNER_LOCK), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue                    # its supervisor is alive
        finally:
            os.close(fd)                # closing drops our lock too
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def leave_with_the_parent(on_gone: Callable[[], None]) -> bool:
    """Calls ``on_gone`` (from a daemon thread) once this process's ``multiprocessing`` parent has
    exited, however it ended (a SIGKILLed parent passes no signal on); False, and nothing watched, in
    a process that multiprocessing did not start."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return False

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        on_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


def serve_worker(name: str, config, index: int) -> None:
    """A worker's entry point (in the spawned child): JSON logs, then ``<name>.__main__.serve(config)``
    until SIGTERM/SIGINT, or until the supervisor is gone (then it drains as on SIGTERM)."""
    from recsys_serving import runtime

    runtime.configure_logging(config.log_level, worker=index)
    leave_with_the_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    log.info("%s worker %d (pid %d) starting", name, index, os.getpid())
    serve = importlib.import_module(f"{name}.__main__").serve
    asyncio.run(serve(config))


@dataclass
class _Slot:
    """One worker position: its process (None while it waits to be restarted) and its backoff."""

    index: int
    process: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    restart_at: float | None = None
    backoff_s: float = RESTART_BACKOFF_S[0]


class Supervisor:
    """Starts ``config.workers`` workers of the service ``name`` and keeps them running until a signal."""

    def __init__(self, name: str, config) -> None:
        self.name, self.config = name, config
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.stopping_since: float | None = None
        self.metrics_dir: str | None = None
        self._owner_fd: int | None = None      # the flocked OWNER_LOCK of metrics_dir, held until exit
        self.restarts = self.alive = None

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT and every worker has exited; 0 when all exited cleanly, else 1."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._start_metrics()
            for slot in self.slots:
                if self.stopping_since is None:       # a signal during start-up starts no more workers
                    self._start(slot)
            return self._supervise()
        finally:
            for slot in self.slots:
                if slot.process is not None and slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self._owner_fd is not None:
                os.close(self._owner_fd)

    def _start_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        # Set before any worker starts: a spawned worker imports prometheus_client afresh and reads it.
        from recsys_serving import runtime

        prefix = f"{self.name}-metrics-"
        for path in sweep_stale_metrics(tempfile.gettempdir(), prefix):
            log.info("%s: removed the metrics folder %s of a supervisor that is gone", self.name, path)
        self.metrics_dir = tempfile.mkdtemp(prefix=prefix)
        self._owner_fd = os.open(os.path.join(self.metrics_dir, OWNER_LOCK), os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
        os.environ[runtime.MULTIPROC_ENV] = self.metrics_dir
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        # This process's own metrics: prometheus_client was imported here before the variable was
        # set, so they stay in memory and reach the endpoint through this registry only.
        self.restarts = Counter("recsys_worker_restarts", "Worker processes restarted after they died",
                                registry=registry)
        self.alive = Gauge("recsys_workers_alive", "Worker processes running now", registry=registry)
        start_http_server(self.config.metrics_port, addr=self.config.metrics_host, registry=registry)

    def _start(self, slot: _Slot) -> None:
        slot.process = self.context.Process(target=serve_worker, args=(self.name, self.config, slot.index),
                                            name=f"{self.name}-worker-{slot.index}", daemon=False)
        slot.process.start()
        slot.started, slot.restart_at = time.monotonic(), None
        log.info("%s: worker %d started (pid %d)", self.name, slot.index, slot.process.pid)
        self._count_alive()

    def _on_signal(self, signum: int, _frame) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            log.info("%s: %s: stopping %d workers (each drains for up to %.1f s)", self.name,
                     signal.Signals(signum).name, sum(s.process is not None for s in self.slots), self.config.grace_s)
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _supervise(self) -> int:
        failed = False
        while True:
            running = {slot.process.sentinel: slot for slot in self.slots if slot.process is not None}
            if self.stopping_since is not None and not running:
                log.info("%s: every worker has exited", self.name)
                return 1 if failed else 0
            for sentinel in multiprocessing.connection.wait(list(running), timeout=self._timeout()):
                failed |= self._reap(running[sentinel])
            now = time.monotonic()
            if self.stopping_since is not None:
                for slot in self.slots:
                    slot.restart_at = None            # no restarts once stopping (nor a zero wait for one)
                if now - self.stopping_since > self.config.grace_s + KILL_MARGIN_S:
                    for slot in self.slots:
                        if slot.process is not None and slot.process.is_alive():
                            log.error("%s: worker %d still running after the drain; killing it", self.name,
                                      slot.index)
                            slot.process.kill()
                continue
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
                    if self.restarts is not None:
                        self.restarts.inc()

    def _timeout(self) -> float:
        waits = [slot.restart_at - time.monotonic() for slot in self.slots if slot.restart_at is not None]
        return max(0.0, min(waits, default=0.5))

    def _reap(self, slot: _Slot) -> bool:
        """Records a worker's exit (and schedules its restart unless stopping); True when it failed."""
        process = slot.process
        process.join()
        slot.process = None
        if self.metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self.metrics_dir)   # its live gauges go
        self._count_alive()
        if self.stopping_since is not None:
            log.info("%s: worker %d (pid %d) exited with %s", self.name, slot.index, process.pid, process.exitcode)
            return process.exitcode != 0
        now = time.monotonic()
        if now - slot.started >= STABLE_S:
            slot.backoff_s = RESTART_BACKOFF_S[0]
        slot.restart_at = now + slot.backoff_s
        log.error("%s: worker %d (pid %d) exited with %s; restarting it in %.1f s", self.name, slot.index,
                  process.pid, process.exitcode, slot.backoff_s)
        slot.backoff_s = min(2 * slot.backoff_s, RESTART_BACKOFF_S[1])
        return False

    def _count_alive(self) -> None:
        if self.alive is not None:
            self.alive.set(sum(slot.process is not None for slot in self.slots))
