"""Child processes that tests stop for real: a free loopback port, and freeze (SIGSTOP), resume, kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def wait_serving(channel, proc: subprocess.Popen, timeout_s: float = 30.0, log=lambda: "") -> None:
    """Polls ``grpc.health.v1`` over ``channel`` until SERVING; fails when ``proc`` exits first (with
    ``log()``, e.g. its stderr's tail) or after ``timeout_s``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, end = health_pb2_grpc.HealthStub(channel), time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"the service exited with {proc.returncode}: {log()}"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server never became SERVING within {timeout_s} s (exit code {proc.poll()})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildProcess:
    """A ``subprocess.Popen`` in ``self.proc`` that a test freezes, resumes and kills."""

    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kills the process (resumed first, so a frozen one dies too) and reaps it."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
        self.proc.wait(timeout=10)
