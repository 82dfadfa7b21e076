"""Node keypair (Ed25519), node id, sign and verify."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

NodeId = NewType("NodeId", str)

KEY_FILE_NAME = "node.key"
NODE_ID_CHARS = 20
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """The node key file cannot be read, written or parsed."""


def node_id_from_public_key(pub_raw: bytes) -> NodeId:
    """Lowercase base32 of sha256(public key), cut to 20 characters: a valid DNS label."""
    digest = hashlib.sha256(pub_raw).digest()
    return NodeId(base64.b32encode(digest).decode("ascii").rstrip("=").lower()[:NODE_ID_CHARS])


def verify_signature(public_key_raw: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message`; never raises."""
    if not all(isinstance(b, bytes) for b in (public_key_raw, message, signature)):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class NodeIdentity:
    """A node's Ed25519 keypair and the node id derived from its public key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._node_id = node_id_from_public_key(self._public_key_raw)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity held only in memory."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """Load `data_dir/node.key`, creating it (mode 0600) when it does not exist."""
        path = Path(data_dir) / KEY_FILE_NAME
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        try:
            Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            created = _create_private_file(path, identity._private_pem())
        except OSError as e:
            raise IdentityError(f"cannot create node key {path}: {e}") from e
        if not created:
            # Another process created the key between our look and our write: theirs wins.
            return cls._load(path)
        log.info("created node key %s, node id %s", path, identity.node_id)
        return identity

    @classmethod
    def _load(cls, path: Path) -> NodeIdentity:
        """Parse an existing key file, tightening loose permissions; FileNotFoundError when absent."""
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if os.name == "posix" and mode & 0o077:
                os.chmod(path, 0o600)
                log.warning("node key %s was accessible to group/others (mode %03o); set to 0600", path, mode)
            pem = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise IdentityError(f"cannot read node key {path}: {e}") from e
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise IdentityError(
                f"node key {path} is corrupt or not an unencrypted PKCS8 PEM key; "
                "it was left untouched (moving it aside creates a new identity with a new node id)"
            ) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"node key {path} is not an Ed25519 key")
        return cls(key)

    @property
    def node_id(self) -> NodeId:
        """The id peers know this node by."""
        return self._node_id

    @property
    def public_key_raw(self) -> bytes:
        """The 32-byte raw Ed25519 public key."""
        return self._public_key_raw

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._private_key.sign(message)

    def _private_pem(self) -> bytes:
        """The private key as unencrypted PKCS8 PEM."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self._node_id!r})"


def _write_new_private(path: Path, data: bytes) -> None:
    """Write `data` to a file that must not exist yet, created with mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_private_file(path: Path, data: bytes) -> bool:
    """Publish `data` at `path` (mode 0600) unless it exists; False when it already did."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    _write_new_private(tmp, data)
    try:
        # A hard link publishes the complete file at once and never over an existing one,
        # so a crash mid-write cannot leave a truncated key behind.
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links: create in place, still never over an existing file.
        try:
            _write_new_private(path, data)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
