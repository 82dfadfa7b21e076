"""Peer request and reply authentication: Ed25519 signatures over method, path, body digest, time and nonce."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from peers.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeId,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)

KEY_HEADER = "X-Expertmesh-Key"
TIME_HEADER = "X-Expertmesh-Time"
NONCE_HEADER = "X-Expertmesh-Nonce"
SIGNATURE_HEADER = "X-Expertmesh-Signature"
MEMBER_HEADER = "X-Expertmesh-Member"  # HMAC of the same signed text under the community secret
# A request older or newer than this is refused: captured requests are worthless after it.
WINDOW_MS = 30_000
NONCE_CHARS = 32
MAX_REPLAY_ENTRIES = 200_000
STREAM = "stream"  # a streamed reply's body digest: its frames are bound to the request's nonce by the header signature

_REQUEST_DOMAIN = b"expertmesh-request-v1"
_REPLY_DOMAIN = b"expertmesh-reply-v1"


class AuthError(Exception):
    """A peer request or reply that is not authentic; `status` is the HTTP status to refuse it with."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Signer:
    """Who sent an authenticated request."""

    node_id: NodeId
    public_key: bytes
    nonce: str


def body_digest(body: bytes) -> str:
    """Hex sha256 of a body."""
    return hashlib.sha256(body).hexdigest()


def _request_text(method: str, path: str, digest: str, time_ms: int, nonce: str, public_key: bytes) -> bytes:
    return b"\n".join(
        (_REQUEST_DOMAIN, method.upper().encode(), path.encode(), digest.encode(), str(time_ms).encode(), nonce.encode(), public_key)
    )


def _reply_text(request_nonce: str, status: int, digest: str, time_ms: int, public_key: bytes) -> bytes:
    return b"\n".join((_REPLY_DOMAIN, request_nonce.encode(), str(status).encode(), digest.encode(), str(time_ms).encode(), public_key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: str | None, size: int, what: str) -> bytes:
    if not value:
        raise AuthError(f"missing {what}")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuthError(f"{what} is not base64") from exc
    if len(raw) != size:
        raise AuthError(f"{what} must be {size} bytes")
    return raw


def _member_tag(secret: bytes, text: bytes) -> str:
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def _check_member(secret: bytes | None, text: bytes, headers: Mapping[str, str]) -> None:
    if secret is None:
        return
    given = headers.get(MEMBER_HEADER, "")
    if not hmac.compare_digest(given.strip().lower().encode("ascii", "replace"), _member_tag(secret, text).encode()):
        raise AuthError("this network needs its community secret: the membership tag is missing or wrong", status=403)


def _time(headers: Mapping[str, str]) -> int:
    value = headers.get(TIME_HEADER, "")
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise AuthError(f"missing or malformed {TIME_HEADER}")
    return int(value)


def new_nonce() -> str:
    """A fresh random nonce."""
    return secrets.token_hex(NONCE_CHARS // 2)


def sign_request(
    identity: NodeIdentity,
    method: str,
    path: str,
    body: bytes,
    *,
    secret: bytes | None = None,
    now_ms: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request as coming from `identity` (and, with a secret, from a member)."""
    time_ms = int(time.time() * 1000) if now_ms is None else now_ms
    nonce = nonce or new_nonce()
    text = _request_text(method, path, body_digest(body), time_ms, nonce, identity.public_key_raw)
    headers = {
        KEY_HEADER: _b64(identity.public_key_raw),
        TIME_HEADER: str(time_ms),
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: _b64(identity.sign(text)),
    }
    if secret is not None:
        headers[MEMBER_HEADER] = _member_tag(secret, text)
    return headers


class ReplayCache:
    """Nonces seen inside the acceptance window; bounded, oldest forgotten first."""

    def __init__(self, window_ms: int = WINDOW_MS, max_entries: int = MAX_REPLAY_ENTRIES) -> None:
        self._window_ms = window_ms
        self._max = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, now_ms: int) -> bool:
        """Remember a nonce; False when it was seen already (a replay)."""
        while self._seen:
            oldest, at_ms = next(iter(self._seen.items()))
            if now_ms - at_ms <= 2 * self._window_ms and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now_ms
        return True


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    replay: ReplayCache,
    *,
    secret: bytes | None = None,
    now_ms: int | None = None,
    window_ms: int = WINDOW_MS,
) -> Signer:
    """The request's signer when its signature, time, nonce (and membership tag) check out; AuthError otherwise."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    public_key = _unb64(headers.get(KEY_HEADER), PUBLIC_KEY_BYTES, KEY_HEADER)
    signature = _unb64(headers.get(SIGNATURE_HEADER), SIGNATURE_BYTES, SIGNATURE_HEADER)
    time_ms = _time(headers)
    nonce = headers.get(NONCE_HEADER, "")
    if len(nonce) != NONCE_CHARS or any(c not in "0123456789abcdef" for c in nonce):
        raise AuthError(f"missing or malformed {NONCE_HEADER}")
    if abs(now - time_ms) > window_ms:
        raise AuthError(f"request time is {abs(now - time_ms) / 1000:.0f} s off this node's clock (window {window_ms // 1000} s)")
    text = _request_text(method, path, body_digest(body), time_ms, nonce, public_key)
    if not verify_signature(public_key, text, signature):
        raise AuthError("request signature does not verify")
    _check_member(secret, text, headers)
    # Only an authentic request spends a nonce, so a forger cannot burn honest nonces.
    if not replay.add(nonce, now):
        raise AuthError("request replayed (nonce seen before)")
    return Signer(node_id_from_public_key(public_key), public_key, nonce)


def sign_reply(
    identity: NodeIdentity,
    request_nonce: str,
    status: int,
    body: bytes | None,
    *,
    secret: bytes | None = None,
    now_ms: int | None = None,
) -> dict[str, str]:
    """Headers binding a reply (its status and body, or STREAM) to the request it answers."""
    time_ms = int(time.time() * 1000) if now_ms is None else now_ms
    digest = STREAM if body is None else body_digest(body)
    text = _reply_text(request_nonce, status, digest, time_ms, identity.public_key_raw)
    headers = {KEY_HEADER: _b64(identity.public_key_raw), TIME_HEADER: str(time_ms), SIGNATURE_HEADER: _b64(identity.sign(text))}
    if secret is not None:
        headers[MEMBER_HEADER] = _member_tag(secret, text)
    return headers


def verify_reply(
    headers: Mapping[str, str],
    request_nonce: str,
    status: int,
    body: bytes | None,
    *,
    expected_key: bytes | None = None,
    secret: bytes | None = None,
) -> bytes:
    """The replying node's public key when the reply answers our nonce and (if given) comes from `expected_key`."""
    public_key = _unb64(headers.get(KEY_HEADER), PUBLIC_KEY_BYTES, f"reply {KEY_HEADER}")
    signature = _unb64(headers.get(SIGNATURE_HEADER), SIGNATURE_BYTES, f"reply {SIGNATURE_HEADER}")
    time_ms = _time(headers)
    if expected_key is not None and not hmac.compare_digest(public_key, expected_key):
        raise AuthError("the reply is signed by another node than the one asked")
    digest = STREAM if body is None else body_digest(body)
    text = _reply_text(request_nonce, status, digest, time_ms, public_key)
    if not verify_signature(public_key, text, signature):
        raise AuthError("reply signature does not verify")
    _check_member(secret, text, headers)
    return public_key
