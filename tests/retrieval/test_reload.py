"""Hot reload under traffic: 5 versions published (one corrupt) while clients stream without a failure."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc
import numpy as np

from recsys_contracts import artifacts
from recsys_contracts.signing import SIGNATURE_FILE
from tests.signing_keys import SIGNER
from tests.factories import publish_tiny_version, tiny_run
from tests.retrieval.harness import config, retrieve, sample, serve

CORRUPT_AT = 3   # the third of the five new versions is broken (checksums fine, contents wrong)


def _wait(predicate, what: str, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _publish_broken(root: Path, source: int) -> int:
    """Publishes a copy of ``source`` whose item embeddings have one dimension too many.

    The manifest's checksums match, so only the loader's checks (dimensions, smoke query) refuse it.
    """
    source_dir = artifacts.version_dir(root, source)

    def write(staging: Path) -> None:
        for path in source_dir.iterdir():
            if path.name not in (artifacts.MANIFEST_FILE, SIGNATURE_FILE):
                shutil.copy2(path, staging / path.name)
        embeddings = np.load(source_dir / "item_embeddings.npy")                 # (m+1, D)
        np.save(staging / "item_embeddings.npy", np.pad(embeddings, ((0, 0), (0, 1))), allow_pickle=False)

    manifest = artifacts.read_manifest(root, source)
    return artifacts.publish(root, write, signer=SIGNER, data=manifest.data, config=manifest.config, metrics=manifest.metrics,
                             extra=manifest.extra)


def _publish_five(root: Path, holder) -> list[int]:
    """Publishes versions one by one, each once the server took (or refused) the previous one."""
    served = []
    for n in range(1, 6):
        if n == CORRUPT_AT:
            refused = holder.stats.refused
            version = _publish_broken(root, served[-1])
            _wait(lambda: holder.stats.refused > refused, f"refusal of version {version}")
        else:
            version = publish_tiny_version(root, n, run=tiny_run(n))
            _wait(lambda: holder.version == version, f"version {version} to serve")
            served.append(version)
    return served


def test_hot_reload_under_traffic_zero_failures_one_version_per_stream(tmp_path, tiny):
    first = publish_tiny_version(tmp_path, 0, run=tiny)

    async def body():
        refusals = sample("retrieval_refusals_total")
        async with serve(config(tmp_path, poll_interval_s=0.05, chunk_size=4)) as (stub, _, app):
            done, streams, failures = asyncio.Event(), [], []

            async def client(user: str) -> None:
                while not done.is_set():
                    try:
                        chunks = await retrieve(stub, timeout=10, user_id=user, num_candidates=20)
                        streams.append([c.model_version for c in chunks])
                    except grpc.aio.AioRpcError as error:
                        failures.append((error.code(), error.details()))

            clients = [asyncio.create_task(client(user)) for user in ("1", "2", "stranger")]
            try:
                served = await asyncio.to_thread(_publish_five, tmp_path, app.holder)
                await asyncio.sleep(0.2)
            finally:
                done.set()
                await asyncio.gather(*clients)
            return (served, streams, failures, app.holder.version, sample("retrieval_refusals_total") - refusals,
                    sample("retrieval_model_version"))

    served, streams, failures, final, refused, gauge = asyncio.run(body())
    assert failures == []
    assert all(len(stream) == 5 and len(set(stream)) == 1 for stream in streams), "one version per stream"
    versions = {stream[0] for stream in streams}
    assert final == served[-1] == gauge and refused == 1
    assert first + CORRUPT_AT not in versions, "the corrupt version never served"
    assert len(versions & set(served)) >= 3 and versions <= {first, *served}
