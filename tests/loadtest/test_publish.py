"""Republishing a version through the artifact contract (the scenarios' hot-reload path)."""

import pytest

import redis

from loadtest.publish import FeatureTarget, publish_tiny, republish
from recsys_contracts import artifacts, feature_store
from tests.signing_keys import SIGNER, TRUST
from tests.processes import free_port


def test_republish_copies_the_current_version_as_new_verified_versions(tmp_path, published):
    source, source_version = published
    target = tmp_path / "target"
    assert republish(target, source, count=3, interval_s=0.0, signer=SIGNER) == [1, 2, 3]
    assert artifacts.current_version(target) == 3
    original = artifacts.verify(source, source_version, TRUST)
    for version in (1, 2, 3):
        copy = artifacts.verify(target, version, TRUST)
        assert copy.files == original.files
        assert (copy.data, copy.config, copy.metrics, copy.extra) == \
            (original.data, original.config, original.metrics, original.extra)


def test_republish_refuses_a_source_that_is_no_bundle(tmp_path):
    """go_live checks the whole bundle: files that verify but are no model never become CURRENT."""
    source = tmp_path / "source"
    artifacts.publish(source, lambda staging: (staging / "model.bin").write_bytes(b"\x00\x01weights"),
                      signer=SIGNER, data={}, config={}, metrics={})
    with pytest.raises(ValueError, match=r"version 1 lacks bundle files \['feature_spec.json', "):
        republish(tmp_path / "target", source, 1, 0.0, signer=SIGNER)
    assert artifacts.current_version(tmp_path / "target") is None


def test_republish_needs_a_published_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="source_root"):
        republish(tmp_path / "target", tmp_path / "empty", 1, 0.0, signer=SIGNER)


@pytest.mark.parametrize(("count", "interval_s", "field"), [(0, 0.0, "count"), (1, -1.0, "interval_s")])
def test_publishing_rejects_bad_arguments(tmp_path, published, count, interval_s, field):
    source, _ = published
    with pytest.raises(ValueError, match=field):
        republish(tmp_path / "target", source, count, interval_s, signer=SIGNER)
    with pytest.raises(ValueError, match=field):
        publish_tiny(tmp_path / "target", None, count, interval_s, seed=0, signer=SIGNER)


def test_republish_writes_features_before_the_version_goes_live(tmp_path, published, redis_url, redis_namespace):
    source, _ = published
    target = tmp_path / "target"
    assert republish(target, source, 2, 0.0, FeatureTarget(redis_url, redis_namespace), signer=SIGNER) == [1, 2]
    assert artifacts.current_version(target) == 2
    client = redis.Redis.from_url(redis_url)
    try:
        for version in (1, 2):
            pipe = client.pipeline(transaction=False)
            feature_store.queue_is_complete(pipe, feature_store.KeyFormat(redis_namespace), version)
            assert feature_store.parse_is_complete(pipe.execute()[0])
    finally:
        client.close()


def test_a_version_whose_features_cannot_be_written_does_not_go_live(tmp_path, published):
    source, _ = published
    target = tmp_path / "target"
    republish(target, source, 1, 0.0, signer=SIGNER)
    unreachable = FeatureTarget(f"redis://127.0.0.1:{free_port()}/0", "nowhere")
    with pytest.raises(redis.ConnectionError):
        republish(target, source, 1, 0.0, unreachable, signer=SIGNER)
    assert artifacts.current_version(target) == 1          # still the version that went live before
