"""The artifact volume: layout, manifest, publish, resolve, verify, retention and watch.

This module is the only owner of the on-disk format below. The trainer writes it through
``publish``; the services read it through ``resolve`` and ``verify`` (``recsys_serving.reload``
follows CURRENT).

Layout::

    <root>/CURRENT                the serving version: ASCII decimal number + "\\n"; replaced
                                  atomically (write CURRENT.tmp-<hex>, fsync, rename, fsync root)
    <root>/versions/<N>/          one published version; N is a positive decimal integer without
                                  leading zeros (^[1-9][0-9]*$)
        manifest.json             see below
        manifest.sig              the publisher's Ed25519 signature over manifest.json's bytes
                                  (``recsys_contracts.signing``); absent in an unsigned version
        ...files...               any tree of regular files (no symlinks)
    <root>/.staging/<hex>/        a version being written; never read by services
    <root>/.staging/trash-<hex>/  a version being deleted by retention

Readers ignore (and log at debug) every entry of ``versions/`` that is not a real directory
(symlinks are not) with such a name whose resolved path stays inside ``<root>``.

``manifest.json`` is a UTF-8 JSON object with exactly these fields:

    schema_version  int   MANIFEST_SCHEMA_VERSION (1); any other value is refused
    version         int   N, equal to the directory name
    created_at      str   ISO-8601 in UTC, e.g. "2024-05-01T12:00:00+00:00"
    data            dict  description of the data window (source, time range, row counts)
    config          dict  the training configuration (model hyper-parameters travel here)
    metrics         dict  offline evaluation metrics
    files           dict  relative POSIX path -> {"sha256": 64 lowercase hex, "bytes": int >= 0}
                          for every file of the version except manifest.json itself
    extra           dict  free-form; {} when the publisher gave none

Values are strict JSON (no NaN or infinity). Nothing in a version is ever unpickled.

Verification order (``verify``): the manifest's bytes and the signature first, checked against the
reader's ``Trust``; only then is the manifest parsed and every file hashed against it.

Crash safety: a version is written under ``.staging``, every file and folder is fsynced, and only
then is the folder renamed into ``versions/`` and ``CURRENT`` replaced. A publisher killed at any
point leaves either no new version or a complete one, and ``CURRENT`` names the previous version
or the new complete one. Concurrent publishers get distinct numbers (a rename onto a taken number
fails and is retried with the next); the last ``CURRENT`` flip wins, so retention and rollback
assume one writer at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from recsys_contracts.arms import read_arms
from recsys_contracts.signing import SIGNATURE_FILE, MAX_SIGNATURE_BYTES, Signer, SignatureError, Trust

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
STAGING_DIR = ".staging"
# A staging tree untouched this long (seconds, newest mtime anywhere in it) belongs to a dead
# publisher: retention removes it.
STALE_STAGING_S = 3600.0

_VERSION_NAME = re.compile(r"[1-9][0-9]*")
# At most 19 digits: the largest int64 has 19, and a longer number is garbage, not a version.
_CURRENT_TEXT = re.compile(r"([1-9][0-9]{0,18})\n?")
_CURRENT_MAX_BYTES = 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CURRENT_TMP_PREFIX = f"{CURRENT_FILE}.tmp-"
_TRASH_PREFIX = "trash-"
# Renames onto a taken number are retried with the next one; more collisions than this in a row
# mean something other than a concurrent publisher keeps taking numbers.
_MAX_RENAME_ATTEMPTS = 100
# A manifest lists files, not data: far below this even for a large version.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_RESERVED_FILES = (MANIFEST_FILE, SIGNATURE_FILE)
_MANIFEST_FIELDS = {"schema_version", "version", "created_at", "data", "config", "metrics",
                    "files", "extra"}


class ArtifactError(Exception):
    """The artifact volume does not hold what was asked for (missing, garbage, refused)."""


class CorruptVersionError(ArtifactError):
    """A version's manifest or files do not match: never serve it."""


class IncompleteVersionError(ArtifactError):
    """A version folder has no manifest yet: it may still be being copied in; retry it later."""


class UntrustedVersionError(CorruptVersionError):
    """A version whose signature is missing, malformed, from an unknown key or wrong: never serve it."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its sha256 (lowercase hex) and size in bytes."""

    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not _is_int(self.size_bytes) or self.size_bytes < 0:
            raise ValueError(f"size_bytes (JSON 'bytes') must be an int >= 0, "
                             f"got {self.size_bytes!r}")


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one version (see the module docstring). Read-only."""

    version: int
    created_at: str
    data: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, FileEntry]
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not _is_int(self.schema_version) or self.schema_version != MANIFEST_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version must be {MANIFEST_SCHEMA_VERSION}, got {self.schema_version!r}")
        _check_version(self.version)
        _check_utc_timestamp(self.created_at)
        for name in ("data", "config", "metrics", "extra"):
            _check_json_object(name, getattr(self, name))
        if not isinstance(self.files, dict):
            raise ValueError(f"files must be a dict, got {type(self.files).__name__}")
        for rel, entry in self.files.items():
            _check_relative_path(rel)
            if not isinstance(entry, FileEntry):
                raise ValueError(f"files[{rel!r}] must be a FileEntry, got {entry!r}")

    def to_json(self) -> str:
        """Canonical text: sorted keys, two-space indent, trailing newline."""
        body = {
            "schema_version": self.schema_version, "version": self.version,
            "created_at": self.created_at, "data": self.data, "config": self.config,
            "metrics": self.metrics, "extra": self.extra,
            "files": {rel: {"sha256": e.sha256, "bytes": e.size_bytes}
                      for rel, e in self.files.items()},
        }
        return json.dumps(body, sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parses and validates manifest text; ValueError names the first bad field."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest must be valid JSON, got error {exc}") from None
        if not isinstance(body, dict):
            raise ValueError(f"manifest must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _MANIFEST_FIELDS)
        if unknown:
            raise ValueError(f"manifest has unknown fields {unknown}, expected only "
                             f"{sorted(_MANIFEST_FIELDS)}")
        missing = sorted(_MANIFEST_FIELDS - {"extra"} - set(body))
        if missing:
            raise ValueError(f"manifest is missing fields {missing}")
        files = body["files"]
        if not isinstance(files, dict):
            raise ValueError(f"files must be a dict, got {type(files).__name__}")
        return cls(
            schema_version=body["schema_version"], version=body["version"],
            created_at=body["created_at"], data=body["data"], config=body["config"],
            metrics=body["metrics"], extra=body.get("extra", {}),
            files={rel: _file_entry_from_json(rel, raw) for rel, raw in files.items()},
        )


def _file_entry_from_json(rel: str, raw: Any) -> FileEntry:
    if not isinstance(raw, dict) or set(raw) != {"sha256", "bytes"}:
        raise ValueError(f"files[{rel!r}] must be an object with exactly sha256 and bytes, "
                         f"got {raw!r}")
    try:
        return FileEntry(sha256=raw["sha256"], size_bytes=raw["bytes"])
    except ValueError as exc:
        raise ValueError(f"files[{rel!r}]: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_version(version: Any) -> None:
    if not _is_int(version) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")


def _check_utc_timestamp(value: Any) -> None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() != timedelta(0):
        raise ValueError(f"created_at must be an ISO-8601 UTC timestamp, got {value!r}")


def _check_json_object(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold only strict JSON values, got {value!r} ({exc})") \
            from None


def _check_relative_path(rel: Any) -> None:
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if (any(part in ("", ".", "..") for part in parts) or "\\" in rel or "\x00" in rel
            or rel in _RESERVED_FILES):
        raise ValueError(f"files keys must be relative POSIX paths without '.', '..' or empty "
                         f"parts, other than {' and '.join(_RESERVED_FILES)}, got {rel!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def list_versions(root: Path | str) -> list[int]:
    """Published version numbers, ascending; entries breaking the layout rules are ignored."""
    root = Path(root)
    versions_dir = root / VERSIONS_DIR
    if not versions_dir.is_dir():
        return []
    found = []
    with os.scandir(versions_dir) as entries:
        for entry in entries:
            if not _VERSION_NAME.fullmatch(entry.name):
                logger.debug("ignoring %s: not a version number", entry.path)
            elif entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                logger.debug("ignoring %s: not a real directory", entry.path)
            elif not _inside(Path(entry.path), root):
                logger.debug("ignoring %s: resolves outside %s", entry.path, root)
            else:
                found.append(int(entry.name))
    return sorted(found)


def current_version(root: Path | str) -> int | None:
    """The version CURRENT names, or None when there is no CURRENT file."""
    try:
        with open(Path(root) / CURRENT_FILE, "rb") as f:
            # One byte past the longest valid text, so an overlong file cannot match.
            raw = f.read(_CURRENT_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    text = raw.decode("ascii", errors="replace")
    match = _CURRENT_TEXT.fullmatch(text)
    if match is None:
        raise ArtifactError(f"CURRENT must hold a positive version number and a newline, "
                            f"got {text!r}")
    return int(match.group(1))


def resolve(root: Path | str, pinned: int | None = None) -> int:
    """The version to serve: ``pinned`` (which must exist), else CURRENT, else the newest."""
    root = Path(root)
    if pinned is not None:
        _check_version(pinned)
        versions = list_versions(root)
        if pinned not in versions:
            raise ArtifactError(f"pinned version {pinned} not found under {root / VERSIONS_DIR}, "
                                f"available: {versions}")
        return pinned
    # CURRENT before the listing: a publisher renames before it flips CURRENT, so the version
    # read here is already listed, while a listing taken first could miss a fresh flip's target.
    current = current_version(root)
    versions = list_versions(root)
    if current is not None:
        # A missing target means someone deleted it: serving another version would hide that.
        if current not in versions:
            raise ArtifactError(f"CURRENT names version {current}, which is not under "
                                f"{root / VERSIONS_DIR}, available: {versions}")
        return current
    if not versions:
        raise ArtifactError(f"no published version under {root / VERSIONS_DIR}")
    return versions[-1]


def version_dir(root: Path | str, version: int) -> Path:
    """The folder of an existing version; refuses bad numbers, symlinks and paths leaving root."""
    _check_version(version)
    root = Path(root)
    path = root / VERSIONS_DIR / str(version)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"version {version} not found under {root / VERSIONS_DIR}") from None
    if stat.S_ISLNK(mode):
        raise ArtifactError(f"version {version} is a symlink ({path}), refused")
    if not stat.S_ISDIR(mode):
        raise ArtifactError(f"version {version} is not a directory ({path})")
    if not _inside(path, root):
        raise ArtifactError(f"version {version} resolves to {path.resolve()}, outside {root}")
    return path


def _read_small_file(path: Path, version: int, limit: int) -> bytes | None:
    """A regular file's bytes (None when absent); refuses symlinks, other kinds and files over ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:   # ELOOP: a symlink
        raise CorruptVersionError(f"version {version}: {path.name} cannot be opened as a regular file "
                                  f"({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CorruptVersionError(f"version {version}: {path.name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise CorruptVersionError(f"version {version}: {path.name} has {info.st_size} bytes, at most "
                                      f"{limit} allowed")
        return f.read(limit + 1)


def _manifest_bytes(root: Path | str, version: int) -> bytes:
    raw = _read_small_file(version_dir(root, version) / MANIFEST_FILE, version, MAX_MANIFEST_BYTES)
    if raw is None:
        raise IncompleteVersionError(f"version {version}: {MANIFEST_FILE} missing (still being copied?)")
    return raw


def read_manifest(root: Path | str, version: int, raw: bytes | None = None) -> Manifest:
    """The parsed manifest of a version (neither its signature nor its files are checked: see
    ``verify``); ``raw`` is its bytes when the caller has read them already."""
    raw = _manifest_bytes(root, version) if raw is None else raw
    try:
        # UnicodeDecodeError is a ValueError too.
        manifest = Manifest.from_json(raw.decode("utf-8"))
    except ValueError as exc:
        raise CorruptVersionError(f"version {version}: {MANIFEST_FILE} is invalid: {exc}") \
            from None
    if manifest.version != version:
        raise CorruptVersionError(
            f"version {version}: {MANIFEST_FILE} says version {manifest.version}")
    return manifest


def check_signature(root: Path | str, version: int, trust: Trust) -> bytes:
    """The manifest's bytes once ``trust`` accepts its signature; UntrustedVersionError otherwise.
    Reads only manifest.json and manifest.sig."""
    raw = _manifest_bytes(root, version)
    signature = None if trust.allow_unsigned else _read_small_file(
        version_dir(root, version) / SIGNATURE_FILE, version, MAX_SIGNATURE_BYTES)
    try:
        trust.check(raw, signature)
    except SignatureError as exc:
        raise UntrustedVersionError(f"version {version}: {exc}") from None
    return raw


def verify(root: Path | str, version: int, trust: Trust | None) -> Manifest:
    """Checks the signature against ``trust`` before anything else is read (None: the publisher's own
    check of what it just wrote, checksums only), then every file against the manifest and that
    nothing else is there; returns the manifest."""
    raw = check_signature(root, version, trust) if trust is not None else None
    manifest = read_manifest(root, version, raw)
    vdir = version_dir(root, version)
    for rel, entry in sorted(manifest.files.items()):
        reason = _file_problem(vdir, rel, entry)
        if reason is not None:
            raise CorruptVersionError(f"version {version}: file {rel!r} {reason}")
    for rel in _tree_entries(vdir):
        if rel not in _RESERVED_FILES and rel not in manifest.files:
            raise CorruptVersionError(f"version {version}: file {rel!r} is not in the manifest")
    return manifest


def _file_problem(vdir: Path, rel: str, entry: FileEntry) -> str | None:
    """Why a listed file does not match its entry, or None when it does."""
    path = vdir / rel
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return "is missing"
    if stat.S_ISLNK(mode):
        return "is a symlink"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    # A symlinked parent folder would pass the checks above but read from elsewhere.
    if not _inside(path, vdir):
        return "resolves outside the version directory"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.size_bytes:
            return f"has {size} bytes, manifest says {entry.size_bytes}"
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != entry.sha256:
        return f"has sha256 {digest}, manifest says {entry.sha256}"
    return None


def _tree_entries(top: Path) -> list[str]:
    """Relative POSIX paths of every non-directory entry under ``top``, symlinks included."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        # os.walk lists symlinks to folders among dirnames without descending into them.
        for name in dirnames + filenames:
            path = base / name
            if name in filenames or path.is_symlink():
                found.append(path.relative_to(top).as_posix())
    return sorted(found)


def _hash_and_sync_tree(staging: Path) -> dict[str, FileEntry]:
    """Hashes and fsyncs every file under ``staging`` (then its folders, deepest first)."""
    files: dict[str, FileEntry] = {}
    folders = []
    for dirpath, dirnames, filenames in os.walk(staging):
        folders.append(Path(dirpath))
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(staging).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ValueError(f"write_files must write regular files only, got a symlink "
                                 f"at {rel!r}")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ValueError(f"write_files must write regular files only, got {rel!r} "
                                 f"(mode {stat.filemode(mode)})")
            if rel in _RESERVED_FILES:
                raise ValueError(f"write_files must not write {rel}: publish writes it")
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                os.fsync(f.fileno())
                files[rel] = FileEntry(sha256=digest, size_bytes=os.fstat(f.fileno()).st_size)
    for folder in reversed(folders):
        _fsync_dir(folder)
    return files


def publish(root: Path | str, write_files: Callable[[Path], None], *, data: dict[str, Any],
            config: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None,
            make_current: bool = True, retain: int | None = None, signer: Signer | None) -> int:
    """Publishes what ``write_files(folder)`` writes as the next version; returns its number.

    ``signer`` signs the manifest (``manifest.sig``); None publishes an unsigned version, which only
    a reader that allows unsigned versions accepts (the caller decides, and says so loudly).

    Until the rename into ``versions/`` nothing is visible, and any exception removes the
    staging folder. After it the version is complete: a later failure (CURRENT flip, retention)
    propagates but leaves that version in place.
    """
    root = Path(root)
    if retain is not None and (not _is_int(retain) or retain < 1):
        raise ValueError(f"retain must be None or an int >= 1, got {retain!r}")
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Validates data/config/metrics/extra before any (possibly long) write_files call.
    draft = Manifest(version=1, created_at=created_at, data=data, config=config, metrics=metrics,
                     files={}, extra={} if extra is None else extra)
    for folder in (root, root / VERSIONS_DIR, root / STAGING_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    # Makes a freshly created versions/ itself durable before anything is renamed into it.
    _fsync_dir(root)
    staging = root / STAGING_DIR / uuid.uuid4().hex
    staging.mkdir()
    try:
        write_files(staging)
        files = _hash_and_sync_tree(staging)
        version = _rename_into_versions(root, staging, draft, files, signer)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if make_current:
        _write_current(root, version)
    if retain is not None:
        apply_retention(root, retain)
    logger.info("published version %d under %s (%d files)", version, root, len(files))
    return version


def _rename_into_versions(root: Path, staging: Path, draft: Manifest,
                          files: dict[str, FileEntry], signer: Signer | None) -> int:
    """Writes the manifest for the next free number and renames staging there; returns it."""
    versions_dir = root / VERSIONS_DIR
    candidate = 0
    for _ in range(_MAX_RENAME_ATTEMPTS):
        candidate = max(max(list_versions(root), default=0), candidate) + 1
        manifest = dataclasses.replace(draft, version=candidate, files=files)
        text = manifest.to_json()
        _write_synced(staging / MANIFEST_FILE, text)
        if signer is not None:
            _write_synced(staging / SIGNATURE_FILE, signer.sign(text.encode("utf-8")))
        _fsync_dir(staging)
        try:
            # A non-empty folder never replaces another non-empty folder or a file: a taken
            # number fails here instead of being overwritten.
            os.rename(staging, versions_dir / str(candidate))
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            logger.info("version %d taken under %s, trying the next", candidate, root)
            continue
        _fsync_dir(versions_dir)
        return candidate
    raise ArtifactError(f"no free version number under {versions_dir} after "
                        f"{_MAX_RENAME_ATTEMPTS} attempts (last tried {candidate})")


def _write_current(root: Path, version: int) -> None:
    tmp = root / f"{_CURRENT_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        _write_synced(tmp, f"{version}\n")
        os.replace(tmp, root / CURRENT_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def set_current(root: Path | str, version: int, trust: Trust | None = None) -> None:
    """Points CURRENT at an existing version that verifies (rollback or promotion); with ``trust``,
    its signature must also be accepted."""
    root = Path(root)
    verify(root, version, trust)
    _write_current(root, version)
    logger.info("CURRENT of %s set to version %d", root, version)


def apply_retention(root: Path | str, keep: int) -> list[int]:
    """Deletes all but the newest ``keep`` versions, never CURRENT nor the arms file's candidate
    (``recsys_contracts.arms``); returns the deleted ones.

    Also removes dead publishers' leftovers: staging trees and CURRENT.tmp files untouched for
    STALE_STAGING_S, and trash of interrupted deletions.
    """
    if not _is_int(keep) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    root = Path(root)
    versions = list_versions(root)
    protected = set(versions[-keep:])
    current = current_version(root)
    if current is not None:
        protected.add(current)
    protected |= _arms_versions(root)
    deleted = []
    for version in (v for v in versions if v not in protected):
        # Renaming away first makes the version vanish from listings in one step, instead of
        # a reader seeing a half-deleted folder under a valid name.
        trash = _claim_as_trash(root, root / VERSIONS_DIR / str(version))
        _fsync_dir(root / VERSIONS_DIR)
        if trash is not None:
            shutil.rmtree(trash)
            deleted.append(version)
    _remove_stale_leftovers(root)
    if deleted:
        logger.info("retention under %s deleted versions %s", root, deleted)
    return deleted


def _arms_versions(root: Path) -> set[int]:
    """The versions the arms file names (its candidate); an unreadable file protects none and is logged."""
    try:
        arms = read_arms(root)
    except ValueError as error:
        logger.warning("retention: the arms file of %s is unreadable (%s); it protects no version", root, error)
        return set()
    return set() if arms is None else {arms.candidate}


def _claim_as_trash(root: Path, path: Path) -> Path | None:
    """Renames ``path`` into .staging/trash-<hex>; None when it vanished meanwhile."""
    (root / STAGING_DIR).mkdir(exist_ok=True)
    trash = root / STAGING_DIR / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return None
    return trash


def _newest_mtime(path: Path) -> float:
    """Newest mtime (seconds since the epoch) of ``path`` and everything under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _remove_stale_leftovers(root: Path) -> None:
    cutoff = time.time() - STALE_STAGING_S
    staging_dir = root / STAGING_DIR
    entries = sorted(staging_dir.iterdir()) if staging_dir.is_dir() else []
    for path in entries:
        try:
            stale = path.name.startswith(_TRASH_PREFIX) or _newest_mtime(path) < cutoff
        except FileNotFoundError:
            continue  # its publisher just renamed it into versions/
        if not stale:
            continue
        if path.is_dir() and not path.is_symlink():
            trash = path if path.name.startswith(_TRASH_PREFIX) else _claim_as_trash(root, path)
            if trash is not None:
                shutil.rmtree(trash)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed stale staging entry %s", path)
    for tmp in sorted(root.glob(f"{_CURRENT_TMP_PREFIX}*")):
        if tmp.lstat().st_mtime < cutoff:
            tmp.unlink(missing_ok=True)
            logger.info("removed stale %s", tmp)
