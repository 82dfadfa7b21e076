"""Who may use the user API: an API key (required off loopback by default) and per-client rate limits."""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from node.errors import Forbidden, NodeError, RateLimited, Unauthorized
from node.state_files import write_private_atomically
from peers.addresses import is_loopback_host

log = logging.getLogger(__name__)

API_KEY_FILE = "api_key"
# Paths anyone may read: the page itself and liveness. Everything else of the user API needs the key.
OPEN_PATHS = ("/", "/healthz", "/openapi.json")
OPEN_PREFIXES = ("/web/",)
PEER_PREFIX = "/peer/"
MAX_TRACKED_CLIENTS = 4096


MIN_API_KEY_CHARS = 1  # an empty key must never compare equal to an empty header


class AccessError(NodeError):
    """The API key cannot be read or written."""


def resolve_api_key(configured: str | None, required: bool | None, host: str, data_dir: Path) -> str | None:
    """The key the user API demands, or None when it is open.

    `required=None` means: required exactly when the API listens beyond loopback. A required key
    that is not configured is created once in the data dir (mode 0600) and reused. A key file that
    is empty (a crash mid-write, a careless edit) never means "no key": it is replaced
    by a fresh key, with a warning.
    """
    if configured is not None:
        if len(configured.strip()) < MIN_API_KEY_CHARS:
            raise AccessError("the configured api_key is empty; refusing to start with authentication silently off")
        return configured.strip()
    if required is False or (required is None and is_loopback_host(host)):
        return None
    path = data_dir / API_KEY_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip() if path.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessError(f"cannot read the API key file {path}: {exc}") from exc
    if existing is not None and len(existing) >= MIN_API_KEY_CHARS:
        return existing
    if existing is not None:
        log.warning("the API key file %s was empty: replaced it with a new key", path)
    key = "em-" + secrets.token_urlsafe(24)
    try:
        write_private_atomically(path, (key + "\n").encode())
    except OSError as exc:
        raise AccessError(f"cannot write the API key file {path}: {exc}") from exc
    log.warning("the user API listens on %s: created an API key in %s (send it as 'Authorization: Bearer ...')", host, path)
    return key


def allowed_hosts(bind_host: str, advertise_urls: tuple[str, ...] = ()) -> frozenset[str] | None:
    """Host header values a loopback-bound node answers to; None (any) when it listens beyond loopback."""
    if not is_loopback_host(bind_host):
        return None
    from urllib.parse import urlsplit

    names = {"localhost", "127.0.0.1", "::1", bind_host.lower()}
    names |= {(urlsplit(u).hostname or "").lower() for u in advertise_urls}
    return frozenset(n for n in names if n)


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_guard_middleware(hosts: frozenset[str] | None):
    """On loopback, refuse requests naming a foreign Host: a web page that rebinds DNS to 127.0.0.1 cannot reach us."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        header = request.headers.get("Host")
        if hosts is not None and header is not None:
            name = _host_name(header)
            if name not in hosts and not name.startswith("127."):
                raise Forbidden(f"this node answers to localhost only, not to Host {header[:80]!r}")
        return await handler(request)

    return middleware


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """Token buckets per client key: `rate_per_s` sustained, `burst` at once; bounded in memory."""

    def __init__(self, rate_per_s: float, burst: float, *, clock=time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """0 when allowed; otherwise the seconds until the next request would be."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                # Forget the idlest client rather than grow without bound under a flood of sources.
                oldest = min(self._buckets, key=lambda k: self._buckets[k].updated_s)
                del self._buckets[oldest]
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated_s) * self._rate)
        bucket.updated_s = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate


def client_key(request: web.Request) -> str:
    """The address a request came from."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "unknown"


def access_middleware(api_key: str | None, user_limiter: RateLimiter, peer_limiter: RateLimiter):
    """Check the API key on user routes and rate-limit every client (peers on their own budget)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        path = request.path
        is_peer = path.startswith(PEER_PREFIX)
        wait_s = (peer_limiter if is_peer else user_limiter).take(client_key(request))
        if wait_s > 0:
            raise RateLimited("too many requests from this client; slow down", retry_after_s=max(1, round(wait_s + 0.5)))
        if api_key is not None and not is_peer and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = request.headers.get("Authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            # Header bytes that are not ASCII arrive as surrogates: no key has them, so they simply do not match.
            token_bytes = token.encode("utf-8", "surrogateescape") if token.isascii() else b""
            if not token_bytes or not hmac.compare_digest(token_bytes, api_key.encode()):
                raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
        return await handler(request)

    return middleware
