"""Tests of the artifact volume: publish, resolve, verify, retention, watch, and crash safety.

Everything runs on real files under tmp_path; the kill test SIGKILLs real publisher processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recsys_contracts.artifacts import (
    UntrustedVersionError,
    MANIFEST_SCHEMA_VERSION,
    STALE_STAGING_S,
    ArtifactError,
    CorruptVersionError,
    FileEntry,
    IncompleteVersionError,
    Manifest,
    apply_retention,
    current_version,
    list_versions,
    publish,
    read_manifest,
    resolve,
    set_current,
    verify,
    version_dir,
)
from tests.contracts._publish_child import payload
from tests.signing_keys import SIGNER, TRUST

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "_publish_child.py"
SHA_A = "a" * 64


def _writer(files: dict[str, bytes]):
    def write_files(folder: Path) -> None:
        for rel, content in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(content)
    return write_files


def _publish(root: Path, tag: str = "t", **kwargs) -> int:
    files = {"model.bin": payload(tag), "sub/table.npy": payload(tag)[:100]}
    return publish(root, _writer(files), signer=SIGNER, data={"tag": tag}, config={"lr": 0.1},
                   metrics={"ndcg@10": 0.25}, **kwargs)


def _assert_files_match_tag(root: Path, version: int) -> None:
    """verify() passes and every file holds the content its manifest's tag promises."""
    manifest = verify(root, version, TRUST)
    tag = manifest.data["tag"]
    for rel in manifest.files:
        content = (version_dir(root, version) / rel).read_bytes()
        assert payload(tag).startswith(content), (version, rel)


def _staging_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".staging").iterdir())


# --- publish, resolve, pin, rollback ---------------------------------------------------------


def test_publish_list_resolve_pin_and_rollback(tmp_path):
    root = tmp_path / "artifacts"
    assert list_versions(root) == [] and current_version(root) is None
    assert _publish(root, "one") == 1
    assert _publish(root, "two") == 2
    assert list_versions(root) == [1, 2]
    assert (root / "CURRENT").read_text() == "2\n"
    assert resolve(root) == 2
    assert resolve(root, pinned=1) == 1
    manifest = verify(root, 2, TRUST)
    assert manifest.version == 2 and manifest.data == {"tag": "two"}
    assert sorted(manifest.files) == ["model.bin", "sub/table.npy"]
    assert manifest.files["sub/table.npy"].size_bytes == 100
    assert (version_dir(root, 2) / "model.bin").read_bytes() == payload("two")
    assert _staging_entries(root) == []

    set_current(root, 1)
    assert current_version(root) == 1 and resolve(root) == 1
    assert [p.name for p in root.iterdir() if p.name.startswith("CURRENT.tmp")] == []


def test_publish_without_make_current_keeps_the_pointer(tmp_path):
    assert _publish(tmp_path, "one") == 1
    assert _publish(tmp_path, "two", make_current=False) == 2
    assert current_version(tmp_path) == 1 and resolve(tmp_path) == 1
    set_current(tmp_path, 2)
    assert resolve(tmp_path) == 2


def test_resolve_without_current_takes_the_newest(tmp_path):
    _publish(tmp_path, "one", make_current=False)
    _publish(tmp_path, "two", make_current=False)
    assert current_version(tmp_path) is None
    assert resolve(tmp_path) == 2


def test_resolve_raises_without_any_version(tmp_path):
    with pytest.raises(ArtifactError, match="no published version"):
        resolve(tmp_path)


def test_resolve_raises_when_current_names_a_missing_version(tmp_path):
    _publish(tmp_path)
    (tmp_path / "CURRENT").write_text("9\n")
    with pytest.raises(ArtifactError, match="CURRENT names version 9"):
        resolve(tmp_path)


def test_resolve_refuses_unknown_or_bad_pins(tmp_path):
    _publish(tmp_path)
    with pytest.raises(ArtifactError, match="pinned version 7 not found"):
        resolve(tmp_path, pinned=7)
    with pytest.raises(ValueError, match="version must be a positive int, got 0"):
        resolve(tmp_path, pinned=0)


def test_current_without_trailing_newline_is_accepted(tmp_path):
    _publish(tmp_path)
    (tmp_path / "CURRENT").write_text("1")
    assert current_version(tmp_path) == 1


@pytest.mark.parametrize("content, shown", [
    (b"abc\n", "'abc\\n'"), (b"007\n", "'007\\n'"), (b"0\n", "'0\\n'"), (b"-1\n", "'-1\\n'"),
    (b"1\n\n", "'1\\n\\n'"), (b" 1\n", "' 1\\n'"), (b"", "''"), (b"\xff\n", "'\ufffd\\n'"),
    (b"1" * 80, "'111111111111"),
])
def test_current_with_garbage_raises_with_the_content(tmp_path, content, shown):
    (tmp_path / "CURRENT").write_bytes(content)
    with pytest.raises(ArtifactError, match="CURRENT must hold a positive version number") as exc:
        current_version(tmp_path)
    assert f"got {shown}" in str(exc.value)


# --- manifest ---------------------------------------------------------------------------------


def _manifest(**overrides) -> Manifest:
    fields = dict(version=3, created_at="2024-05-01T12:00:00+00:00",
                  data={"source": "ml-100k", "rows": 100000}, config={"epochs": 2},
                  metrics={"recall@50": 0.5}, files={"a.npy": FileEntry(SHA_A, 12)},
                  extra={"git": "abc"})
    fields.update(overrides)
    return Manifest(**fields)


def test_manifest_golden_text():
    # The on-disk format is pinned: change it only together with MANIFEST_SCHEMA_VERSION.
    assert _manifest().to_json() == (
        '{\n'
        '  "config": {\n    "epochs": 2\n  },\n'
        '  "created_at": "2024-05-01T12:00:00+00:00",\n'
        '  "data": {\n    "rows": 100000,\n    "source": "ml-100k"\n  },\n'
        '  "extra": {\n    "git": "abc"\n  },\n'
        '  "files": {\n    "a.npy": {\n      "bytes": 12,\n'
        f'      "sha256": "{SHA_A}"\n    }}\n  }},\n'
        '  "metrics": {\n    "recall@50": 0.5\n  },\n'
        '  "schema_version": 1,\n'
        '  "version": 3\n'
        '}\n')


def test_manifest_round_trip():
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.schema_version == MANIFEST_SCHEMA_VERSION
    body = json.loads(manifest.to_json())
    del body["extra"]
    assert Manifest.from_json(json.dumps(body)).extra == {}


def test_published_manifest_records_every_file(tmp_path):
    version = _publish(tmp_path, "tag", extra={"note": "x"})
    manifest = read_manifest(tmp_path, version)
    text = (version_dir(tmp_path, version) / "manifest.json").read_text()
    assert Manifest.from_json(text) == manifest
    assert manifest.config == {"lr": 0.1} and manifest.metrics == {"ndcg@10": 0.25}
    assert manifest.extra == {"note": "x"}
    assert manifest.files["model.bin"].size_bytes == 4096
    assert manifest.created_at.endswith("+00:00")


def _valid_body() -> dict:
    return json.loads(_manifest().to_json())


_DELETE = object()


def _with(path: tuple, value) -> str:
    """A valid manifest's JSON text with one field replaced (or deleted with _DELETE)."""
    body = _valid_body()
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(body)


@pytest.mark.parametrize("text, message", [
    ("{not json", "manifest must be valid JSON"),
    ("[1, 2]", "manifest must be a JSON object, got list"),
    (_with(("surprise",), 1), r"unknown fields \['surprise'\]"),
    (_with(("metrics",), _DELETE), r"missing fields \['metrics'\]"),
    (_with(("schema_version",), 2), "schema_version must be 1, got 2"),
    (_with(("schema_version",), True), "schema_version must be 1, got True"),
    (_with(("version",), 0), "version must be a positive int, got 0"),
    (_with(("version",), "3"), "version must be a positive int, got '3'"),
    (_with(("created_at",), "yesterday"), "created_at must be an ISO-8601 UTC timestamp"),
    (_with(("created_at",), "2024-05-01T12:00:00"), "created_at must be .* got '2024-05-01"),
    (_with(("created_at",), "2024-05-01T12:00:00+02:00"), "created_at must be"),
    (_with(("created_at",), 17), "created_at must be .* got 17"),
    (_with(("data",), [1]), "data must be a dict, got list"),
    (_with(("metrics", "auc"), float("nan")), "metrics must hold only strict JSON values"),
    (_with(("files",), []), "files must be a dict, got list"),
    (_with(("files", "a.npy"), {"sha256": SHA_A}), r"files\['a.npy'\] must be an object"),
    (_with(("files", "a.npy", "sha256"), "A" * 64), r"files\['a.npy'\]: sha256 must be 64"),
    (_with(("files", "a.npy", "sha256"), "ab"), "sha256 must be 64 lowercase hex .* got 'ab'"),
    (_with(("files", "a.npy", "bytes"), -1), r"size_bytes \(JSON 'bytes'\) must be .* got -1"),
    (_with(("files", "a.npy", "bytes"), 1.5), "size_bytes .* got 1.5"),
])
def test_manifest_from_json_rejects_bad_fields(text, message):
    with pytest.raises(ValueError, match=message):
        Manifest.from_json(text)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a//b", "a/./b", "a/", "", "a\\b",
                                 "a\x00b", "manifest.json"])
def test_manifest_rejects_unsafe_file_paths(rel):
    body = _valid_body()
    body["files"] = {rel: {"sha256": SHA_A, "bytes": 1}}
    with pytest.raises(ValueError, match="files keys must be relative POSIX paths") as exc:
        Manifest.from_json(json.dumps(body))
    assert repr(rel) in str(exc.value)


def test_manifest_constructor_checks_python_types():
    with pytest.raises(ValueError, match="files must be a dict, got list"):
        _manifest(files=[])
    with pytest.raises(ValueError, match=r"files\['a'\] must be a FileEntry, got 'x'"):
        _manifest(files={"a": "x"})
    with pytest.raises(ValueError, match="config must hold only strict JSON values"):
        _manifest(config={"dims": {1, 2}})
    with pytest.raises(ValueError, match="files keys must be relative POSIX paths"):
        _manifest(files={3: FileEntry(SHA_A, 1)})


# --- publish failures leave nothing visible ---------------------------------------------------


def test_publish_rejects_bad_arguments_before_writing(tmp_path):
    calls = []
    with pytest.raises(ValueError, match="retain must be None or an int >= 1, got 0"):
        publish(tmp_path, calls.append, signer=SIGNER, data={}, config={}, metrics={}, retain=0)
    with pytest.raises(ValueError, match="data must be a dict, got str"):
        publish(tmp_path, calls.append, signer=SIGNER, data="ml-100k", config={}, metrics={})
    assert calls == [] and list_versions(tmp_path) == []


def _bad_tree(kind: str):
    def write_files(folder: Path) -> None:
        (folder / "ok.bin").write_bytes(b"ok")
        if kind == "symlink":
            (folder / "link").symlink_to(folder / "ok.bin")
        elif kind == "dir symlink":
            (folder / "sub").mkdir()
            (folder / "sub" / "out").symlink_to(folder.parent)
        elif kind == "fifo":
            os.mkfifo(folder / "pipe")
        elif kind == "manifest":
            (folder / "manifest.json").write_text("{}")
        else:
            raise RuntimeError("trainer crashed mid-write")
    return write_files


@pytest.mark.parametrize("kind, error, message", [
    ("symlink", ValueError, "got a symlink at 'link'"),
    ("dir symlink", ValueError, "got a symlink at 'sub/out'"),
    ("fifo", ValueError, r"regular files only, got 'pipe' \(mode p"),
    ("manifest", ValueError, "must not write manifest.json"),
    ("crash", RuntimeError, "trainer crashed"),
])
def test_failed_publish_leaves_nothing_visible(tmp_path, kind, error, message):
    _publish(tmp_path, "base")
    with pytest.raises(error, match=message):
        publish(tmp_path, _bad_tree(kind), signer=SIGNER, data={}, config={}, metrics={})
    assert list_versions(tmp_path) == [1] and current_version(tmp_path) == 1
    assert _staging_entries(tmp_path) == []


def test_publish_propagates_unexpected_rename_errors(tmp_path):
    def remove_versions_folder(folder: Path) -> None:
        (folder / "x").write_bytes(b"x")
        shutil.rmtree(tmp_path / "versions")

    with pytest.raises(FileNotFoundError):
        publish(tmp_path, remove_versions_folder, signer=SIGNER, data={}, config={}, metrics={})
    assert _staging_entries(tmp_path) == [] and current_version(tmp_path) is None


def test_publish_skips_numbers_taken_by_non_versions(tmp_path):
    _publish(tmp_path, "one")
    (tmp_path / "versions" / "2").write_text("not a version")
    (tmp_path / "versions" / "3").symlink_to(tmp_path / "versions" / "1")
    assert _publish(tmp_path, "four") == 4
    assert list_versions(tmp_path) == [1, 4] and resolve(tmp_path) == 4
    _assert_files_match_tag(tmp_path, 4)


def test_publish_gives_up_after_too_many_taken_numbers(tmp_path):
    versions = tmp_path / "versions"
    versions.mkdir()
    for n in range(1, 101):
        (versions / str(n)).write_text("taken")
    with pytest.raises(ArtifactError, match=r"no free version number .* \(last tried 100\)"):
        _publish(tmp_path)
    assert list_versions(tmp_path) == [] and _staging_entries(tmp_path) == []


def test_concurrent_publishers_get_distinct_numbers(tmp_path):
    errors: list[BaseException] = []

    def publisher(worker: int) -> None:
        try:
            for i in range(3):
                _publish(tmp_path, f"w{worker}-{i}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert list_versions(tmp_path) == list(range(1, 13))
    tags = set()
    for version in range(1, 13):
        _assert_files_match_tag(tmp_path, version)
        tags.add(read_manifest(tmp_path, version).data["tag"])
    assert len(tags) == 12


# --- readers ignore anything that is not a version ------------------------------------------


def test_list_versions_ignores_junk(tmp_path):
    root = tmp_path / "root"
    _publish(root, "one")
    outside = tmp_path / "outside"
    outside.mkdir()
    versions = root / "versions"
    for name in ("abc", "007", "-1", "0", "1.0"):
        (versions / name).mkdir()
    (versions / "8").symlink_to(outside, target_is_directory=True)
    (versions / "9").symlink_to(versions / "1", target_is_directory=True)
    (versions / "5").write_text("a file")
    assert list_versions(root) == [1]
    assert _publish(root, "two") == 2

    with pytest.raises(ArtifactError, match=r"version 8 is a symlink"):
        version_dir(root, 8)
    with pytest.raises(ArtifactError, match=r"version 5 is not a directory"):
        version_dir(root, 5)
    with pytest.raises(ArtifactError, match=r"version 99 not found"):
        version_dir(root, 99)
    with pytest.raises(ArtifactError, match="pinned version 8 not found"):
        resolve(root, pinned=8)


def test_versions_folder_resolving_outside_root_is_ignored(tmp_path):
    outside = tmp_path / "outside"
    _publish(outside)
    root = tmp_path / "root"
    root.mkdir()
    (root / "versions").symlink_to(outside / "versions", target_is_directory=True)
    assert list_versions(root) == []
    with pytest.raises(ArtifactError, match="version 1 resolves to .*, outside"):
        version_dir(root, 1)


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_version_dir_refuses_non_positive_ints(tmp_path, version):
    _publish(tmp_path)
    with pytest.raises(ValueError, match=f"version must be a positive int, got {version!r}"):
        version_dir(tmp_path, version)


# --- verify -------------------------------------------------------------------------------


def _tamper(vdir: Path, how: str) -> None:
    target = vdir / "sub" / "table.npy"
    if how == "content":
        target.write_bytes(b"X" + target.read_bytes()[1:])
    elif how == "size":
        target.write_bytes(target.read_bytes() + b"!")
    elif how == "missing":
        target.unlink()
    elif how == "symlink":
        target.unlink()
        target.symlink_to(vdir / "model.bin")
    elif how == "folder":
        target.unlink()
        target.mkdir()
    elif how == "parent symlink":
        outside = vdir.parents[2] / "outside-copy"
        shutil.copytree(vdir / "sub", outside)
        shutil.rmtree(vdir / "sub")
        (vdir / "sub").symlink_to(outside, target_is_directory=True)
    elif how == "extra":
        (vdir / "sub" / "notes.txt").write_text("unlisted")
    elif how == "extra symlink":
        (vdir / "elsewhere").symlink_to(vdir / "sub", target_is_directory=True)


@pytest.mark.parametrize("how, message", [
    ("content", r"file 'sub/table.npy' has sha256 [0-9a-f]{64}, manifest says"),
    ("size", "file 'sub/table.npy' has 101 bytes, manifest says 100"),
    ("missing", "file 'sub/table.npy' is missing"),
    ("symlink", "file 'sub/table.npy' is a symlink"),
    ("folder", "file 'sub/table.npy' is not a regular file"),
    ("parent symlink", "file 'sub/table.npy' resolves outside the version directory"),
    ("extra", "file 'sub/notes.txt' is not in the manifest"),
    ("extra symlink", "file 'elsewhere' is not in the manifest"),
])
def test_verify_names_the_bad_file(tmp_path, how, message):
    root = tmp_path / "root"
    _publish(root)
    _tamper(version_dir(root, 1), how)
    read_manifest(root, 1)  # the manifest itself is still fine
    with pytest.raises(CorruptVersionError, match=f"version 1: {message}"):
        verify(root, 1, TRUST)


def test_manifest_problems_are_corrupt_or_incomplete(tmp_path):
    _publish(tmp_path)
    manifest_path = version_dir(tmp_path, 1) / "manifest.json"
    good = manifest_path.read_text()

    manifest_path.write_text(good.replace('"version": 1', '"version": 4'))
    with pytest.raises(UntrustedVersionError, match="version 1: manifest.sig does not match manifest.json"):
        verify(tmp_path, 1, TRUST)                       # an edited manifest no longer matches its signature
    with pytest.raises(CorruptVersionError, match="version 1: manifest.json says version 4"):
        verify(tmp_path, 1, None)
    manifest_path.write_text(good.replace('"schema_version": 1', '"schema_version": 2'))
    with pytest.raises(CorruptVersionError, match="manifest.json is invalid: schema_version"):
        read_manifest(tmp_path, 1)
    manifest_path.write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptVersionError, match="manifest.json is invalid"):
        read_manifest(tmp_path, 1)
    manifest_path.unlink()
    with pytest.raises(IncompleteVersionError, match="version 1: manifest.json missing"):
        verify(tmp_path, 1, TRUST)
    manifest_path.mkdir()
    with pytest.raises(CorruptVersionError, match="manifest.json is not a regular file"):
        read_manifest(tmp_path, 1)


def test_set_current_refuses_unknown_and_corrupt_versions(tmp_path):
    _publish(tmp_path, "one")
    _publish(tmp_path, "two")
    with pytest.raises(ArtifactError, match="version 7 not found"):
        set_current(tmp_path, 7)
    (version_dir(tmp_path, 1) / "model.bin").write_bytes(b"tampered")
    with pytest.raises(CorruptVersionError, match="file 'model.bin'"):
        set_current(tmp_path, 1)
    assert current_version(tmp_path) == 2


# --- retention ------------------------------------------------------------------------------


def test_retention_keeps_the_newest_and_current(tmp_path):
    for i in range(5):
        _publish(tmp_path, f"v{i}")
    set_current(tmp_path, 2)
    assert apply_retention(tmp_path, keep=2) == [1, 3]
    assert list_versions(tmp_path) == [2, 4, 5] and resolve(tmp_path) == 2
    assert _staging_entries(tmp_path) == []
    assert apply_retention(tmp_path, keep=2) == []


def test_publish_applies_retention(tmp_path):
    for i in range(4):
        _publish(tmp_path, f"v{i}", retain=2)
    assert list_versions(tmp_path) == [3, 4] and resolve(tmp_path) == 4
    _publish(tmp_path, "cold", make_current=False, retain=1)
    assert list_versions(tmp_path) == [4, 5] and resolve(tmp_path) == 4


@pytest.mark.parametrize("keep", [0, -3, True, 2.0])
def test_retention_rejects_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep must be an int >= 1, got {keep!r}"):
        apply_retention(tmp_path, keep)


def test_retention_removes_stale_leftovers_only(tmp_path):
    _publish(tmp_path)
    staging = tmp_path / ".staging"
    old = time.time() - STALE_STAGING_S - 60
    for name in ("dead", "alive", "trash-half-deleted"):
        (staging / name / "sub").mkdir(parents=True)
        (staging / name / "sub" / "f.bin").write_bytes(b"x")
    (staging / "dead-file").write_bytes(b"x")
    (tmp_path / "CURRENT.tmp-dead").write_text("3\n")
    (tmp_path / "CURRENT.tmp-alive").write_text("3\n")
    for path in (staging / "dead", staging / "dead" / "sub", staging / "dead" / "sub" / "f.bin",
                 staging / "dead-file", tmp_path / "CURRENT.tmp-dead",
                 staging / "alive", staging / "alive" / "sub"):
        os.utime(path, (old, old))  # "alive" still has a fresh file deep inside

    assert apply_retention(tmp_path, keep=5) == []
    assert _staging_entries(tmp_path) == ["alive"]
    assert sorted(p.name for p in tmp_path.glob("CURRENT.tmp-*")) == ["CURRENT.tmp-alive"]
    assert list_versions(tmp_path) == [1] and current_version(tmp_path) == 1


# --- crash safety and concurrent readers ------------------------------------------------------


def _child(root: Path, tag: str, n_files: int, sleep_s: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen([sys.executable, str(CHILD), str(root), tag, str(n_files),
                             str(sleep_s)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "ready\n"
    return proc


def _assert_consistent(root: Path, before: list[int], current_before: int) -> list[int]:
    """Only complete versions are visible and CURRENT names the old or the new complete one."""
    versions = list_versions(root)
    new = [v for v in versions if v not in before]
    assert versions[:len(before)] == before
    assert new in ([], [before[-1] + 1])
    for version in versions:
        _assert_files_match_tag(root, version)
    assert current_version(root) in {current_before, *new}
    assert resolve(root) == current_version(root)
    return new


@pytest.mark.slow
def test_publisher_killed_at_random_points_never_exposes_a_partial_version(tmp_path):
    rng = random.Random(20240501)
    n_files, sleep_s = 4, 0.04
    write_time_s = n_files * sleep_s
    _publish(tmp_path, "base")
    outcomes = []
    for run in range(15):
        before, current_before = list_versions(tmp_path), current_version(tmp_path)
        # Run 0 sleeps seconds inside its first file and dies there; runs 1-13 die anywhere up
        # to a bit past their writes (fsync, rename and the CURRENT flip follow); run 14 lives.
        proc = _child(tmp_path, f"run-{run:04d}", n_files, 5.0 if run == 0 else sleep_s)
        if run < 14:
            time.sleep(0.0 if run == 0 else rng.uniform(0.0, 1.5 * write_time_s))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        new = _assert_consistent(tmp_path, before, current_before)
        outcomes.append((proc.returncode, new))
    assert outcomes[0] == (-signal.SIGKILL, [])
    last_returncode, last_new = outcomes[-1]
    assert last_returncode == 0 and len(last_new) == 1
    assert current_version(tmp_path) == last_new[0]
    assert read_manifest(tmp_path, last_new[0]).data == {"tag": "run-0014"}


@pytest.mark.slow
def test_reader_never_sees_an_inconsistent_version_during_publishes(tmp_path):
    _publish(tmp_path, "first")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while True:
            # Read the flag first, so the last check starts after the last publish.
            last = stop.is_set()
            try:
                version = resolve(tmp_path)
                _assert_files_match_tag(tmp_path, version)
                seen.append(version)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                return
            if last:
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            _publish(tmp_path, f"v{i:03d}")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert errors == []
    assert seen and seen == sorted(seen) and seen[-1] == 21
