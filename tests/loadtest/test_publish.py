"""Republishing a version through the artifact contract (the scenarios' hot-reload path)."""

import pytest

from loadtest.publish import publish_tiny, republish
from recsys_contracts import artifacts


def _source_root(tmp_path):
    root = tmp_path / "source"

    def write(staging):
        (staging / "model.bin").write_bytes(b"\x00\x01weights")
        (staging / "sub").mkdir()
        (staging / "sub" / "table.json").write_text('{"rows": 3}')

    version = artifacts.publish(root, write, data={"dataset": "ml-100k"}, config={"dim": 8}, metrics={"ndcg": 0.1},
                                extra={"index": "flat"})
    return root, version


def test_republish_copies_the_current_version_as_new_verified_versions(tmp_path):
    source, source_version = _source_root(tmp_path)
    target = tmp_path / "target"
    assert republish(target, source, count=3, interval_s=0.0) == [1, 2, 3]
    assert artifacts.current_version(target) == 3
    original = artifacts.verify(source, source_version)
    for version in (1, 2, 3):
        copy = artifacts.verify(target, version)
        assert copy.files == original.files
        assert (copy.data, copy.config, copy.metrics, copy.extra) == \
            (original.data, original.config, original.metrics, original.extra)


def test_republish_needs_a_published_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="source_root"):
        republish(tmp_path / "target", tmp_path / "empty", 1, 0.0)


@pytest.mark.parametrize(("count", "interval_s", "field"), [(0, 0.0, "count"), (1, -1.0, "interval_s")])
def test_publishing_rejects_bad_arguments(tmp_path, count, interval_s, field):
    source, _ = _source_root(tmp_path)
    with pytest.raises(ValueError, match=field):
        republish(tmp_path / "target", source, count, interval_s)
    with pytest.raises(ValueError, match=field):
        publish_tiny(tmp_path / "target", None, count, interval_s, seed=0)
