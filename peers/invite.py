"""Invites (pure): a one-line, signed, expiring admission to a node, and the join that redeems it."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgpack
from pydantic import Field

from peers.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeId,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)
from peers.wire import Bool, Bytes, HttpUrl, Int, Items, NodeIdText, Str, WireError, WireMessage, decode, encode

INVITE_PREFIX = "expertmesh-invite:"
SECRET_BYTES = 16
MAX_INVITE_BYTES = 4096
_INVITE_DOMAIN = b"expertmesh-invite-1"
_JOIN_DOMAIN = b"expertmesh-join-1"


class InviteError(ValueError):
    """An invite that cannot be used: malformed, forged or expired."""


@dataclass(frozen=True)
class Invite(WireMessage):
    """Who invites (id, key, addresses), whether it relays, the admission secret and its expiry."""

    TYPE: ClassVar[str] = "invite"
    node_id: NodeIdText
    public_key: Annotated[Bytes, Field(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)]
    addresses: Annotated[tuple[HttpUrl, ...], Items(8, min_len=1)]
    secret: Annotated[Bytes, Field(min_length=SECRET_BYTES, max_length=SECRET_BYTES)]
    expires_ms: Annotated[Int, Field(ge=0)]
    one_time: Bool = True
    relay: Bool = False
    signature: Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)] = bytes(SIGNATURE_BYTES)


def _invite_bytes(invite: Invite) -> bytes:
    fields = dataclasses.asdict(dataclasses.replace(invite, signature=b""))
    fields["addresses"] = list(fields["addresses"])
    return msgpack.packb([_INVITE_DOMAIN, sorted(fields.items())], use_bin_type=True)


def make_invite(
    identity: NodeIdentity, addresses: list[str], secret: bytes, expires_ms: int, *, one_time: bool, relay: bool
) -> str:
    """A signed invite, as one line."""
    unsigned = Invite(
        node_id=identity.node_id,
        public_key=identity.public_key_raw,
        addresses=tuple(addresses),
        secret=secret,
        expires_ms=expires_ms,
        one_time=one_time,
        relay=relay,
    )
    signed = dataclasses.replace(unsigned, signature=identity.sign(_invite_bytes(unsigned)))
    return INVITE_PREFIX + base64.urlsafe_b64encode(encode(signed)).decode("ascii").rstrip("=")


def read_invite(text: str, now_ms: int) -> Invite:
    """The invite in `text` when it parses, is signed by the node it names and has not expired."""
    text = text.strip()
    if not text.startswith(INVITE_PREFIX):
        raise InviteError(f"an invite starts with {INVITE_PREFIX!r}")
    payload = text[len(INVITE_PREFIX) :]
    if len(payload) > MAX_INVITE_BYTES * 2:
        raise InviteError("invite too long")
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        invite = decode(raw, Invite, max_bytes=MAX_INVITE_BYTES)
    except (binascii.Error, ValueError, WireError) as exc:
        raise InviteError(f"invite is malformed: {exc}") from exc
    if node_id_from_public_key(invite.public_key) != invite.node_id:
        raise InviteError("invite's node id does not derive from its key")
    if not verify_signature(invite.public_key, _invite_bytes(invite), invite.signature):
        raise InviteError("invite's signature does not verify (altered or forged)")
    if now_ms > invite.expires_ms:
        raise InviteError("invite has expired; ask for a new one")
    return invite


def secret_digest(secret: bytes) -> str:
    """How a node stores an invite's secret: its hash, never the secret itself."""
    return hashlib.sha256(secret).hexdigest()


# ---- join ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinRequest(WireMessage):
    """A node redeems an invite: the secret, and its key with a signature binding both."""

    TYPE: ClassVar[str] = "join"
    secret: Annotated[Bytes, Field(min_length=SECRET_BYTES, max_length=SECRET_BYTES)]
    public_key: Annotated[Bytes, Field(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)]
    inviter: Annotated[Str, Field(min_length=1, max_length=64)]
    signature: Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)] = bytes(SIGNATURE_BYTES)


@dataclass(frozen=True)
class JoinReply(WireMessage):
    """The inviter admitted the node; whether it relays for it."""

    TYPE: ClassVar[str] = "join_reply"
    node_id: Annotated[Str, Field(min_length=1, max_length=64)]
    relay: Bool = False


def _join_bytes(secret: bytes, public_key: bytes, inviter: str) -> bytes:
    return msgpack.packb([_JOIN_DOMAIN, secret, public_key, inviter], use_bin_type=True)


def make_join(identity: NodeIdentity, invite: Invite) -> JoinRequest:
    """The request that redeems `invite` for `identity`."""
    signature = identity.sign(_join_bytes(invite.secret, identity.public_key_raw, invite.node_id))
    return JoinRequest(secret=invite.secret, public_key=identity.public_key_raw, inviter=invite.node_id, signature=signature)


def check_join(request: JoinRequest, inviter: str) -> NodeId:
    """The joining node's id when its signature binds its key to this secret and this inviter."""
    if request.inviter != inviter:
        raise WireError(403, "the invite is for another node")
    if not verify_signature(request.public_key, _join_bytes(request.secret, request.public_key, inviter), request.signature):
        raise WireError(403, "join signature does not verify")
    return node_id_from_public_key(request.public_key)
