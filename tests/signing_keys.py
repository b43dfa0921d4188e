"""The test suite's signing key pair: versions published by tests are signed, services trust it.

The key is derived from a fixed seed (a test key, worthless outside this suite), so every process
of a run (in-process servers, service subprocesses, the trainer) agrees on it. ``tests/conftest.py``
exports the PEM files as ``RECSYS_SIGNING_KEY`` / ``RECSYS_TRUSTED_KEYS`` for child processes.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recsys_contracts.signing import Signer, Trust, key_id

_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"recsys test suite signing key").digest())
SIGNER = Signer(_KEY)
TRUST = Trust(keys={key_id(_KEY.public_key()): _KEY.public_key()})
# A second pair nobody trusts: a version it signs must be refused.
_OTHER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"an untrusted key").digest())
UNTRUSTED_SIGNER = Signer(_OTHER)

_folder = Path(tempfile.mkdtemp(prefix="recsys-test-keys-"))
atexit.register(shutil.rmtree, _folder, ignore_errors=True)
PRIVATE_KEY_FILE = _folder / "signing.key"
PUBLIC_KEY_FILE = _folder / "signing.pub"
PRIVATE_KEY_FILE.write_bytes(_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
PUBLIC_KEY_FILE.write_bytes(_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
# What a child process (trainer, service) needs to sign and to trust, for tests that start one with
# a cleaned environment.
SIGNING_ENV = {"RECSYS_SIGNING_KEY": str(PRIVATE_KEY_FILE), "RECSYS_TRUSTED_KEYS": str(PUBLIC_KEY_FILE)}
