"""Signed versions: format, trust (rotation), refusals by the hot-reload holder, key handling."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from recsys_contracts import artifacts
from recsys_contracts.signing import (SIGNATURE_FILE, Signer, Trust, key_id, keygen, local_key_env, main,
                                      signer_for)
from recsys_serving.reload import VersionHolder
from tests.signing_keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, SIGNER, TRUST, UNTRUSTED_SIGNER


def _publish(root: Path, signer: Signer | None, make_current: bool = True) -> int:
    return artifacts.publish(root, lambda d: (d / "model.bin").write_bytes(b"weights"), data={}, config={},
                             metrics={}, signer=signer, make_current=make_current)


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("recsys_version_refused_total", {"reason": reason}) or 0.0


def test_a_signed_version_verifies_and_the_signature_file_is_the_documented_json(tmp_path):
    version = _publish(tmp_path, SIGNER)
    manifest = artifacts.verify(tmp_path, version, TRUST)
    assert manifest.files.keys() == {"model.bin"}              # the signature is not a listed file
    body = json.loads((artifacts.version_dir(tmp_path, version) / SIGNATURE_FILE).read_text())
    assert set(body) == {"algorithm", "key_id", "signature"} and body["algorithm"] == "ed25519"
    assert body["key_id"] == SIGNER.key_id and len(body["key_id"]) == 16


@pytest.mark.parametrize("signer, break_it, message", [
    (None, None, "manifest.sig is missing"),
    (UNTRUSTED_SIGNER, None, "names key '[0-9a-f]{16}', which is not trusted"),
    (SIGNER, lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"files"', '"files" ', 1)),
     "does not match manifest.json"),
    (SIGNER, lambda d: (d / SIGNATURE_FILE).write_text("{not json"), "must be UTF-8 JSON"),
    (SIGNER, lambda d: (d / SIGNATURE_FILE).write_text('{"algorithm": "rsa", "key_id": "x", "signature": ""}'),
     "algorithm 'ed25519'"),
    (SIGNER, lambda d: (d / SIGNATURE_FILE).write_bytes(b"x" * 5000), "manifest.sig has 5000 bytes"),
], ids=["unsigned", "untrusted-key", "edited-manifest", "not-json", "other-algorithm", "oversized"])
def test_versions_without_a_good_signature_are_refused_before_any_file_is_read(tmp_path, signer, break_it,
                                                                               message):
    version = _publish(tmp_path, signer)
    folder = artifacts.version_dir(tmp_path, version)
    if break_it is not None:
        break_it(folder)
    (folder / "model.bin").unlink()                  # a file check would fail too: the signature comes first
    with pytest.raises(artifacts.CorruptVersionError, match=message):
        artifacts.verify(tmp_path, version, TRUST)


def test_rotation_two_trusted_keys_accept_versions_of_both(tmp_path):
    old, new = _publish(tmp_path, SIGNER), _publish(tmp_path, UNTRUSTED_SIGNER)
    both = Trust(keys={**TRUST.keys, UNTRUSTED_SIGNER.key_id: UNTRUSTED_SIGNER.private_key.public_key()})
    for version in (old, new):
        artifacts.verify(tmp_path, version, both)
    with pytest.raises(artifacts.UntrustedVersionError):
        artifacts.verify(tmp_path, new, TRUST)                # the old trust alone: only the old key


def test_trust_from_a_folder_of_keys_and_its_errors(tmp_path):
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "a.pub").write_bytes(PUBLIC_KEY_FILE.read_bytes())
    keygen(tmp_path / "b.key", folder / "b.pem")
    (folder / "README").write_text("ignored: not *.pem or *.pub")
    assert len(Trust.from_path(folder).keys) == 2
    assert list(Trust.from_path(PUBLIC_KEY_FILE).keys) == [SIGNER.key_id]
    (folder / "c.pem").write_text("not a key")
    with pytest.raises(ValueError, match=r"trusted key '.*c.pem' must be a readable PEM public key"):
        Trust.from_path(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="must hold at least one"):
        Trust.from_path(empty)
    with pytest.raises(ValueError, match="trust needs at least one public key"):
        Trust()


def test_unsigned_trust_accepts_anything_and_says_so(tmp_path, caplog):
    version = _publish(tmp_path, None)
    with caplog.at_level(logging.WARNING):
        trust = Trust.unsigned()
    assert "NOT checked" in caplog.text
    artifacts.verify(tmp_path, version, trust)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    private, public = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert main(["keygen", "--private", str(private), "--public", str(public)]) == 0
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    signer, trust = Signer.from_file(private), Trust.from_path(public)
    assert list(trust.keys) == [signer.key_id] and key_id(signer.private_key.public_key()) == signer.key_id
    assert main(["keygen", "--private", str(private), "--public", str(public)]) == 1
    assert "not overwritten" in capsys.readouterr().err


def test_signer_for_needs_a_key_or_an_explicit_opt_out(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_SIGNING_KEY", raising=False)
    with pytest.raises(ValueError, match="a signing key is needed to publish"):
        signer_for()
    assert signer_for(unsigned=True) is None
    assert signer_for(str(PRIVATE_KEY_FILE)).key_id == SIGNER.key_id
    monkeypatch.setenv("RECSYS_SIGNING_KEY", str(PRIVATE_KEY_FILE))
    assert signer_for().key_id == SIGNER.key_id
    with pytest.raises(ValueError, match="must be a readable, unencrypted PEM Ed25519 private key"):
        signer_for(str(PUBLIC_KEY_FILE))


def test_the_holder_refuses_an_unsigned_version_once_and_counts_it(tmp_path, caplog):
    good = _publish(tmp_path, SIGNER)
    holder = VersionHolder(tmp_path, lambda directory, version: version, trust=TRUST, poll_interval_s=0.01)
    before = _refused("signature")

    async def main():
        assert await holder.refresh() and holder.current == good
        bad = _publish(tmp_path, None)
        for _ in range(3):
            await holder.refresh()
        return bad

    with caplog.at_level(logging.WARNING, logger="recsys_serving.reload"):
        bad = asyncio.run(main())
    assert holder.version == good and bad in holder.stats.refused_versions
    assert _refused("signature") == before + 1
    lines = [r for r in caplog.records if f"refused version {bad} (signature)" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"


@pytest.mark.parametrize("pointer, problem", [("999\n", "CURRENT names version 999"),
                                              ("garbage\n", "CURRENT must hold a positive version number"),
                                              ("symlink", "CURRENT names version 7")])
def test_a_broken_current_is_logged_once_with_its_reason_and_counted(tmp_path, caplog, pointer, problem):
    good = _publish(tmp_path, SIGNER)
    holder = VersionHolder(tmp_path, lambda directory, version: version, trust=TRUST)
    before = _refused("pointer")
    if pointer == "symlink":       # a version folder that is a symlink is not a version
        (tmp_path / "versions" / "7").symlink_to(artifacts.version_dir(tmp_path, good))
        pointer = "7\n"

    async def main():
        await holder.refresh()
        (tmp_path / "CURRENT").write_text(pointer)
        for _ in range(3):
            await holder.refresh()

    with caplog.at_level(logging.WARNING, logger="recsys_serving.reload"):
        asyncio.run(main())
    assert holder.version == good
    lines = [r for r in caplog.records if problem in r.getMessage()]
    assert len(lines) == 1 and "cannot follow CURRENT" in lines[0].getMessage()
    assert _refused("pointer") == before + 1


def test_local_key_env_makes_a_pair_once_or_keeps_the_callers(tmp_path):
    made = local_key_env(tmp_path / "keys", environ={})
    assert Signer.from_file(made["RECSYS_SIGNING_KEY"]).key_id in Trust.from_path(made["RECSYS_TRUSTED_KEYS"]).keys
    assert local_key_env(tmp_path / "keys", environ={}) == made                 # reused, not remade
    given = {"RECSYS_SIGNING_KEY": str(PRIVATE_KEY_FILE), "RECSYS_TRUSTED_KEYS": str(PUBLIC_KEY_FILE)}
    assert local_key_env(tmp_path / "other", environ=given) == given and not (tmp_path / "other").exists()
