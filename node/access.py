"""Who may use the user API: an API key (required off loopback by default) and per-client rate limits."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from node.errors import RateLimited, Unauthorized

log = logging.getLogger(__name__)

API_KEY_FILE = "api_key"
# Paths anyone may read: the page itself and liveness. Everything else of the user API needs the key.
OPEN_PATHS = ("/", "/healthz", "/openapi.json")
OPEN_PREFIXES = ("/web/",)
PEER_PREFIX = "/peer/"
MAX_TRACKED_CLIENTS = 4096


def is_loopback_host(host: str) -> bool:
    """Whether a bind address only accepts local connections."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(configured: str | None, required: bool | None, host: str, data_dir: Path) -> str | None:
    """The key the user API demands, or None when it is open.

    `required=None` means: required exactly when the API listens beyond loopback. A required key
    that is not configured is created once in the data dir (mode 0600) and reused.
    """
    if configured:
        return configured
    if required is False or (required is None and is_loopback_host(host)):
        return None
    path = data_dir / API_KEY_FILE
    if path.exists():
        return path.read_text().strip()
    key = "em-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    log.warning("the user API listens on %s: created an API key in %s (send it as 'Authorization: Bearer ...')", host, path)
    return key


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
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")
        return await handler(request)

    return middleware
