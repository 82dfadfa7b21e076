"""Node keypair: creation, permissions, reload, corruption, sign and verify."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import pytest

from peers.identity import (
    KEY_FILE_NAME,
    IdentityError,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_key_is_created_with_mode_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # a permissive umask must not widen the key's mode
    try:
        NodeIdentity.load_or_create(tmp_path / "data")
    finally:
        os.umask(old_umask)
    key = tmp_path / "data" / KEY_FILE_NAME
    assert _mode(key) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in key.parent.iterdir()] == [KEY_FILE_NAME]  # no temp file left behind


def test_node_id_is_stable_across_reloads(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    second = NodeIdentity.load_or_create(tmp_path)
    assert first.node_id == second.node_id
    assert first.public_key_raw == second.public_key_raw
    assert verify_signature(second.public_key_raw, b"m", first.sign(b"m"))


def test_different_keys_have_different_ids(tmp_path: Path) -> None:
    assert NodeIdentity.load_or_create(tmp_path / "a").node_id != NodeIdentity.load_or_create(tmp_path / "b").node_id


def test_node_id_is_a_dns_label() -> None:
    identity = NodeIdentity.generate()
    assert re.fullmatch(r"[a-z2-7]{20}", identity.node_id)
    assert identity.node_id == node_id_from_public_key(identity.public_key_raw)
    assert len(identity.public_key_raw) == 32


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "garbage", "bad-pem"],
)
def test_corrupt_key_raises_and_is_left_alone(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / KEY_FILE_NAME
    key.write_bytes(content)
    key.chmod(0o600)
    with pytest.raises(IdentityError, match="corrupt"):
        NodeIdentity.load_or_create(tmp_path)
    assert key.read_bytes() == content


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / KEY_FILE_NAME).write_bytes(pem)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        NodeIdentity.load_or_create(tmp_path)


@posix_only
def test_loose_permissions_are_tightened_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node_id = NodeIdentity.load_or_create(tmp_path).node_id
    key = tmp_path / KEY_FILE_NAME
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="peers.identity"):
        assert NodeIdentity.load_or_create(tmp_path).node_id == node_id
    assert _mode(key) == 0o600
    assert any("0600" in r.getMessage() for r in caplog.records)


def test_sign_and_verify() -> None:
    identity = NodeIdentity.generate()
    signature = identity.sign(b"hello")
    assert len(signature) == 64
    assert verify_signature(identity.public_key_raw, b"hello", signature)


def test_tampered_message_or_signature_fails() -> None:
    identity = NodeIdentity.generate()
    signature = identity.sign(b"hello")
    assert not verify_signature(identity.public_key_raw, b"hellO", signature)
    assert not verify_signature(identity.public_key_raw, b"hello", bytes([signature[0] ^ 1]) + signature[1:])
    assert not verify_signature(NodeIdentity.generate().public_key_raw, b"hello", signature)


@pytest.mark.parametrize(
    "public_key, message, signature",
    [
        (b"short", b"m", b"\0" * 64),
        (b"\0" * 32, b"m", b"\0" * 64),
        (b"\xff" * 32, b"m", b"short"),
        ("not bytes", b"m", b"\0" * 64),
        (b"\0" * 32, None, b"\0" * 64),
        (b"\0" * 32, b"m", None),
    ],
)
def test_verify_never_raises_on_bad_input(public_key: object, message: object, signature: object) -> None:
    assert verify_signature(public_key, message, signature) is False  # type: ignore[arg-type]


def test_repr_does_not_leak_the_key() -> None:
    identity = NodeIdentity.generate()
    assert repr(identity) == f"NodeIdentity(node_id={identity.node_id!r})"
