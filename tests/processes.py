"""Child processes that tests stop for real: a free loopback port, and freeze (SIGSTOP), resume, kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


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
