"""Signed versions: the trainer signs each version's manifest with Ed25519; services verify it first.

The manifest already holds every file's sha256 and size, so one signature over its exact bytes
covers the whole version. Checksums alone prove nothing (whoever writes a version folder also writes
its manifest); a signature proves the manifest came from a holder of a trusted private key, which is
kept off the artifact volume (docs/ARCHITECTURE.md, "Threat model").

Format: ``<version>/manifest.sig`` is a UTF-8 JSON object with exactly these fields:

    algorithm   str  "ed25519"
    key_id      str  KEY_ID_HEX lowercase hex digits of sha256(raw 32-byte public key)
    signature   str  base64 (standard alphabet, padded) of the 64-byte Ed25519 signature over the
                     bytes of manifest.json

Keys are PEM files: the private key PKCS#8, public keys SubjectPublicKeyInfo. A service trusts every
public key in ``RECSYS_TRUSTED_KEYS`` (one PEM file, or a folder of ``*.pem`` / ``*.pub`` files), so
a new key can be trusted before the trainer switches to it and the old one dropped after (rotation).

    python -m recsys_contracts.signing keygen --private signing.key --public signing.pub
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
KEY_ID_HEX = 16
MAX_SIGNATURE_BYTES = 4096        # a valid file is ~180 bytes; anything far larger is refused unread
_FIELDS = {"algorithm", "key_id", "signature"}


class SignatureError(ValueError):
    """A version's signature is missing, malformed, from an untrusted key, or does not match."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


@dataclass(frozen=True)
class Signer:
    """The trainer's private key: ``sign(manifest_bytes)`` -> the text of ``manifest.sig``."""

    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"signing key {os.fspath(path)!r} must be a readable, unencrypted PEM "
                             f"Ed25519 private key: {type(error).__name__}: {str(error)[:120]}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"signing key {os.fspath(path)!r} must be an Ed25519 key, got {type(key).__name__}")
        return cls(key)

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def sign(self, manifest_bytes: bytes) -> str:
        signature = base64.b64encode(self.private_key.sign(manifest_bytes)).decode("ascii")
        body = {"algorithm": ALGORITHM, "key_id": self.key_id, "signature": signature}
        return json.dumps(body, sort_keys=True) + "\n"


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"trusted key {str(path)!r} must be a readable PEM public key: "
                         f"{type(error).__name__}: {str(error)[:120]}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"trusted key {str(path)!r} must be an Ed25519 public key, got {type(key).__name__}")
    return key


@dataclass(frozen=True)
class Trust:
    """Which versions a service accepts: those signed by one of ``keys`` (key id -> public key), or,
    with ``allow_unsigned`` (an explicit opt-out for local experiments), any version at all."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        if not self.keys and not self.allow_unsigned:
            raise ValueError("trust needs at least one public key (RECSYS_TRUSTED_KEYS), or allow_unsigned "
                             "(RECSYS_ALLOW_UNSIGNED=1, local experiments only)")

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Trust:
        """Every public key in ``path``: one PEM file, or a folder's ``*.pem`` and ``*.pub`` files."""
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".pub") and p.is_file()) \
            if path.is_dir() else [path]
        if not files:
            raise ValueError(f"trusted keys folder {str(path)!r} must hold at least one *.pem or *.pub file")
        keys = {key_id(key): key for key in map(_load_public_key, files)}
        return cls(keys=keys)

    @classmethod
    def unsigned(cls) -> Trust:
        """Accept unsigned versions (and do not check signatures at all): loud, for local experiments."""
        log.warning("version signatures are NOT checked (RECSYS_ALLOW_UNSIGNED): anyone who can write the "
                    "artifact volume decides what this process serves; never run production like this")
        return cls(allow_unsigned=True)

    def check(self, manifest_bytes: bytes, signature_text: bytes | None) -> str | None:
        """The key id that signed ``manifest_bytes``; raises SignatureError. None when unsigned is allowed."""
        if self.allow_unsigned:
            return None
        if signature_text is None:
            raise SignatureError(f"{SIGNATURE_FILE} is missing (unsigned version)")
        try:
            body = json.loads(signature_text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SignatureError(f"{SIGNATURE_FILE} must be UTF-8 JSON") from None
        if not isinstance(body, dict) or set(body) != _FIELDS or body["algorithm"] != ALGORITHM:
            raise SignatureError(f"{SIGNATURE_FILE} must be an object with exactly {sorted(_FIELDS)} and "
                                 f"algorithm {ALGORITHM!r}")
        key = self.keys.get(body["key_id"]) if isinstance(body["key_id"], str) else None
        if key is None:
            raise SignatureError(f"{SIGNATURE_FILE} names key {str(body['key_id'])[:32]!r}, which is not "
                                 f"trusted (trusted: {sorted(self.keys)})")
        try:
            key.verify(base64.b64decode(str(body["signature"]), validate=True), manifest_bytes)
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"{SIGNATURE_FILE} does not match manifest.json for key {body['key_id']!r} "
                                 f"(tampered manifest or wrong signature)") from None
        return body["key_id"]


SIGNING_KEY_ENV = "RECSYS_SIGNING_KEY"


def signer_for(signing_key: str = "", unsigned: bool = False) -> Signer | None:
    """The publisher's signer: the key at ``signing_key``, else at $RECSYS_SIGNING_KEY; None only when
    ``unsigned`` (said loudly). Publishers call it before their long work, so a missing key fails first."""
    if unsigned:
        log.warning("publishing UNSIGNED versions: services refuse them unless they run with "
                    "RECSYS_ALLOW_UNSIGNED=1; never do this for production")
        return None
    path = signing_key or os.environ.get(SIGNING_KEY_ENV, "")
    if not path:
        raise ValueError(f"a signing key is needed to publish: set publish.signing_key or {SIGNING_KEY_ENV} to an "
                         f"Ed25519 private key file (make one with `python -m recsys_contracts.signing keygen`), "
                         f"or publish unsigned (publish.unsigned=true) for local experiments; got neither")
    return Signer.from_file(path)


def keygen(private_path: Path, public_path: Path) -> str:
    """Writes a new key pair (private file mode 0600, never overwritten); returns its key id."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)
    return key_id(key.public_key())


def local_key_env(folder: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``RECSYS_SIGNING_KEY`` / ``RECSYS_TRUSTED_KEYS`` for local tools (the demo, benchmarks): those of
    ``environ`` when both are set, else a pair made once in ``folder`` (e.g. the project's gitignored
    ``keys/``, never the artifact volume)."""
    environ = os.environ if environ is None else environ
    if environ.get(SIGNING_KEY_ENV) and environ.get("RECSYS_TRUSTED_KEYS"):
        return {SIGNING_KEY_ENV: environ[SIGNING_KEY_ENV], "RECSYS_TRUSTED_KEYS": environ["RECSYS_TRUSTED_KEYS"]}
    private, public = folder / "signing.key", folder / "signing.pub"
    if not private.exists():
        log.warning("making a signing key pair for local use: %s, %s", private, public)
        keygen(private, public)
    return {SIGNING_KEY_ENV: str(private), "RECSYS_TRUSTED_KEYS": str(public)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_contracts.signing",
                                     description="Make an Ed25519 key pair for signing versions.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("keygen", help="write a new key pair (refuses to overwrite)")
    make.add_argument("--private", type=Path, required=True, help="private key PEM (keep OFF the artifact volume)")
    make.add_argument("--public", type=Path, required=True, help="public key PEM (give to the services)")
    args = parser.parse_args(argv)
    try:
        kid = keygen(args.private, args.public)
    except FileExistsError:
        print(f"{args.private} exists: not overwritten", file=sys.stderr)
        return 1
    print(f"key {kid}: private {args.private}, public {args.public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
