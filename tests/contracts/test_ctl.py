"""``python -m recsys_serving.ctl``: show, promote and roll back through the one go-live order."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import redis

from recsys_contracts import artifacts, feature_store
from recsys_contracts.arms import Arms, read_arms
from recsys_serving import ctl
from tests.factories import publish_tiny_version
from tests.ranking.test_untrusted_versions import publish_copy
from tests.signing_keys import PUBLIC_KEY_FILE

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _ctl(root, *argv: str) -> int:
    return ctl.main(["--root", str(root), "--trusted-keys", str(PUBLIC_KEY_FILE), *argv])


def test_promote_show_and_rollback(tmp_path, capsys, redis_url, redis_namespace):
    first = publish_tiny_version(tmp_path, 0)
    second = publish_copy(tmp_path, first, lambda staging: None, signed=True)
    assert _ctl(tmp_path, "show") == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "arms: none",
        f"{second:>6}  staged  " + artifacts.read_manifest(tmp_path, second).created_at,
        f"{first:>6}  live    " + artifacts.read_manifest(tmp_path, first).created_at]
    assert _ctl(tmp_path, "--redis-url", redis_url, "--redis-namespace", redis_namespace, "promote", str(second)) == 0
    assert artifacts.current_version(tmp_path) == second
    client = redis.Redis.from_url(redis_url)
    try:
        assert feature_store.parse_is_complete(client.get(feature_store.KeyFormat(redis_namespace).complete(second)))
    finally:
        client.close()
    assert _ctl(tmp_path, "rollback") == 0
    assert artifacts.current_version(tmp_path) == first
    assert "version 1 is live" in capsys.readouterr().out


def test_a_broken_bundle_is_not_promoted_and_rollback_needs_an_older_version(tmp_path, capsys):
    first = publish_tiny_version(tmp_path, 0)

    def nan_embeddings(folder):
        np.save(folder / "item_embeddings.npy", np.full((151, 16), np.nan, np.float32), allow_pickle=False)

    bad = publish_copy(tmp_path, first, nan_embeddings, signed=True)
    assert _ctl(tmp_path, "promote", str(bad)) == 1
    assert "promote failed: item_embeddings.npy must be finite" in capsys.readouterr().err
    assert artifacts.current_version(tmp_path) == first
    assert _ctl(tmp_path, "rollback") == 1
    assert f"rollback needs a version below CURRENT ({first})" in capsys.readouterr().err


def test_a_canary_arm_is_set_shown_kept_by_retention_and_cleared_by_promotion(tmp_path, capsys):
    first = publish_tiny_version(tmp_path, 0)
    candidate = publish_copy(tmp_path, first, lambda staging: None, signed=True)
    newest = publish_copy(tmp_path, first, lambda staging: None, signed=True)
    assert _ctl(tmp_path, "arms", "set", "--candidate", str(candidate), "--canary-percent", "5",
                "--shadow-percent", "10") == 0
    assert read_arms(tmp_path) == Arms(candidate, 5.0, 10.0)
    assert _ctl(tmp_path, "show") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"version {candidate} serves 5 % of users (canary) and shadows 10 % of the other requests"
    assert lines[2] == f"arms: candidate {candidate} for 5 % of users, shadowing 10 % of the rest"
    assert lines[3].startswith(f"{newest:>6}  staged") and lines[4].startswith(f"{candidate:>6}  canary")
    assert artifacts.current_version(tmp_path) == first            # a canary does not move CURRENT
    assert artifacts.apply_retention(tmp_path, 1) == []             # newest, CURRENT and the candidate stay
    assert _ctl(tmp_path, "promote", str(candidate)) == 0
    assert artifacts.current_version(tmp_path) == candidate and read_arms(tmp_path) is None
    assert artifacts.apply_retention(tmp_path, 1) == [first]
    assert newest in artifacts.list_versions(tmp_path)


def test_a_broken_candidate_is_not_set_as_an_arm(tmp_path, capsys):
    first = publish_tiny_version(tmp_path, 0)
    bad = publish_copy(tmp_path, first, lambda folder: (folder / "ranker.onnx").write_bytes(b"junk"), signed=True)
    assert _ctl(tmp_path, "arms", "set", "--candidate", str(bad), "--canary-percent", "5") == 1
    assert "arms failed: ranker program must be an ONNX model" in capsys.readouterr().err
    assert read_arms(tmp_path) is None
    assert _ctl(tmp_path, "arms", "set", "--candidate", str(first), "--canary-percent", "150") == 1
    assert "canary_percent must be a number in [0, 100], got 150.0" in capsys.readouterr().err


def test_the_module_runs_and_needs_a_root(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recsys_serving.ctl", "show"], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2 and "--root (or RECSYS_ARTIFACT_ROOT) must name the artifact root" in done.stderr
