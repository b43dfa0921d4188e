"""Where the data lives, and fetching MovieLens when it is not there.

``data_dir_from_env()`` is ``$RECSYS_DATA_DIR``, else ``<repo>/../shared/data``.
``ensure_movielens(name, data_dir)`` returns ``data_dir/<name>`` when present; otherwise it
downloads the official GroupLens zip, checks its md5 (``verify_md5``), extracts it with no
member allowed outside the target folder (``safe_extract``) and moves the folder into place.
Offline it raises a DataError that says where to put the folder instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from trainer.data.dataset import DataError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/"
MOVIELENS_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
}
# The ratings file whose presence means the folder is complete.
_RATINGS_FILE = {"ml-100k": "u.data", "ml-1m": "ratings.dat"}
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK_BYTES = 1 << 20


def data_dir_from_env() -> Path:
    """The data directory: ``$RECSYS_DATA_DIR`` when set and non-empty, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("RECSYS_DATA_DIR") or _REPO_ROOT.parent / "shared" / "data")


def ensure_movielens(name: str, data_dir: Path, *, base_url: str = GROUPLENS_URL,
                     timeout_s: float = 60.0) -> Path:
    """``data_dir/<name>`` for name in ("ml-100k", "ml-1m"), downloading ``<base_url><name>.zip`` if absent."""
    if name not in MOVIELENS_MD5:
        raise ValueError(f"name must be one of {sorted(MOVIELENS_MD5)}, got {name!r}")
    target = Path(data_dir) / name
    ratings = _RATINGS_FILE[name]
    if (target / ratings).is_file():
        return target
    if target.exists():
        raise DataError(f"{target} exists but has no {ratings}; complete or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}{name}.zip"
    # Work in a hidden folder beside the target so the final move is a same-disk rename.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-download-") as work:
        archive = Path(work) / f"{name}.zip"
        _download(url, archive, timeout_s, name, target.parent)
        verify_md5(archive, MOVIELENS_MD5[name])
        extracted = Path(work) / "extracted"
        safe_extract(archive, extracted)
        if not (extracted / name / ratings).is_file():
            raise DataError(f"{url}: the archive has no {name}/{ratings}")
        (extracted / name).rename(target)
    return target


def _download(url: str, destination: Path, timeout_s: float, name: str, data_dir: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, destination.open("wb") as out:
            shutil.copyfileobj(response, out, _CHUNK_BYTES)
    except (urllib.error.URLError, OSError) as error:
        raise DataError(
            f"could not download {url} ({getattr(error, 'reason', error)}). Without network access, "
            f"put the unzipped {name!r} folder in {data_dir}, or set RECSYS_DATA_DIR to a folder "
            f"that contains it.") from error


def verify_md5(path: Path, expected: str) -> None:
    """Raise DataError unless the file's md5 hex digest is ``expected``."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DataError(f"{path}: md5 must be {expected}, got {digest.hexdigest()} "
                        "(corrupt or partial download; delete it and retry)")


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a zip into ``destination``; DataError, before writing anything, if a member would escape it."""
    destination = Path(destination).resolve()
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                _check_member(member, destination, archive)
            destination.mkdir(parents=True, exist_ok=True)
            zipped.extractall(destination)
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive}: not a zip archive ({error})") from error


def _check_member(member: zipfile.ZipInfo, destination: Path, archive: Path) -> None:
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    is_link = (member.external_attr >> 16) & 0o170000 == 0o120000  # Unix mode bits: a symlink
    escapes = (name.startswith("/") or ".." in parts or (parts and ":" in parts[0])
               or not (destination / name).resolve().is_relative_to(destination))
    if escapes or is_link:
        raise DataError(f"{archive}: refusing unsafe member {member.filename!r} "
                        f"(a link or a path outside {destination})")
