"""Writes versions into an artifact root: the scenarios' publish path (``python -m loadtest publish``).

Two sources, both through the artifact contract's own ``recsys_contracts.artifacts.publish``:

- ``republish``: copies the current version of another root (one ``python -m trainer`` published)
  as new versions: the real trained models, and a publish that costs a file copy, so ten hot
  reloads measure the services' reloading and not training;
- ``publish_tiny``: the test suite's small real models (``trainer.tiny.tiny_run``: the real
  two-tower and DCN, seeded, untrained, embedding size 16) fitted to MovieLens 100K's features,
  or to the tiny synthetic dataset when no data directory is given. Untrained weights cost the
  same to serve as trained ones of the same shape, which is what a load test measures.

Every version goes live through ``recsys_contracts.bundle.go_live``, the trainer's own order: the
whole bundle verified, then (with a Redis URL, ``--redis-url``; the scenarios' ``Stack`` does not
pass one by default) its features written to Redis and marked complete, and only then ``CURRENT``
moved to it, so the services read the new version's features from Redis from their first request on
it instead of degrading to the artifact's copy.

Runs in its own process (the ``Stack`` starts it): copying and exporting would steal the load
generator's event loop.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from recsys_contracts import artifacts, bundle, feature_store
from recsys_contracts.signing import Signer


@dataclass(frozen=True)
class FeatureTarget:
    """Where published versions' features go: a Redis URL and the services' key namespace."""

    redis_url: str
    namespace: str



def _go_live(root: Path, version: int, features: FeatureTarget | None) -> int:
    """``bundle.go_live``: bundle verified, features in Redis marked complete, then CURRENT."""
    if features is None:
        bundle.go_live(root, version, trust=None)
        return version
    client = redis.Redis.from_url(features.redis_url, socket_timeout=10)
    try:
        bundle.go_live(root, version, trust=None, redis_client=client,
                       keys=feature_store.KeyFormat(features.namespace))
    finally:
        client.close()
    return version


def _check(count: int, interval_s: float) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    if interval_s < 0:
        raise ValueError(f"interval_s must be >= 0 (seconds between versions), got {interval_s!r}")


def republish(root: Path, source_root: Path, count: int, interval_s: float,
              features: FeatureTarget | None = None, *, signer: Signer | None) -> list[int]:
    """Publishes the source root's current version ``count`` times into ``root``, ``interval_s`` apart,
    each signed by ``signer`` (None: unsigned)."""
    _check(count, interval_s)
    source_version = artifacts.current_version(source_root)
    if source_version is None:
        raise ValueError(f"source_root must hold a published version (CURRENT), got {str(source_root)!r}")
    manifest = artifacts.verify(source_root, source_version, None)   # the copies are signed anew below
    versions = []
    for i in range(count):
        if i and interval_s:
            time.sleep(interval_s)
        versions.append(_go_live(root, publish_copy(root, source_root, source_version, manifest, signer=signer),
                                 features))
    return versions


def publish_copy(root: Path, source_root: Path, source_version: int, manifest: artifacts.Manifest, *,
                 signer: Signer | None) -> int:
    """Publishes into ``root`` a copy of ``source_root``'s version ``source_version`` (its files as
    ``manifest`` lists them), signed by ``signer``, not current; returns the new version's number."""
    source_dir = artifacts.version_dir(source_root, source_version)

    def copy_files(staging: Path) -> None:
        for rel in manifest.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dir / rel, staging / rel)

    return artifacts.publish(root, copy_files, data=manifest.data, config=manifest.config, metrics=manifest.metrics,
                             extra=manifest.extra, make_current=False, signer=signer)


def publish_tiny(root: Path, data_dir: Path | None, count: int, interval_s: float, seed: int,
                 features: FeatureTarget | None = None, *, signer: Signer | None) -> list[int]:
    """Publishes ``count`` tiny versions (new seeded weights each), ``interval_s`` apart; returns their numbers."""
    _check(count, interval_s)
    # Imported here: torch and the trainer load in seconds, and republish needs neither.
    from trainer.tiny import publish_tiny_version, tiny_dataset, tiny_run  # noqa: PLC0415
    from trainer.data.movielens import load_movielens  # noqa: PLC0415

    dataset = load_movielens(data_dir) if data_dir is not None else tiny_dataset(seed)
    versions = []
    for i in range(count):
        if i and interval_s:
            time.sleep(interval_s)
        version = publish_tiny_version(root, seed + i, run=tiny_run(seed + i, dataset=dataset), make_current=False,
                                       signer=signer)
        versions.append(_go_live(root, version, features))
    return versions
