"""Hot reload: a new version is verified, loaded, warmed and swapped in; a corrupt one is refused."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from ranking_service.state import load_state
from recsys_contracts import artifacts
from recsys_contracts.signing import SIGNATURE_FILE
from tests.signing_keys import SIGNER, TRUST
from recsys_contracts.v1 import ranking_pb2
from recsys_serving.reload import VersionHolder
from tests.ranking.harness import config, run, sample, serve


def republish(root: Path, source: Path, corrupt_ranker: bool = False) -> int:
    """Publishes a copy of the version in ``source`` (optionally with a ranker that is not a program)."""

    def write(staging: Path) -> None:
        for path in source.iterdir():
            if path.name not in (artifacts.MANIFEST_FILE, SIGNATURE_FILE):
                shutil.copy2(path, staging / path.name)
        if corrupt_ranker:
            (staging / "ranker.onnx").write_bytes(b"not an onnx model")

    return artifacts.publish(root, write, signer=SIGNER, data={}, config={}, metrics={})


async def wait_for_version(stub, version: int) -> None:
    for _ in range(200):
        reply = await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5)
        if reply.ranking_version == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {version} never served")


def test_new_version_is_swapped_in_and_a_corrupt_one_refused(tmp_path, published, loaded):
    source_root, version = published
    root = tmp_path / "artifacts"
    shutil.copytree(source_root, root)
    source = root / "versions" / str(version)
    # Version 1 reuses the session's loaded state; later versions go through the real loader.
    holder = VersionHolder(root, lambda directory, v: loaded if v == version else load_state(directory, v),
                           trust=TRUST, poll_interval_s=0.1)

    async def main():
        async with serve(config(root), holder=holder) as (stub, _, app):
            assert (await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5)).ranking_version == 1
            loads, refusals = sample("ranking_reloads_total", result="loaded"), sample("ranking_reloads_total",
                                                                                       result="refused")
            second = await asyncio.to_thread(republish, root, source)
            await wait_for_version(stub, second)
            assert sample("ranking_model_version") == second
            third = await asyncio.to_thread(republish, root, source, True)
            while third not in app.holder.stats.refused_versions:
                await asyncio.sleep(0.05)
            reply = await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5)
            assert reply.ranking_version == second                       # the old version keeps serving
            assert sample("ranking_reloads_total", result="loaded") == loads + 1
            assert sample("ranking_reloads_total", result="refused") == refusals + 1
            return app.holder.stats.last_error

    last_error = run(main())
    assert "ranker program must be an ONNX model" in last_error
