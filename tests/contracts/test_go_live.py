"""The one go-live order (``recsys_contracts.bundle.go_live``): a version's features are in Redis and
marked complete before CURRENT names it, and a version whose bundle fails its self-check never
becomes CURRENT nor reaches Redis. The trainer's ``publish_run`` goes through it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from recsys_contracts import artifacts, bundle, feature_store
from tests.factories import publish_tiny_version, tiny_run
from tests.ranking.test_untrusted_versions import publish_copy
from trainer.publish import choose_index_params, publish_run
from tests.signing_keys import SIGNER, TRUST


class _CurrentWatcher(threading.Thread):
    """Polls CURRENT every ~0.2 ms; the first time it names ``version``, records whether Redis already
    held the version's complete marker at that moment."""

    def __init__(self, root: Path, version: int, client: redis.Redis, keys: feature_store.KeyFormat) -> None:
        super().__init__(daemon=True)
        self.root, self.version, self.client, self.keys = root, version, client, keys
        self.complete_when_current: bool | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if artifacts.current_version(self.root) == self.version:
                self.complete_when_current = feature_store.parse_is_complete(
                    self.client.get(self.keys.complete(self.version)))
                return
            time.sleep(0.0002)


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_features_are_complete_in_redis_before_current_names_the_version(tmp_path, client, redis_namespace):
    keys = feature_store.KeyFormat(redis_namespace)
    first = publish_tiny_version(tmp_path, 0, make_current=False)
    assert artifacts.current_version(tmp_path) is None            # staged: nothing is live yet
    bundle.go_live(tmp_path, first, trust=TRUST, redis_client=client, keys=keys)
    assert artifacts.current_version(tmp_path) == first
    watcher = _CurrentWatcher(tmp_path, first + 1, client, keys)
    watcher.start()
    run = tiny_run(1)
    # The trainer's own path: publish_run stages the files, then goes live through bundle.go_live.
    version = publish_run(tmp_path, run, index_params=choose_index_params("flat", run.tables.vocab.n_items, 0),
                          data={}, config={}, metrics={}, retain=None, signer=SIGNER, redis_client=client, keys=keys)
    watcher.join(timeout=10)
    watcher.stop.set()
    assert version == first + 1 and artifacts.current_version(tmp_path) == version
    assert watcher.complete_when_current is True                  # Redis was complete before the flip


def test_a_version_whose_bundle_fails_never_goes_live_nor_reaches_redis(tmp_path, client, redis_namespace):
    keys = feature_store.KeyFormat(redis_namespace)
    good = publish_tiny_version(tmp_path, 0)

    def nan_embeddings(folder: Path) -> None:
        embeddings = np.load(folder / "item_embeddings.npy")
        np.save(folder / "item_embeddings.npy", np.full_like(embeddings, np.nan), allow_pickle=False)

    bad = publish_copy(tmp_path, good, nan_embeddings, signed=True)
    with pytest.raises(ValueError, match="item_embeddings.npy must be finite"):
        bundle.go_live(tmp_path, bad, trust=TRUST, redis_client=client, keys=keys)
    assert artifacts.current_version(tmp_path) == good
    assert not feature_store.parse_is_complete(client.get(keys.complete(bad)))
    assert list(client.scan_iter(match=f"{redis_namespace}:*")) == []


def test_go_live_needs_keys_with_a_redis_client(tmp_path, client):
    version = publish_tiny_version(tmp_path, 0, make_current=False)
    with pytest.raises(ValueError, match="keys must be a feature_store.KeyFormat when redis_client is given"):
        bundle.go_live(tmp_path, version, trust=TRUST, redis_client=client)
    assert artifacts.current_version(tmp_path) is None
