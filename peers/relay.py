"""Relay protocol (pure): relayed addresses, tunnel messages, and end-to-end signed reply envelopes.

A home node behind NAT keeps a WebSocket open to a public node (the relay). Other nodes
reach it at the relayed address `<relay>/peer/v1/relay/<home node id>`, which carries the
ordinary peer API. The relay only moves bytes: every reply the home node sends back is cut
into envelopes, each signed by the home node's Ed25519 key over the requester's fresh nonce,
the digest of the request as the home node received it, its sequence number and its bytes.
So the relay cannot alter, inject, reorder, drop (undetected) or replay reply bytes, cannot
alter the request unnoticed, and cannot pose as the home node, whose id is in the address.

Nor can it read them: the requester first fetches the home node's X25519 key (route
`relay-key`, in an envelope signed by the home node's Ed25519 key), then seals each request
(route `sealed`) for it with a fresh X25519 key of its own: route, headers and body are
encrypted with ChaCha20-Poly1305 under a key from HKDF over the shared secret and the nonce,
and every reply envelope's status and bytes under a second key, numbered by the envelope's
sequence. The relay sees which node is asked, when, and how many bytes go each way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, ClassVar, TypeVar
from urllib.parse import urlsplit

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field

from peers.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeId,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)
from peers.wire import Bool, Bytes, FrameReader, Int, Items, Str, WireError, WireMessage, decode, encode

M = TypeVar("M", bound=WireMessage)

RELAY_PREFIX = "/peer/v1/relay"
CONNECT_PATH = "/peer/v1/relay-connect"
NONCE_HEADER = "X-Expertmesh-E2E-Nonce"
NONCE_BYTES = 16
MAX_ENVELOPE_DATA = 48 << 10
MAX_ENVELOPE_BYTES = MAX_ENVELOPE_DATA + 512
MAX_TUNNEL_MESSAGE_BYTES = (256 << 10) + 4096
# Request headers a relay passes on to the home node; everything else stays at the relay.
FORWARDED_HEADER_PREFIX = "x-expertmesh-"

KEY_ROUTE = "relay-key"  # the home node's X25519 key, signed, in the clear
SEALED_ROUTE = "sealed"  # an encrypted request: the real route is inside
E2E_KEY_HEADER = "X-Expertmesh-E2E-Key"  # the requester's fresh X25519 public key (hex)
X25519_BYTES = 32
_AEAD_OVERHEAD = 16
_STATUS = struct.Struct(">HI")  # status, retry_after_s: inside the encryption

_ENVELOPE_DOMAIN = b"expertmesh-relay-envelope-1"
_E2E_DOMAIN = b"expertmesh-relay-e2e-1"
_X25519_DERIVE = b"expertmesh-relay-x25519-1"
_TUNNEL_DOMAIN = b"expertmesh-relay-tunnel-1"
_NODE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class RelayForgery(WireError):
    """A relayed reply whose envelope does not verify: altered, injected, reordered or not from the node."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message)


# ---- addresses ----------------------------------------------------------------------


@dataclass(frozen=True)
class RelayedAddress:
    """A node reached through a relay: the relay's base URL and the node's id."""

    relay_url: str
    node_id: NodeId


def relayed_url(relay_url: str, node_id: str) -> str:
    """The address at which `relay_url` relays for `node_id`."""
    return f"{relay_url.rstrip('/')}{RELAY_PREFIX}/{node_id}"


def parse_relayed_url(url: str) -> RelayedAddress | None:
    """The relay and node of a relayed address, or None for a direct one."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    head, sep, node_id = path.rpartition("/")
    if not sep or not head.endswith(RELAY_PREFIX) or not node_id or not set(node_id) <= _NODE_ID_CHARS:
        return None
    base_path = head[: -len(RELAY_PREFIX)]
    return RelayedAddress(f"{parts.scheme}://{parts.netloc}{base_path}", NodeId(node_id))


def is_relayed(url: str) -> bool:
    """Whether `url` is a relayed address."""
    return parse_relayed_url(url) is not None


# ---- end-to-end envelopes -----------------------------------------------------------


@dataclass(frozen=True)
class Envelope(WireMessage):
    """A signed slice of a relayed reply; the first carries the status, the last has `end`."""

    TYPE: ClassVar[str] = "relay_envelope"
    seq: Annotated[Int, Field(ge=0)]
    data: Annotated[Bytes, Field(max_length=MAX_ENVELOPE_DATA)] = b""
    status: Annotated[Int, Field(ge=0, le=999)] = 0
    retry_after_s: Annotated[Int, Field(ge=0, le=86400)] = 0
    end: Bool = False
    public_key: Annotated[Bytes, Field(max_length=PUBLIC_KEY_BYTES)] = b""
    signature: Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)] = bytes(SIGNATURE_BYTES)


def request_digest(route: str, body: bytes) -> bytes:
    """What the home node confirms it received: the route and the exact body."""
    return hashlib.sha256(route.encode() + b"\0" + body).digest()


def _envelope_bytes(node_id: str, nonce: bytes, digest: bytes, env: Envelope) -> bytes:
    return msgpack.packb(
        [_ENVELOPE_DOMAIN, node_id, nonce, digest, env.seq, env.status, env.retry_after_s, env.end, env.data],
        use_bin_type=True,
    )


class EnvelopeSealer:
    """The home node's side: cuts one reply into signed envelopes."""

    def __init__(self, identity: NodeIdentity, nonce: bytes, digest: bytes, *, cipher: ChaCha20Poly1305 | None = None) -> None:
        self._identity = identity
        self._nonce = nonce
        self._digest = digest
        self._cipher = cipher  # set for a sealed request: status and bytes travel encrypted
        self._seq = 0

    def seal(self, data: bytes = b"", *, status: int = 0, retry_after_s: int = 0, end: bool = False) -> list[bytes]:
        """Encoded envelopes for `data` (split at the size cap); the first one ever carries the key."""
        size = MAX_ENVELOPE_DATA - (_STATUS.size + _AEAD_OVERHEAD if self._cipher else 0)
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        out = []
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            piece_status = status if index == 0 else 0
            piece_retry = retry_after_s if index == 0 else 0
            if self._cipher is not None:
                plain = _STATUS.pack(piece_status, piece_retry) + piece
                piece, piece_status, piece_retry = self._cipher.encrypt(_seq_nonce(self._seq), plain, None), 0, 0
            unsigned = Envelope(
                seq=self._seq,
                data=piece,
                status=piece_status,
                retry_after_s=piece_retry,
                end=end and last,
                public_key=self._identity.public_key_raw if self._seq == 0 else b"",
            )
            signature = self._identity.sign(_envelope_bytes(self._identity.node_id, self._nonce, self._digest, unsigned))
            out.append(encode(dataclasses.replace(unsigned, signature=signature)))
            self._seq += 1
        return out


@dataclass(frozen=True)
class Opened:
    """A verified envelope's content."""

    seq: int
    data: bytes
    status: int
    retry_after_s: int
    end: bool


class EnvelopeOpener:
    """The requester's side: verifies envelopes of one relayed reply, in order, against the node id asked for."""

    def __init__(self, node_id: str, nonce: bytes, digest: bytes, *, cipher: ChaCha20Poly1305 | None = None) -> None:
        self._node_id = node_id
        self._nonce = nonce
        self._digest = digest
        self._cipher = cipher
        self._public_key: bytes | None = None
        self._next_seq = 0
        self.ended = False
        self._reader = FrameReader(Envelope, max_frame_bytes=MAX_ENVELOPE_BYTES, max_total_bytes=64 << 20)

    def feed(self, chunk: bytes) -> Iterator[Opened]:
        """Verified envelopes completed by `chunk`; RelayForgery on the first that fails."""
        if self.ended and chunk:
            raise RelayForgery("bytes after the signed end of the reply")
        self._reader.feed(chunk)
        for env in self._reader:
            yield self._open(env)

    def _open(self, env: Envelope) -> Opened:
        if self.ended:
            raise RelayForgery("an envelope after the signed end of the reply")
        if env.seq != self._next_seq:
            raise RelayForgery(f"envelope {env.seq} where {self._next_seq} was due")
        if self._public_key is None:
            if node_id_from_public_key(env.public_key) != self._node_id:
                raise RelayForgery(f"the reply is not signed by node {self._node_id}")
            self._public_key = env.public_key
        if not verify_signature(self._public_key, _envelope_bytes(self._node_id, self._nonce, self._digest, env), env.signature):
            raise RelayForgery(f"envelope {env.seq} does not verify against node {self._node_id}'s key")
        data, status, retry_after_s = env.data, env.status, env.retry_after_s
        if self._cipher is not None:
            try:
                plain = self._cipher.decrypt(_seq_nonce(env.seq), env.data, None)
            except InvalidTag as exc:  # signed by the node, yet not for our key: nothing a relay could cause
                raise RelayForgery(f"envelope {env.seq} does not decrypt") from exc
            if len(plain) < _STATUS.size:
                raise RelayForgery(f"envelope {env.seq} is too short")
            (status, retry_after_s), data = _STATUS.unpack_from(plain), plain[_STATUS.size :]
        self._next_seq += 1
        self.ended = env.end
        return Opened(env.seq, data, status, retry_after_s, env.end)


# ---- end-to-end encryption ------------------------------------------------------------


def _seq_nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


def home_e2e_key(identity: NodeIdentity) -> X25519PrivateKey:
    """The home node's X25519 key, derived from its Ed25519 key (deterministic signatures): stable across restarts."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(identity.sign(_X25519_DERIVE)).digest())


def _session_keys(shared: bytes, nonce: bytes, requester_pub: bytes, home_pub: bytes, node_id: str) -> tuple[ChaCha20Poly1305, ChaCha20Poly1305]:
    """(request cipher, reply cipher) for one sealed request."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=nonce, info=_E2E_DOMAIN + requester_pub + home_pub + node_id.encode()
    ).derive(shared)
    return ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:])


@dataclass(frozen=True)
class SealedRequest:
    """What a requester sends through the relay, and the cipher its reply arrives under."""

    body: bytes  # the encrypted request
    requester_key: bytes  # fresh X25519 public key, sent in E2E_KEY_HEADER
    reply_cipher: ChaCha20Poly1305


def seal_request(
    node_id: str, home_key: bytes, nonce: bytes, route: str, headers: dict[str, str], body: bytes
) -> SealedRequest:
    """Encrypt a peer request (route, headers, body) for the home node's X25519 key."""
    if len(home_key) != X25519_BYTES:
        raise WireError(502, "the home node's end-to-end key has the wrong size")
    ephemeral = X25519PrivateKey.generate()
    mine = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(home_key))
    request_cipher, reply_cipher = _session_keys(shared, nonce, mine, home_key, node_id)
    flat = [item for pair in headers.items() for item in pair]
    plain = msgpack.packb([route, flat, body], use_bin_type=True)
    return SealedRequest(request_cipher.encrypt(_seq_nonce(0), plain, _E2E_DOMAIN), mine, reply_cipher)


@dataclass(frozen=True)
class UnsealedRequest:
    """A sealed request as the home node reads it."""

    route: str
    headers: tuple[str, ...]
    body: bytes
    reply_cipher: ChaCha20Poly1305


def open_request(identity: NodeIdentity, nonce: bytes, requester_key: bytes, body: bytes) -> UnsealedRequest:
    """The home node's side of seal_request; WireError(400) when it does not decrypt or parse."""
    home = home_e2e_key(identity)
    try:
        shared = home.exchange(X25519PublicKey.from_public_bytes(requester_key))
    except ValueError as exc:
        raise WireError(400, "bad end-to-end key") from exc
    home_pub = home.public_key().public_bytes_raw()
    request_cipher, reply_cipher = _session_keys(shared, nonce, requester_key, home_pub, identity.node_id)
    try:
        plain = request_cipher.decrypt(_seq_nonce(0), body, _E2E_DOMAIN)
        route, flat, inner = msgpack.unpackb(plain, raw=False, max_bin_len=MAX_TUNNEL_MESSAGE_BYTES)
    except (InvalidTag, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(400, "the sealed request does not decrypt") from exc
    if not isinstance(route, str) or not isinstance(inner, bytes) or not isinstance(flat, list) or not all(isinstance(h, str) for h in flat):
        raise WireError(400, "the sealed request is malformed")
    return UnsealedRequest(route, tuple(flat[:64]), inner, reply_cipher)


# ---- tunnel messages (relay <-> home node, over one WebSocket) ------------------------


@dataclass(frozen=True)
class TunnelChallenge(WireMessage):
    """The relay asks the home node to prove its key."""

    TYPE: ClassVar[str] = "tunnel_challenge"
    nonce: Annotated[Bytes, Field(min_length=NONCE_BYTES, max_length=64)]
    relay_node_id: Annotated[Str, Field(min_length=1, max_length=64)]


@dataclass(frozen=True)
class TunnelAuth(WireMessage):
    """The home node's proof: its key and a signature over the challenge."""

    TYPE: ClassVar[str] = "tunnel_auth"
    public_key: Annotated[Bytes, Field(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)]
    signature: Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]


@dataclass(frozen=True)
class TunnelReady(WireMessage):
    """The relay accepted the tunnel: the address at which it now relays for the home node."""

    TYPE: ClassVar[str] = "tunnel_ready"
    url: Annotated[Str, Field(min_length=1, max_length=200)]
    max_streams: Annotated[Int, Field(ge=0)]
    max_bytes_per_s: Annotated[Int, Field(ge=0)]
    observed_ip: Annotated[Str, Field(max_length=64)] = ""  # the home node's address as the relay sees it (for hole punching)


@dataclass(frozen=True)
class TunnelRequest(WireMessage):
    """A peer request the relay passes to the home node (`headers`: name, value, name, value...)."""

    TYPE: ClassVar[str] = "tunnel_request"
    stream_id: Annotated[Int, Field(ge=0)]
    route: Annotated[Str, Field(min_length=1, max_length=64)]
    body: Annotated[Bytes, Field(max_length=256 << 10)]
    headers: Annotated[tuple[Annotated[Str, Field(max_length=2048)], ...], Items(32)] = ()
    nonce: Annotated[Bytes, Field(max_length=64)] = b""


@dataclass(frozen=True)
class TunnelData(WireMessage):
    """Envelope bytes of one stream's reply, from the home node; `end` closes the stream."""

    TYPE: ClassVar[str] = "tunnel_data"
    stream_id: Annotated[Int, Field(ge=0)]
    data: Annotated[Bytes, Field(max_length=MAX_ENVELOPE_BYTES * 2)] = b""
    end: Bool = False


@dataclass(frozen=True)
class TunnelCancel(WireMessage):
    """The requester hung up: the home node stops the stream."""

    TYPE: ClassVar[str] = "tunnel_cancel"
    stream_id: Annotated[Int, Field(ge=0)]


def tunnel_proof_bytes(nonce: bytes, relay_node_id: str, public_key: bytes) -> bytes:
    """What a home node signs to open a tunnel: only good for this relay and this challenge."""
    return msgpack.packb([_TUNNEL_DOMAIN, nonce, relay_node_id, public_key], use_bin_type=True)


def prove_tunnel(identity: NodeIdentity, challenge: TunnelChallenge) -> TunnelAuth:
    """The home node's answer to a relay's challenge."""
    proof = tunnel_proof_bytes(challenge.nonce, challenge.relay_node_id, identity.public_key_raw)
    return TunnelAuth(public_key=identity.public_key_raw, signature=identity.sign(proof))


def check_tunnel(challenge: TunnelChallenge, auth: TunnelAuth) -> NodeId:
    """The node id proven by `auth`; WireError(403) when the signature does not verify."""
    proof = tunnel_proof_bytes(challenge.nonce, challenge.relay_node_id, auth.public_key)
    if not verify_signature(auth.public_key, proof, auth.signature):
        raise WireError(403, "tunnel proof does not verify")
    return node_id_from_public_key(auth.public_key)


TUNNEL_TO_HOME = (TunnelChallenge, TunnelReady, TunnelRequest, TunnelCancel)
TUNNEL_TO_RELAY = (TunnelAuth, TunnelData)


def decode_tunnel(data: bytes, allowed: tuple[type[M], ...]) -> M:
    """Decode one tunnel message of one of the `allowed` types; WireError on anything else."""
    if len(data) > MAX_TUNNEL_MESSAGE_BYTES:
        raise WireError(413, "tunnel message over the cap")
    try:
        kind = msgpack.unpackb(data, raw=False, max_bin_len=MAX_TUNNEL_MESSAGE_BYTES).get("type")
    except Exception as exc:  # noqa: BLE001 - any unpack failure is a malformed message
        raise WireError(400, f"malformed tunnel message: {type(exc).__name__}") from exc
    for shape in allowed:
        if shape.TYPE == kind:
            return decode(data, shape, max_bytes=MAX_TUNNEL_MESSAGE_BYTES)
    raise WireError(400, f"unexpected tunnel message {str(kind)[:40]!r}")
