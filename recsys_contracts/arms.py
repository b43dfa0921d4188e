"""Traffic arms: a candidate version served to a sticky canary share of users, and shadowing a sample
of the rest, set on the artifact volume.

Format: ``<root>/ARMS.json`` beside ``CURRENT``, replaced atomically (write a temporary file, fsync,
rename, fsync the root); absent = no arm, every user is served CURRENT::

    {"candidate": 7, "canary_percent": 5.0, "shadow_percent": 10.0}

``candidate`` is a published version (>= 1); ``canary_percent`` in [0, 100] is the share of users it
serves; ``shadow_percent`` in [0, 100] (optional, default 0) is the share of the other requests it
also answers off the answer path, for comparison metrics only. Both services read the file when they poll CURRENT (configuration, not a redeploy: in
Kubernetes it lives on the artifact volume) and keep the candidate loaded beside CURRENT; the ranking
service routes a user to it when ``in_canary(user_id, canary_percent)``. The bucket of a user is a
hash of the id (sha256, not Python's per-process salted ``hash``), so every process and every
restart puts a user in the same arm: the canary is sticky per user.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

ARMS_FILE = "ARMS.json"
_MAX_ARMS_BYTES = 4096


@dataclass(frozen=True)
class Arms:
    """The candidate version and the percentage of users it serves."""

    candidate: int
    canary_percent: float
    shadow_percent: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.candidate, bool) or not isinstance(self.candidate, int) or self.candidate < 1:
            raise ValueError(f"candidate must be a version number >= 1, got {self.candidate!r}")
        if isinstance(self.canary_percent, bool) or not isinstance(self.canary_percent, (int, float)) \
                or not math.isfinite(self.canary_percent) or not 0 <= self.canary_percent <= 100:
            raise ValueError(f"canary_percent must be a number in [0, 100], got {self.canary_percent!r}")
        if isinstance(self.shadow_percent, bool) or not isinstance(self.shadow_percent, (int, float)) \
                or not math.isfinite(self.shadow_percent) or not 0 <= self.shadow_percent <= 100:
            raise ValueError(f"shadow_percent must be a number in [0, 100], got {self.shadow_percent!r}")

    def to_json(self) -> str:
        return json.dumps({"candidate": self.candidate, "canary_percent": float(self.canary_percent),
                           "shadow_percent": float(self.shadow_percent)}, sort_keys=True) + "\n"


def user_bucket(user_id: str) -> float:
    """The user's place in [0, 100): the first 8 bytes of sha256(user id) as a fraction of 2^64, x 100."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def in_canary(user_id: str, canary_percent: float) -> bool:
    """True for the ``canary_percent`` share of users whose bucket lies below it (the same users every time)."""
    return user_bucket(user_id) < canary_percent


def read_arms(root: str | Path) -> Arms | None:
    """The arms set under ``root``, None when none is; ValueError names what is wrong with the file."""
    path = Path(root) / ARMS_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_ARMS_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _MAX_ARMS_BYTES:
        raise ValueError(f"{ARMS_FILE} must be at most {_MAX_ARMS_BYTES} bytes, got more")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{ARMS_FILE} must be a JSON object, got unparsable text ({str(error)[:64]})") from None
    if not isinstance(body, dict) or not {"candidate", "canary_percent"} <= set(body) \
            or not set(body) <= {"candidate", "canary_percent", "shadow_percent"}:
        raise ValueError(f"{ARMS_FILE} must hold candidate, canary_percent and optionally shadow_percent, "
                         f"got {str(body)[:64]}")
    return Arms(candidate=body["candidate"], canary_percent=body["canary_percent"],
                shadow_percent=body.get("shadow_percent", 0.0))


def write_arms(root: str | Path, arms: Arms | None) -> None:
    """Sets (or with None, clears) the arms under ``root`` atomically."""
    root = Path(root)
    if arms is None:
        (root / ARMS_FILE).unlink(missing_ok=True)
    else:
        tmp = root / f"{ARMS_FILE}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(arms.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, root / ARMS_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
