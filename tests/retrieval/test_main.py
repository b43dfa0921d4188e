"""``python -m retrieval_service`` as a real process: serves, then exits cleanly on SIGTERM; bad config exits 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest

from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from tests.conftest import REPO_ROOT
from tests.processes import free_port, wait_serving
from tests.signing_keys import SIGNING_ENV


def _env(**names: str) -> dict[str, str]:
    """The parent environment without project variables, plus ``names``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "RETRIEVAL_", "RANKING_"))} | SIGNING_ENV
    return {**env, **names}


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(published):
    root, version = published
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "retrieval_service"], cwd=REPO_ROOT,
                            env=_env(RECSYS_ARTIFACT_ROOT=str(root), RETRIEVAL_PORT=str(port),
                                     RETRIEVAL_METRICS_PORT="0", RETRIEVAL_GRACE_S="5",
                                     RETRIEVAL_GIL_SWITCH_MS="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc)
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            chunks = list(stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id="1", num_candidates=5), timeout=5))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {c.model_version for c in chunks} == {version}
    assert proc.returncode == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert any("NOT_SERVING" in m for m in messages) and messages[-1] == "retrieval service stopped"
    assert "GIL switch interval 0.5 ms" in messages                      # RETRIEVAL_GIL_SWITCH_MS applied


def test_bad_configuration_exits_2_naming_the_variable(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "retrieval_service"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=_env(RECSYS_ARTIFACT_ROOT=str(tmp_path), RETRIEVAL_PORT="not-a-port"))
    assert proc.returncode == 2
    assert "RETRIEVAL_PORT" in proc.stderr and "not-a-port" in proc.stderr
