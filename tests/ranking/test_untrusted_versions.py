"""Versions that would run code or carry changed weights are refused by BOTH services, with real loaders.

Both services start in this process on the session's signed version (their own holders, the real
loaders) and then CURRENT moves to a tampered copy, as an attacker who can write the artifact volume
would publish it: files changed, the manifest's checksums recomputed, the old signature copied
beside it. Each service must refuse the copy (reason ``signature``), keep answering from the old
version, and no code from the copy may run. A copy signed with the trusted key itself (a stolen key)
still cannot run code: its "program" is refused by the ONNX loader (reason ``load``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import zipfile
from pathlib import Path

import grpc
import onnx
import pytest
import torch

from ranking_service.server import create_server
from recsys_contracts import artifacts
from recsys_contracts.signing import SIGNATURE_FILE
from recsys_contracts.v1 import ranking_pb2_grpc
from retrieval_service.server import create_server as create_retrieval_server
from tests.ranking.harness import config, run, sample
from tests.ranking.test_recommend import recommend
from tests.retrieval.harness import config as retrieval_config
from tests.signing_keys import SIGNER

pytestmark = pytest.mark.slow


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return x * 2


def shape_expression_archive(path: Path, marker: Path) -> bytes:
    """A torch.export archive whose shape expression runs ``touch marker`` when torch.export.load
    parses it (sympy evaluates the text): the attack the ONNX format closes."""
    batch = torch.export.Dim("b", min=2, max=100)
    torch.export.save(torch.export.export(_Tiny(), (torch.ones(3, 4),), dynamic_shapes=({0: batch},)), path)
    crafted = path.with_name("crafted.pt2")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("models/model.json"):
                text = data.decode()
                symbol = text[text.index("Symbol('"):text.index(")", text.index("Symbol('")) + 1]
                payload = f"(__import__('os').system('touch {marker}'), {symbol})[1]"
                data = text.replace(symbol, payload, 1).encode()
            target.writestr(name, data)
    return crafted.read_bytes()


def _changed_weights(directory: Path) -> None:
    model = onnx.load(directory / "ranker.onnx")
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(tensor).copy()
    values.flat[0] += 1000.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    (directory / "ranker.onnx").write_bytes(model.SerializeToString())


def publish_copy(root: Path, source: int, change, *, signed: bool) -> int:
    """A copy of ``source`` changed by ``change(staging)``: signed with the trusted key, or (an
    attacker without it) unsigned with the source's signature file copied beside the new manifest."""
    source_dir = artifacts.version_dir(root, source)

    def write(staging: Path) -> None:
        for path in source_dir.iterdir():
            if path.name not in (artifacts.MANIFEST_FILE, SIGNATURE_FILE):
                shutil.copy2(path, staging / path.name)
        change(staging)

    version = artifacts.publish(root, write, data={}, config={}, metrics={}, make_current=False,
                                signer=SIGNER if signed else None)
    if not signed:
        shutil.copy2(source_dir / SIGNATURE_FILE, artifacts.version_dir(root, version) / SIGNATURE_FILE)
    return version


async def _both(root: Path):
    """Retrieval and ranking with their default holders: the real verify and load paths."""
    _, port, retrieval = await create_retrieval_server(dataclasses.replace(retrieval_config(root), chunk_size=50))
    server, ranking_port, ranking = await create_server(config(root, retrieval_target=f"127.0.0.1:{port}"))
    return retrieval, (server, ranking, ranking_port)


async def _serve_then_swap(root: Path, bad: int) -> tuple[list, list, dict]:
    before = {reason: sample("recsys_version_refused_total", reason=reason) for reason in ("signature", "load")}
    retrieval, (server, ranking, port) = await _both(root)
    try:
        for _ in range(600):
            if retrieval.holder.ready and ranking.holder.ready:
                break
            await asyncio.sleep(0.05)
        artifacts.set_current(root, bad)
        for _ in range(600):
            if bad in retrieval.holder.stats.refused_versions and bad in ranking.holder.stats.refused_versions:
                break
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await ranking_pb2_grpc.RankingServiceStub(channel).Recommend(recommend(k=5), timeout=10)
        errors = [retrieval.holder.stats.last_error, ranking.holder.stats.last_error]
        refused = [bad in retrieval.holder.stats.refused_versions, bad in ranking.holder.stats.refused_versions]
        after = {reason: sample("recsys_version_refused_total", reason=reason) - before[reason]
                 for reason in before}
        return [reply.retrieval_version, reply.ranking_version, len(reply.items)], refused + errors, after
    finally:
        await server.stop(0)
        await ranking.close()
        await retrieval.close(grace_s=0)


@pytest.mark.parametrize("tamper", ["shape-expression-archive", "changed-weights"])
def test_a_tampered_copy_with_recomputed_checksums_is_refused_by_both_and_runs_nothing(published, tmp_path, tamper):
    source_root, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source_root, root)
    marker = tmp_path / "code-ran"
    archive = shape_expression_archive(tmp_path / "m.pt2", marker)

    def change(staging: Path) -> None:
        if tamper == "changed-weights":
            _changed_weights(staging)
        else:
            for name in ("user_tower.onnx", "ranker.onnx"):
                (staging / name).write_bytes(archive)

    bad = publish_copy(root, version, change, signed=False)
    answer, outcome, refusals = run(_serve_then_swap(root, bad))
    assert answer == [version, version, 5]                     # the old version answers, whole
    assert outcome[:2] == [True, True], outcome                 # refused by retrieval AND ranking
    assert all("manifest.sig does not match manifest.json" in error for error in outcome[2:]), outcome
    assert refusals == {"signature": 2, "load": 0}
    assert not marker.exists()


def test_the_payload_is_live_and_a_signed_copy_still_cannot_run_it(published, tmp_path):
    """With the trusted key itself (stolen), the archive passes the signature but is not a program:
    both services refuse it at load and nothing runs. The payload is real: torch.export's own
    loader runs it (the reason the services no longer use that loader)."""
    source_root, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source_root, root)
    marker = tmp_path / "code-ran"
    archive = shape_expression_archive(tmp_path / "m.pt2", marker)
    bad = publish_copy(root, version, lambda staging: (staging / "user_tower.onnx").write_bytes(archive),
                       signed=True)
    answer, outcome, refusals = run(_serve_then_swap(root, bad))
    assert answer == [version, version, 5]
    assert outcome[:2] == [True, True], outcome
    assert all("user tower program must be an ONNX model" in error for error in outcome[2:]), outcome
    assert refusals == {"signature": 0, "load": 2}
    assert not marker.exists()

    torch.export.load(tmp_path / "crafted.pt2")                 # the old loader: the payload runs
    assert marker.exists()
